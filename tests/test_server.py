"""The asyncio handout server on the real kernel: many clients, hostile clients, limits, no leaks.

The server runs in-process on an event-loop thread, serving a real veth with
our program attached, inside a test netns that this (main) thread enters, so
client sockets opened here pass the peer-netns check.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bpf import libbpf
from bpf.program import NetdevProgram, ensure_attached
from cni_server import xsk
from cni_server.allocation import AllocatedDevice, Allocation
from cni_server.client import Client, HandshakeError, fetch_map_fd
from cni_server.netdev import link_info
from cni_server.netns import Netns
from cni_server.receiver import XskReceiver, receive_all
from cni_server.server import HandoutServer, Limits, ServerError
from cni_server.traffic import send_frames
from tests.kernel import NsFixture, make_netns
from tests.loop_thread import loop_thread, on_loop

pytestmark = pytest.mark.kernel
T = TypeVar("T")
HOST = socket.gethostname()


@dataclass
class Served:
    path: Path
    server: HandoutServer
    loop: asyncio.AbstractEventLoop
    allocation: Allocation

    def on_loop(self, fn: Callable[[], T]) -> T:
        return on_loop(self.loop, fn)

    def stats(self) -> dict[str, Any]:
        return self.on_loop(self.server.stats)


@contextlib.contextmanager
def serve(ns: NsFixture, sockdir: Path, *, netdevs: tuple[str, ...] = ("va",), queues: int = 1,
          limits: Limits | None = None, unbound: bool = False) -> Iterator[Served]:
    peers = {"va": "vb", "vc": "vd"}
    for dev in netdevs:
        ns.veth(dev, peers[dev], queues=queues)
    with ns.entered(), loop_thread() as loop:
        programs: list[NetdevProgram] = []
        here = Netns.current()
        server = HandoutServer(limits=limits or Limits())
        try:
            for dev in netdevs:
                info = link_info(dev)
                programs.append(ensure_attached(dev, info.ifindex, info.queue_slots))
            alloc = Allocation(
                id="test", socket_paths=(sockdir / "afxdp.sock",),
                netdevs={p.netdev: AllocatedDevice(p.netdev, p, here) for p in programs},
                hostnames_allowed=frozenset({HOST}), allow_unbound_xsk=unbound,
            )
            served = Served(sockdir / "afxdp.sock", server, loop, alloc)
            served.on_loop(lambda: server.serve(alloc, mode=0o666))
            yield served
        finally:
            with contextlib.suppress(Exception):
                on_loop(loop, server.close)
            for p in programs:
                p.detach()
            here.close()


@pytest.fixture
def served(netns: NsFixture, tmp_path: Path) -> Iterator[Served]:
    with serve(netns, tmp_path) as s:
        yield s


@pytest.fixture
def served_unbound(netns: NsFixture, tmp_path: Path) -> Iterator[Served]:
    """An allocation that opted in to handing out unbound sockets (/xsk_socket)."""
    with serve(netns, tmp_path, unbound=True) as s:
        yield s


def settle(served: Served, handshakes: int, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until the server has finished ``handshakes`` connections and holds none open.

    Waiting for "no connections" alone races with accept: a count of zero can
    mean the server has not accepted the clients yet.
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = served.stats()
        done = sum(stats["handshakes"].values())
        if (done >= handshakes and not stats["connections"]) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(path))
    return s


def ask(s: socket.socket, data: bytes, fds: list[int] | None = None) -> bytes:
    if fds:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
            __import__("array").array("i", fds))))])
    else:
        s.send(data)
    reply, anc, _, _ = s.recvmsg(256, socket.CMSG_SPACE(16))
    assert not anc, "no fd may come with this reply"
    return reply


# -- many clients ---------------------------------------------------------------------------


def test_dpdk_pattern_two_netdevs_four_queues_eight_handshakes_on_one_socket(
        netns: NsFixture, tmp_path: Path) -> None:
    with serve(netns, tmp_path, netdevs=("va", "vc"), queues=4) as s, netns.entered():
        ids = set()
        for netdev in ("va", "vc"):
            for _queue in range(4):
                with fetch_map_fd(s.path, netdev) as fd:
                    info = libbpf.map_info(fd.fileno())
                    assert info.type == libbpf.BPF_MAP_TYPE_XSKMAP and info.max_entries == 4
                    ids.add((netdev, info.id))
        assert len({i for _, i in ids}) == 2  # one map per netdev, the same each time
        assert s.stats()["handshakes"] == {"granted": 8}


def test_fifty_concurrent_clients_all_get_the_map(served: Served, netns: NsFixture) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                with fetch_map_fd(served.path, "va") as fd:
                    assert libbpf.map_info(fd.fileno()).type == libbpf.BPF_MAP_TYPE_XSKMAP
        except BaseException as e:
            errors.append(e)

    with netns.entered():
        threads = [threading.Thread(target=worker) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    stats = served.stats()
    assert stats["handshakes"] == {"granted": 500}
    # One source of counts: `afxdp status` (stats) and /metrics say the same.
    exposition = served.server.metrics.exposition().decode()
    assert 'afxdp_handshakes_total{result="granted"} 500.0' in exposition
    assert f'afxdp_fds_handed_out_total{{kind="xsk_map"}} {stats["fds_sent"]}.0' in exposition


def test_connections_held_open_do_not_block_new_ones(served: Served, netns: NsFixture) -> None:
    with netns.entered():
        held = [raw(served.path) for _ in range(20)]
        try:
            held[0].send(b"/connect,")  # a half-finished handshake
            for _ in range(5):
                with fetch_map_fd(served.path, "va", timeout=2):
                    pass
        finally:
            for h in held:
                h.close()


@pytest.mark.parametrize("spin", [0.0, 50e-6, 1e-3], ids=["spin-off", "spin-50us", "spin-1ms"])
def test_handshakes_with_the_spin_off_default_and_long(netns: NsFixture, tmp_path: Path,
                                                       spin: float) -> None:
    with serve(netns, tmp_path, limits=Limits(handshake_spin=spin)) as s, netns.entered():
        for _ in range(30):
            with fetch_map_fd(s.path, "va", timeout=2) as fd:
                assert libbpf.map_info(fd.fileno()).type == libbpf.BPF_MAP_TYPE_XSKMAP
        with raw(s.path) as held:  # an open connection: the server spins after each reply
            assert ask(held, f"/connect,{HOST}".encode()) == b"/host_ok"
            with fetch_map_fd(s.path, "va", timeout=2):
                pass
            assert ask(held, b"/version") == b"0.1"
        assert settle(s, 32)["handshakes"] == {"granted": 31, "ok": 1}


# A client in another process that keeps one connection busy: /version as fast
# as it gets answers, for up to 20 s or until killed.
_CHATTY_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(("/connect," + sys.argv[2]).encode()); assert s.recv(64) == b"/host_ok"
end = time.monotonic() + 20
while time.monotonic() < end:
    s.send(b"/version"); s.recv(64)
"""


