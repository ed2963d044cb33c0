"""What the daemon does for each CNI request: ADD, DEL, CHECK, STATUS and GC.

Called by the CNI endpoint (``plugin.cniendpoint``) with the request and the fds
it carried.  ADD moves an allocated netdev into the pod's network namespace,
named ``CNI_IFNAME`` there, and configures it; DEL brings it home as it was.
Operations on one netdev are serialised; different netdevs proceed in parallel.
Netlink work runs in worker threads (inside the right namespace).  Errors are
:class:`CniError` with CNI error codes (``docs/cni.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_server.allocation import Allocation
from cni_server.fds import OwnedFd
from cni_server.netdev import (
    MoveRefused,
    NetdevMissing,
    bring_home,
    get_link,
    ifindex_of,
    move_into,
)
from cni_server.netns import Netns
from cni_server.protocol import valid_netdev_name
from cni_server.registry import NotBroughtHome, Registry
from cni_server.spec import AllocationSpec
from plugin.virtual import VirtualError, host_end, plug, unplug

log = logging.getLogger(__name__)

# CNI error codes (spec) and ours (100+).
BAD_ENV = 4
TRY_AGAIN = 11
NOT_ALLOCATED = 101
IN_OTHER_NETNS = 102
NAME_TAKEN = 103
CHECK_FAILED = 104
MOVE_FAILED = 105
BAD_REQUEST = 106
IPAM_FAILED = 108
NOT_OWNER = 109
NETNS_UNUSABLE = 111

# The next datagram of the request's connection (None: closed, timed out or not a
# JSON object): ADD's IPAM result when the plugin ran IPAM while the device moved.
FollowUp = Callable[[], Awaitable[dict[str, Any] | None]]

# Asked before a device moves: may pod (namespace, name) have this allocation?
# Returns why not ("" when it may).
OwnerCheck = Callable[[Allocation, str, str], Awaitable[str]]


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(msg)


def _link_state(name: str) -> dict[str, Any]:
    """ifindex, mac, up and IPv4/IPv6 addresses of ``name`` in the calling thread's netns."""
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        idx = int(link["index"])
        addrs = [f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)
                 if int(a["scope"]) < 253]
    return {"ifindex": idx, "mac": str(link.get("address") or ""), "up": bool(link["flags"] & 1),
            "addresses": addrs}


def _configure(name: str, ipam: dict[str, Any] | None, mac: str) -> dict[str, Any]:
    """In the pod's netns: addresses and routes from the IPAM result; its ifindex
    and MAC.  This is on every pod's start: the ifindex by one ioctl, ``mac`` the
    one it had at home (a move keeps it), and a netlink socket only for addresses
    and routes (none without IPAM: DPDK needs none)."""
    idx = ifindex_of(name)
    if idx is None:
        raise NetdevMissing(f"no netdev named {name!r} in this network namespace")
    ips, routes = (ipam or {}).get("ips", []), (ipam or {}).get("routes", [])
    if ips or routes:
        with IPRoute() as ipr:
            for ip in ips:
                addr, _, plen = str(ip["address"]).partition("/")
                ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
            for route in routes:
                dst, _, plen = str(route["dst"]).partition("/")
                kw: dict[str, Any] = {"dst": dst, "dst_len": int(plen), "oif": idx}
                if route.get("gw"):
                    kw["gateway"] = route["gw"]
                with contextlib.suppress(NetlinkError):  # e.g. the prefix route exists
                    ipr.route("add", **kw)
    return {"ifindex": idx, "mac": mac}


