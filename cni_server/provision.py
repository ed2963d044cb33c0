"""What an allocation is made of on the node, made and unmade: the registry's hands.

The registry (``cni_server.registry``) decides and records; the provisioner does
the side effects: netdevs a factory makes (virtual pools), our program on each
netdev (through the program table), the socket and pin directories, pins, the
served sockets; and moving a netdev home from a pod.  Building is all or nothing:
a failure undoes every step taken, and so does a failure of whatever the caller
does inside ``building`` (recording and saving the allocation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from bpf import bpffs
from bpf.errors import BpffsError
from bpf.program import XdpMode
from cni_server.allocation import AllocatedDevice, Allocation
from cni_server.netdev import HomeNameTaken, bring_home, link_info, send_back
from cni_server.netns import Netns, NetnsError
from cni_server.programs import ProgramTable, RegistryError
from cni_server.safedir import UnsafeDirectory, ensure_dir
from cni_server.server import HandoutServer
from cni_server.spec import PIN_NAME, AllocationSpec

log = logging.getLogger(__name__)


class NotBroughtHome(Exception):
    """A netdev could not be moved back from a pod's netns, and is still there."""


class NetdevFactory(Protocol):
    """Makes the netdevs an allocation asks for, when it asks for ones that do not
    exist yet (virtual pools); the core knows no kind of netdev itself."""

    def make(self, spec: AllocationSpec, netdev: str) -> bool:
        """Make ``netdev`` if ``spec`` asks for it to be made; whether it did."""
        ...

    def unmake(self, spec: AllocationSpec, netdev: str) -> None:
        """Remove what ``make`` made for ``netdev`` (nothing for a netdev it did not make)."""
        ...


