#!/usr/bin/env python3
"""A well-behaved client's handshake latency while the daemon is flooded.

    sudo .venv/bin/python benchmarks/floods.py [--handshakes 300]

Starts ``afxdp serve`` on a veth in a private netns and measures, in a
process that runs no load of its own, sequential DPDK handshakes
(connect .. fin, map fd received; 5 ms apart) in each scenario:

- quiet: nothing else going on (the floor);
- idle-2000: 2,000 connections opened and held silent (per-socket limit raised
  to hold them all), then the time until the idle timeout dropped them all;
- idle-2000-default-limits: the same with the default limits: 128 held, the
  rest closed at once, newcomers evict the longest silent;
- hammer-200-same-socket: 200 closed-loop handshaking clients (4 processes x
  50 threads) on the socket the measured client uses;
- hammer-200-other-socket: the same flood on another netdev's socket (in
  Kubernetes: another pod's);
- non-readers-20: 20 clients sending requests without reading replies.

Target: the well-behaved client's p99 stays under 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni_server.control import call
from tests.kernel import Daemon, NsFixture, make_netns
from tests.load import (
    closed_by_server,
    hammer_results,
    hammering,
    handshake_latencies,
    non_reader,
    open_idle,
    pct,
)

HOST = socket.gethostname()


def report(name: str, lat: list[float], failures: int, **extra: object) -> dict[str, object]:
    row = {"scenario": name, "handshakes": len(lat), "failures": failures,
           "p50_ms": round(pct(lat, 0.5) * 1e3, 2), "p99_ms": round(pct(lat, 0.99) * 1e3, 2),
           "max_ms": round(max(lat) * 1e3, 2), **extra}
    print(json.dumps(row), flush=True)
    return row


def connections(d: Daemon) -> int:
    return int(call(d.control, {"op": "status"})["status"]["server"]["connections"])


def start(ns: NsFixture, work: Path, *args: str) -> tuple[Daemon, Path]:
    sockdir = Path(tempfile.mkdtemp(dir=work))
    d = Daemon(ns, work, "--netdev", "va", "--socket-dir", str(sockdir), "--allow-host", HOST,
               "--log-level", "warning", *args)
    return d, sockdir / "va" / "afxdp.sock"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=300)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("floods.py: needs root (netns, veth, XDP)")
    n = a.handshakes
    print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                      "kernel": platform.release()}))
    with make_netns() as ns, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ns.veth("va", "vb")
        ns.veth("vc", "vd")

        d, path = start(ns, work)
        with ns.entered():
            report("quiet", *handshake_latencies(path, n, pause=0.005))
        d.stop()

        d, path = start(ns, work, "--idle-timeout", "5", "--max-connections-per-socket", "2500")
        with ns.entered():
            idle = open_idle(path, 2000)
            t0 = time.monotonic()
            while connections(d) < 2000 and time.monotonic() - t0 < 10:
                time.sleep(0.02)
            held = connections(d)
            lat, failures = handshake_latencies(path, n, pause=0.005)
            t0 = time.monotonic()
            while closed_by_server(idle) < len(idle) and time.monotonic() - t0 < 30:
                time.sleep(0.05)
            opened_to_dropped = time.monotonic() - t0
            report("idle-2000", lat, failures, held=held,
                   all_dropped_s_after_measuring=round(opened_to_dropped, 2))
            for s in idle:
                s.close()
        d.stop()

        d, path = start(ns, work)
        with ns.entered():
            idle = open_idle(path, 2000)
            time.sleep(1.2)
            held = connections(d)
            report("idle-2000-default-limits", *handshake_latencies(path, n, pause=0.005),
                   held=held)
            for s in idle:
                s.close()
        d.stop()

        for where in ("same-socket", "other-socket"):
            d, path = start(ns, work, "--netdev", "vc", "--max-connections-per-socket", "512")
            target = path if where == "same-socket" else path.parent.parent / "vc" / "afxdp.sock"
            with hammering(ns.cmd(), path, clients=200) as procs, ns.entered():
                time.sleep(1.0)
                t0 = time.monotonic()
                lat, failures = handshake_latencies(target, n, netdev=target.parent.name,
                                                    pause=0.005)
                wall = time.monotonic() - t0
            done = hammer_results(procs)
            report(f"hammer-200-{where}", lat, failures, hammer_handshakes=done["handshakes"],
                   hammer_failures=done["failures"],
                   hammer_per_s_approx=round(done["handshakes"] / (wall + 1.0)))
            d.stop()

        d, path = start(ns, work)
        with ns.entered():
            endings: list[str] = []
            stop = threading.Event()

            def flood() -> None:
                while not stop.is_set():
                    endings.append(non_reader(path, HOST))

            threads = [threading.Thread(target=flood) for _ in range(20)]
            for t in threads:
                t.start()
            lat, failures = handshake_latencies(path, n, pause=0.005)
            stop.set()
            for t in threads:
                t.join(30)
        report("non-readers-20", lat, failures, non_reader_sessions=len(endings),
               disconnected=endings.count("disconnected"))
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