class CniOperations:
    def __init__(self, registry: Registry, check_owner: OwnerCheck | None = None) -> None:
        self.registry = registry
        # The config a CNI ADD carries is written by tenants (NADs): which device it
        # names proves nothing; the pod the runtime names must own the allocation.
        self.check_owner = check_owner
        self._locks: dict[str, asyncio.Lock] = {}

    def handlers(self) -> dict[str, Callable[[dict[str, Any], list[OwnedFd], FollowUp | None],
                                             Awaitable[dict[str, Any]]]]:
        """The operations by the request's ``op``."""
        return {"add": self.add, "del": self.delete, "check": self.check,
                "status": self.status, "gc": self.gc}

    def _lock(self, netdev: str) -> asyncio.Lock:
        return self._locks.setdefault(netdev, asyncio.Lock())

    # -- operations -------------------------------------------------------------------

    def _allocated(self, netdev: str) -> tuple[str, Any]:
        allocation = self.registry.by_netdev(netdev)
        if allocation is None:
            raise CniError(NOT_ALLOCATED, f"device {netdev!r} is not allocated on this node",
                           "the device plugin must allocate it to the pod first")
        return allocation.id, allocation.netdevs[netdev]

    async def add(self, req: dict[str, Any], fds: list[OwnedFd],
                  follow_up: FollowUp | None = None) -> dict[str, Any]:
        netdev, cid = str(req.get("deviceID") or ""), str(req.get("containerID") or "")
        cni_ifname = str(req.get("ifname") or "")
        if not netdev or not cid or not cni_ifname or len(fds) != 1:
            raise CniError(BAD_REQUEST, "add needs deviceID, containerID, ifname and a netns fd")
        if not valid_netdev_name(cni_ifname):  # the pod's network annotation names it
            raise CniError(BAD_ENV, f"CNI_IFNAME {cni_ifname!r} is not a valid interface name",
                           "1 to 15 bytes, no '/', ':' or whitespace")
        target_name = cni_ifname if req.get("rename") else netdev
        pod: dict[str, Any] = req["pod"] if isinstance(req.get("pod"), dict) else {}
        namespace, pod_name = str(pod.get("namespace") or ""), str(pod.get("name") or "")
        async with self._lock(netdev):
            alloc_id, _device = self._allocated(netdev)
            target = Netns(OwnedFd(os.dup(fds[0].fileno())), str(req.get("netns") or ""))
            handed_over = False  # once recorded, the registry owns ``target``
            # Whether the name is free in the pod is asked while kubelet is asked
            # who owns the device: both only read, and the answer counts only once
            # the pod may have it.  (Also the first entry into the pod's netns: one
            # we cannot enter fails there, before anything moves.)
            taken = asyncio.ensure_future(target.run_async(lambda: _exists(target_name)))
            try:
                await self._check_owner(alloc_id, netdev, namespace, pod_name)
                with self.registry.moving(netdev):
                    alloc_id, device = self._allocated(netdev)
                    home = self.registry.netns
                    if device.netns is not home:
                        record = self.registry.attachment(netdev) or {}
                        if device.netns.inode == target.inode and record.get("container_id") == cid:
                            state = await target.run_async(lambda: _link_state(record["ifname"]))
                            return self._result(record["ifname"], state, req)  # a retried ADD
                        raise CniError(IN_OTHER_NETNS, f"device {netdev!r} is already in another "
                                       f"network namespace (container {record.get('container_id')})")
                    spec = self.registry.spec(alloc_id)
                    if spec.virtual_kind:  # first, so a missing bridge fails before any move
                        try:
                            await asyncio.to_thread(plug, host_end(netdev), spec.virtual_bridge)
                        except (VirtualError, NetlinkError) as e:
                            raise CniError(MOVE_FAILED, f"cannot connect virtual device "
                                           f"{netdev!r} on the node", str(e)) from e
                    if await taken:
                        raise CniError(NAME_TAKEN, f"interface {target_name!r} already exists in "
                                       "the pod's network namespace")
                    record = {"netns": str(req.get("netns") or ""), "ifname": target_name,
                              "cni_ifname": cni_ifname, "container_id": cid,
                              "network": str(req.get("network") or "")}
                    ahead = _RecordAhead(self.registry, alloc_id, netdev, record)
                    try:
                        # Moved, named and sized in one request; recorded meanwhile.
                        before = await asyncio.to_thread(move_into, netdev, target.fileno(),
                                                         target_name, int(req.get("mtu") or 0),
                                                         ahead.start_from_thread)
                    except (MoveRefused, NetlinkError, LookupError) as e:
                        # The kernel may have moved it and then refused the rest.
                        settings = e.settings if isinstance(e, MoveRefused) else {}
                        with contextlib.suppress(Exception):
                            if not await asyncio.to_thread(_exists, netdev):
                                await target.run_async(lambda: bring_home(
                                    target_name if _exists(target_name) else netdev, netdev,
                                    home.fileno(), settings))
                        await ahead.take_back()
                        await self._unplug(spec, netdev)
                        raise CniError(MOVE_FAILED, f"cannot move {netdev!r} into the pod", str(e)
                                       ) from e
                    try:
                        ipam = await _ipam_result(req, follow_up)
                        state = await target.run_async(
                            lambda: _configure(target_name, ipam, before["orig_mac"]))
                    except Exception as e:
                        with contextlib.suppress(Exception):
                            await target.run_async(lambda: bring_home(
                                target_name if _exists(target_name) else netdev, netdev,
                                home.fileno(), before))
                        await ahead.take_back()
                        await self._unplug(spec, netdev)
                        if isinstance(e, CniError):
                            raise
                        raise CniError(MOVE_FAILED, f"cannot configure {netdev!r} in the pod",
                                       str(e)) from e
                    record = {**record, **before}
                    await self.registry.attach(alloc_id, netdev, record, target, target_name,
                                               int(state["ifindex"]),
                                               on_disk=await ahead.written(record))
                    handed_over = True
            finally:
                try:
                    await _settled(taken)
                finally:
                    if not handed_over:
                        target.close()
        return self._result(target_name, state, req)

    async def _check_owner(self, alloc_id: str, netdev: str, namespace: str, pod_name: str
                           ) -> None:
        if self.check_owner is None:
            return
        if not namespace or not pod_name:
            raise CniError(NOT_OWNER, "CNI_ARGS names no pod (K8S_POD_NAMESPACE, "
                           "K8S_POD_NAME): cannot check who may have the device")
        why = await self.check_owner(self.registry.allocations[alloc_id], namespace, pod_name)
        if why:
            raise CniError(NOT_OWNER, f"device {netdev!r} is not allocated to pod "
                           f"{namespace}/{pod_name}", why)

    @staticmethod
    def _result(name: str, state: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
        return {"interface": {"name": name, "mac": state["mac"], "sandbox": req.get("netns", "")}}

    async def delete(self, req: dict[str, Any], fds: list[OwnedFd],
                     follow_up: FollowUp | None = None) -> dict[str, Any]:
        netdev, cid = str(req.get("deviceID") or ""), str(req.get("containerID") or "")
        if not netdev:
            netdev = self._by_container(cid, str(req.get("ifname") or "")) or ""
        if not netdev:
            return {"released": False}  # nothing of ours: DEL is idempotent
        async with self._lock(netdev):
            allocation = self.registry.by_netdev(netdev)
            if allocation is None:
                return {"released": False}
            record = self.registry.attachment(netdev)
            if record is None or (cid and record.get("container_id") not in ("", cid)):
                return {"released": False}
            with self.registry.moving(netdev):
                try:
                    # Answered once the device is home, not once that is on disk:
                    # a daemon that dies between the two finds it home at its next
                    # start (its record names a pod that no longer holds it).
                    await self.registry.bring_home(allocation.id, netdev, wait_for_disk=False)
                except NotBroughtHome as e:  # the runtime retries a failed DEL
                    raise CniError(MOVE_FAILED, f"cannot bring {netdev!r} back to the node",
                                   str(e)) from e
                await self._unplug(self.registry.spec(allocation.id), netdev)
        return {"released": True}

    @staticmethod
    async def _unplug(spec: AllocationSpec, netdev: str) -> None:
        """A virtual device's node end off its bridge (the pod no longer has the other end)."""
        if spec.virtual_kind:
            try:
                await asyncio.to_thread(unplug, host_end(netdev))
            except NetlinkError as e:
                log.warning("event=virtual_unplug_failed netdev=%s error=%r", netdev, str(e))

    def _by_container(self, cid: str, cni_ifname: str) -> str | None:
        for netdev, rec in self.registry.attachments():
            if rec.get("container_id") == cid and rec.get("cni_ifname") in ("", cni_ifname):
                return netdev
        return None

    async def check(self, req: dict[str, Any], fds: list[OwnedFd],
                    follow_up: FollowUp | None = None) -> dict[str, Any]:
        netdev, cid = str(req.get("deviceID") or ""), str(req.get("containerID") or "")
        _, device = self._allocated(netdev)
        record = self.registry.attachment(netdev)
        if record is None or record.get("container_id") != cid:
            raise CniError(CHECK_FAILED, f"device {netdev!r} is not attached to container {cid}")
        try:
            state = await device.netns.run_async(lambda: _link_state(record["ifname"]))
        except LookupError:
            raise CniError(CHECK_FAILED, f"{record['ifname']!r} is missing from the pod's "
                           "network namespace") from None
        if not state["up"]:
            raise CniError(CHECK_FAILED, f"{record['ifname']!r} is down")
        want = {str(ip["address"]) for ip in req.get("ips", [])}
        missing = sorted(want - set(state["addresses"]))
        if missing:
            raise CniError(CHECK_FAILED, f"{record['ifname']!r} lacks address(es) "
                           f"{', '.join(missing)}")
        return {"checked": True}

    async def status(self, req: dict[str, Any], fds: list[OwnedFd],
                     follow_up: FollowUp | None = None) -> dict[str, Any]:
        return {"allocations": len(self.registry.allocations)}

    async def gc(self, req: dict[str, Any], fds: list[OwnedFd],
                 follow_up: FollowUp | None = None) -> dict[str, Any]:
        """Release this network's attachments not in its valid list (CNI 1.1 GC).  Only
        attachments recorded for the same network name: GC for network A must leave
        network B's devices in their pods (and records without a network, from an
        earlier release, alone)."""
        network = str(req.get("network") or "")
        if not network:
            raise CniError(BAD_REQUEST, "gc needs the network name")
        valid = {(str(a.get("containerID")), str(a.get("ifname")))
                 for a in req.get("valid", []) if isinstance(a, dict)}
        released = []
        for netdev, rec in list(self.registry.attachments()):
            if rec.get("network") != network:
                continue
            if (rec.get("container_id"), rec.get("cni_ifname")) not in valid:
                try:
                    await self.delete({"deviceID": netdev,
                                       "containerID": rec.get("container_id")}, [])
                except CniError as e:  # the others are still collected
                    log.warning("event=gc_release_failed netdev=%s msg=%r details=%r",
                                netdev, e.msg, e.details)
                    continue
                released.append(netdev)
        return {"released": released}


async def _ipam_result(req: dict[str, Any], follow_up: FollowUp | None
                       ) -> dict[str, Any] | None:
    """ADD's IPAM result: in the request, or (``"ipam": "follows"``) the next datagram,
    ``{"ipam": {...}}``, which the plugin sends once its IPAM plugin, run while the
    device moved, has answered.  CniError when IPAM failed or nothing came: the
    caller brings the device home."""
    ipam = req.get("ipam")
    if ipam != "follows":
        return ipam if isinstance(ipam, dict) else None
    msg = await follow_up() if follow_up is not None else None
    if msg is None or not isinstance(msg.get("ipam"), dict):
        why = (str(msg.get("ipam_failed") or "no IPAM result in the follow-up")
               if msg is not None else "the plugin sent no IPAM result")
        raise CniError(IPAM_FAILED, "IPAM gave the pod no addresses; the device is back on "
                       "the node", why)
    result: dict[str, Any] = msg["ipam"]
    return result


class _RecordAhead:
    """ADD's record, written while the kernel moves the device (Registry.record_ahead):
    started from the mover's thread once the device's settings are read, just
    before the move."""

    def __init__(self, registry: Registry, alloc_id: str, netdev: str,
                 record: dict[str, str]) -> None:
        self.registry, self.alloc_id, self.netdev = registry, alloc_id, netdev
        self.record = record
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Future[None] | None = None

    def start_from_thread(self, settings: dict[str, str]) -> None:
        self.loop.call_soon_threadsafe(self._start, {**self.record, **settings})

    def _start(self, record: dict[str, str]) -> None:
        self.record = record
        self.task = asyncio.ensure_future(
            self.registry.record_ahead(self.alloc_id, self.netdev, record))

    async def written(self, record: dict[str, str]) -> bool:
        """Whether ``record`` is what was written, and the write succeeded (if not,
        Registry.attach writes it)."""
        if self.task is None:
            return False
        await _settled(self.task)
        return not self.task.cancelled() and self.task.exception() is None \
            and record == self.record

    async def take_back(self) -> None:
        """The move or the set-up failed: off the disk again."""
        if self.task is None:
            return
        await _settled(self.task)
        await self.registry.forget_ahead(self.netdev)


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait until ``task`` has ended, whatever its outcome (which is not wanted)."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: an error nobody needed is not logged as lost


def _exists(name: str) -> bool:
    return ifindex_of(name) is not None
