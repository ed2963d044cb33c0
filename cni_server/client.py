"""The client side of the fd-handout protocol (what DPDK's ``use_cni`` does, and our extension).

Used by the CLI, the demo, the tests and the benchmarks.  Every fd received is
returned as an :class:`OwnedFd`; extra fds a (broken) server might attach are
closed on arrival.
"""

from __future__ import annotations

import array
import errno
import socket
from collections.abc import Callable
from pathlib import Path

from cni_server import protocol as p
from cni_server.fds import OwnedFd, fds_from_ancillary

_ANC = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _connect_hint(err: int | None) -> str:
    if err == errno.EACCES:
        return " (the socket's owner and mode decide who may connect: see --socket-owner)"
    if err in (errno.ENOENT, errno.ECONNREFUSED):
        return " (is the daemon serving this netdev? see `afxdp status`)"
    return ""


class HandshakeError(Exception):
    """The server refused a step, closed, or answered something unexpected."""

    def __init__(self, request: str, reply: str, message: str = "") -> None:
        self.request = request
        self.reply = reply
        super().__init__(message or f"{request!r} was answered {reply!r}")


class Client:
    """One connection to a handout socket."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"cannot connect to the handout socket {self.path}: "
                                   f"{e.strerror}{_connect_hint(e.errno)}") from e

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, text: str | bytes, fds: list[int] | None = None) -> tuple[str, OwnedFd | None]:
        """Send one datagram (optionally with fds) and read one reply (and its fd)."""
        data = text.encode() if isinstance(text, str) else text
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)
        reply, anc, _flags, _ = self.sock.recvmsg(p.MAX_REPLY_BYTES + 1, _ANC)
        got = fds_from_ancillary(anc)
        if not reply and not got:
            raise HandshakeError(data.decode("ascii", "replace"), "", "server closed the connection")
        first = got[0] if got else None
        for extra in got[1:]:
            extra.close()
        return reply.decode("ascii", "replace"), first

    def _expect(self, text: str, want: str, fds: list[int] | None = None) -> OwnedFd | None:
        reply, fd = self.request(text, fds)
        if reply != want:
            if fd is not None:
                fd.close()
            raise HandshakeError(text, reply)
        return fd

    # -- the steps -----------------------------------------------------------

    def connect(self, hostname: str | None = None) -> None:
        self._no_fd(self._expect(f"{p.CONNECT},{hostname or socket.gethostname()}", p.HOST_OK))

    def version(self) -> str:
        reply, fd = self.request(p.VERSION)
        self._no_fd(fd)
        return reply

    def xsk_map_fd(self, netdev: str) -> OwnedFd:
        return self._want_fd(f"{p.XSK_MAP_FD},{netdev}")

    def xsk_socket(self, netdev: str, queue: int) -> OwnedFd:
        return self._want_fd(f"{p.XSK_SOCKET},{netdev},{queue}")

    def xsk_bind(self, netdev: str, queue: int, sock_fd: int) -> None:
        self._no_fd(self._expect(f"{p.XSK_BIND},{netdev},{queue}", p.XSK_BIND_ACK, [sock_fd]))

    def config_busy_poll(self, sock_fd: int, timeout_us: int, budget: int) -> None:
        self._no_fd(self._expect(f"{p.BUSY_POLL},{timeout_us},{budget}", p.BUSY_POLL_ACK,
                                 [sock_fd]))

    def fin(self) -> None:
        self._no_fd(self._expect(p.FIN, p.FIN_ACK))

    def _want_fd(self, text: str) -> OwnedFd:
        fd = self._expect(text, p.FD_ACK)
        if fd is None:
            raise HandshakeError(text, p.FD_ACK, f"{text!r} was acknowledged without an fd")
        return fd

    @staticmethod
    def _no_fd(fd: OwnedFd | None) -> None:
        if fd is not None:
            fd.close()


def _fetch_fd(path: str | Path, hostname: str | None, timeout: float,
              step: Callable[[Client], OwnedFd]) -> OwnedFd:
    """connect, one fd-granting step, fin; the fd is closed if anything after it fails."""
    with Client(path, timeout) as c:
        c.connect(hostname)
        fd = step(c)
        try:
            c.fin()
        except BaseException:
            fd.close()
            raise
        return fd


def fetch_map_fd(path: str | Path, netdev: str, hostname: str | None = None,
                 timeout: float = 5.0) -> OwnedFd:
    """DPDK's handshake: connect, version, xsk_map_fd, fin.  Returns the XSKMAP fd."""

    def step(c: Client) -> OwnedFd:
        c.version()
        return c.xsk_map_fd(netdev)

    return _fetch_fd(path, hostname, timeout, step)


def fetch_xsk_socket(path: str | Path, netdev: str, queue: int, hostname: str | None = None,
                     timeout: float = 5.0) -> OwnedFd:
    """Our extension, step 1: an AF_XDP socket created by the daemon (not yet bound)."""
    return _fetch_fd(path, hostname, timeout, lambda c: c.xsk_socket(netdev, queue))


def bind_xsk_socket(path: str | Path, netdev: str, queue: int, sock_fd: int,
                    hostname: str | None = None, timeout: float = 5.0) -> None:
    """Our extension, step 2: have the daemon bind the socket and insert it in the XSKMAP."""
    with Client(path, timeout) as c:
        c.connect(hostname)
        c.xsk_bind(netdev, queue, sock_fd)
        c.fin()