def test_a_client_that_never_pauses_does_not_starve_the_event_loop(
        netns: NsFixture, tmp_path: Path) -> None:
    """The spin keeps serving while requests keep coming; the loop's timers must still run.

    Judged by counts, not by wall time (a loaded machine slows everything down):
    every timer runs while the client is being served, and no loop wakeup served
    more than its round cap before the loop got its turn back."""
    with serve(netns, tmp_path, limits=Limits(handshake_spin=1e-3)) as s, netns.entered():
        client = subprocess.Popen([sys.executable, "-c", _CHATTY_CLIENT, str(s.path), HOST])
        try:
            deadline = time.monotonic() + 10
            while s.stats()["replies"].get("0.1", 0) < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            served_at_tick: list[int] = []
            done = threading.Event()

            def tick() -> None:
                served_at_tick.append(s.server.metrics.replies.get("/version", "0.1", "ok"))
                if len(served_at_tick) < 40:
                    s.loop.call_later(0.01, tick)
                else:
                    done.set()

            s.loop.call_soon_threadsafe(lambda: s.loop.call_later(0.01, tick))
            assert done.wait(30), f"the loop ran {len(served_at_tick)} of 40 timers in 30 s"
            longest = s.stats()["longest_wakeup"]
        finally:
            client.kill()
            client.wait()
    # The client really was being served between the timers, not only before them.
    between = [b - a for a, b in itertools.pairwise(served_at_tick)]
    assert sum(between) > 100, between
    assert sum(1 for n in between if n) > 20, between
    # One wakeup serves at most 32 rounds (one request per round for one client).
    assert 1 <= longest <= 32, longest


