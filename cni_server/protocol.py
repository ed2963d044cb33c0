"""The fd-handout protocol (``docs/protocol.md``) as a sans-I/O state machine.

No sockets, no clocks, no kernel calls here.  The I/O layer (``server.py``)
turns each received datagram into a :class:`Request` (text, how many fds came
with it, whether anything was truncated) and feeds it to :meth:`Session.handle`,
which answers with either

- a :class:`Reply` to send as-is, or
- a :class:`Grant`: an authorized privileged step (hand out the XSKMAP, create
  or bind an AF_XDP socket, set busy-poll options) that the I/O layer performs,
  then sends ``grant.ok`` (with the fd, for fd-granting steps) or ``grant.fail``.

Every authorization decision (hostname, peer network namespace, which netdevs
and queues this allocation may use, request grammar, fd counts) is made here,
so it is tested exhaustively without a socket.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cni_server.logs import esc_token

PROTOCOL_VERSION = "0.1"

# DPDK sends at most 63 bytes (64-byte buffer incl. NUL) and reads replies into
# 128 bytes, writing a NUL at response[len]: replies must stay <= 127 bytes.
DPDK_REQUEST_LIMIT = 63
MAX_REQUEST_BYTES = 255
MAX_REPLY_BYTES = 127

CONNECT = "/connect"
VERSION = "/version"
XSK_MAP_FD = "/xsk_map_fd"
XSK_SOCKET = "/xsk_socket"
XSK_BOUND_SOCKET = "/xsk_bound_socket"
XSK_BIND = "/xsk_bind"
BUSY_POLL = "/config_busy_poll"
FIN = "/fin"

HOST_OK = "/host_ok"
HOST_NAK = "/host_nak"
FD_ACK = "/fd_ack"
FD_NAK = "/fd_nak"
XSK_BIND_ACK = "/xsk_bind_ack"
XSK_BIND_NAK = "/xsk_bind_nak"
BUSY_POLL_ACK = "/config_busy_poll_ack"
BUSY_POLL_NAK = "/config_busy_poll_nak"
FIN_ACK = "/fin_ack"
NAK = "/nak"

_NETDEV_RE = re.compile(r"[^\s/:,\x00]{1,15}")
# RFC 1123 labels, plus '_' which some container runtimes allow; 64 = HOST_NAME_MAX.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,62}[A-Za-z0-9_])?")
_UINT_RE = re.compile(r"[0-9]{1,10}")
U32_MAX = 2**32 - 1
INT_MAX = 2**31 - 1
U16_MAX = 2**16 - 1
# UMEM geometry a client may ask for with /xsk_bound_socket: frame sizes the
# kernel takes in aligned mode, frame counts that are ring sizes (powers of two).
FRAME_SIZES = (2048, 4096)
MAX_FRAMES = 2**16
DEFAULT_UMEM_LIMIT = 64 * 2**20


def valid_hostname(name: str) -> bool:
    """What ``/connect,<hostname>`` accepts (a pod name, a host's name)."""
    return bool(_HOSTNAME_RE.fullmatch(name))


def valid_netdev_name(name: str) -> bool:
    """The kernel's dev_valid_name(): 1..15 bytes, no '/', ':' or whitespace, not '.'/'..'."""
    return bool(_NETDEV_RE.fullmatch(name)) and name not in (".", "..")


class Op(enum.Enum):
    """Privileged steps the I/O layer performs for an authorized request."""

    MAP_FD = "map_fd"  # attach the netdev's XSKMAP fd to grant.ok
    XSK_SOCKET = "xsk_socket"  # create an AF_XDP socket in the netdev's netns; attach it
    # create an AF_XDP socket with a UMEM (memfd) and rings, bind it to netdev/queue,
    # insert it into the XSKMAP; attach the socket and the memfd
    XSK_BOUND = "xsk_bound_socket"
    XSK_BIND = "xsk_bind"  # bind the received socket to netdev/queue, insert into XSKMAP
    BUSY_POLL = "busy_poll"  # set SO_PREFER_BUSY_POLL/SO_BUSY_POLL/_BUDGET on received fd


@dataclass(frozen=True)
class Request:
    """One received datagram, as the I/O layer saw it."""

    data: bytes
    nfds: int = 0
    truncated: bool = False  # MSG_TRUNC: the datagram was longer than our buffer
    ctrl_truncated: bool = False  # MSG_CTRUNC: more fds/control data than we accept


@dataclass(frozen=True)
class Reply:
    """A reply datagram.  ``reason`` is for logs and metrics, never sent."""

    text: str
    close: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if len(self.text.encode()) > MAX_REPLY_BYTES:
            raise ValueError(f"reply longer than {MAX_REPLY_BYTES} bytes: {self.text!r}")


@dataclass(frozen=True)
class Grant:
    """An authorized privileged step; the I/O layer performs it and sends ok or fail."""

    op: Op
    ok: Reply
    fail: Reply
    netdev: str = ""
    queue: int = 0
    timeout_us: int = 0
    budget: int = 0
    frames: int = 0  # XSK_BOUND: UMEM frames (and ring size)
    frame_size: int = 0


class Defer(enum.Enum):
    """Not answered yet: the I/O layer stops reading the connection, finds out who
    owns the allocation (the Kubernetes owner lookup), then hands the same request
    to ``Session.handle`` again, which decides it then (as h11 returns PAUSED)."""

    OWNER = "owner"


@dataclass(frozen=True)
class Peer:
    """Kernel-verified identity of the connected client (SO_PEERCRED / SO_PEERPIDFD)."""

    pid: int
    uid: int
    gid: int
    netns: int | None  # inode of the peer's network namespace; None if unknown
    netns_error: str = ""  # why netns is None


@dataclass(frozen=True)
class Device:
    """A netdev of the allocation, as the session needs to know it."""

    name: str
    netns: int | None  # inode of the netns holding it now; None if it is gone
    queues: int  # queue slots clients may use (0..queues-1)
    unavailable: str = ""  # why nothing may be handed out for it now (e.g. netdev gone)


class Allocation(Protocol):
    """What the session asks of the allocation the connection belongs to."""

    @property
    def check_peer_netns(self) -> bool: ...

    def host_allowed(self, hostname: str) -> bool: ...

    def hostnames(self) -> Iterable[str]: ...

    def device(self, name: str) -> Device | None: ...

    def devices(self) -> Iterable[Device]: ...

    @property
    def allow_unbound_xsk(self) -> bool:
        """Whether /xsk_socket may hand out an unbound socket (an explicit opt-in)."""
        ...

    @property
    def umem_limit(self) -> int:
        """Most UMEM bytes one /xsk_bound_socket may ask for."""
        ...


# Replies without a reason are the same every time: built once, not per request.
_HOST_OK = Reply(HOST_OK)
_VERSION = Reply(PROTOCOL_VERSION)
_FD_ACK = Reply(FD_ACK)
_FD_NAK = Reply(FD_NAK)
_XSK_BIND_ACK = Reply(XSK_BIND_ACK)
_XSK_BIND_NAK = Reply(XSK_BIND_NAK)
_BUSY_POLL_ACK = Reply(BUSY_POLL_ACK)
_BUSY_POLL_NAK = Reply(BUSY_POLL_NAK)
_FIN_ACK = Reply(FIN_ACK, close=True)


class State(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(slots=True)
class Step:
    """One request and its outcome, for the per-handshake log line."""

    verb: str
    result: str
    arg: str = ""

    def label(self) -> str:
        """``/verb(arg)=result`` as one log token: the argument (client text) is
        percent-encoded, so it cannot fake a step, a field or a line."""
        arg = f"({esc_token(self.arg)})" if self.arg else ""
        return f"{self.verb}{arg}={self.result}".replace(" ", "_")


@dataclass
class Session:
    """The protocol state of one connection."""

    allocation: Allocation
    peer: Peer
    state: State = State.NEW
    hostname: str = ""
    steps: list[Step] = field(default_factory=list)
    # The I/O layer can look up an allocation's owner (Kubernetes): a /connect to an
    # allocation whose hostnames are not known yet is deferred until it has (once).
    owner_lookup: bool = False
    deferred: bool = False

    # -- entry point ---------------------------------------------------------

    def handle(self, request: Request) -> Reply | Grant | Defer:
        """Decide the answer to one request (or defer it: see Defer)."""
        if self.state is State.CLOSED:
            return self._note("", Reply(NAK, close=True, reason="closed"))
        text = self._decode(request)
        if text is None:
            return self._note("?", Reply(NAK, reason="malformed"))
        verb, _, rest = text.partition(",")
        has_args = "," in text
        if verb == FIN:
            return self._fin(has_args, request)
        handler = _HANDLERS.get(verb)
        if handler is None:
            return self._note("?", Reply(NAK, reason="unknown request"))
        if self.state is not State.CONNECTED and verb != CONNECT:
            return self._note(verb, Reply(NAK, reason="before connect"))
        if verb == CONNECT and self.owner_lookup and not self.deferred and has_args \
                and not any(True for _ in self.allocation.hostnames()):
            self.deferred = True
            return Defer.OWNER
        return handler(self, rest if has_args else None, request, len(request.data))

    def outcome(self) -> str:
        """A one-word summary of the connection so far, for the log line."""
        if not self.steps:
            return "empty"
        if any(s.verb in _GRANTING and s.result == "ok" for s in self.steps):
            return "granted"
        return "ok" if all(s.result == "ok" for s in self.steps) else "refused"

    # -- helpers -------------------------------------------------------------

    def _note(self, verb: str, reply: Reply, arg: str = "") -> Reply:
        result = "ok" if not reply.reason else reply.reason
        self.steps.append(Step(verb or "?", result, arg))
        if reply.close:
            self.state = State.CLOSED
        return reply

    def grant_done(self, grant: Grant, ok: bool, reason: str = "") -> Reply:
        """Record the result of a performed grant; returns the reply to send."""
        reply = grant.ok if ok else Reply(grant.fail.text, reason=reason or "failed")
        verb = _GRANT_VERB[grant.op]
        arg = grant.netdev if grant.op is Op.MAP_FD else (
            f"{grant.netdev}:{grant.queue}" if grant.netdev else ""
        )
        return self._note(verb, reply, arg)

    @staticmethod
    def _decode(request: Request) -> str | None:
        if request.truncated or request.ctrl_truncated:
            return None
        if not request.data or len(request.data) > MAX_REQUEST_BYTES:
            return None
        try:
            text = request.data.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text.isprintable():
            return None  # NULs, newlines and other control bytes
        return text

    def _peer_in(self, netns: int | None) -> str:
        """'' when the peer may act on a netdev in ``netns``, else the reason it may not."""
        if not self.allocation.check_peer_netns:
            return ""
        if self.peer.netns is None:
            return f"peer netns unknown ({self.peer.netns_error or 'no identity'})"
        if netns is None:
            return "netdev gone"
        if netns != self.peer.netns:
            return "peer in another netns"
        return ""

    def _peer_may_connect(self) -> str:
        """'' when the peer lives where at least one of the allocation's netdevs is."""
        if not self.allocation.check_peer_netns:
            return ""
        if self.peer.netns is None:
            return f"peer netns unknown ({self.peer.netns_error or 'no identity'})"
        if any(d.netns == self.peer.netns for d in self.allocation.devices()):
            return ""
        return "peer in another netns"

    # -- requests ------------------------------------------------------------

    def _connect(self, arg: str | None, request: Request, size: int) -> Reply:
        if arg is None or request.nfds:
            return self._note(CONNECT, Reply(NAK, reason="malformed"))
        if self.state is State.CONNECTED:
            return self._note(CONNECT, Reply(NAK, reason="already connected"), arg)
        if not valid_hostname(arg):
            return self._note(CONNECT, Reply(HOST_NAK, reason="invalid hostname"), arg)
        if not self._host_matches(arg, size):
            return self._note(CONNECT, Reply(HOST_NAK, reason="hostname not allowed"), arg)
        why = self._peer_may_connect()
        if why:
            return self._note(CONNECT, Reply(HOST_NAK, reason=why), arg)
        self.state = State.CONNECTED
        self.hostname = arg
        return self._note(CONNECT, _HOST_OK, arg)

    def _host_matches(self, hostname: str, size: int) -> bool:
        if self.allocation.host_allowed(hostname):
            return True
        # DPDK builds "/connect,<hostname>" in a 64-byte buffer, so a long
        # hostname arrives cut to exactly 63 bytes: accept a true prefix then.
        if size == DPDK_REQUEST_LIMIT:
            return any(h.startswith(hostname) for h in self.allocation.hostnames())
        return False

    def _version(self, arg: str | None, request: Request, size: int) -> Reply:
        if arg is not None or request.nfds:
            return self._note(VERSION, Reply(NAK, reason="malformed"))
        return self._note(VERSION, _VERSION)

    def _netdev_check(self, name: str) -> tuple[Device | None, str]:
        device = self.allocation.device(name) if valid_netdev_name(name) else None
        if device is None:
            return None, "netdev not in allocation"
        if device.unavailable:
            return None, device.unavailable
        why = self._peer_in(device.netns)
        return (None, why) if why else (device, "")

    def _map_fd(self, arg: str | None, request: Request, size: int) -> Reply | Grant:
        if arg is None or not arg or "," in arg or request.nfds:
            return self._note(XSK_MAP_FD, Reply(NAK, reason="malformed"), arg or "")
        device, why = self._netdev_check(arg)
        if device is None:
            return self._note(XSK_MAP_FD, Reply(FD_NAK, reason=why), arg)
        return Grant(Op.MAP_FD, _FD_ACK, _FD_NAK, netdev=device.name)

    def _netdev_queue(self, arg: str | None) -> tuple[str, int] | None:
        if arg is None:
            return None
        parts = arg.split(",")
        if len(parts) != 2 or not parts[0] or not _UINT_RE.fullmatch(parts[1]):
            return None
        queue = int(parts[1])
        return (parts[0], queue) if queue <= U32_MAX else None

    def _queue_check(self, verb: str, arg: str, netdev: str, queue: int, nak: str
                     ) -> Reply | Device:
        device, why = self._netdev_check(netdev)
        if device is None:
            return self._note(verb, Reply(nak, reason=why), arg)
        if queue >= device.queues:
            return self._note(verb, Reply(nak, reason="queue out of range"), arg)
        return device

    def _xsk_socket(self, arg: str | None, request: Request, size: int) -> Reply | Grant:
        parsed = self._netdev_queue(arg)
        if parsed is None or request.nfds:
            return self._note(XSK_SOCKET, Reply(NAK, reason="malformed"), arg or "")
        netdev, queue = parsed
        if not self.allocation.allow_unbound_xsk:
            # An unbound AF_XDP socket can be bound to any netdev of its netns:
            # raw frames anywhere, without CAP_NET_RAW.  Only by explicit opt-in.
            return self._note(XSK_SOCKET, Reply(FD_NAK, reason="unbound sockets not allowed"),
                              f"{netdev}:{queue}")
        checked = self._queue_check(XSK_SOCKET, f"{netdev}:{queue}", netdev, queue, FD_NAK)
        if isinstance(checked, Reply):
            return checked
        return Grant(Op.XSK_SOCKET, _FD_ACK, _FD_NAK, netdev=netdev, queue=queue)

    def _xsk_bound_socket(self, arg: str | None, request: Request, size: int) -> Reply | Grant:
        parts = arg.split(",") if arg is not None else []
        if len(parts) != 4 or request.nfds or not parts[0] \
                or not all(_UINT_RE.fullmatch(p) for p in parts[1:]):
            return self._note(XSK_BOUND_SOCKET, Reply(NAK, reason="malformed"), arg or "")
        netdev = parts[0]
        queue, frames, frame_size = (int(p) for p in parts[1:])
        label = f"{netdev}:{queue}:{frames}x{frame_size}"
        if frame_size not in FRAME_SIZES or not 0 < frames <= MAX_FRAMES \
                or frames & (frames - 1):
            return self._note(XSK_BOUND_SOCKET, Reply(FD_NAK, reason="bad umem geometry"), label)
        if frames * frame_size > self.allocation.umem_limit:
            return self._note(XSK_BOUND_SOCKET, Reply(FD_NAK, reason="umem over the limit"),
                              label)
        if queue > U32_MAX:
            return self._note(XSK_BOUND_SOCKET, Reply(NAK, reason="malformed"), label)
        checked = self._queue_check(XSK_BOUND_SOCKET, label, netdev, queue, FD_NAK)
        if isinstance(checked, Reply):
            return checked
        return Grant(Op.XSK_BOUND, _FD_ACK, _FD_NAK, netdev=netdev, queue=queue, frames=frames,
                     frame_size=frame_size)

    def _xsk_bind(self, arg: str | None, request: Request, size: int) -> Reply | Grant:
        parsed = self._netdev_queue(arg)
        if parsed is None:
            return self._note(XSK_BIND, Reply(NAK, reason="malformed"), arg or "")
        netdev, queue = parsed
        label = f"{netdev}:{queue}"
        if request.nfds != 1:
            why = "no socket fd" if request.nfds == 0 else "more than one fd"
            return self._note(XSK_BIND, Reply(XSK_BIND_NAK, reason=why), label)
        checked = self._queue_check(XSK_BIND, label, netdev, queue, XSK_BIND_NAK)
        if isinstance(checked, Reply):
            return checked
        return Grant(Op.XSK_BIND, _XSK_BIND_ACK, _XSK_BIND_NAK,
                     netdev=netdev, queue=queue)

    def _busy_poll(self, arg: str | None, request: Request, size: int) -> Reply | Grant:
        parts = arg.split(",") if arg is not None else []
        if len(parts) != 2 or not all(_UINT_RE.fullmatch(p) for p in parts):
            return self._note(BUSY_POLL, Reply(NAK, reason="malformed"), arg or "")
        label = f"{parts[0]},{parts[1]}"
        timeout_us, budget = int(parts[0]), int(parts[1])
        if timeout_us > INT_MAX or budget > U16_MAX:
            return self._note(BUSY_POLL, Reply(BUSY_POLL_NAK, reason="value out of range"), label)
        if request.nfds != 1:
            why = "no socket fd" if request.nfds == 0 else "more than one fd"
            return self._note(BUSY_POLL, Reply(BUSY_POLL_NAK, reason=why), label)
        return Grant(Op.BUSY_POLL, _BUSY_POLL_ACK, _BUSY_POLL_NAK,
                     timeout_us=timeout_us, budget=budget)

    def _fin(self, has_args: bool, request: Request) -> Reply:
        if has_args or request.nfds:
            return self._note(FIN, Reply(NAK, reason="malformed"))
        # /fin grants nothing, so it is answered in any state: a client that
        # gave up after /host_nak can still end the conversation cleanly.
        return self._note(FIN, _FIN_ACK)


_HANDLERS = {
    CONNECT: Session._connect,
    VERSION: Session._version,
    XSK_MAP_FD: Session._map_fd,
    XSK_SOCKET: Session._xsk_socket,
    XSK_BOUND_SOCKET: Session._xsk_bound_socket,
    XSK_BIND: Session._xsk_bind,
    BUSY_POLL: Session._busy_poll,
}
_GRANT_VERB = {Op.MAP_FD: XSK_MAP_FD, Op.XSK_SOCKET: XSK_SOCKET, Op.XSK_BIND: XSK_BIND,
               Op.XSK_BOUND: XSK_BOUND_SOCKET, Op.BUSY_POLL: BUSY_POLL}
_GRANTING = set(_GRANT_VERB.values())
