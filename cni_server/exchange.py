"""One connection's requests and replies: read a datagram, let the session decide,
have the broker act, reply with what it made, and the handshake's log line at the end.

The I/O half of :mod:`cni_server.protocol`; the server (:mod:`cni_server.server`)
accepts connections and hands them here.  All methods run on the loop's thread.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial

from cni_server import protocol
from cni_server.allocation import Allocation
from cni_server.broker import Broker, Outcome
from cni_server.connection import Connection, client_key
from cni_server.fds import OwnedFd, close_all, fds_from_ancillary
from cni_server.metrics import Metrics, reason_label
from cni_server.reactor import Reactor

log = logging.getLogger("cni_server.server")  # (the handshake line's logger, as before)

MAX_FDS_PER_REQUEST = 8  # more than this sets MSG_CTRUNC (the kernel drops the rest)
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_REQUEST * array.array("i").itemsize)
# Plain ints: socket.MSG_* are IntFlag members, and enum arithmetic on every
# datagram shows up in profiles.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_RESOLVE_TIMEOUT = 5.0


class Exchange:
    """Requests and replies on the server's connections."""

    def __init__(self, broker: Broker, metrics: Metrics, reactor: Reactor,
                 closed: Callable[[Connection], None]) -> None:
        self.broker = broker
        self.metrics = metrics
        self.reactor = reactor
        self.closed = closed  # told when a connection is gone (the server counts them)
        self.loop: asyncio.AbstractEventLoop | None = None
        # Called for a /connect on an allocation that allows no hostname yet
        # (Kubernetes: its pod is not known yet); the request waits for it.
        self.resolve_owner: Callable[[Allocation], Awaitable[None]] | None = None
        self.parked: set[asyncio.Task[None]] = set()

    def on_readable(self, conn: Connection) -> None:
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
            self.close(conn, f"recv error: {e.strerror}")
            return
        fds = fds_from_ancillary(anc)
        if not data and not fds:
            self.close(conn, "peer closed")
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
        assert self.loop is not None and self.resolve_owner is not None
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
                    self.reactor.watch(fd, partial(self.on_readable, conn), client_key(conn))
            finally:
                if not handed:
                    close_all(fds)

        task = self.loop.create_task(resolve_then_answer())
        self.parked.add(task)
        task.add_done_callback(self.parked.discard)

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
            self.close(conn, "internal error")
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
            self.close(conn, "")
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
            self.close(conn, "client not reading replies")
            return False
        except OSError as e:
            self.close(conn, f"send error: {e.strerror}")
            return False
        return True

    def close(self, conn: Connection, why: str) -> None:
        listener = conn.listener
        if conn not in listener.connections:
            return
        listener.connections.discard(conn)
        self.closed(conn)
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


def _close_created(outcome: Outcome) -> None:
    """The fds a grant made for its reply are closed once the reply is sent (or not)."""
    for made in (outcome.created, outcome.extra):
        if made is not None:
            made.close()
