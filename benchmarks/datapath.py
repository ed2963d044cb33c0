#!/usr/bin/env python3
"""Per-packet cost of the XDP program, from the kernel's own BPF_PROG_TEST_RUN timing.

    sudo .venv/bin/python benchmarks/datapath.py [--repeat 1000000] [--rounds 5]

Three programs run on the same 64-byte UDP frame, ``--repeat`` times per
round, and the kernel reports the mean ns per run; the best of ``--rounds``
rounds is kept (the VM is noisy):

- bare: ``return XDP_PASS`` (the floor: the cost of running any XDP program);
- afxdp: our redirect program (empty queue slot: the lookup misses, XDP_PASS);
- libxdp: Debian libxdp1's default AF_XDP program (``xsk_def_xdp_prog.o``), when installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpf import libbpf
from bpf.program import LoadedProgram
from cni_server.traffic import udp_frame

LIBXDP_OBJECT = Path("/usr/lib/x86_64-linux-gnu/bpf/xsk_def_xdp_prog.o")
BARE = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_XSKMAP); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u32); } xsks_map SEC(".maps");
SEC("xdp") int bare_pass(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] SEC("license") = "GPL";
"""


def best_ns(program: LoadedProgram, frame: bytes, repeat: int, rounds: int) -> tuple[int, int]:
    results = [libbpf.test_run(program.prog_fd, frame, repeat) for _ in range(rounds)]
    retval = results[0][0]
    return retval, min(ns for _, ns in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("datapath.py: needs root (BPF)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-"))
    try:
        src = work / "bare.bpf.c"
        src.write_text(BARE)
        arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                              text=True).stdout.strip()
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
                        str(src), "-o", str(work / "bare.o")], check=True)
        frame = udp_frame(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02",
                          payload=b"\0" * 22)
        programs = {"bare XDP_PASS": LoadedProgram.load(1, work / "bare.o", "bare_pass"),
                    "afxdp_redirect": LoadedProgram.load(1)}
        if LIBXDP_OBJECT.exists():
            programs["libxdp xsk_def_prog"] = LoadedProgram.load(1, LIBXDP_OBJECT,
                                                                 "xsk_def_prog")
        results = {}
        for name, prog in programs.items():
            with prog:
                results[name] = best_ns(prog, frame, a.repeat, a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = results["bare XDP_PASS"][1] or 1
    print(f"BPF_PROG_TEST_RUN, {len(frame)}-byte frame, repeat {a.repeat}, best of {a.rounds}:")
    for name, (retval, ns) in results.items():
        print(f"  {name:22s} {ns:4d} ns/run  (x{ns / floor:.2f} of the floor)  retval {retval}")
    if "libxdp xsk_def_prog" in results:
        ours, theirs = results["afxdp_redirect"][1], results["libxdp xsk_def_prog"][1]
        print(f"  afxdp / libxdp: x{ours / max(theirs, 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
