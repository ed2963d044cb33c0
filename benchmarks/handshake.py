#!/usr/bin/env python3
"""Full handshakes (connect .. fin, the map fd received) against the standalone daemon.

    sudo .venv/bin/python benchmarks/handshake.py [--sequential 5000] [--clients 50] [--seconds 5]

Starts ``afxdp serve`` on a veth in a private netns (logging one line per
handshake to a file, as in production), then measures, with two clients:

- ``c``: benchmarks/dpdk_client.c, DPDK's exact sequence in C (built here with
  the system C compiler): the client cost the daemon sees in the field;
- ``python``: our client library (cni_server.client), as the CLI and tests use it;

- sequential: one client, back-to-back handshakes: rate and p50/p99 latency;
- concurrent: N client processes on the same socket, closed loop, for S seconds:
  aggregate rate and p50/p99 latency of each handshake.

Daemon CPU per handshake comes from /proc/<pid>/stat (utime+stime).

``--split N`` adds a run of the same C clients spread over N daemons, each with
its own veth and socket: an upper bound for serving handshakes from N
processes on this machine.

Targets (2-core machine): >= 5,000/s sequential; p99 < 10 ms at 50 clients.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni_server.client import fetch_map_fd
from tests.kernel import Daemon, NsFixture, build_c, make_netns
from tests.machine import measuring


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def one(path: Path) -> float:
    t0 = time.perf_counter()
    fetch_map_fd(path, "va").close()
    return time.perf_counter() - t0


def summary(lat: list[float], wall: float, **extra: float) -> dict[str, float]:
    return {**extra, "handshakes": len(lat), "per_s": len(lat) / wall,
            "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "max_ms": max(lat) * 1e3}


def c_sequential(client: Path, path: Path, n: int) -> dict[str, float]:
    subprocess.run([str(client), str(path), "va", "200"], check=True, capture_output=True)
    t0 = time.perf_counter()
    out = subprocess.run([str(client), str(path), "va", str(n)], check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    return summary([int(x) / 1e9 for x in out.split()], wall)


def c_concurrent(client: Path, targets: list[tuple[Path, str]], clients: int, seconds: float
                 ) -> dict[str, float]:
    """``clients`` C clients for ``seconds``, spread round robin over ``targets``
    (socket path, netdev)."""
    deadline = time.time() + seconds
    procs = [subprocess.Popen([str(client), str(path), netdev, "0", str(int(deadline * 1e9))],
                              stdout=subprocess.PIPE, text=True)
             for path, netdev in (targets[i % len(targets)] for i in range(clients))]
    lat: list[float] = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"dpdk_client failed ({p.returncode})")
        lat.extend(int(x) / 1e9 for x in out.split())
    return summary(lat, seconds, clients=clients)


def _bare_server(path: str) -> None:
    """Reference: the same four round trips and fd pass, no checks, blocking, one client."""
    import array
    import socket

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(128)
    r, _w = os.pipe()
    fds = array.array("i", [r])
    while True:
        c, _ = srv.accept()
        for reply in (b"/host_ok", b"0.1", None, b"/fin_ack"):
            c.recvmsg(256, 64)
            if reply is None:
                c.sendmsg([b"/fd_ack"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            else:
                c.send(reply)
        c.close()


def reference(client: Path, work: Path, n: int) -> dict[str, float]:
    """Rate of a bare Python server on this machine right now (the machine may be noisy)."""
    path = work / "bare.sock"
    proc = mp.Process(target=_bare_server, args=(str(path),), daemon=True)
    proc.start()
    try:
        while not path.exists():
            time.sleep(0.01)
        return c_sequential(client, path, n)
    finally:
        proc.kill()
        proc.join()


def sequential(path: Path, n: int) -> dict[str, float]:
    for _ in range(200):
        one(path)  # warm-up
    t0 = time.perf_counter()
    lat = [one(path) for _ in range(n)]
    wall = time.perf_counter() - t0
    return {"handshakes": n, "per_s": n / wall, "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3}


def _worker(path: str, start: float, stop: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    lat: list[float] = []
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < stop:
        lat.append(one(Path(path)))
    out.put(lat)


def concurrent(path: Path, clients: int, seconds: float) -> dict[str, float]:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    start = time.time() + 1.0
    procs = [mp.Process(target=_worker, args=(str(path), start, start + seconds, q))
             for _ in range(clients)]
    for p in procs:
        p.start()
    lat: list[float] = []
    for _ in procs:
        lat.extend(q.get())
    for p in procs:
        p.join()
    return {"clients": clients, "handshakes": len(lat), "per_s": len(lat) / seconds,
            "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "max_ms": max(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3}


def split_daemon(ns: NsFixture, work: Path, i: int, a: argparse.Namespace
                 ) -> tuple[Daemon, Path, str]:
    """One more daemon for ``--split``: its own veth, socket directory and control socket."""
    netdev, _peer = ns.veth(f"sa{i}", f"sb{i}")
    (work / f"split{i}").mkdir()
    daemon = Daemon(ns, work / f"split{i}", "--netdev", netdev, "--socket-dir",
                    str(work / f"split{i}" / "sock"), "--max-connections-per-socket",
                    str(max(128, a.clients * 2)), *a.daemon_arg)
    return daemon, work / f"split{i}" / "sock" / netdev / "afxdp.sock", netdev


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--split", type=int, default=1, metavar="N",
                    help="also run the concurrent C clients spread over N daemons (each its own "
                         "veth and socket): what serving from N processes could reach here")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra argument for afxdp serve (repeatable), e.g. --daemon-arg=--log-level=warning")
    a = ap.parse_args()
    if a.split < 1:
        ap.error("--split must be at least 1")
    if os.geteuid() != 0:
        print("handshake.py: needs root (netns, veth, XDP)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-"))
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                              "python": platform.python_version()}}
    ns: NsFixture
    others: list[tuple[Daemon, Path, str]] = []
    with make_netns() as ns:
        ns.veth()
        daemon = Daemon(ns, work, "--netdev", "va", "--socket-dir", str(work / "sock"),
                        "--max-connections-per-socket", str(max(128, a.clients * 2)), *a.daemon_arg)
        try:
            path = work / "sock" / "va" / "afxdp.sock"
            pid = daemon.proc.pid

            def measured(name: str, fn: Callable[[], dict[str, float]],
                         pids: tuple[int, ...] = (pid,)) -> None:
                c0 = sum(map(cpu_seconds, pids))
                r = fn()
                r["daemon_cpu_us_per_handshake"] = ((sum(map(cpu_seconds, pids)) - c0) * 1e6
                                                    / r["handshakes"])
                results[name] = r

            client = build_c(Path(__file__).with_name("dpdk_client.c"), work)
            for i in range(1, a.split):
                others.append(split_daemon(ns, work, i, a))
            with measuring() as steal:
                results["reference"] = reference(client, work, a.sequential)
                with ns.entered():
                    measured("c_sequential", lambda: c_sequential(client, path, a.sequential))
                    measured("c_concurrent",
                             lambda: c_concurrent(client, [(path, "va")], a.clients, a.seconds))
                    if others:  # right after the one-daemon run, for a same-hour comparison
                        targets = [(path, "va")] + [(p, n) for _d, p, n in others]
                        measured("c_concurrent_split",
                                 lambda: {**c_concurrent(client, targets, a.clients, a.seconds),
                                          "daemons": a.split},
                                 (pid, *(d.proc.pid for d, _p, _n in others)))
                    measured("python_sequential", lambda: sequential(path, a.sequential))
                    measured("python_concurrent", lambda: concurrent(path, a.clients, a.seconds))
            results["steal_pct"] = round(100 * steal.share, 1)
        finally:
            for d in [daemon, *(d for d, _p, _n in others)]:
                d.stop()
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"machine: {results['machine']}; CPU time stolen by the hypervisor meanwhile: "
          f"{results['steal_pct']}%")
    for name in ("c_sequential", "c_concurrent", "c_concurrent_split", "python_sequential",
                 "python_concurrent"):
        if name not in results:
            continue
        r = results[name]
        assert isinstance(r, dict)
        who = f"{int(r['clients'])} clients" if "clients" in r else "1 client"
        if name == "c_concurrent_split":
            who += f" / {a.split} daemons"
        print(f"{name:18s} {who:>10s}: {r['handshakes']:6d} handshakes {r['per_s']:6.0f}/s  "
              f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:6.2f} ms  "
              f"daemon CPU {r['daemon_cpu_us_per_handshake']:4.0f} us/handshake")
    seq, conc, ref = results["c_sequential"], results["c_concurrent"], results["reference"]
    assert isinstance(seq, dict) and isinstance(conc, dict) and isinstance(ref, dict)
    print(f"reference (bare blocking Python server, no checks, same C client): {ref['per_s']:.0f}/s;"
          f" the daemon reaches {100 * seq['per_s'] / ref['per_s']:.0f}% of it")
    print("targets (C client, DPDK's sequence): sequential >= 5000/s: "
          + ("met" if seq["per_s"] >= 5000 else "NOT met")
          + f"; p99 < 10 ms with {a.clients} clients: " + ("met" if conc["p99_ms"] < 10 else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
