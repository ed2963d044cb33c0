"""The client side of the fd-handout protocol (what DPDK's ``use_cni`` does, and our extension).

Used by the CLI, the demo, the tests and the benchmarks.  Every fd received is
returned as an :class:`OwnedFd`; extra fds a (broken) server might attach are
closed on arrival.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from cni_server import protocol as p
from cni_server import xsk
from cni_server.fds import OwnedFd, fds_from_ancillary

_XSKMAP_TYPE = 17  # BPF_MAP_TYPE_XSKMAP
_ANC = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def is_xskmap(fd: int) -> bool:
    """Whether ``fd`` is a BPF map of type XSKMAP (from /proc: needs no capability)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return any(line.split() == ["map_type:", str(_XSKMAP_TYPE)] for line in f)
    except OSError:
        return False


def is_af_xdp(fd: int) -> bool:
    return xsk.socket_domain(fd) == xsk.AF_XDP


def _is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


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


class UntrustedServer(HandshakeError):
    """The process serving the socket is not the daemon (wrong uid), or it handed out
    something other than what the request asks for."""


def trusted_server_uid() -> int:
    """The uid the daemon runs as: 0, or $AFXDP_SERVER_UID (e.g. when this client runs
    in a user namespace where the host's root shows as the overflow uid)."""
    text = os.environ.get("AFXDP_SERVER_UID", "0")
    return int(text) if text.isdigit() else 0


class Client:
    """One connection to a handout socket, served by a process of the trusted uid."""

    def __init__(self, path: str | Path, timeout: float = 5.0,
                 server_uid: int | None = None) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"cannot connect to the handout socket {self.path}: "
                                   f"{e.strerror}{_connect_hint(e.errno)}") from e
        # Whoever could create a socket at this path could serve anything: trust
        # only the daemon's uid, as the kernel reports it.
        want = trusted_server_uid() if server_uid is None else server_uid
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != want:
            self.sock.close()
            raise UntrustedServer("", "", f"the server at {self.path} (pid {pid}) runs as uid "
                                          f"{uid}, not the daemon's uid {want}: refusing to "
                                          "trust it (set AFXDP_SERVER_UID if the daemon runs "
                                          "as another uid)")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, text: str | bytes, fds: list[int] | None = None) -> tuple[str, OwnedFd | None]:
        """Send one datagram (optionally with fds) and read one reply (and its fd)."""
        reply, got = self.request_fds(text, fds)
        first = got[0] if got else None
        for extra in got[1:]:
            extra.close()
        return reply, first

    def request_fds(self, text: str | bytes, fds: list[int] | None = None
                    ) -> tuple[str, list[OwnedFd]]:
        """Send one datagram (optionally with fds); the reply and every fd it carried."""
        data = text.encode() if isinstance(text, str) else text
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)
        reply, anc, _flags, _ = self.sock.recvmsg(p.MAX_REPLY_BYTES + 1, _ANC)
        got = fds_from_ancillary(anc)
        if not reply and not got:
            raise HandshakeError(data.decode("ascii", "replace"), "", "server closed the connection")
        return reply.decode("ascii", "replace"), got

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
        return self._want_fd(f"{p.XSK_MAP_FD},{netdev}", is_xskmap, "an XSKMAP")

    def xsk_socket(self, netdev: str, queue: int) -> OwnedFd:
        return self._want_fd(f"{p.XSK_SOCKET},{netdev},{queue}", is_af_xdp, "an AF_XDP socket")

    def xsk_bound_socket(self, netdev: str, queue: int, frames: int, frame_size: int
                         ) -> tuple[OwnedFd, OwnedFd]:
        """Our extension: an AF_XDP socket the daemon made, sized, bound to netdev/queue
        and put in the XSKMAP, and the memfd holding its UMEM."""
        text = f"{p.XSK_BOUND_SOCKET},{netdev},{queue},{frames},{frame_size}"
        reply, got = self.request_fds(text)
        if reply != p.FD_ACK or len(got) != 2 or not is_af_xdp(got[0].fileno()) \
                or not _is_memfd(got[1].fileno()):
            for fd in got:
                fd.close()
            if reply != p.FD_ACK:
                raise HandshakeError(text, reply)
            raise UntrustedServer(text, reply, f"the server at {self.path} answered {text!r} "
                                               "without an AF_XDP socket and a memfd")
        return got[0], got[1]

    def xsk_bind(self, netdev: str, queue: int, sock_fd: int) -> None:
        self._no_fd(self._expect(f"{p.XSK_BIND},{netdev},{queue}", p.XSK_BIND_ACK, [sock_fd]))

    def config_busy_poll(self, sock_fd: int, timeout_us: int, budget: int) -> None:
        self._no_fd(self._expect(f"{p.BUSY_POLL},{timeout_us},{budget}", p.BUSY_POLL_ACK,
                                 [sock_fd]))

    def fin(self) -> None:
        self._no_fd(self._expect(p.FIN, p.FIN_ACK))

    def _want_fd(self, text: str, kind: Callable[[int], bool], what: str) -> OwnedFd:
        fd = self._expect(text, p.FD_ACK)
        if fd is None:
            raise HandshakeError(text, p.FD_ACK, f"{text!r} was acknowledged without an fd")
        if not kind(fd.fileno()):
            fd.close()
            raise UntrustedServer(text, p.FD_ACK, f"the server at {self.path} answered "
                                                  f"{text!r} with an fd that is not {what}")
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


def fetch_bound_xsk(path: str | Path, netdev: str, queue: int, frames: int, frame_size: int,
                    hostname: str | None = None, timeout: float = 5.0, busy_wait: float = 0.5
                    ) -> tuple[OwnedFd, OwnedFd]:
    """Our extension, the default: (bound AF_XDP socket, its UMEM memfd).

    The kernel frees a queue some milliseconds after the socket that held it is
    closed (a client restarting at once finds it busy), so a refusal is retried
    for up to ``busy_wait`` seconds before it is final."""
    deadline = time.monotonic() + busy_wait
    while True:
        with Client(path, timeout) as c:
            c.connect(hostname)
            try:
                sock, umem = c.xsk_bound_socket(netdev, queue, frames, frame_size)
            except HandshakeError as e:
                if e.reply != p.FD_NAK or time.monotonic() > deadline:
                    raise
                c.fin()
                time.sleep(0.02)
                continue
            try:
                c.fin()
            except BaseException:
                sock.close()
                umem.close()
                raise
            return sock, umem


def bind_xsk_socket(path: str | Path, netdev: str, queue: int, sock_fd: int,
                    hostname: str | None = None, timeout: float = 5.0) -> None:
    """Our extension, step 2: have the daemon bind the socket and insert it in the XSKMAP."""
    with Client(path, timeout) as c:
        c.connect(hostname)
        c.xsk_bind(netdev, queue, sock_fd)
        c.fin()
