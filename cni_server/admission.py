"""Who makes room when a handout server is at a connection limit."""

from __future__ import annotations

import _socket
import socket
import struct
import time
from collections.abc import Iterable

from cni_server import protocol
from cni_server.connection import Connection, client_key

_DONTWAIT = int(socket.MSG_DONTWAIT)


def choose_victim(candidates: Iterable[Connection], newcomer: _socket.socket,
                  evict_idle_after: float) -> tuple[Connection, str] | None:
    """At a connection limit: the connection ``newcomer`` takes the place of, and
    why; None if none may go.  In this order:

    1. a connection that never passed /connect and has nothing waiting to be
       read (silent since it connected), the oldest first: a burst of silent
       connects cannot push out a client whose /connect is on its way;
    2. a connection of the peer (process) holding the most, if it holds more
       than the newcomer's: no peer keeps the slots from another, however
       chatty its connections are;
    3. the connection idle the longest, if idle for ``evict_idle_after``.

    A connection waiting on the daemon (parked) is never closed.
    """
    pool = [c for c in candidates if not c.parked]
    silent = [c for c in pool if c.session.state is protocol.State.NEW
              and not has_data(c.sock)]
    if silent:
        return min(silent, key=lambda c: c.opened), "silent since it connected"
    by_peer: dict[int, list[Connection]] = {}
    for c in pool:
        by_peer.setdefault(client_key(c), []).append(c)
    if by_peer:
        heaviest = max(by_peer.values(), key=len)
        if len(heaviest) > len(by_peer.get(peer_pid(newcomer), ())) + 1:
            return (min(heaviest, key=lambda c: c.last_active),
                    "its peer holds the most connections")
    oldest = min(pool, default=None, key=lambda c: c.last_active)
    if oldest is None or time.monotonic() - oldest.last_active < evict_idle_after:
        return None
    return oldest, "idle the longest"


def has_data(sock: _socket.socket) -> bool:
    """Whether a request (or EOF) is waiting on ``sock`` (peeked, not read)."""
    try:
        sock.recv(1, socket.MSG_PEEK | _DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error is news too: not a silent connection
    return True


def peer_pid(sock: _socket.socket) -> int:
    """The connecting process (SO_PEERCRED), as client_key keys connections."""
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return 0
    return pid if pid > 0 else 0
