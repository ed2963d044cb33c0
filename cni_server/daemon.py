"""The standalone daemon: attach the program to netdevs, serve one handout socket each.

Start-up is all-or-nothing: if any netdev cannot be set up, whatever was done
for the others is undone and the daemon exits with the reason.  On SIGTERM or
SIGINT it stops accepting, closes connections, removes its sockets and pins,
detaches the programs it manages and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpf import bpffs
from bpf.errors import BpffsError
from cni_server.config import StandaloneConfig
from cni_server.control import ControlServer
from cni_server.health import HealthServer
from cni_server.lifecycle import raise_fd_limit, report_ready, run_until_signal
from cni_server.netns import Netns
from cni_server.ownership import Claims, NetdevBusy, OwnershipError
from cni_server.registry import SOCKET_NAME, AllocationSpec, ProgramTable, Registry
from cni_server.safedir import UnsafeDirectory, ensure_dir
from cni_server.server import HandoutServer, Limits
from cni_server.watch import ProgramWatch

log = logging.getLogger(__name__)
DRAIN_SECONDS = 2.0


class DaemonError(Exception):
    """Start-up failed; the message says what and where."""


@dataclass
class StandaloneDaemon:
    cfg: StandaloneConfig
    server: HandoutServer = field(init=False)
    registry: Registry | None = None
    netns: Netns | None = None
    _created_dirs: list[Path] = field(default_factory=list)
    _bpffs_mount: Path | None = None
    _control: ControlServer | None = None
    _watch: ProgramWatch | None = None
    http: HealthServer | None = None
    _ready: bool = False
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.server = HandoutServer(limits=Limits(
            idle_timeout=self.cfg.idle_timeout,
            max_connections=self.cfg.max_connections,
            max_connections_per_socket=self.cfg.max_connections_per_socket,
            handshake_spin=self.cfg.handshake_spin_us / 1e6,
        ))

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        raise_fd_limit(self.cfg.max_connections + 256)
        self.netns = Netns.current()
        claims = Claims(self.netns.inode, {
            "pid": os.getpid(), "mode": "standalone",
            "sockets": str(self.cfg.socket_dir / "<netdev>" / SOCKET_NAME),
            "control": str(self.cfg.control_socket or "")})
        programs = ProgramTable(force_replace=self.cfg.force_replace,
                                bpf_object=self.cfg.bpf_object, metrics=self.server.metrics,
                                claims=claims)
        self.registry = Registry(self.server, self.netns, programs)
        try:
            # Claim every netdev before touching anything: a netdev another daemon
            # serves stops this start with nothing of the other daemon changed.
            self._preflight()
            for netdev in self.cfg.netdevs:
                claims.take(netdev)
            self._prepare_dirs()
            for netdev in self.cfg.netdevs:
                await self._serve_netdev(netdev)
            self._watch = ProgramWatch(self.registry, self.cfg.watch_interval)
            self._watch.start()
            if self.cfg.control_socket is not None:
                self._control = ControlServer(self.cfg.control_socket)
                self._control.register("status", self._status_op)
                await self._control.start()
            if self.cfg.metrics_address:
                self.http = HealthServer(self.cfg.metrics_address, self.server.metrics,
                                         lambda: (self._ready, "starting"))
                await self.http.start()
        except (LookupError, NetdevBusy, OwnershipError) as e:  # LookupError: no such netdev
            await self.stop()
            raise DaemonError(str(e)) from e
        except BaseException:
            await self.stop()
            raise
        self._report_ready()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        await run_until_signal(self.start, self.stop, self._stop)


    async def stop(self) -> None:
        """Undo everything start() did, in reverse; safe to call on a partial start."""
        self._ready = False
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self._control is not None:
            await self._control.close()
            self._control = None
        await self.server.drain(DRAIN_SECONDS)  # let handshakes in flight finish
        if self.registry is not None:
            await self.registry.shutdown(release=True)
        self.server.close()
        if self._bpffs_mount is not None:
            bpffs.unmount(self._bpffs_mount)
            self._bpffs_mount = None
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created_dirs.clear()
        if self.cfg.ready_file is not None:
            self.cfg.ready_file.unlink(missing_ok=True)
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    # -- pieces ----------------------------------------------------------------

    def _preflight(self) -> None:
        """Fail before touching any netdev when a place we must write is unusable,
        naming the place and the option that sets it."""
        _check_writable_dir(self.cfg.socket_dir,
                            f"socket directory {self.cfg.socket_dir} (--socket-dir, socketDir)")
        if self.cfg.control_socket is not None:
            _check_writable_dir(self.cfg.control_socket.parent,
                                f"control socket {self.cfg.control_socket} (--control-socket, "
                                "controlSocket; --no-control-socket turns it off)")

    def _prepare_dirs(self) -> None:
        try:
            if ensure_dir(self.cfg.socket_dir, "socket directory (--socket-dir, socketDir)"):
                self._created_dirs.append(self.cfg.socket_dir)
        except UnsafeDirectory as e:
            raise DaemonError(str(e)) from e
        if self.cfg.pin_dir is not None:
            what = "pin directory (--pin-dir, pinDir)"
            existed = os.path.lexists(self.cfg.pin_dir)
            try:
                # Check before mounting anything there, and again on the bpffs.
                if existed:
                    ensure_dir(self.cfg.pin_dir, what)
                self._bpffs_mount = bpffs.ensure_bpffs(self.cfg.pin_dir)
                ensure_dir(self.cfg.pin_dir, what)
            except UnsafeDirectory as e:
                raise DaemonError(str(e)) from e
            except (OSError, BpffsError) as e:
                raise DaemonError(f"pin directory {self.cfg.pin_dir}: {e}") from e
            if not existed:
                self._created_dirs.append(self.cfg.pin_dir)

    async def _serve_netdev(self, netdev: str) -> None:
        """One allocation per netdev: DIR/<netdev>/afxdp.sock, for the allowed hosts."""
        assert self.registry is not None
        await self.registry.create(AllocationSpec(
            id=netdev, netdevs=(netdev,), hostnames=frozenset(self.cfg.allow_hosts),
            socket_base=self.cfg.socket_dir, pin_base=self.cfg.pin_dir,
            xdp_mode=self.cfg.xdp_mode.value, uid=self.cfg.socket_uid, gid=self.cfg.socket_gid,
            mode=self.cfg.socket_mode, check_peer_netns=self.cfg.check_peer_netns,
            program_object=str(self.cfg.bpf_object or ""), program_name=self.cfg.program_name,
            allow_unbound_xsk=self.cfg.allow_unbound_xsk, umem_limit=self.cfg.max_umem_bytes,
        ))

    def status(self) -> dict[str, Any]:
        allocations = self.registry.allocations.values() if self.registry else []
        return {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "netns": self.netns.inode if self.netns else None,
            "allocations": [a.describe() | {"connections": sum(
                len(lst.connections) for lst in self.server.listeners.values()
                if lst.allocation is a)} for a in allocations],
            "server": self.server.stats(),
            "http": self.http.address if self.http else None,
        }

    async def _status_op(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    def _report_ready(self) -> None:
        self._ready = True
        report_ready(self.cfg.ready_file, self.status())
        log.info("event=ready netdevs=%s sockets=%s", ",".join(self.cfg.netdevs),
                 ",".join(str(p) for p in self.server.listeners))


def _check_writable_dir(path: Path, what: str) -> None:
    """DaemonError unless ``path`` is, or can be created as, a directory we can write."""
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DaemonError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        readonly = os.statvfs(probe).f_flag & os.ST_RDONLY
        reason = "read-only file system" if readonly else f"not writable by uid {os.geteuid()}"
        where = "" if probe == path else f": cannot create it in {probe}"
        raise DaemonError(f"{what}{where}: {reason}")
