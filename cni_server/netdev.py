"""Netdevs over rtnetlink (pyroute2) in the calling thread's netns: facts, and moves
between network namespaces.

pyroute2's synchronous API refuses to run inside a running event loop; call
these from a worker thread (``asyncio.to_thread`` or ``Netns.run_async``).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_server.rtread import lookup

_SIOCGIFINDEX = 0x8933
_IFNAMSIZ = 16


def ifindex_of(name: str) -> int | None:
    """``name``'s ifindex (its name or a short altname) in the calling thread's
    netns, or None if there is no such netdev.

    One ioctl (SIOCGIFINDEX) on a throwaway socket: a tenth of what a netlink
    socket and a lookup cost, and this is on every pod's start.  Unlike
    ``if_nametoindex()``, which says "no interface" also when it could not even
    open its socket, a failure to ask raises OSError.  ValueError for what cannot
    be an interface's name (empty, or longer than the kernel's 15 bytes).
    """
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ:
        raise ValueError(f"{name!r} is not an interface name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            reply = fcntl.ioctl(s, _SIOCGIFINDEX, struct.pack("16si", raw, 0))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
    return int(struct.unpack("16si", reply)[1])


class NetdevMissing(LookupError):
    """No netdev of that name in this network namespace."""


@dataclass(frozen=True)
class LinkInfo:
    name: str
    ifindex: int
    mac: str
    num_rx_queues: int
    num_tx_queues: int
    up: bool

    @property
    def queue_slots(self) -> int:
        """XSKMAP slots to cover every queue an AF_XDP socket may bind to.

        num_rx/tx_queues are the counts the driver allocated (its maximum), so
        they cover the current and any later combined channel count.
        """
        return max(self.num_rx_queues, self.num_tx_queues, 1)


def link_info(name: str) -> LinkInfo:
    """Look up ``name``; raises NetdevMissing when there is no such link here."""
    with IPRoute() as ipr:
        return _info(get_link(ipr, name))


def _info(link: Any) -> LinkInfo:
    return LinkInfo(
        name=link.get("ifname"),
        ifindex=int(link["index"]),
        mac=str(link.get("address") or ""),
        num_rx_queues=int(link.get("num_rx_queues") or 1),
        num_tx_queues=int(link.get("num_tx_queues") or 1),
        up=bool(link["flags"] & 1),
    )


def _settings(link: Any) -> dict[str, str]:
    return {"orig_up": "1" if link["flags"] & 1 else "0",
            "orig_mtu": str(link.get("mtu") or 0),
            "orig_mac": str(link.get("address") or "")}


def get_link(ipr: IPRoute, name: str) -> Any:
    """The link called ``name`` here; NetdevMissing when there is none."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == 19:  # ENODEV
            raise NetdevMissing(f"no netdev named {name!r} in this network namespace") from e
        raise


class MoveRefused(Exception):
    """The kernel refused (part of) a move into a pod; ``settings`` are the device's
    from before, for bring_home."""

    def __init__(self, settings: dict[str, str], why: str) -> None:
        super().__init__(why)
        self.settings = settings


def move_into(name: str, target_fd: int, new_name: str, mtu: int,
              before_move: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Move ``name`` into the netns ``target_fd`` refers to, named ``new_name`` there,
    with ``mtu`` (0: as it is), and up, in one netlink request.  The kernel applies
    the move first: a refused name or MTU leaves the device moved (the caller checks
    the name before and brings it home after a failure: MoveRefused).  Returns its
    settings from before (admin state, MTU, MAC), for DEL to give back; they are
    also passed to ``before_move`` (in this thread), just before the request."""
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        settings = _settings(link)
        if before_move is not None:
            before_move(settings)
        kw: dict[str, Any] = {"net_ns_fd": target_fd, "state": "up"}
        if new_name != name:
            kw["ifname"] = new_name
        if mtu:
            kw["mtu"] = mtu
        try:
            ipr.link("set", index=int(link["index"]), **kw)
        except NetlinkError as e:
            raise MoveRefused(settings, str(e)) from e
        return settings


class NotTheDevice(LookupError):
    """The netdev under the recorded name is not the one ADD moved (another ifindex):
    left where it is, so that a pod cannot have a link of its own sent to the node."""


class HomeNameTaken(Exception):
    """The device went home but its own name is taken there: it is on the node under
    the name it had in the pod (``pod_name``)."""

    def __init__(self, pod_name: str, why: str) -> None:
        super().__init__(why)
        self.pod_name = pod_name


def bring_home(ifname: str, orig: str, home_fd: int, settings: dict[str, str] | None = None,
               ifindex: int = 0) -> None:
    """In a pod's netns: send ``ifname`` to the netns ``home_fd`` refers to as it was
    before ADD, in one request: its original name, MTU, MAC and admin state
    (``settings``, from move_into at ADD).  The kernel moves it first, which takes it
    down and drops its addresses; renames, sizes and re-addresses it at home; and
    sets it up last.  A device found under ``orig`` already (an earlier attempt
    renamed it) is moved as it is.

    ``ifindex``: the device's in the pod, when known.  A pod that may change its own
    links (NET_ADMIN) could rename ours and give one of its own our name; that one
    is not moved (NotTheDevice): the node would get a link whose other end the pod
    holds, up.

    A name taken on the node: when both names are taken there the kernel refuses the
    move and it stays here (NetlinkError); when only ``orig`` is, it is moved and then
    refused the name, and HomeNameTaken says so (see ``send_back``)."""
    settings = settings or {}
    with IPRoute() as ipr:
        idx = _index(ipr, ifname, orig)
        if ifindex and idx != ifindex:
            raise NotTheDevice(f"{ifname!r} in the pod's network namespace is not the "
                               f"device ADD moved there (ifindex {idx}, not {ifindex})")
        kw: dict[str, Any] = {"net_ns_fd": home_fd}
        if ifname != orig:
            kw["ifname"] = orig
        if int(settings.get("orig_mtu") or 0):
            kw["mtu"] = int(settings["orig_mtu"])
        if settings.get("orig_mac"):
            kw["address"] = settings["orig_mac"]
        if settings.get("orig_up") == "1":
            kw["state"] = "up"
        try:
            ipr.link("set", index=idx, **kw)
        except NetlinkError as e:
            if e.code == errno.EEXIST and ifname != orig and _gone(ipr, idx):
                raise HomeNameTaken(ifname, f"{orig!r} is taken on the node") from e
            raise


def _index(ipr: IPRoute, ifname: str, orig: str) -> int:
    facts = lookup(ipr, ifname)
    if facts is None and ifname != orig:
        facts = lookup(ipr, orig)
    if facts is None:
        raise NetdevMissing(f"no netdev named {ifname!r} in this network namespace")
    return facts[1]


def _gone(ipr: IPRoute, index: int) -> bool:
    try:
        ipr.link("get", index=index)
    except NetlinkError as e:
        return bool(e.code == errno.ENODEV)
    return False


def send_back(pod_name: str, pod_fd: int) -> None:
    """On the node: a device HomeNameTaken left here under its pod's name goes back
    into the pod (the netns ``pod_fd`` refers to), where its record says it is, so a
    later DEL finds it.  Down and without addresses: the pod is being deleted."""
    with IPRoute() as ipr:
        ipr.link("set", index=_index(ipr, pod_name, pod_name), net_ns_fd=pod_fd)