# -- hostile and broken clients ---------------------------------------------------------------


def test_garbage_gets_nak_and_the_connection_stays_usable(served: Served, netns: NsFixture
                                                          ) -> None:
    with netns.entered(), raw(served.path) as s:
        assert ask(s, f"/connect,{HOST}".encode()) == b"/host_ok"
        for junk in (b"\xff\xfe\x00", b"/version\x00", b"/nope", b"A" * 200, b"/xsk_map_fd,"):
            assert ask(s, junk) == b"/nak"
        assert ask(s, b"/version") == b"0.1"


def test_oversized_datagram_gets_nak(served: Served, netns: NsFixture) -> None:
    with netns.entered(), raw(served.path) as s:
        assert ask(s, b"/connect," + b"x" * 60000) == b"/nak"
        assert ask(s, f"/connect,{HOST}".encode()) == b"/host_ok"


def test_extra_fds_get_nak_and_are_closed_by_the_server(served: Served, netns: NsFixture
                                                        ) -> None:
    r, w = os.pipe()
    try:
        with netns.entered(), raw(served.path) as s:
            assert ask(s, f"/connect,{HOST}".encode()) == b"/host_ok"
            assert ask(s, b"/version", [r, r, r]) == b"/nak"
            os.close(r)
            r = -1
            # Every read end (ours and the copies the server received) is closed now.
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)


def test_more_fds_than_accepted_truncates_and_gets_nak(served: Served, netns: NsFixture) -> None:
    pipes = [os.pipe() for _ in range(12)]
    try:
        with netns.entered(), raw(served.path) as s:
            assert ask(s, f"/connect,{HOST}".encode()) == b"/host_ok"
            assert ask(s, b"/version", [r for r, _ in pipes]) == b"/nak"
            assert ask(s, b"/version") == b"0.1"
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_requests_before_connect_get_nak(served: Served, netns: NsFixture) -> None:
    with netns.entered(), raw(served.path) as s:
        assert ask(s, b"/version") == b"/nak"
        assert ask(s, b"/xsk_map_fd,va") == b"/nak"


def test_wrong_hostname_and_foreign_netdev_are_refused(served: Served, netns: NsFixture) -> None:
    with netns.entered(), Client(served.path) as c:
        with pytest.raises(HandshakeError, match="/host_nak"):
            c.connect("someone-else")
        c.connect(HOST)
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("vb")
        assert c.xsk_map_fd("va").fileno() >= 0


def test_abrupt_close_mid_handshake_is_cleaned_up(served: Served, netns: NsFixture) -> None:
    with netns.entered():
        for _ in range(50):
            s = raw(served.path)
            s.send(f"/connect,{HOST}".encode())
            s.close()
    stats = settle(served, 50)
    assert stats["connections"] == 0
    assert sum(stats["handshakes"].values()) == 50


def test_client_that_never_reads_is_disconnected(served: Served, netns: NsFixture) -> None:
    with netns.entered(), raw(served.path) as s:
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            for _ in range(100000):  # until our own send buffer is full
                s.send(b"/version")
        assert settle(served, 1)["connections"] == 0
        with fetch_map_fd(served.path, "va"):
            pass  # others still served


def test_idle_connections_are_dropped_at_the_timeout(netns: NsFixture, tmp_path: Path) -> None:
    with serve(netns, tmp_path, limits=Limits(idle_timeout=0.3)) as s, netns.entered():
        idle = raw(s.path)
        active = raw(s.path)
        try:
            t0 = time.monotonic()
            assert idle.recv(64) == b""  # closed by the server
            waited = time.monotonic() - t0  # never early; late only if the machine is slow
            assert waited >= 0.25
            assert s.stats()["idle_closed"] >= 1
        finally:
            idle.close()
            active.close()


