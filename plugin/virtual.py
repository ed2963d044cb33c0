"""Virtual devices: interface pairs the daemon creates for pools without spare NICs.

Device ``vx0`` of a virtual pool is a pair: ``vx0``, the end the pod gets
(moved into its netns by CNI ADD, carrying our XDP program), and ``vx0h``,
the end that stays on the node, enslaved to the pool's bridge while the pod
runs.  A pair is a veth pair, or a netkit pair where the kernel has netkit
(CONFIG_NETKIT, Linux >= 6.7); both ends get one queue each, so a pod's
AF_XDP socket on queue 0 sees every frame.

Every function acts in the calling thread's network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_server.spec import AllocationSpec

log = logging.getLogger(__name__)
_PROBE = "afxnkprobe"


def host_end(name: str) -> str:
    """The node end of virtual device ``name``."""
    return name + "h"


class VirtualError(Exception):
    """A virtual device cannot be created or connected."""


def netkit_supported() -> bool:
    """Whether this kernel can create netkit devices (a probe pair, removed again)."""
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=_PROBE, kind="netkit")
        except NetlinkError as e:
            if e.code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
                return False
            if e.code != errno.EEXIST:
                raise
        with contextlib.suppress(NetlinkError):
            ipr.link("del", ifname=_PROBE)
        return True


def resolve_kind(kind: str) -> str:
    """The kind of pair to create for a pool's ``virtual.kind`` (auto, veth, netkit)."""
    if kind == "veth":
        return "veth"
    if netkit_supported():
        return "netkit"
    if kind == "netkit":
        raise VirtualError(f"this kernel ({os.uname().release}) cannot create netkit devices "
                           "(it needs CONFIG_NETKIT, Linux >= 6.7): use kind veth or auto")
    return "veth"


def _exists(ipr: IPRoute, name: str) -> bool:
    return bool(ipr.link_lookup(ifname=name))


def ensure_pair(name: str, host: str, kind: str) -> bool:
    """Create the pair ``name``/``host`` unless ``name`` exists; True when created."""
    with IPRoute() as ipr:
        if _exists(ipr, name):
            return False
        if _exists(ipr, host):  # a half-gone pair: its pod end went with a pod netns
            ipr.link("del", ifname=host)
        if kind == "netkit":
            # pyroute2 does not encode netkit's peer attributes; iproute2 >= 6.7 does.
            proc = subprocess.run(["ip", "link", "add", name, "type", "netkit", "mode", "l2",
                                   "peer", "name", host], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                raise VirtualError(f"cannot create netkit pair {name}/{host}: "
                                   f"{proc.stderr.strip()} (needs iproute2 >= 6.7)")
        else:
            try:
                ipr.link("add", ifname=name, kind="veth", num_rx_queues=1, num_tx_queues=1,
                         peer={"ifname": host, "num_rx_queues": 1, "num_tx_queues": 1})
            except NetlinkError as e:
                raise VirtualError(f"cannot create veth pair {name}/{host}: {e}") from e
        for end in (host, name):
            ipr.link("set", index=ipr.link_lookup(ifname=end)[0], state="up")
    log.info("event=virtual_device_created netdev=%s host_end=%s kind=%s", name, host, kind)
    return True


def delete_pair(host: str) -> None:
    """Delete the pair through its node end (the other end goes with it); idempotent."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=host)
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise
            return
    log.info("event=virtual_device_deleted host_end=%s", host)


def plug(host: str, bridge: str) -> None:
    """Bring the node end up, enslaved to ``bridge`` when one is named."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host)
        if not idx:
            raise VirtualError(f"the node end {host} of a virtual device is missing")
        if bridge:
            master = ipr.link_lookup(ifname=bridge)
            if not master:
                raise VirtualError(f"bridge {bridge} does not exist on this node")
            ipr.link("set", index=idx[0], master=master[0])
        ipr.link("set", index=idx[0], state="up")


def unplug(host: str) -> None:
    """Take the node end off its bridge (idempotent; a missing end is fine)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host)
        if idx:
            ipr.link("set", index=idx[0], master=0)


class VirtualDevices:
    """The registry's NetdevFactory for virtual pools: an allocation whose spec names
    a pair kind gets its pair made (and removed at release)."""

    def make(self, spec: AllocationSpec, netdev: str) -> bool:
        return bool(spec.virtual_kind) and ensure_pair(netdev, host_end(netdev),
                                                       spec.virtual_kind)

    def unmake(self, spec: AllocationSpec, netdev: str) -> None:
        if spec.virtual_kind:
            delete_pair(host_end(netdev))
