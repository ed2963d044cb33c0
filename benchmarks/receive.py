#!/usr/bin/env python3
"""Frames per second through a handed-out map vs. a receiver that attaches its own program.

    sudo .venv/bin/python benchmarks/receive.py [--frames 200000] [--rounds 3]

One single-queue veth pair in a private netns; frames are injected on the peer
by ``afxdp send`` (AF_PACKET, one process).  The same receiver
(cni_server.receiver: UMEM + rings over mmap, busy polling) counts them in two
set-ups, alternating, ``--rounds`` times each:

- handed-out: ``afxdp serve`` attached our program; the receiver gets the XSKMAP
  fd by the DPDK handshake and inserts its own socket (what a pod does);
- privileged: the receiver loads and attaches the same program itself and
  inserts its socket into its own map (what DPDK/libxdp do as root).

Rate = frames received / time from the first to the last frame.  Both runs
share the sender and the kernel path (XDP redirect into the socket), so the
ratio shows what the handout costs on the data path: it should be ~1.0.  The
absolute rate is bound by this Python sender and receiver, not by the kernel.

``--c``: the receiver and the sender are benchmarks/xsk_bench.c instead (built
here with the system C compiler): an AF_XDP receiver that busy-polls its rings,
given the map fd, and an AF_PACKET sender (sendmmsg, qdisc bypassed), so that
the kernel path, not Python, is the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpf.program import LoadedProgram, XdpMode, attach, default_object, detach
from cni_server.client import fetch_map_fd
from cni_server.receiver import XskReceiver
from tests.kernel import Daemon, NsFixture, build_c, make_netns


def count(rx: XskReceiver, sender: subprocess.Popen[bytes], wanted: int) -> tuple[int, float]:
    """Receive until ``wanted`` frames, or 1 s of silence after the sender is done."""
    poller = select.poll()
    poller.register(rx.sock.fileno(), select.POLLIN)
    got, first, last = 0, 0.0, 0.0
    while got < wanted:
        n = rx.poll_batch()
        if n:
            now = time.perf_counter()
            first = first or now
            last = now
            got += n
            continue
        if sender.poll() is not None and not poller.poll(1000):
            break
    return got, (last - first) if got > 1 else 0.0


def one_run(ns: NsFixture, map_fd: int, frames: int) -> dict[str, float]:
    ifindex = socket.if_nametoindex("va")
    with XskReceiver.with_own_socket(frames=4096, ring_size=2048) as rx:
        rx.bind(ifindex, 0)
        rx.insert(map_fd, 0)
        sender = subprocess.Popen(ns.cmd(sys.executable, "-m", "cni_server.cli", "send",
                                         "--netdev", "vb", "--count", str(frames)),
                                  stdout=subprocess.DEVNULL)
        try:
            got, seconds = count(rx, sender, frames)
        finally:
            sender.wait(60)
        return {"received": got, "fps": got / seconds if seconds else 0.0}


def one_run_c(ns: NsFixture, map_fd: int, frames: int) -> dict[str, float]:
    """The C receiver (given the map fd) and the C sender, in ``ns``."""
    assert C_BENCH is not None
    ifindex = socket.if_nametoindex("va")  # (the caller is in ns)
    rx = subprocess.Popen(ns.cmd(str(C_BENCH), "rx", str(map_fd), str(ifindex), "0",
                                 str(frames)),
                          stdout=subprocess.PIPE, text=True, pass_fds=(map_fd,))
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise SystemExit("xsk_bench rx did not start")
        subprocess.run(ns.cmd(str(C_BENCH), "tx", "vb", str(frames)), check=True)
        got, first, last = (int(x) for x in rx.stdout.readline().split())
    finally:
        rx.kill()
        rx.wait()
    seconds = (last - first) / 1e9
    return {"received": got, "fps": got / seconds if seconds else 0.0}


C_BENCH: Path | None = None  # set by --c


def run_with(ns: NsFixture, map_fd: int, frames: int) -> dict[str, float]:
    return (one_run_c if C_BENCH else one_run)(ns, map_fd, frames)


def handed_out(ns: NsFixture, tmp: Path, frames: int) -> dict[str, float]:
    d = Daemon(ns, tmp, "--netdev", "va", "--socket-dir", f"{tmp}/s",
               "--allow-host", socket.gethostname(), "--log-level", "warning")
    try:
        with ns.entered(), fetch_map_fd(f"{tmp}/s/va/afxdp.sock", "va") as fd:
            return run_with(ns, fd.fileno(), frames)
    finally:
        d.stop()


def privileged(ns: NsFixture, tmp: Path, frames: int) -> dict[str, float]:
    with ns.entered():
        ifindex = socket.if_nametoindex("va")
        program = LoadedProgram.load(1, default_object())
        mode = attach(ifindex, program, XdpMode.AUTO, ifname="va")
        try:
            return run_with(ns, program.map_fd, frames)
        finally:
            detach(ifindex, program, mode, ifname="va")
            program.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c", action="store_true",
                    help="C receiver and sender (benchmarks/xsk_bench.c), not Python")
    a = ap.parse_args()
    global C_BENCH
    if os.geteuid() != 0:
        raise SystemExit("receive.py: needs root (netns, veth, XDP)")
    runs: dict[str, list[dict[str, float]]] = {"handed_out": [], "privileged": []}
    with make_netns() as ns, tempfile.TemporaryDirectory() as tmp:
        if a.c:
            C_BENCH = build_c(Path(__file__).with_name("xsk_bench.c"), Path(tmp))
        ns.veth("va", "vb")
        for r in range(a.rounds):
            # Alternate which goes first: the VM's speed drifts within a round too.
            order = (handed_out, privileged) if r % 2 == 0 else (privileged, handed_out)
            for how in order:
                runs[how.__name__].append(how(ns, Path(tmp), a.frames))
    med = {k: statistics.median(r["fps"] for r in v) for k, v in runs.items()}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "node": platform.node()},
        "consumer": "C (xsk_bench.c)" if a.c else "Python (cni_server.receiver)",
        "frames_per_run": a.frames, "runs": runs,
        "median_fps": {k: round(v) for k, v in med.items()},
        "ratio_handed_out_to_privileged": round(med["handed_out"] / med["privileged"], 3)
        if med["privileged"] else None,
        # Each round's two runs side by side (the VM drifts between rounds): the median
        # of the per-round ratios.
        "paired_ratio_median": round(statistics.median(
            h["fps"] / p["fps"] for h, p in zip(runs["handed_out"], runs["privileged"],
                                                 strict=True) if p["fps"]), 3),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