def test_connection_limit_per_socket_closes_extra_connections_at_once(
        netns: NsFixture, tmp_path: Path) -> None:
    limits = Limits(max_connections=100, max_connections_per_socket=3)
    with serve(netns, tmp_path, limits=limits) as s, netns.entered():
        held = [raw(s.path) for _ in range(3)]
        try:
            for h in held:
                assert ask(h, f"/connect,{HOST}".encode()) == b"/host_ok"
            extra = raw(s.path)
            with extra:
                assert extra.recv(64) == b""
            assert s.stats()["rejected_limit"] == 1
        finally:
            for h in held:
                h.close()
        assert settle(s, 3)["connections"] == 0  # the rejected one is no handshake
        with fetch_map_fd(s.path, "va"):
            pass


def test_at_the_limit_a_newcomer_evicts_the_connection_silent_the_longest(
        netns: NsFixture, tmp_path: Path) -> None:
    limits = Limits(max_connections=100, max_connections_per_socket=3, evict_idle_after=0.2)
    with serve(netns, tmp_path, limits=limits) as s, netns.entered():
        held = [raw(s.path) for _ in range(3)]
        try:
            time.sleep(0.3)
            # The newest one talks, so it is no longer the longest silent.
            assert ask(held[0], f"/connect,{HOST}".encode()) == b"/host_ok"
            with fetch_map_fd(s.path, "va") as fd:
                assert libbpf.map_info(fd.fileno()).type == libbpf.BPF_MAP_TYPE_XSKMAP
            assert held[1].recv(64) == b""  # silent since before held[2] opened
            assert s.stats()["evicted"] == 1
            assert s.stats()["rejected_limit"] == 0
            assert ask(held[0], b"/version") == b"0.1"  # the active one is untouched
        finally:
            for h in held:
                h.close()


def test_total_limit_evicts_across_sockets(netns: NsFixture, tmp_path: Path) -> None:
    limits = Limits(max_connections=2, max_connections_per_socket=2, evict_idle_after=0.2)
    with serve(netns, tmp_path, limits=limits) as s, netns.entered():
        held = [raw(s.path) for _ in range(2)]
        try:
            for h in held:  # past /connect: no longer silent newcomers
                assert ask(h, f"/connect,{HOST}".encode()) == b"/host_ok"
            fresh = raw(s.path)  # same peer, nobody idle long enough yet: closed at once
            with fresh:
                assert fresh.recv(64) == b""
            time.sleep(0.3)
            with fetch_map_fd(s.path, "va"):
                pass
            assert held[0].recv(64) == b""  # idle the longest
            stats = s.stats()
            assert (stats["evicted"], stats["rejected_limit"]) == (1, 1)
        finally:
            for h in held:
                h.close()


def test_silent_newcomers_give_way_to_the_next_one_at_once(
        netns: NsFixture, tmp_path: Path) -> None:
    """Connections that never passed /connect are the first to go, whatever their age."""
    limits = Limits(max_connections=100, max_connections_per_socket=3)
    with serve(netns, tmp_path, limits=limits) as s, netns.entered():
        silent = [raw(s.path) for _ in range(3)]
        try:
            with fetch_map_fd(s.path, "va"):  # no second needed: the oldest silent goes
                pass
            assert silent[0].recv(64) == b""
            assert s.stats()["evicted"] == 1 and s.stats()["rejected_limit"] == 0
        finally:
            for h in silent:
                h.close()


_CHATTY_PEER = r"""
import socket, sys, time
path, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conns = []
for _ in range(n):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(path)
    c.send(f"/connect,{host}".encode()); c.recv(64)
    conns.append(c)
print("ready", flush=True)
while True:  # keep every connection busy: none is ever idle
    for c in conns:
        try:
            c.send(b"/version"); c.recv(64)
        except OSError:
            pass
    time.sleep(0.01)
"""


