"""The UDS fd-handout server: asyncio, one event loop, any number of sockets and clients.

The sockets' side of the I/O layer: it serves each allocation's ``SOCK_SEQPACKET``
socket files, accepts connections within the limits, and enforces the idle timeout
with a periodic sweep.  Its parts:

- :mod:`cni_server.reactor`: one epoll set of our own, served round robin between
  clients;
- :mod:`cni_server.admission`: at a connection limit, which connection a newcomer
  takes the place of;
- :mod:`cni_server.exchange`: a connection's requests and replies (the
  :class:`protocol.Session` decides, the :class:`Broker` acts).

All methods must be called on the loop's thread.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cni_server import peer as peer_mod
from cni_server import protocol
from cni_server.admission import choose_victim
from cni_server.allocation import Allocation
from cni_server.broker import Broker
from cni_server.connection import Connection, Listener, client_key
from cni_server.exchange import Exchange
from cni_server.metrics import Metrics
from cni_server.reactor import Reactor
from cni_server.socketfile import SocketFileError, listen_on

log = logging.getLogger(__name__)

_ACCEPTS_PER_EVENT = 16
_ACCEPT_PAUSE = 0.1  # seconds a socket is not accepted on after accept() failed
# A well-behaved client has one reply in flight.  Connected SEQPACKET sockets
# are bounded only by the sender's SO_SNDBUF (default ~208 KiB), so a client
# that never reads would pin that much daemon memory; the kernel doubles this
# value, which still holds dozens of replies.
_CONN_SNDBUF = 16 * 1024


class ServerError(Exception):
    """A socket cannot be served (path in use, too long, not creatable)."""


@dataclass
class Limits:
    """Protection against slow, silent or numerous clients."""

    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_socket: int = 128
    # At a limit, a new connection takes the place of the connection idle the
    # longest, if that one has been idle at least this long; else the new one
    # is closed.  A handshake takes milliseconds, so a connection silent for a
    # second is a client that is not going to talk; without eviction a few
    # hundred silent connections would lock everyone out until the idle timeout.
    evict_idle_after: float = 1.0
    # While connections are open and none has a request waiting, look again for
    # this long (seconds, busy) before going back to the event loop: see
    # Reactor._on_events.  0 turns it off.
    handshake_spin: float = 50e-6


class HandoutServer:
    """Serves the fd-handout protocol for any number of allocations."""

    def __init__(self, broker: Broker | None = None, limits: Limits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.broker = broker or Broker()
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.metrics.track(self.metrics.connections, lambda: self._connections)
        self._listeners: dict[Path, Listener] = {}
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reactor = Reactor(self.limits.handshake_spin, lambda: self._connections > 0)
        self.exchange = Exchange(self.broker, self.metrics, self.reactor, self._closed)
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_limit_log = 0.0
        # Out of fds (EMFILE): a spare fd to give up so that a waiting connection can
        # be accepted and closed (the client sees EOF instead of hanging), and a
        # count of accept failures logged at most once a second.
        self._reserve_fd = -1
        self._accept_failures = 0
        self._last_accept_log = 0.0

    # -- serving sockets -----------------------------------------------------

    def serve(self, allocation: Allocation, *, mode: int = 0o660, uid: int = -1,
              gid: int = -1) -> list[Listener]:
        """Create every path in ``allocation.socket_paths`` and start accepting on them.

        All or nothing: if one path cannot be served, the others are withdrawn.
        """
        loop = self._loop = self._loop or asyncio.get_running_loop()
        self.reactor.start(loop)
        self.exchange.loop = loop
        if self._reserve_fd < 0:
            self._reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if any(lst.allocation.id == allocation.id for lst in self._listeners.values()):
            raise ServerError(f"allocation {allocation.id} is already served")
        made: list[Listener] = []
        try:
            for path in allocation.socket_paths:
                made.append(self._listen(allocation, path, mode, uid, gid))
        except BaseException:
            for lst in made:
                self._withdraw(lst)
            raise
        self._schedule_sweep()
        for lst in made:
            log.info("event=serving allocation=%s socket=%s netdevs=%s", allocation.id, lst.path,
                     ",".join(allocation.netdevs))
        return made

    def _listen(self, allocation: Allocation, path: Path, mode: int, uid: int, gid: int
                ) -> Listener:
        if path in self._listeners:
            raise ServerError(f"{path} is already served (allocation "
                              f"{self._listeners[path].allocation.id})")
        try:
            sock, inode = listen_on(path, mode, uid, gid)
        except SocketFileError as e:
            raise ServerError(str(e)) from e
        listener = Listener(allocation, path, sock, inode)
        self._listeners[path] = listener
        self.reactor.watch(sock.fileno(), partial(self._on_acceptable, listener), -1 - sock.fileno())
        return listener

    def stop_serving(self, allocation_id: str) -> None:
        """Stop accepting, close its connections, remove its socket files (if still ours)."""
        for listener in [lst for lst in self._listeners.values()
                         if lst.allocation.id == allocation_id]:
            self._withdraw(listener)
            log.info("event=stopped_serving allocation=%s socket=%s", allocation_id,
                     listener.path)

    def _withdraw(self, listener: Listener) -> None:
        self._listeners.pop(listener.path, None)
        if listener.sock.fileno() >= 0:  # not yet closed by drain()
            self.reactor.unwatch(listener.sock.fileno())
        for conn in list(listener.connections):
            self.exchange.close(conn, "socket withdrawn")
        listener.sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(listener.path).st_ino == listener.inode:
                listener.path.unlink()

    async def drain(self, timeout: float) -> None:
        """Graceful stop: accept nothing more, let open connections finish their
        handshakes (up to ``timeout`` seconds), then close what is left."""
        for listener in self._listeners.values():
            self.reactor.unwatch(listener.sock.fileno())
            listener.sock.close()  # new clients are refused; the file goes in close()
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._connections:
            log.info("event=drain_timeout open_connections=%d", self._connections)
        self.close()

    def close(self) -> None:
        for task in list(self.exchange.parked):
            task.cancel()
        for listener in list(self._listeners.values()):
            self._withdraw(listener)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.reactor.close()
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1

    @property
    def listeners(self) -> dict[Path, Listener]:
        return self._listeners

    @property
    def resolve_owner(self) -> Callable[[Allocation], Awaitable[None]] | None:
        """Who owns an allocation with no hostname yet (Kubernetes: PodResources);
        a /connect to one waits for it (see Exchange)."""
        return self.exchange.resolve_owner

    @resolve_owner.setter
    def resolve_owner(self, fn: Callable[[Allocation], Awaitable[None]] | None) -> None:
        self.exchange.resolve_owner = fn

    def _closed(self, conn: Connection) -> None:
        self._connections -= 1

    # -- accepting -------------------------------------------------------------

    def _on_acceptable(self, listener: Listener) -> None:
        """Accept what is waiting, up to ``_ACCEPTS_PER_EVENT``.

        Draining the backlog moves waiting clients from the kernel's FIFO
        into our per-client round robin (see Reactor._on_events): a well-behaved
        client queued behind a flood of connects is then served in the next
        round instead of after everyone queued before it.  Only the first is
        answered at once (the common case: one client, /connect already sent);
        the others are answered in their turn.  With no connection open on the
        socket (a lone client, handshakes one after another) one accept is
        all there is: no second accept() that would only return EAGAIN.
        """
        for i in range(_ACCEPTS_PER_EVENT if listener.connections else 1):
            try:
                fd, _addr = listener.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._accept_failed(listener, e)
                return
            # The C-level socket type: socket.socket's Python layer (its __init__,
            # close() and reference counting for makefile) costs microseconds per
            # connection and adds nothing here.  Explicit family/type: no
            # getsockname() to detect them.
            sock = _socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd)
            if ((len(listener.connections) >= self.limits.max_connections_per_socket
                    and not self._make_room(listener.connections, sock))
                    or (self._connections >= self.limits.max_connections
                        and not self._make_room(self._all_connections(), sock))):
                sock.close()
                self.metrics.dropped.inc("limit")
                self._log_limit(listener)
                continue
            self._open(sock, listener, answer_now=i == 0)

    def _accept_failed(self, listener: Listener, err: OSError) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS, ...): keep serving what we have.

        The waiting connection keeps the socket readable, so retrying at once
        would spin (and log) as fast as the CPU allows.  Instead: shed it with the
        reserve fd (accept and close: the client sees EOF), stop accepting on this
        socket for ``_ACCEPT_PAUSE`` seconds, and log once a second with a count.
        """
        self._accept_failures += 1
        now = time.monotonic()
        if now - self._last_accept_log >= 1.0:
            log.error("event=accept_failed socket=%s error=%r failures=%d", listener.path,
                      err.strerror, self._accept_failures)
            self._last_accept_log = now
            self._accept_failures = 0
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
            with contextlib.suppress(OSError):
                fd, _addr = listener.sock._accept()  # type: ignore[attr-defined]
                os.close(fd)
            with contextlib.suppress(OSError):
                self._reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        fd = listener.sock.fileno()
        if fd < 0 or self._loop is None:
            return
        self.reactor.unwatch(fd)

        def resume() -> None:
            if self._listeners.get(listener.path) is listener and listener.sock.fileno() == fd:
                self.reactor.watch(fd, partial(self._on_acceptable, listener), -1 - fd)

        self._loop.call_later(_ACCEPT_PAUSE, resume)

    def _all_connections(self) -> list[Connection]:
        return [c for lst in self._listeners.values() for c in lst.connections]

    def _make_room(self, candidates: Iterable[Connection], newcomer: _socket.socket) -> bool:
        """At a connection limit: close the connection ``newcomer`` takes the place
        of (admission.choose_victim), if there is one.  True if one was closed."""
        victim = choose_victim(candidates, newcomer, self.limits.evict_idle_after)
        if victim is None:
            return False
        conn, why = victim
        self.metrics.dropped.inc("evicted")
        self.exchange.close(conn, f"evicted for a new connection: {why}")
        return True

    def _open(self, sock: _socket.socket, listener: Listener, answer_now: bool) -> None:
        # The socket stays in blocking mode; every recv/send passes MSG_DONTWAIT,
        # which saves the fcntl/ioctl that setblocking(False) costs per connection.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CONN_SNDBUF)
        try:
            peer = peer_mod.identify(sock, netns=listener.allocation.check_peer_netns)
        except OSError as e:
            peer = protocol.Peer(0, -1, -1, None, f"SO_PEERCRED: {e.strerror}")
        conn = Connection(sock, listener, protocol.Session(
            listener.allocation, peer, owner_lookup=self.exchange.resolve_owner is not None))
        listener.connections.add(conn)
        self._connections += 1
        self.reactor.watch(sock.fileno(), partial(self.exchange.on_readable, conn), client_key(conn))
        # Clients usually write /connect right after connect(); answering it now
        # saves a trip through the event loop (EAGAIN costs one cheap syscall).
        if answer_now:
            self.exchange.on_readable(conn)

    def _log_limit(self, listener: Listener) -> None:
        now = time.monotonic()
        if now - self._last_limit_log >= 1.0:
            self._last_limit_log = now
            log.warning(
                "event=connection_rejected reason=limit socket=%s socket_connections=%d "
                "total_connections=%d rejected_so_far=%d", listener.path,
                len(listener.connections), self._connections, self.metrics.dropped.get("limit"))

    # -- idle timeout ------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and self._loop is not None:
            shortest = min([self.limits.idle_timeout] + [
                lst.allocation.idle_timeout for lst in self._listeners.values()
                if lst.allocation.idle_timeout])
            interval = max(0.05, min(1.0, shortest / 4))
            self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for listener in list(self._listeners.values()):
            timeout = listener.allocation.idle_timeout or self.limits.idle_timeout
            for conn in [c for c in listener.connections if now - c.last_active > timeout]:
                self.metrics.dropped.inc("idle")
                self.exchange.close(conn, "idle timeout")
        self._schedule_sweep()

    def stats(self) -> dict[str, object]:
        """For ``afxdp status``: read from the metrics, so it and /metrics agree."""
        return {"sockets": len(self._listeners), "connections": self._connections,
                **self.metrics.handout_summary(), "longest_wakeup": self.reactor.longest_wakeup}
