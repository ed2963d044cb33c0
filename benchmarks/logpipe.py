#!/usr/bin/env python3
"""A pod's handshakes while the daemon's log reader stalls.

    sudo .venv/bin/python benchmarks/logpipe.py [--handshakes 300] [--stall 0.5]

Under Kubernetes the daemon's stderr is a pipe that the container runtime reads
and writes to a file; on a busy disk the runtime falls behind, and the pipe
(64 KiB, about 250 handshake lines) fills.  Here ``afxdp serve`` runs on two
veths in a private netns with its output going through a relay (this script,
``relay`` mode) that copies it to the log file but stops reading for
``--stall`` seconds every ``--stall`` seconds.  200 clients hammer one netdev's
socket (a log line per handshake); the measured client makes a handshake on the
other socket every 5 ms.  Reported: its p50/p99/max with the relay keeping up,
and with it stalling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kernel import Daemon, NsFixture, make_netns
from tests.load import hammer_results, hammering, handshake_latencies, pct

HOST = socket.gethostname()


def relay(stall: float, argv: list[str]) -> int:
    """Run ``argv`` with its output through us: copied to our stdout, with a pause
    of ``stall`` s after every ``stall`` s of copying.  SIGTERM is passed on."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    assert child.stdout is not None
    fd = child.stdout.fileno()
    copying_since = time.monotonic()
    while chunk := os.read(fd, 1 << 16):
        os.write(1, chunk)
        if stall and time.monotonic() - copying_since >= stall:
            time.sleep(stall)
            copying_since = time.monotonic()
    return child.wait()


def measure(ns: NsFixture, work: Path, n: int, stall: float) -> dict[str, object]:
    sockdir = Path(tempfile.mkdtemp(dir=work))
    wrap = (sys.executable, str(Path(__file__).resolve()), "relay", "--stall", str(stall), "--")
    d = Daemon(ns, work, "--netdev", "va", "--netdev", "vc", "--socket-dir", str(sockdir),
               "--allow-host", HOST, "--max-connections-per-socket", "512", wrap=wrap)
    try:
        hammered = sockdir / "va" / "afxdp.sock"
        measured = sockdir / "vc" / "afxdp.sock"
        with hammering(ns.cmd(), hammered, clients=200) as procs, ns.entered():
            time.sleep(1.0)
            lat, failures = handshake_latencies(measured, n, netdev="vc", pause=0.005)
        done = hammer_results(procs)
    finally:
        d.stop()
    return {"stall_s": stall, "handshakes": len(lat), "failures": failures,
            "p50_ms": round(pct(lat, .5) * 1e3, 2), "p99_ms": round(pct(lat, .99) * 1e3, 2),
            "max_ms": round(max(lat) * 1e3, 2), "hammer_handshakes": done["handshakes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--stall", type=float, default=0.5)
    sub = ap.add_subparsers(dest="mode")
    r = sub.add_parser("relay")
    r.add_argument("--stall", type=float, default=0.5)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.mode == "relay":
        return relay(a.stall, a.argv[1:] if a.argv[:1] == ["--"] else a.argv)
    if os.geteuid() != 0:
        raise SystemExit("logpipe.py: needs root (netns, veth, XDP)")
    print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                      "kernel": platform.release()}))
    with make_netns() as ns, tempfile.TemporaryDirectory() as tmp:
        ns.veth("va", "vb")
        ns.veth("vc", "vd")
        for stall in (0.0, a.stall):
            print(json.dumps(measure(ns, Path(tmp), a.handshakes, stall)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
