"""The node daemon: one lifecycle for every front end.

``NodeDaemon`` owns what every node daemon has: the handout server and its
limits, the daemon's netns, the claim on the netdevs it serves, the program
table and the registry, the control socket, ``/metrics`` and the probes, the
ready file, and the order things start and stop in.  A :class:`FrontEnd` says
what is served: the standalone one (``cni_server.standalone``) a fixed netdev
list; the Kubernetes one (``plugin.kubernetes``) pools, the device plugin, the
CNI endpoint and PodResources.

Start-up is all-or-nothing: a failure undoes what was done and is raised.  On
SIGTERM or SIGINT it stops accepting, lets handshakes in flight finish, and
stops; whether allocations are released (standalone) or kept for running pods
and the next start (Kubernetes) is the front end's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import socket
import time
from typing import Any, Protocol

from cni_server import logs
from cni_server.config import NodeSettings
from cni_server.control import ControlServer
from cni_server.health import HealthServer
from cni_server.lifecycle import raise_fd_limit, report_ready, run_until_signal
from cni_server.netns import Netns
from cni_server.ownership import Claims
from cni_server.programs import ProgramTable
from cni_server.provision import NetdevFactory
from cni_server.registry import Registry
from cni_server.server import HandoutServer, Limits
from cni_server.state import StateFile
from cni_server.tuning import log_node_hints
from cni_server.warm import WarmPrograms

log = logging.getLogger(__name__)
DRAIN_SECONDS = 2.0
SETTLE_AFTER = 0.5  # seconds after ready: see _settle_heap


class DaemonError(Exception):
    """Start-up failed; the message says what and where."""


class FrontEnd(Protocol):
    """What a kind of node daemon adds to the core, called in this order:
    ``prepare`` (before the registry exists), ``start``, and on the way down
    ``stop`` (before connections drain) and ``cleanup`` (after the registry's
    shutdown)."""

    mode: str  # in the netdev claims and the status: "standalone", "kubernetes"
    release_on_stop: bool  # detach and remove everything at stop, or keep it for pods
    fd_headroom: int  # fds beyond the connections: programs, maps, sockets, the daemon's own
    force_replace: bool  # take a netdev whose XDP program is not ours
    warm_programs: int  # fresh programs kept ready for attaches (cni_server.warm); 0: none

    def claim_facts(self) -> dict[str, str]: ...
    def idle_timeout(self) -> float: ...
    async def prepare(self, node: NodeDaemon) -> None: ...
    def registry_parts(self) -> tuple[StateFile | None, NetdevFactory | None]: ...
    async def start(self, node: NodeDaemon) -> None: ...
    async def stop(self, node: NodeDaemon) -> None: ...
    async def cleanup(self, node: NodeDaemon) -> None: ...
    def ready(self) -> tuple[bool, str]: ...
    def status(self, node: NodeDaemon) -> dict[str, Any]: ...
    def ready_line(self, node: NodeDaemon) -> str: ...


class NodeDaemon:
    def __init__(self, settings: NodeSettings, front: FrontEnd) -> None:
        self.settings = settings
        self.front = front
        self.server = HandoutServer(limits=Limits(
            idle_timeout=front.idle_timeout(),
            max_connections=settings.max_connections,
            max_connections_per_socket=settings.max_connections_per_socket,
            handshake_spin=settings.handshake_spin_us / 1e6,
        ))
        self.netns: Netns | None = None
        self.claims: Claims | None = None
        self.registry: Registry | None = None
        self.warm: WarmPrograms | None = None
        self.http: HealthServer | None = None
        self._control: ControlServer | None = None
        self._started = False
        self._settle: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        raise_fd_limit(s.max_connections + self.front.fd_headroom)
        logs.follow_loop(asyncio.get_running_loop())
        self.server.metrics.track(self.server.metrics.log_waiting, logs.waiting_bytes)
        self.netns = Netns.current()
        self.claims = Claims(self.netns.inode, {
            "pid": os.getpid(), "mode": self.front.mode, **self.front.claim_facts(),
            "control": str(s.control_socket or "")})
        try:
            await self.front.prepare(self)
            table = ProgramTable(force_replace=self.front.force_replace,
                                 bpf_object=s.bpf_object, metrics=self.server.metrics,
                                 claims=self.claims)
            self.registry = Registry(self.server, self.netns, table,
                                     *self.front.registry_parts())
            if self.front.warm_programs:
                self.warm = WarmPrograms(self.front.warm_programs, self.registry.wait_quiet,
                                         self.server.metrics)
                await self.warm.start()
                table.warm = self.warm
            await self.front.start(self)
            if s.control_socket is not None:
                self._control = ControlServer(s.control_socket)
                self._control.register("status", self._status_op)
                await self._control.start()
            if s.metrics_address:
                self.http = HealthServer(s.metrics_address, self.server.metrics, self.ready)
                await self.http.start()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        # Soon, not now: kubelet dials back for the device list right after the
        # device plugin registers, and it should not wait for this.
        self._settle = asyncio.get_running_loop().call_later(SETTLE_AFTER, _settle_heap)
        report_ready(s.ready_file, self.status())
        log.info("event=ready %s", self.front.ready_line(self))
        log_node_hints()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        await run_until_signal(self.start, self.stop, self._stop)

    async def stop(self) -> None:
        """Undo everything start() did, in reverse; safe to call on a partial start."""
        self._started = False
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self.http is not None:
            await self.http.close()
            self.http = None
        await self.front.stop(self)
        if self._control is not None:
            await self._control.close()
            self._control = None
        await self.server.drain(DRAIN_SECONDS)  # let handshakes in flight finish
        if self.registry is not None:
            await self.registry.shutdown(release=self.front.release_on_stop)
        if self.warm is not None:
            await self.warm.stop()
            self.warm = None
        self.server.close()
        await self.front.cleanup(self)
        if self.claims is not None:  # ours, whether or not a registry got to use them
            self.claims.close()
            self.claims = None
        if self.settings.ready_file is not None:
            self.settings.ready_file.unlink(missing_ok=True)
        if self.netns is not None:
            self.netns.close()
            self.netns = None
        logs.unfollow_loop()

    # -- what it reports -------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """/readyz: started, and whatever the front end waits for."""
        if not self._started:
            return False, "starting"
        return self.front.ready()

    def status(self) -> dict[str, Any]:
        allocations = self.registry.allocations.values() if self.registry else []
        return {
            "pid": os.getpid(),
            "mode": self.front.mode,
            "hostname": socket.gethostname(),
            "netns": self.netns.inode if self.netns else None,
            "allocations": [a.describe() | {"connections": sum(
                len(lst.connections) for lst in self.server.listeners.values()
                if lst.allocation is a)} for a in allocations],
            "server": self.server.stats(),
            "warm_programs": self.warm.describe() if self.warm else None,
            "http": self.http.address if self.http else None,
            **self.front.status(self),
        }

    async def _status_op(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}


def _trim_malloc() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): what
    start-up's garbage occupied would otherwise stay in the daemon's RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def freeze_imports() -> None:
    """Move what the imports built (modules, classes, functions: most of the
    daemon's objects) out of the cyclic collector's sight before start-up begins.
    Start-up's own garbage is collected later (:func:`_settle_heap`), and that
    collection then walks only what start-up made, not every object of every
    imported module.  Call once, from the process's entry point."""
    gc.freeze()


def _settle_heap() -> None:
    """Collect start-up's garbage once, then freeze what is left out of the cyclic
    collector's sight.

    pyroute2 makes cyclic garbage of every netlink reply (each parsed message
    refers to itself), so start-up at 1,000 netdevs leaves ~400,000 such objects,
    and the first full collection, which also walks every live object, landed in
    whatever ran next: a 400 ms Allocate.  Collected here, just after start-up,
    and with what start-up built (modules, the registry, the inventory) frozen,
    later full collections walk only what came after.
    Refcounting still frees frozen objects; only a cycle among them would stay."""
    t0 = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    _trim_malloc()
    log.info("event=heap_settled collected=%d frozen=%d ms=%.0f", collected,
             gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)