def test_a_peer_holding_every_slot_with_chatty_connections_cannot_lock_another_out(
        netns: NsFixture, tmp_path: Path) -> None:
    limits = Limits(max_connections=100, max_connections_per_socket=16)
    with serve(netns, tmp_path, limits=limits) as s, netns.entered():
        hog = subprocess.Popen([sys.executable, "-c", _CHATTY_PEER, str(s.path), HOST, "16"],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
            for _ in range(5):  # each on its first try
                with fetch_map_fd(s.path, "va") as fd:
                    assert libbpf.map_info(fd.fileno()).type == libbpf.BPF_MAP_TYPE_XSKMAP
            # The first took a slot from the hog (which does not reconnect): the rest
            # found that slot free again.
            assert s.stats()["evicted"] == 1 and s.stats()["rejected_limit"] == 0
        finally:
            hog.kill()
            hog.wait()


# -- our extension and busy poll -------------------------------------------------------------------


def test_xsk_socket_then_bind_inserts_the_daemons_socket(served_unbound: Served,
                                                        netns: NsFixture) -> None:
    served = served_unbound
    with netns.entered(), Client(served.path) as c:
        c.connect()
        sock = c.xsk_socket("va", 0)
        assert xsk.is_xdp_socket(sock.fileno())
        with XskReceiver(sock, frames=64, ring_size=64) as rx:
            c.xsk_bind("va", 0, rx.sock.fileno())
            with pytest.raises(HandshakeError, match="/xsk_bind_nak"):
                c.xsk_bind("va", 0, rx.sock.fileno())  # already bound


def test_a_bound_socket_receives_with_no_capability_and_cannot_be_bound_elsewhere(
        served: Served, netns: NsFixture) -> None:
    """The default zero-capability flow: the client gets a socket the daemon bound to
    the granted queue (and its UMEM), never one it could point at another netdev."""
    with netns.entered():
        with Client(served.path) as c:
            c.connect()
            with pytest.raises(HandshakeError, match="/fd_nak"):
                c.xsk_socket("va", 0)  # unbound sockets: not without the opt-in
            sock, umem = c.xsk_bound_socket("va", 0, 64, 2048)
        with XskReceiver.from_bound(sock, umem, frames=64, frame_size=2048) as rx:
            with pytest.raises(OSError) as bound:
                xsk.bind(rx.sock.fileno(), socket.if_nametoindex("vb"), 0)
            assert bound.value.errno == errno.EBUSY
            with pytest.raises(OSError) as reg:
                xsk.size_rings(rx.sock.fileno(), 64, 64, 64, 64)
            assert reg.value.errno == errno.EBUSY
            assert send_frames("vb", 50) == 50
            assert receive_all([rx], 50, 5) == 50


def test_xsk_bind_refuses_a_socket_it_did_not_hand_out(served_unbound: Served,
                                                       netns: NsFixture) -> None:
    served = served_unbound
    with netns.entered(), Client(served.path) as c:
        c.connect()
        c.xsk_socket("va", 0).close()
        with XskReceiver.with_own_socket(frames=64, ring_size=64) as own, pytest.raises(
                HandshakeError, match="/xsk_bind_nak"):
            c.xsk_bind("va", 0, own.sock.fileno())
        r, w = os.pipe()
        try:
            with pytest.raises(HandshakeError, match="/xsk_bind_nak"):
                c.xsk_bind("va", 0, r)
        finally:
            os.close(r)
            os.close(w)


def test_busy_poll_is_set_on_an_af_xdp_socket_only(served: Served, netns: NsFixture) -> None:
    with netns.entered(), Client(served.path) as c:
        c.connect()
        sock, umem = c.xsk_bound_socket("va", 0, 64, 2048)
        umem.close()
        with sock:
            c.config_busy_poll(sock.fileno(), 20, 64)
            s = socket.socket(xsk.AF_XDP, socket.SOCK_RAW, 0, fileno=os.dup(sock.fileno()))
            with s:
                assert s.getsockopt(socket.SOL_SOCKET, xsk.SO_BUSY_POLL) == 20
                assert s.getsockopt(socket.SOL_SOCKET, xsk.SO_PREFER_BUSY_POLL) == 1
                # SO_BUSY_POLL_BUDGET cannot be read back (the kernel has no getsockopt for it).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(
                HandshakeError, match="/config_busy_poll_nak"):
            c.config_busy_poll(udp.fileno(), 20, 64)


