"""Load generators for the flood tests and benchmarks/floods.py.

Hammering runs in separate processes (``python -m tests.load hammer ...``
under nsenter), so the process that measures well-behaved handshakes has no
client threads competing for its GIL: what it measures is the daemon.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cni_server.client import HandshakeError, fetch_map_fd

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def open_idle(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections that never send anything."""
    raise_nofile(n + 256)
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(path))
        held.append(s)
    return held


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (EOF readable now)."""
    n = 0
    for s in socks:
        try:
            if s.recv(16, socket.MSG_DONTWAIT) == b"":
                n += 1
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def handshake_latencies(path: Path, n: int, netdev: str = "va",
                        pause: float = 0.0) -> tuple[list[float], int]:
    """``n`` well-behaved DPDK handshakes one after another: (latencies in s, failures)."""
    lat: list[float] = []
    failures = 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            fetch_map_fd(path, netdev).close()
        except (HandshakeError, OSError):
            failures += 1
            continue
        lat.append(time.perf_counter() - t0)
        if pause:
            time.sleep(pause)
    return lat, failures


def non_reader(path: Path, host: str, requests: int = 5000) -> str:
    """Send requests without ever reading the replies; returns how it ended."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    with s:
        s.connect(str(path))
        try:
            s.send(f"/connect,{host}".encode())
            for _ in range(requests):
                s.send(b"/version")
        except (BrokenPipeError, ConnectionResetError):
            return "disconnected"
        except TimeoutError:
            return "blocked"
    return "never disconnected"


@contextmanager
def hammering(netns_cmd: list[str], path: Path, clients: int, processes: int = 4
              ) -> Iterator[list[subprocess.Popen[str]]]:
    """``clients`` closed-loop handshaking clients, spread over ``processes``, until the block ends.

    ``path``: one socket (netdev ``va``), or a .json file of [socket, netdev]
    pairs the clients go through in turn.

    On exit each process prints {"handshakes": N, "failures": M}; the popen
    objects are yielded so the caller can read them after the block.
    """
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    procs = [subprocess.Popen([*netns_cmd, sys.executable, "-m", "tests.load", "hammer",
                               str(path), str(n)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for n in per if n]
    try:
        for p in procs:  # each says "ready" once its threads run
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield procs
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()  # the signal to stop
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def hammer_results(procs: list[subprocess.Popen[str]]) -> dict[str, int]:
    total = {"handshakes": 0, "failures": 0}
    for p in procs:
        assert p.stdout is not None
        doc = json.loads(p.stdout.read() or "{}")
        for k in total:
            total[k] += int(doc.get(k, 0))
    return total


def _targets(path: Path) -> list[tuple[str, str]]:
    """A socket (netdev ``va``), or a JSON file listing [socket, netdev] pairs."""
    if path.suffix == ".json":
        return [(str(p), str(n)) for p, n in json.loads(path.read_text())]
    return [(str(path), "va")]


def _hammer(path: Path, threads: int) -> None:
    stop = threading.Event()
    counts = [[0, 0] for _ in range(threads)]
    targets = _targets(path)

    def loop(i: int) -> None:
        n = i
        while not stop.is_set():
            sock, netdev = targets[n % len(targets)]
            n += threads
            try:
                fetch_map_fd(sock, netdev).close()
                counts[i][0] += 1
            except (HandshakeError, OSError):
                counts[i][1] += 1
                time.sleep(0.01)

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
    for w in workers:
        w.join(10)
    print(json.dumps({"handshakes": sum(c[0] for c in counts),
                      "failures": sum(c[1] for c in counts)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.load")
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hammer")
    h.add_argument("path", type=Path)
    h.add_argument("threads", type=int)
    a = ap.parse_args()
    raise_nofile(4096)
    _hammer(a.path, a.threads)


if __name__ == "__main__":
    main()