class Provisioner:
    def __init__(self, server: HandoutServer, netns: Netns, programs: ProgramTable,
                 factory: NetdevFactory | None = None) -> None:
        self.server = server
        self.netns = netns  # the daemon's own
        self.programs = programs
        self.factory = factory

    @contextlib.asynccontextmanager
    async def building(self, spec: AllocationSpec) -> AsyncIterator[Allocation]:
        """The allocation ``spec`` describes, attached, pinned and served; every step
        is undone if building fails or the caller's block raises."""
        async with contextlib.AsyncExitStack() as undo:
            devices: dict[str, AllocatedDevice] = {}
            aliases: dict[str, str] = {}
            if spec.own_socket_base:
                self._mkdir(spec.socket_base, spec.socket_base.parent, undo.callback)
            for netdev in spec.netdevs:
                where, ifname = self.locate(spec, netdev)
                factory = self.factory
                if factory is not None and where is None and await asyncio.to_thread(
                        factory.make, spec, netdev):
                    undo.callback(_undo_step, factory.unmake, spec, netdev)
                program = await self.programs.acquire(netdev, XdpMode(spec.xdp_mode), where,
                                                      ifname, spec.program_choice())
                undo.push_async_callback(_undo_async_step, self.programs.release, netdev)
                if where is not None:
                    undo.callback(_undo_step, where.close)
                self._mkdir(spec.socket_dir(netdev), spec.socket_base, undo.callback)
                pin = spec.pin_path(netdev)
                if pin is not None and spec.pin_base is not None:
                    if spec.own_socket_base:  # the allocation's own pin directory too
                        self._mkdir(spec.pin_base, spec.pin_base.parent, undo.callback)
                    self._mkdir(pin.parent, spec.pin_base, undo.callback)
                    if not (spec.await_cni and where is None):  # else pinned at CNI ADD
                        bpffs.pin(program.map_fd, pin, uid=spec.uid, gid=spec.gid,
                                  mode=spec.mode)
                        undo.callback(_undo_step, bpffs.unpin, pin)
                if spec.pin_placeholder:
                    spot = spec.socket_dir(netdev) / PIN_NAME
                    spot.touch(mode=0o644)
                    undo.callback(_undo_step, spot.unlink, missing_ok=True)
                devices[netdev] = AllocatedDevice(netdev, program, where or self.netns,
                                                  spec.queues, pin,
                                                  awaiting_cni=spec.await_cni and where is None)
                if where is not None and ifname != netdev:
                    aliases[ifname] = netdev
            allocation = Allocation(
                id=spec.id, netdevs=devices, hostnames_allowed=spec.hostnames,
                socket_paths=spec.socket_paths(), check_peer_netns=spec.check_peer_netns,
                pool=spec.pool, owner=spec.owner, idle_timeout=spec.idle_timeout,
                aliases=aliases, allow_unbound_xsk=spec.allow_unbound_xsk,
                umem_limit=spec.umem_limit,
            )
            self.server.serve(allocation, mode=spec.mode, uid=spec.uid, gid=spec.gid)
            undo.callback(_undo_step, self.server.stop_serving, spec.id)
            yield allocation
            undo.pop_all()

    async def tear_down(self, spec: AllocationSpec, *, detach: bool) -> None:
        """Remove pins and directories, drop program references (detach: and let the
        program go with the last one, and unmake made netdevs).  Not served any more,
        and every netdev home (or gone) already."""
        for netdev in spec.netdevs:
            pin = spec.pin_path(netdev)
            if pin is not None:
                bpffs.unpin(pin)
                with contextlib.suppress(OSError):
                    pin.parent.rmdir()
            if spec.pin_placeholder:
                (spec.socket_dir(netdev) / PIN_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                spec.socket_dir(netdev).rmdir()
            await self.programs.release(netdev, detach=detach)
            if self.factory is not None and detach:
                try:
                    await asyncio.to_thread(self.factory.unmake, spec, netdev)
                except Exception as e:  # the rest of the release must still happen
                    log.warning("event=netdev_unmake_failed netdev=%s error=%r", netdev, str(e))
        if spec.own_socket_base:
            with contextlib.suppress(OSError):
                spec.socket_base.rmdir()
        if spec.pin_base is not None and spec.own_socket_base:
            with contextlib.suppress(OSError):
                spec.pin_base.rmdir()

    def locate(self, spec: AllocationSpec, netdev: str) -> tuple[Netns | None, str]:
        """Where a netdev of a (restored) allocation is: a pod's netns per its attachment
        record, if that netns still holds it; else the daemon's (None)."""
        record = spec.attached.get(netdev)
        if not record:
            return None, ""
        try:
            where = Netns.open(Path(record["netns"]))
        except (NetnsError, KeyError):
            log.info("event=attachment_gone netdev=%s netns=%s", netdev, record.get("netns"))
            return None, ""
        ifname = record.get("ifname") or netdev
        try:
            where.run(lambda: link_info(ifname))
        except LookupError:
            where.close()
            log.info("event=attachment_gone netdev=%s ifname=%s", netdev, ifname)
            return None, ""
        return where, ifname

    async def move_home(self, device: AllocatedDevice, record: dict[str, str]) -> int | None:
        """Bring ``device`` home from its pod as it was before ADD (name, MTU, MAC, admin
        state, per ``record``).  Its ifindex at home (0: not known); None if it went
        with its pod (a veth end whose peer went with the pod's namespace).
        NotBroughtHome if it is still in the pod (the kernel refused the move: its
        name taken on the node, say)."""
        netdev = device.name
        ifname = record.get("ifname") or netdev
        # Records from before the admin state was recorded: it was up.
        settings = {**record, "orig_up": record.get("orig_up", "1")}
        in_pod = device.program.ifindex  # (recorded at ADD, found again at a restart)
        try:
            await device.netns.run_async(
                lambda: bring_home(ifname, netdev, self.netns.fileno(), settings, in_pod))
        except HomeNameTaken as e:
            await self._send_back(device, e)
            raise NotBroughtHome(f"{netdev} is still in the pod's network namespace: "
                                 f"{e}") from None
        except (NetlinkError, LookupError) as e:
            if await _still_there(device, ifname, netdev):
                log.warning("event=netdev_not_brought_home netdev=%s in=%s reason=%r", netdev,
                            record.get("netns"), str(e))
                raise NotBroughtHome(f"{netdev} is still in the pod's network namespace: "
                                     f"{e}") from None
            log.info("event=netdev_gone_with_its_pod netdev=%s reason=%r", netdev, str(e))
            return None
        log.info("event=netdev_brought_home netdev=%s from=%s", netdev, record.get("netns"))
        # Its ifindex at home: one ioctl, run right here when this thread is home
        # (the daemon's loop is), where a netlink lookup took a worker thread and
        # a socket (1.7 ms of every DEL).
        try:
            return await self.netns.run_async(lambda: socket.if_nametoindex(netdev))
        except OSError:
            return 0

    @staticmethod
    async def _send_back(device: AllocatedDevice, taken: HomeNameTaken) -> None:
        """The device came home but its name is taken here: back into its pod, where
        its record says it is, for the next DEL."""
        try:
            await asyncio.to_thread(send_back, taken.pod_name, device.netns.fileno())
        except (NetlinkError, LookupError) as e:
            # Left on the node under its pod's name; the next DEL finds it gone from
            # the pod and records it home.
            log.error("event=netdev_not_sent_back netdev=%s name=%s reason=%r", device.name,
                      taken.pod_name, str(e))
        else:
            log.warning("event=netdev_not_brought_home netdev=%s reason=%r", device.name,
                        str(taken))

    @staticmethod
    def pin_for_pod(spec: AllocationSpec, device: AllocatedDevice, *, in_pod: bool) -> None:
        """A CNI-moved netdev's map: pinned where its pod looks while it is there,
        unpinned when it is home.  A failure is logged, not raised: the move is done
        and recorded either way, and the pod still has its socket."""
        if device.pin is None:
            return
        try:
            if in_pod:
                bpffs.pin(device.program.map_fd, device.pin, uid=spec.uid, gid=spec.gid,
                          mode=spec.mode)
            else:
                bpffs.unpin(device.pin)
        except (BpffsError, OSError) as e:
            log.error("event=pin_failed netdev=%s pin=%s error=%r", device.name, device.pin,
                      str(e))

    @staticmethod
    def repin(spec: AllocationSpec, device: AllocatedDevice) -> None:
        """The pin of a netdev whose program (and map) was replaced: the new map."""
        pin = spec.pin_path(device.name)
        if pin is not None:
            bpffs.unpin(pin)
            if not device.awaiting_cni:  # else pinned at CNI ADD
                bpffs.pin(device.program.map_fd, pin, uid=spec.uid, gid=spec.gid,
                          mode=spec.mode)

    @staticmethod
    def _mkdir(path: Path, inside: Path, on_undo: Callable[..., Any]) -> None:
        """A directory of ours (root, 0755) in one the daemon made safe at start.
        Clients get access through the socket's or pin's own owner and mode: a
        directory they owned would let them replace what the daemon put there."""
        try:
            created = ensure_dir(path, "directory", inside=inside)
        except (OSError, UnsafeDirectory) as e:
            raise RegistryError(f"cannot make directory {path}: {e}") from e
        if created:
            on_undo(_rmdir_quietly, path)


async def _still_there(device: AllocatedDevice, *names: str) -> bool:
    def look() -> bool:
        for name in names:
            try:
                link_info(name)
                return True
            except LookupError:
                pass
        return False
    try:
        return await device.netns.run_async(look)
    except (NetlinkError, NetnsError):
        return False


def _undo_step(fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """Undo one step of a failed create; a failure here is logged, not raised, so
    the error that made the create fail is the one the caller sees."""
    try:
        fn(*args, **kw)
    except Exception as e:
        log.error("event=undo_failed step=%s error=%r", getattr(fn, "__qualname__", fn), str(e))


async def _undo_async_step(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception as e:
        log.error("event=undo_failed step=%s error=%r", getattr(fn, "__qualname__", fn), str(e))


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