def test_busy_poll_only_on_sockets_of_the_callers_allocation(served: Served,
                                                             netns: NsFixture) -> None:
    """DPDK's own socket, made in the netdev's namespace (map mode), may be tuned; an
    AF_XDP socket from elsewhere may not: the daemon is nobody's CAP_NET_ADMIN."""
    with make_netns() as other, other.entered():
        elsewhere = xsk.create_socket()  # an AF_XDP socket of another namespace
    try:
        with netns.entered(), Client(served.path) as c:
            c.connect()
            with xsk.create_socket() as own:  # where the netdev is, as DPDK makes it
                c.config_busy_poll(own.fileno(), 20, 64)
            with pytest.raises(HandshakeError, match="/config_busy_poll_nak"):
                c.config_busy_poll(elsewhere.fileno(), 20, 64)
    finally:
        elsewhere.close()
    assert served.stats()["replies"].get("not a socket of this allocation") == 1


# -- socket files ------------------------------------------------------------------------------


def test_a_live_socket_is_not_taken_over(served: Served) -> None:
    dup = Allocation(id="other", netdevs={}, hostnames_allowed=frozenset(),
                     socket_paths=(served.path,))
    other = HandoutServer()  # e.g. a second daemon
    with pytest.raises(ServerError, match="already serving"):
        served.on_loop(lambda: other.serve(dup))
    with pytest.raises(ServerError, match="already served"):
        served.on_loop(lambda: served.server.serve(dup))
    served.on_loop(other.close)


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "afxdp.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    s.close()  # leaves the file, nobody listening

    async def main() -> None:
        server = HandoutServer()
        alloc = Allocation(id="x", netdevs={}, hostnames_allowed=frozenset(), socket_paths=(path,))
        server.serve(alloc)
        try:
            with raw(path):
                pass
        finally:
            server.close()
        assert not path.exists()

    asyncio.run(main())


def test_regular_file_at_the_socket_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "afxdp.sock"
    path.write_text("not a socket")

    async def main() -> None:
        alloc = Allocation(id="x", netdevs={}, hostnames_allowed=frozenset(), socket_paths=(path,))
        with pytest.raises(ServerError, match="not a socket"):
            HandoutServer().serve(alloc)

    asyncio.run(main())
    assert path.read_text() == "not a socket"


# -- fds ----------------------------------------------------------------------------------------------


def test_no_fd_leak_after_thousands_of_good_and_bad_sessions(served: Served, netns: NsFixture
                                                             ) -> None:
    def round_of_sessions() -> None:
        for i in range(250):
            with fetch_map_fd(served.path, "va"):
                pass
            with Client(served.path) as c:  # daemon-made socket and UMEM, never mapped
                c.connect()
                # The kernel frees a closed socket's queue a few ms later: the next
                # one may find it busy (/fd_nak): both paths must leak nothing.
                with contextlib.suppress(HandshakeError):
                    for fd in c.xsk_bound_socket("va", 0, 64, 2048):
                        fd.close()
            with raw(served.path) as s:
                kind = i % 5
                if kind == 0:
                    ask(s, b"\xff" * 100)
                elif kind == 1:
                    r, w = os.pipe()
                    ask(s, b"/version", [r, w])
                    os.close(r)
                    os.close(w)
                elif kind == 2:
                    ask(s, b"/connect,intruder")
                elif kind == 3:
                    ask(s, f"/connect,{HOST}".encode())
                    r, w = os.pipe()
                    ask(s, b"/config_busy_poll,1,1", [r])
                    os.close(r)
                    os.close(w)
                else:
                    s.send(f"/connect,{HOST}".encode())  # and hang up without reading

    with netns.entered():
        round_of_sessions()  # warm-up: lazily opened fds (libbpf, /proc) settle
        settle(served, 750)
        before = open_fds()
        for _ in range(4):
            round_of_sessions()
        settle(served, 3750)
        after = open_fds()
    stats = served.stats()
    assert stats["connections"] == 0
    assert after == before, f"{after - before} fds leaked"
    assert sum(stats["handshakes"].values()) >= 3750
