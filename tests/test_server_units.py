"""The handout server from the protocol to the socket, without root or a kernel: real
Unix sockets, epoll, SCM_RIGHTS and peer identity; grants done by tests/fakes.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from cni_server.allocation import Allocation
from cni_server.client import Client
from cni_server.netns import Netns
from cni_server.protocol import Op
from cni_server.server import HandoutServer
from tests.fakes import FakeBroker, FakeProgram, fake_allocation
from tests.loop_thread import loop_thread, on_loop

T = TypeVar("T")
HOST = "pod-a"


@dataclass
class Served:
    path: Path
    server: HandoutServer
    broker: FakeBroker
    allocation: Allocation
    programs: list[FakeProgram]
    loop: asyncio.AbstractEventLoop

    def on_loop(self, fn: Callable[[], T]) -> T:
        return on_loop(self.loop, fn)

    def client(self) -> Client:
        return Client(self.path, server_uid=os.getuid())


@contextlib.contextmanager
def serve(tmp_path: Path, hostnames: frozenset[str] = frozenset({HOST})) -> Iterator[Served]:
    with loop_thread() as loop:
        here = Netns.current()
        broker = FakeBroker()
        server = HandoutServer(broker=broker)
        path = tmp_path / "afxdp.sock"
        alloc, programs = fake_allocation(here, "eth1", "eth2", hostnames=hostnames,
                                          socket_paths=(path,))
        served = Served(path, server, broker, alloc, programs, loop)
        try:
            served.on_loop(lambda: server.serve(alloc, mode=0o600))
            yield served
        finally:
            served.on_loop(server.close)
            for p in programs:
                p.close()
            here.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_the_dpdk_handshake_hands_the_netdevs_map_and_closes_after_fin(served: Served) -> None:
    with served.client() as c:
        assert c.request(f"/connect,{HOST}") == ("/host_ok", None)
        assert c.request("/version") == ("0.1", None)
        reply, fd = c.request("/xsk_map_fd,eth2")
        assert reply == "/fd_ack" and fd is not None
        assert same_file(fd.fileno(), served.programs[1].map_fd)
        fd.close()
        assert c.request("/fin") == ("/fin_ack", None)
        assert c.sock.recv(64) == b""  # the server closed it
    assert [(g.op, g.netdev) for g in served.broker.grants] == [(Op.MAP_FD, "eth2")]
    assert served.on_loop(served.server.stats)["handshakes"] == {"granted": 1}


def test_refusals_grant_nothing_and_keep_the_connection_usable(served: Served) -> None:
    with served.client() as c:
        assert c.request("/xsk_map_fd,eth1") == ("/nak", None)  # before /connect
        assert c.request("/connect,someone-else")[0] == "/host_nak"
        assert c.request(b"\x00garbage")[0] == "/nak"
        assert c.request(f"/connect,{HOST}")[0] == "/host_ok"
        assert c.request("/xsk_map_fd,eth9") == ("/fd_nak", None)  # not ours
        assert c.request("/xsk_bound_socket,eth1,0,4096,2048")[0] == "/fd_nak"  # broker says no
    assert [g.op for g in served.broker.grants] == [Op.XSK_BOUND]


def test_many_clients_at_once_each_get_the_map(served: Served) -> None:
    def handshake(_: int) -> bool:
        with served.client() as c:
            c.request(f"/connect,{HOST}")
            reply, fd = c.request("/xsk_map_fd,eth1")
            ok = reply == "/fd_ack" and fd is not None and same_file(
                fd.fileno(), served.programs[0].map_fd)
            if fd is not None:
                fd.close()
            return ok

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(handshake, range(200)))
    assert served.on_loop(served.server.stats)["handshakes"] == {"granted": 200}


def test_a_connect_waits_for_the_owner_lookup_then_is_answered(tmp_path: Path) -> None:
    """Kubernetes: the allocation's pod is not known when the client connects; the
    session defers, the server asks its owner lookup, then answers the same request."""
    asked: list[str] = []

    async def resolve(allocation: Allocation) -> None:
        asked.append(allocation.id)
        await asyncio.sleep(0.05)
        allocation.hostnames_allowed = frozenset({HOST})

    with serve(tmp_path, hostnames=frozenset()) as served:
        served.server.resolve_owner = resolve
        with served.client() as c:
            assert c.request(f"/connect,{HOST}")[0] == "/host_ok"
            assert c.request("/xsk_map_fd,eth1")[0] == "/fd_ack"
        assert asked == ["fake"]


def test_the_socket_file_is_the_servers_and_goes_with_it(tmp_path: Path) -> None:
    with serve(tmp_path) as served:
        st = os.stat(served.path)
        assert st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o600
    assert not served.path.exists()
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(served.path))
