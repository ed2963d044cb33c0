"""A handout server's connections and listening sockets, as plain records."""

from __future__ import annotations

import _socket
import socket
import time
from pathlib import Path

from cni_server import protocol
from cni_server.allocation import Allocation


class Connection:
    """One accepted client connection (owner of its socket)."""

    __slots__ = ("last_active", "listener", "opened", "parked", "session", "sock")

    def __init__(self, sock: _socket.socket, listener: Listener, session: protocol.Session
                 ) -> None:
        self.sock = sock
        self.listener = listener
        self.session = session
        self.opened = self.last_active = time.monotonic()
        self.parked = False  # waiting on us (owner lookup), not idle


class Listener:
    """One served socket path and the connections accepted on it."""

    def __init__(self, allocation: Allocation, path: Path, sock: socket.socket, inode: int) -> None:
        self.allocation = allocation
        self.path = path
        self.sock = sock
        self.inode = inode
        self.path_text = str(path)
        self.connections: set[Connection] = set()


def client_key(conn: Connection) -> int:
    """Who a connection belongs to, for fairness: its peer process, else itself."""
    pid = conn.session.peer.pid
    return pid if pid > 0 else -1 - conn.sock.fileno()
