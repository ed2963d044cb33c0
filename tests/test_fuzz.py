"""Property-based fuzzing of the handout server (hypothesis), against a real daemon process.

``afxdp serve`` runs as a child process on a veth in a test netns; this
process enters the netns, so its connections pass the peer-netns check and
reach every code path, authorized ones included.  Each case is a sequence of
actions on connections: valid and invalid requests, random bytes, NULs,
non-UTF-8, 64..65535-byte datagrams, 0..8 attached fds of random kinds, abrupt
closes mid-handshake.  Invariants:

- during the case: a reply is at most 127 bytes; a reply carries an fd only if
  it is ``/fd_ack`` for a request this connection was authorized for, and the
  fd is of the promised kind (an XSKMAP, or an AF_XDP socket);
- after every case: the daemon is alive and serves a correct handshake, and
  its open-fd count is back to its baseline;
- after all cases: its memory has not grown beyond noise.

``AFXDP_FUZZ_EXAMPLES`` raises the number of cases (default 150, seeded: the
same cases on every run, so CI stays deterministic).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpf import libbpf
from cni_server import xsk
from cni_server.client import fetch_map_fd
from cni_server.control import call
from tests.kernel import Daemon, NsFixture, make_netns

pytestmark = pytest.mark.kernel
HOST = socket.gethostname()
EXAMPLES = int(os.environ.get("AFXDP_FUZZ_EXAMPLES", "150"))

REQUESTS = [
    f"/connect,{HOST}", "/connect,someone-else", "/connect,", "/connect", f"/connect,{HOST},x",
    "/version", "/version,1", "/xsk_map_fd,va", "/xsk_map_fd,vb", "/xsk_map_fd,", "/xsk_map_fd",
    "/xsk_map_fd,lo", "/xsk_map_fd,va@1", "/fin", "/fin,now", "/config_busy_poll,20,64",
    "/config_busy_poll,x,y", "/config_busy_poll,-1,99999999", "/xsk_socket,va,0",
    "/xsk_socket,va,1", "/xsk_socket,va,9", "/xsk_socket,vb,0", "/xsk_bind,va,0", "/xsk_bind,va,1",
    "/xsk_bind,va", "/error", "/nak", "", "connect,x", "/CONNECT," + HOST,
]
# Requests that, granted, come back as /fd_ack with an fd of this kind.
FD_REQUESTS = {"/xsk_map_fd": "xskmap", "/xsk_socket": "xsk"}
FD_KINDS = ["pipe", "socketpair", "xskmap", "xsk", "devnull", "eventfd", "memfd"]


def _with_nul(pair: tuple[str, int]) -> bytes:
    req, pos = pair
    b = req.encode()
    pos %= len(b) + 1
    return b[:pos] + b"\0" + b[pos:]


def _big(pair: tuple[int, bytes]) -> bytes:
    size, pattern = pair
    return (pattern * (size // len(pattern) + 1))[:size]


payloads = st.one_of(
    st.sampled_from(REQUESTS).map(str.encode),
    st.sampled_from(REQUESTS).map(lambda r: r.encode() + b"\xff\xfe\x80"),  # not UTF-8
    st.tuples(st.sampled_from(REQUESTS), st.integers(0, 80)).map(_with_nul),
    st.binary(min_size=1, max_size=300),
    st.tuples(st.integers(64, 65535), st.binary(min_size=1, max_size=8)).map(_big),
)
Step = tuple[str, bytes, list[str]]
actions: st.SearchStrategy[Step] = st.one_of(
    st.tuples(st.just("send"), payloads, st.lists(st.sampled_from(FD_KINDS), max_size=8)),
    st.tuples(st.just("send_then_close"), payloads, st.lists(st.sampled_from(FD_KINDS),
                                                            max_size=8)),
    st.tuples(st.just("close"), st.just(b""), st.just([])),
    st.tuples(st.just("open_extra"), st.just(b""), st.just([])),  # a silent second connection
)
cases = st.lists(actions, min_size=1, max_size=12)


def make_fds(kinds: list[str]) -> list[int]:
    made: list[int] = []
    for kind in kinds:
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            made.append(r)
        elif kind == "socketpair":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            b.close()
            made.append(a.detach())
        elif kind == "xskmap":
            made.append(libbpf.xskmap_create(4, "fuzz_map"))
        elif kind == "xsk":
            made.append(xsk.create_socket().detach())
        elif kind == "devnull":
            made.append(os.open("/dev/null", os.O_RDONLY))
        elif kind == "eventfd":
            made.append(os.eventfd(0))
        else:
            made.append(os.memfd_create("fuzz"))
    return made


@dataclass
class Conn:
    """One client connection and what the client knows of its state."""

    sock: socket.socket
    authorized: bool = False
    alive: bool = True


@dataclass
class Target:
    ns: NsFixture
    daemon: Daemon
    path: Path
    pid: int
    rss: list[int] = field(default_factory=list)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def connections(self) -> int:
        status = call(self.daemon.control, {"op": "status"})["status"]
        return int(status["server"]["connections"])


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with make_netns() as ns, tempfile.TemporaryDirectory(prefix="afxdp-fuzz-") as tmp:
        ns.veth("va", "vb", queues=2)
        d = Daemon(ns, Path(tmp), "--netdev", "va", "--socket-dir", f"{tmp}/sock",
                   "--allow-host", HOST, "--socket-mode", "0666", "--idle-timeout", "5")
        try:
            # nsenter execs the daemon (no --fork for a net namespace): same pid.
            assert Path(f"/proc/{d.proc.pid}/exe").resolve().name.startswith("python")
            yield Target(ns, d, Path(tmp) / "sock" / "va" / "afxdp.sock", d.proc.pid)
        finally:
            d.stop()


def fd_kind(fd: int) -> str:
    if xsk.is_xdp_socket(fd):
        return "xsk"
    with contextlib.suppress(OSError):
        if libbpf.map_info(fd).type == libbpf.BPF_MAP_TYPE_XSKMAP:
            return "xskmap"
    return "other"


def exchange(conn: Conn, data: bytes, kinds: list[str], read: bool) -> None:
    """Send one datagram (with fds), read the reply, check the fd invariant."""
    fds = make_fds(kinds)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
            else []
        conn.sock.sendmsg([data], anc)
    except OSError:  # the server closed on us (after /fin, or an empty datagram)
        conn.alive = False
        return
    finally:
        for fd in fds:
            os.close(fd)
    if not read:
        return
    try:
        reply, ancdata, flags, _ = conn.sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
    except (ConnectionResetError, BrokenPipeError):
        conn.alive = False
        return
    got: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got += array.array("i", blob[: len(blob) - len(blob) % 4]).tolist()
    try:
        if not reply and not got:
            conn.alive = False  # EOF
            return
        assert len(reply) <= 127, reply
        assert not flags & socket.MSG_CTRUNC
        verb = data.split(b",", 1)[0].decode("ascii", "replace")
        if reply == b"/host_ok":
            conn.authorized = True
        if got:
            assert reply == b"/fd_ack", (data, reply)
            assert len(got) == 1, got
            assert conn.authorized, f"fd handed out before /host_ok: {data!r}"
            assert verb in FD_REQUESTS, data
            assert fd_kind(got[0]) == FD_REQUESTS[verb], (data, fd_kind(got[0]))
        else:
            assert reply != b"/fd_ack", f"/fd_ack without an fd for {data!r}"
        if reply == b"/fin_ack":
            conn.alive = False
    finally:
        for fd in got:
            os.close(fd)


def settle(t: Target, baseline: int | None = None, timeout: float = 2.0) -> int:
    """Wait until the daemon holds no connections and its fd count is at most
    ``baseline`` (when given); return its fd count.

    Asking the daemon for its connection count is itself a control connection,
    which the daemon closes a moment after answering: the count may briefly show
    that fd.  A leak never goes away, so waiting for the count to come down to
    the baseline tells the two apart.  Without a baseline, the lowest count seen
    over a short quiet spell is the baseline."""
    deadline = time.monotonic() + timeout
    lowest = t.fd_count()
    while True:
        idle = t.connections() == 0
        time.sleep(0.005)
        count = t.fd_count()
        lowest = min(lowest, count)
        if idle and baseline is not None and count <= baseline:
            return count
        if time.monotonic() > deadline:
            return count if baseline is not None else lowest
        if idle and baseline is None and time.monotonic() > deadline - timeout + 0.2:
            return lowest


def check_serves(t: Target) -> None:
    assert t.daemon.proc.poll() is None, t.daemon.log()
    with t.ns.entered(), fetch_map_fd(t.path, "va") as fd:
        assert fd_kind(fd.fileno()) == "xskmap"


def run_case(t: Target, steps: list[Step]) -> None:
    conns: list[Conn] = []
    with t.ns.entered():
        try:
            current: Conn | None = None
            for what, data, kinds in steps:
                if current is None or not current.alive:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.settimeout(5)
                    s.connect(str(t.path))
                    current = Conn(s)
                    conns.append(current)
                if what == "close":
                    current.sock.close()
                    current.alive = False
                elif what == "open_extra":
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.connect(str(t.path))
                    conns.append(Conn(s, alive=False))  # held silent until the case ends
                else:
                    exchange(current, data, kinds, read=(what == "send"))
                    if what == "send_then_close":
                        current.sock.close()
                        current.alive = False
        finally:
            for c in conns:
                c.sock.close()


def test_fuzzed_sessions_leave_the_daemon_serving_with_no_leak(target: Target) -> None:
    check_serves(target)
    baseline = settle(target)  # the count with no client connected
    target.rss.append(target.rss_kib())

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases)
    def one_case(steps: list[Step]) -> None:
        run_case(target, steps)
        assert settle(target, baseline) <= baseline, "daemon fd count did not return to baseline"
        check_serves(target)
        assert settle(target, baseline) <= baseline
        target.rss.append(target.rss_kib())

    one_case()
    # Memory: after the first cases warm up caches, RSS stays flat.
    warm = target.rss[min(20, len(target.rss) - 1)]
    assert max(target.rss) - warm < 4096, f"RSS grew from {warm} to {max(target.rss)} KiB"
    assert "Traceback" not in target.daemon.log()
