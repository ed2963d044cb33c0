"""Log lines on a pipe whose reader falls behind (a container runtime on a busy disk):
the event loop goes on, no line is lost or reordered, and memory is bounded (no
kernel beyond a pipe)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_server import logs
from cni_server.logs import KeyValueFormatter, LineHandler, LogOutput
from cni_server.metrics import Metrics

LINE = 200  # bytes a line, about a handshake's


def line(i: int) -> bytes:
    return f"event=handshake n={i:08d} ".encode().ljust(LINE - 1, b"x") + b"\n"


class Reader(threading.Thread):
    """Reads a pipe to its end once ``go`` is set (or after ``timeout``, so that a
    writer that blocks is released and the test can fail instead of hanging)."""

    def __init__(self, fd: int, timeout: float = 5.0, slow: bool = False) -> None:
        super().__init__(daemon=True)
        self.fd, self.timeout, self.slow = fd, timeout, slow
        self.go = threading.Event()
        self.data = bytearray()

    def run(self) -> None:
        if not self.slow:
            self.go.wait(self.timeout)
        while chunk := os.read(self.fd, 4096 if self.slow else 1 << 16):
            self.data += chunk
            if self.slow:  # the pipe has room now and then, while lines wait
                time.sleep(0.005)


class Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def read_to_the_end(self, reader: Reader) -> bytes:
        """Close the write end and let ``reader`` read to the end: what it read."""
        os.close(self.w)
        self.w = -1
        reader.join(10)
        assert not reader.is_alive(), "the reader saw no end (a write end still open?)"
        return bytes(reader.data)

    def close(self) -> None:
        for fd in (self.w, self.r):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    try:
        yield p
    finally:
        p.close()


def test_a_reader_that_falls_behind_does_not_hold_up_the_loop(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    out = LogOutput(w)
    reader = Reader(r)
    reader.start()
    n = 10_000  # 2 MB: thirty times what the pipe holds

    async def body() -> float:
        assert out.attach(asyncio.get_running_loop())
        t0 = time.monotonic()
        for i in range(n):
            out.write(line(i))
        took = time.monotonic() - t0
        reader.go.set()
        while len(reader.data) < n * LINE:  # the loop writes the rest as the pipe drains
            await asyncio.sleep(0.01)
        out.detach()
        return took

    took = asyncio.run(body())
    assert took < 2.0, f"writing held up the loop for {took:.1f} s"
    assert pipe.read_to_the_end(reader) == b"".join(line(i) for i in range(n))


def test_lines_from_other_threads_keep_their_order_while_lines_wait(
        pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    out = LogOutput(w)
    reader = Reader(r, slow=True)
    reader.start()

    async def body() -> int:
        assert out.attach(asyncio.get_running_loop())
        most = 0
        for i in range(0, 3000, 2):  # the loop's lines and a worker's, alternately
            out.write(line(i))
            await asyncio.to_thread(out.write, line(i + 1))
            most = max(most, out.waiting)
        while len(reader.data) < 3000 * LINE:
            await asyncio.sleep(0.01)
        out.detach()
        return most

    assert asyncio.run(body()) > 0  # (lines did wait)
    assert pipe.read_to_the_end(reader) == b"".join(line(i) for i in range(3000))


def test_past_the_limit_a_write_waits_for_the_reader(pipe: Pipe) -> None:
    """Memory stays bounded: with 100 KB waiting, the next write waits (as a plain
    write on a full pipe would), and still nothing is lost."""
    r, w = pipe.r, pipe.w
    out = LogOutput(w, limit=100_000)
    reader = Reader(r, timeout=0.5)
    reader.start()

    async def body() -> float:
        assert out.attach(asyncio.get_running_loop())
        t0 = time.monotonic()
        for i in range(2000):  # 400 KB
            out.write(line(i))
        took = time.monotonic() - t0
        out.detach()
        return took

    took = asyncio.run(body())
    assert took >= 0.4  # waited for the reader
    assert pipe.read_to_the_end(reader) == b"".join(line(i) for i in range(2000))


def test_detaching_writes_what_waits_first(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    out = LogOutput(w)
    reader = Reader(r, timeout=0.2)
    reader.start()

    async def body() -> None:
        assert out.attach(asyncio.get_running_loop())
        for i in range(1000):
            out.write(line(i))
        out.detach()  # at the reader's pace, before returning
        out.write(line(1000))  # blocking, after all of them

    asyncio.run(body())
    assert pipe.read_to_the_end(reader) == b"".join(line(i) for i in range(1001))


def test_the_bytes_waiting_are_a_metric(pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    out = LogOutput(pipe.w)
    monkeypatch.setattr(logs, "_output", out)
    metrics = Metrics()
    metrics.track(metrics.log_waiting, logs.waiting_bytes)
    reader = Reader(pipe.r)
    reader.start()

    async def body() -> tuple[float, int, float]:
        assert out.attach(asyncio.get_running_loop())
        for i in range(1000):  # 200 KB, three pipes' worth
            out.write(line(i))
        stalled, waiting = gauge(metrics.exposition(), "afxdp_log_bytes_waiting"), out.waiting
        reader.go.set()
        while len(reader.data) < 1000 * LINE:
            await asyncio.sleep(0.01)
        drained = gauge(metrics.exposition(), "afxdp_log_bytes_waiting")
        out.detach()
        return stalled, waiting, drained

    stalled, waiting, drained = asyncio.run(body())
    assert stalled == waiting > 100_000  # all but what the pipe took
    assert drained == 0
    pipe.read_to_the_end(reader)


def gauge(exposition: bytes, name: str) -> float:
    [value] = [float(ln.split()[1]) for ln in exposition.decode().splitlines()
               if ln.startswith(name + " ")]
    return value


def test_attaching_again_keeps_one_descriptor_of_its_own(pipe: Pipe) -> None:
    out = LogOutput(pipe.w)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def body() -> None:
        assert out.attach(asyncio.get_running_loop())

    asyncio.run(body())
    before = fds()
    asyncio.run(body())  # a second loop: the first one's descriptor is closed
    assert fds() == before
    out.detach()
    assert fds() == before - 1


def test_a_file_is_written_as_before(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        out = LogOutput(fd)
        handler = LineHandler(out)
        handler.setFormatter(KeyValueFormatter())
        record = logging.LogRecord("afxdp.test", logging.INFO, __file__, 1, "event=x n=%s",
                                   ("a b",), None)

        async def body() -> bool:
            attached = out.attach(asyncio.get_running_loop())
            handler.emit(record)
            return attached

        assert asyncio.run(body()) is False
        text = (tmp_path / "log").read_text()
        assert text.endswith('logger=afxdp.test event=x n="a b"\n') and text.count("\n") == 1
    finally:
        os.close(fd)
