"""Floods against a real daemon process: idle connections, hammering clients, non-readers.

What is asserted is counted, not timed: every well-behaved handshake succeeds on
its first try (within the client's own timeout) while the flood goes on, so a
loaded machine slows these tests down but cannot fail them.  Latency figures
against the p99 target come from ``benchmarks/floods.py``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cni_server.control import call
from tests.kernel import ROOT, Daemon, NsFixture
from tests.load import (
    closed_by_server,
    hammer_results,
    hammering,
    handshake_latencies,
    non_reader,
    open_idle,
)

pytestmark = pytest.mark.kernel
HOST = socket.gethostname()


def server_stats(d: Daemon) -> dict[str, int]:
    stats: dict[str, int] = call(d.control, {"op": "status"})["status"]["server"]
    return stats


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def serve(netns: NsFixture, workdir: Path, start: Callable[..., Daemon], *args: str
          ) -> tuple[Daemon, Path]:
    netns.veth("va", "vb")
    d = start("--netdev", "va", "--socket-dir", str(workdir / "s"), "--allow-host", HOST, *args)
    return d, workdir / "s" / "va" / "afxdp.sock"


def test_two_thousand_idle_connections_are_held_then_dropped_at_their_timeout(
        netns: NsFixture, workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    d, path = serve(netns, workdir, start_daemon, "--idle-timeout", "3",
                    "--max-connections-per-socket", "2500")
    with netns.entered():
        idle = open_idle(path, 2000)
        try:
            assert wait_until(lambda: server_stats(d)["connections"] == 2000, 10), \
                server_stats(d)
            lat, failures = handshake_latencies(path, 100)
            assert (len(lat), failures) == (100, 0)
            assert closed_by_server(idle) == 0  # all still held
            assert wait_until(lambda: server_stats(d)["connections"] == 0, 10)
            assert closed_by_server(idle) == 2000
            assert server_stats(d)["idle_closed"] == 2000
        finally:
            for s in idle:
                s.close()
    assert d.proc.poll() is None


def test_with_default_limits_silent_connections_cannot_lock_others_out(
        netns: NsFixture, workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    d, path = serve(netns, workdir, start_daemon)
    with netns.entered():
        idle = open_idle(path, 2000)
        try:
            # 128 are held (the per-socket limit), the rest closed as newer ones came.
            assert wait_until(lambda: closed_by_server(idle) >= 2000 - 128, 10)
            assert server_stats(d)["connections"] == 128
            time.sleep(1.1)  # silent long enough to be evicted for a newcomer
            lat, failures = handshake_latencies(path, 50)
            assert (len(lat), failures) == (50, 0)
            # Each silent newcomer past 128 evicted the oldest silent one; the first
            # well-behaved client evicts one more, and its slot is free again after.
            stats = server_stats(d)
            assert (stats["evicted"], stats["connections"]) == (2000 - 128 + 1, 127)
            assert stats["rejected_limit"] == 0
        finally:
            for s in idle:
                s.close()


def test_two_hundred_hammering_clients_do_not_starve_a_well_behaved_one(
        netns: NsFixture, workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    d, path = serve(netns, workdir, start_daemon, "--max-connections-per-socket", "512")
    with hammering(netns.cmd(), path, clients=200) as procs, netns.entered():
        time.sleep(0.5)
        lat, failures = handshake_latencies(path, 100, pause=0.01)
    done = hammer_results(procs)
    assert (len(lat), failures) == (100, 0)
    assert done["failures"] == 0, done
    assert done["handshakes"] > 200, done
    assert d.proc.poll() is None


def test_clients_that_never_read_are_disconnected_while_others_are_served(
        netns: NsFixture, workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    import threading

    d, path = serve(netns, workdir, start_daemon)
    with netns.entered():
        endings: list[str] = []
        readers = [threading.Thread(target=lambda: endings.append(non_reader(path, HOST)))
                   for _ in range(20)]
        for t in readers:
            t.start()
        lat, failures = handshake_latencies(path, 50)
        for t in readers:
            t.join(30)
    assert endings == ["disconnected"] * 20
    assert (len(lat), failures) == (50, 0)
    assert wait_until(lambda: server_stats(d)["connections"] == 0, 5)
    assert "client_not_reading_replies" in d.log()


def test_out_of_fds_the_daemon_sheds_connections_backs_off_and_serves_again(
        netns: NsFixture, workdir: Path) -> None:
    """A daemon at its fd limit: accept() fails with EMFILE while a flood of
    connections waits.  It must neither spin nor write a log line per failure,
    and once the flood is gone it serves as before."""
    netns.veth("va", "vb")
    ready = workdir / "ready.json"
    log_path = workdir / "daemon.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(netns.cmd(
            "prlimit", "--nofile=64:64", "--", sys.executable, "-m", "cni_server.cli", "serve",
            "--netdev", "va", "--socket-dir", str(workdir / "s"), "--allow-host", HOST,
            "--no-control-socket", "--ready-file", str(ready)), stdout=out, stderr=out,
            cwd=ROOT)
    try:
        assert wait_until(ready.exists, 15), log_path.read_text()
        path = workdir / "s" / "va" / "afxdp.sock"
        with netns.entered():
            flood = open_idle(path, 150)  # the kernel's backlog holds what we cannot accept
            try:
                time.sleep(2)  # the daemon meets EMFILE over and over
                failures = log_path.read_text().count("event=accept_failed")
                assert 1 <= failures <= 4, failures  # once a second, with a count
                assert proc.poll() is None
            finally:
                for s in flood:
                    s.close()
            lat, failures_after = handshake_latencies(path, 20)
        assert (len(lat), failures_after) == (20, 0), log_path.read_text()[-3000:]
        assert "failures=" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
