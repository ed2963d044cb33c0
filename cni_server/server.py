"""The UDS fd-handout server: asyncio, one event loop, any number of sockets and clients.

The I/O layer only: it accepts connections on each allocation's
``SOCK_SEQPACKET`` socket, turns datagrams into :class:`protocol.Request`,
lets the :class:`protocol.Session` decide, has the :class:`Broker` carry out
granted steps, and sends the reply (with an fd when one is granted).

Connections are watched through one epoll set of our own (:mod:`cni_server.reactor`),
served round robin between clients.  At a connection limit, :func:`choose_victim`
picks the connection a newcomer takes the place of.  A periodic sweep enforces the
idle timeout.  All methods must be called on the loop's thread.
"""

from __future__ import annotations

import _socket
import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cni_server import peer as peer_mod
from cni_server import protocol
from cni_server.admission import choose_victim
from cni_server.allocation import Allocation
from cni_server.broker import Broker, Outcome
from cni_server.connection import Connection, Listener, client_key
from cni_server.fds import OwnedFd, close_all, fds_from_ancillary
from cni_server.metrics import Metrics, reason_label
from cni_server.reactor import Reactor

log = logging.getLogger(__name__)

MAX_FDS_PER_REQUEST = 8  # more than this sets MSG_CTRUNC (the kernel drops the rest)
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_REQUEST * array.array("i").itemsize)
# Plain ints: socket.MSG_* are IntFlag members, and enum arithmetic on every
# datagram shows up in profiles.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_ACCEPTS_PER_EVENT = 16
_ACCEPT_PAUSE = 0.1  # seconds a socket is not accepted on after accept() failed
_RESOLVE_TIMEOUT = 5.0
_SUN_PATH_MAX = 107
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
        # Called for a /connect on an allocation that allows no hostname yet
        # (Kubernetes: its pod is not known yet); the request waits for it.
        self.resolve_owner: Callable[[Allocation], Awaitable[None]] | None = None
        self._parked: set[asyncio.Task[None]] = set()
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
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ServerError(f"socket path too long for a Unix socket (max 107 bytes): {path}")
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            # Mode first, while the file is still ours: changing the mode of a file
            # handed to another uid would need CAP_FOWNER, which the daemon lacks.
            os.chmod(path, mode)
            os.chown(path, uid, gid)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            inode = os.stat(path).st_ino
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise ServerError(f"cannot serve {path}: {e.strerror or e}") from e
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
            self._close(conn, "socket withdrawn")
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
        for task in list(self._parked):
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
        self._close(conn, f"evicted for a new connection: {why}")
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
            listener.allocation, peer, owner_lookup=self.resolve_owner is not None))
        listener.connections.add(conn)
        self._connections += 1
        self.reactor.watch(sock.fileno(), partial(self._on_readable, conn), client_key(conn))
        # Clients usually write /connect right after connect(); answering it now
        # saves a trip through the event loop (EAGAIN costs one cheap syscall).
        if answer_now:
            self._on_readable(conn)

    def _log_limit(self, listener: Listener) -> None:
        now = time.monotonic()
        if now - self._last_limit_log >= 1.0:
            self._last_limit_log = now
            log.warning(
                "event=connection_rejected reason=limit socket=%s socket_connections=%d "
                "total_connections=%d rejected_so_far=%d", listener.path,
                len(listener.connections), self._connections, self.metrics.dropped.get("limit"))

    # -- one connection ---------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        """Answer one datagram per wakeup.

        A well-behaved client sends its next request only after reading the
        reply, so reading again would almost always hit EAGAIN; epoll is
        level-triggered and calls us again if more is queued, which also lets
        other clients take turns with a chatty one.
        """
        try:
            data, anc, flags, _ = conn.sock.recvmsg(protocol.MAX_REQUEST_BYTES + 1, _ANC_SIZE,
                                                    _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(conn, f"recv error: {e.strerror}")
            return
        fds = fds_from_ancillary(anc)
        if not data and not fds:
            self._close(conn, "peer closed")
            return
        conn.last_active = time.monotonic()
        request = protocol.Request(data, len(fds), truncated=bool(flags & _MSG_TRUNC),
                                   ctrl_truncated=bool(flags & _MSG_CTRUNC))
        self._answer(conn, request, fds)

    def _park(self, conn: Connection, request: protocol.Request, fds: list[OwnedFd]) -> None:
        """Stop reading ``conn`` until the allocation's owner is resolved, then answer."""
        fd = conn.sock.fileno()
        self.reactor.unwatch(fd)
        conn.parked = True
        assert self._loop is not None and self.resolve_owner is not None
        resolve = self.resolve_owner

        async def resolve_then_answer() -> None:
            handed = False  # _answer owns (and closes) the fds once called
            try:
                try:
                    await asyncio.wait_for(resolve(conn.listener.allocation), _RESOLVE_TIMEOUT)
                except Exception as e:
                    log.warning("event=owner_unresolved allocation=%s error=%r",
                                conn.listener.allocation.id, str(e) or type(e).__name__)
                if conn not in conn.listener.connections:  # closed meanwhile
                    return
                handed = True
                conn.parked = False
                conn.last_active = time.monotonic()
                if self._answer(conn, request, fds):
                    self.reactor.watch(fd, partial(self._on_readable, conn), client_key(conn))
            finally:
                if not handed:
                    close_all(fds)

        task = self._loop.create_task(resolve_then_answer())
        self._parked.add(task)
        task.add_done_callback(self._parked.discard)

    def _answer(self, conn: Connection, request: protocol.Request, fds: list[OwnedFd]) -> bool:
        """Decide, act, close the received fds, reply.  Returns False once the connection is closed.

        Received fds are closed *before* the reply is sent, so a client that has
        its answer can rely on the daemon holding none of what it sent.
        """
        session = conn.session
        outcome: Outcome | None = None
        parked = False  # then the parked task owns the fds
        try:
            decision = session.handle(request)
            if isinstance(decision, protocol.Defer):
                parked = True
                self._park(conn, request, fds)
                return True
            if isinstance(decision, protocol.Grant):
                outcome = self.broker.perform(conn.listener.allocation, decision, fds)
                reply = session.grant_done(decision, outcome.ok, outcome.reason)
            else:
                reply = decision
        except Exception:  # a bug in our code must not take the daemon down
            log.exception("event=session_error socket=%s", conn.listener.path)
            if outcome is not None:
                _close_created(outcome)
            self._close(conn, "internal error")
            return False
        finally:
            if not parked:
                close_all(fds)
        try:
            send_fds: list[int] = []
            if outcome is not None and outcome.ok and outcome.fd is not None:
                send_fds.append(outcome.fd)
                if outcome.extra is not None:
                    send_fds.append(outcome.extra.fileno())
            kind = "xsk_socket" if isinstance(decision, protocol.Grant) and decision.op in (
                protocol.Op.XSK_SOCKET, protocol.Op.XSK_BOUND) else "xsk_map"
            sent = self._send(conn, reply.text, send_fds, kind)
        finally:
            if outcome is not None:
                _close_created(outcome)
        verb = session.steps[-1].verb if session.steps else "?"
        self.metrics.replies.inc(verb, reply.text, reason_label(reply.reason))
        if not sent:
            return False
        if reply.close:
            self._close(conn, "")
            return False
        return True

    def _send(self, conn: Connection, text: str, fds: list[int], kind: str = "") -> bool:
        payload = text.encode()
        try:
            if not fds:
                conn.sock.send(payload, _DONTWAIT)
            else:
                # One SCM_RIGHTS message; DPDK reads its first fd.
                conn.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", fds))], _DONTWAIT)
                self.metrics.fds.inc(kind)
        except BlockingIOError:
            # A well-behaved client has one request in flight; a full queue means it
            # sends without reading replies.
            self._close(conn, "client not reading replies")
            return False
        except OSError as e:
            self._close(conn, f"send error: {e.strerror}")
            return False
        return True

    def _close(self, conn: Connection, why: str) -> None:
        listener = conn.listener
        if conn not in listener.connections:
            return
        listener.connections.discard(conn)
        self._connections -= 1
        # Closing the only reference to the socket also removes it from our
        # epoll set (we never dup accepted sockets): no EPOLL_CTL_DEL needed.
        self.reactor.forget(conn.sock.fileno())
        conn.sock.close()
        s = conn.session
        outcome = s.outcome()
        self.metrics.handshakes.inc(outcome)
        self.metrics.handshake_seconds.observe(time.monotonic() - conn.opened)
        if log.isEnabledFor(logging.INFO):
            # One f-string and no arguments: the handshake line is the daemon's most
            # frequent log line.  Its values are escaped here: the steps' arguments
            # (client text) by Step.label, the hostname passed /connect's grammar.
            steps = ",".join([st.label() for st in s.steps]) or "-"
            extra = f" closed_because={why.replace(' ', '_')}" if why else ""
            log.info(f"event=handshake socket={listener.path_text} peer_pid={s.peer.pid} "
                     f"peer_uid={s.peer.uid} peer_netns={s.peer.netns or 'unknown'} "
                     f"host={s.hostname or '-'} result={outcome} steps={steps} "
                     f"duration_ms={(time.monotonic() - conn.opened) * 1000.0:.2f}{extra}")

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
                self._close(conn, "idle timeout")
        self._schedule_sweep()

    def stats(self) -> dict[str, object]:
        """For ``afxdp status``: read from the metrics, so it and /metrics agree."""
        m = self.metrics
        replies: dict[str, int] = {}
        for (_verb, text, reason), n in list(m.replies.counts.items()):
            key = text if reason == "ok" else reason
            replies[key] = replies.get(key, 0) + n
        return {
            "sockets": len(self._listeners),
            "connections": self._connections,
            "handshakes": {outcome: n for (outcome,), n in list(m.handshakes.counts.items())},
            "replies": replies,
            "fds_sent": sum(m.fds.counts.values()),
            "rejected_limit": m.dropped.get("limit"),
            "evicted": m.dropped.get("evicted"),
            "idle_closed": m.dropped.get("idle"),
            "longest_wakeup": self.reactor.longest_wakeup,
        }


def _close_created(outcome: Outcome) -> None:
    """The fds a grant made for its reply are closed once the reply is sent (or not)."""
    for made in (outcome.created, outcome.extra):
        if made is not None:
            made.close()


def _clear_stale_socket(path: Path) -> None:
    """Remove a leftover socket file, refusing if a live server still answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ServerError(f"cannot check existing socket {path}: {e.strerror}") from e
        path.unlink(missing_ok=True)
        log.info("event=stale_socket_removed socket=%s", path)
        return
    finally:
        probe.close()
    raise ServerError(f"another server is already serving {path}")
