"""The standalone front end: attach the program to netdevs, serve one handout socket each.

``afxdp serve``: the node daemon (``cni_server.node``) with a fixed list of
netdevs.  Start-up is all-or-nothing: if any netdev cannot be set up, whatever
was done for the others is undone and the daemon exits with the reason.  On
SIGTERM or SIGINT it stops accepting, closes connections, removes its sockets
and pins, detaches the programs it manages and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from bpf import bpffs
from bpf.errors import BpffsError
from cni_server.config import StandaloneConfig
from cni_server.node import DaemonError, NodeDaemon
from cni_server.ownership import NetdevBusy, OwnershipError
from cni_server.provision import NetdevFactory
from cni_server.safedir import UnsafeDirectory, ensure_dir
from cni_server.spec import SOCKET_NAME, AllocationSpec
from cni_server.state import StateFile
from cni_server.watch import ProgramWatch

log = logging.getLogger(__name__)


def standalone_daemon(cfg: StandaloneConfig) -> NodeDaemon:
    return NodeDaemon(cfg, StandaloneFront(cfg))


class StandaloneFront:
    mode = "standalone"
    release_on_stop = True
    fd_headroom = 256

    def __init__(self, cfg: StandaloneConfig) -> None:
        self.cfg = cfg
        self.force_replace = cfg.force_replace
        # Its netdevs get their programs at start-up: nothing to keep ready for.
        self.warm_programs = 0
        self._created_dirs: list[Path] = []
        self._bpffs_mount: Path | None = None
        self._watch: ProgramWatch | None = None

    def claim_facts(self) -> dict[str, str]:
        return {"sockets": str(self.cfg.socket_dir / "<netdev>" / SOCKET_NAME)}

    def idle_timeout(self) -> float:
        return self.cfg.idle_timeout

    def registry_parts(self) -> tuple[StateFile | None, NetdevFactory | None]:
        return None, None  # no state file: everything is released at stop; real netdevs

    async def prepare(self, node: NodeDaemon) -> None:
        """Claim every netdev before touching anything: a netdev another daemon serves
        stops this start with nothing of the other daemon changed."""
        assert node.claims is not None
        try:
            self._preflight()
            for netdev in self.cfg.netdevs:
                node.claims.take(netdev)
            self._prepare_dirs()
        except (NetdevBusy, OwnershipError) as e:
            raise DaemonError(str(e)) from e

    async def start(self, node: NodeDaemon) -> None:
        assert node.registry is not None
        try:
            for netdev in self.cfg.netdevs:
                await self._serve_netdev(node, netdev)
        except LookupError as e:  # no such netdev
            raise DaemonError(str(e)) from e
        self._watch = ProgramWatch(node.registry, self.cfg.watch_interval)
        self._watch.start()

    async def stop(self, node: NodeDaemon) -> None:
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None

    async def cleanup(self, node: NodeDaemon) -> None:
        if self._bpffs_mount is not None:
            bpffs.unmount(self._bpffs_mount)
            self._bpffs_mount = None
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created_dirs.clear()

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def status(self, node: NodeDaemon) -> dict[str, Any]:
        return {}

    def ready_line(self, node: NodeDaemon) -> str:
        return (f"netdevs={','.join(self.cfg.netdevs)} "
                f"sockets={','.join(str(p) for p in node.server.listeners)}")

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

    async def _serve_netdev(self, node: NodeDaemon, netdev: str) -> None:
        """One allocation per netdev: DIR/<netdev>/afxdp.sock, for the allowed hosts."""
        assert node.registry is not None
        await node.registry.create(AllocationSpec(
            id=netdev, netdevs=(netdev,), hostnames=frozenset(self.cfg.allow_hosts),
            socket_base=self.cfg.socket_dir, pin_base=self.cfg.pin_dir,
            xdp_mode=self.cfg.xdp_mode.value, uid=self.cfg.socket_uid, gid=self.cfg.socket_gid,
            mode=self.cfg.socket_mode, check_peer_netns=self.cfg.check_peer_netns,
            program_object=str(self.cfg.bpf_object or ""), program_name=self.cfg.program_name,
            allow_unbound_xsk=self.cfg.allow_unbound_xsk, umem_limit=self.cfg.max_umem_bytes,
        ))


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
