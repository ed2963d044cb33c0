"""The HTTP endpoint sheds what a hostile peer sends (no root needed: loopback only).

Judged by what the server counts and by what each client sees, never by how
fast the machine is: deadlines are checked from below only.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cni_server.health import MAX_LINE, HealthServer
from cni_server.metrics import Metrics


class Running:
    def __init__(self, server: HealthServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    @property
    def port(self) -> int:
        return int(self.server.address.rsplit(":", 1)[1])

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        s = socket.socket()
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        return s

    def get(self, path: str, source: str = "127.0.0.1") -> bytes:
        with self.connect(source) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture
def http() -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = HealthServer("127.0.0.1:0", Metrics(), lambda: (True, ""), max_connections=6,
                          max_per_peer=3, deadline=0.5)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield Running(server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        asyncio.run_coroutine_threadsafe(_finish_handlers(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _finish_handlers() -> None:
    """Server.close() leaves connection handlers running: end them before the loop
    stops, so none is destroyed pending."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def wait_open(http: Running, n: int) -> None:
    deadline = time.monotonic() + 10
    while http.server.open != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.server.open == n


def test_healthz_answers(http: Running) -> None:
    assert http.get("/healthz").startswith(b"HTTP/1.0 200 OK")


def test_a_header_line_over_the_limit_gets_431(http: Running) -> None:
    with http.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\nX-Big: " + b"a" * (MAX_LINE + 10) + b"\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.0 431 Request Header Fields Too Large")


def test_too_many_header_bytes_get_431(http: Running) -> None:
    with http.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n" + b"X-A: " + b"b" * 1000 + b"\r\n" * 1
                  + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 1000) for i in range(20)) + b"\r\n")
        assert read_all(s).startswith(b"HTTP/1.0 431")


def test_a_trickling_client_is_cut_at_the_request_deadline(http: Running) -> None:
    with http.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.0\r\n")
        got = b""
        for _ in range(200):  # one header byte at a time, far longer than the deadline
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.02)
        got = read_all(s)
        assert got == b""  # closed, never answered
        assert time.monotonic() - t0 >= 0.5
    wait_open(http, 0)


def test_a_peer_holding_its_share_leaves_slots_for_the_probes(http: Running) -> None:
    held = [http.connect("127.0.0.2") for _ in range(3)]  # max_per_peer
    try:
        wait_open(http, 3)
        with http.connect("127.0.0.2") as extra:  # one more from the same peer: shed at once
            assert read_all(extra) == b""
        assert http.server.refused == 1
        assert http.get("/healthz", "127.0.0.1").startswith(b"HTTP/1.0 200")  # the probe
    finally:
        for s in held:
            s.close()


def test_the_total_is_capped_whoever_connects(http: Running) -> None:
    held = [http.connect(f"127.0.0.{2 + i // 3}") for i in range(6)]  # max_connections
    try:
        wait_open(http, 6)
        with http.connect("127.0.0.9") as extra:
            assert read_all(extra) == b""
        assert http.server.open == 6 and http.server.refused == 1
    finally:
        for s in held:
            s.close()
    wait_open(http, 0)  # every slot back once they are gone (or their deadline passed)
