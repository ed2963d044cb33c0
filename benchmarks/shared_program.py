#!/usr/bin/env python3
"""One XDP program for every netdev, or one per netdev: what an attach costs.

    sudo .venv/bin/python benchmarks/shared_program.py [--netdevs 60] [--frames 2000]

An experiment to inform a design choice, not the product's way.  The daemon
attaches a program of its own to each netdev (each with its own XSKMAP, the map
a pod receives).  The kernel calls XDP programs through a dispatcher that tracks
the first 48 distinct programs on the node, and every change to it waits for an
RCU grace period, so each of the first 48 attaches (and detaches) on a node pays
one.  ``benchmarks/shared_redirect.bpf.c`` is ONE program for all netdevs that
finds the netdev's own XSKMAP by ifindex in a map of maps: attaching it to
another netdev does not change the dispatcher.

In a private netns with ``--netdevs`` veth pairs (``p<i>``/``q<i>``):

- ``shared``: the object loaded once; per netdev an XSKMAP made, put in the map
  of maps at the netdev's ifindex, the program attached (driver mode); then a
  check that it works: an AF_XDP socket on ``p0`` queue 0, in ``p0``'s map,
  receives the frames sent into ``q0``, and frames sent into ``q1`` do not
  reach it (``p1``'s map is empty: they pass to the stack);
- ``per-netdev``: the daemon's own way (``bpf.program.ensure_attached``).

Prints one JSON line per way: median attach among the first 40 and after the
48th, and the detach of all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpf import libbpf
from bpf.program import NetdevProgram, XdpMode, ensure_attached
from cni_server.netdev import link_info
from cni_server.receiver import XskReceiver
from cni_server.traffic import send_frames
from tests.kernel import make_netns, veth_pairs

DISPATCHER_MAX = 48
SLOTS = 64  # XSKMAP_SLOTS in shared_redirect.bpf.c
HERE = Path(__file__).resolve().parent


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def build(out: Path) -> Path:
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
                    str(HERE / "shared_redirect.bpf.c"), "-o", str(out)], check=True)
    return out


def shared(obj_path: Path, names: list[str], frames: int) -> dict[str, object]:
    obj = libbpf.check_ptr(libbpf.call("bpf_object__open_file", str(obj_path).encode(), None),
                           "opening the shared object")
    inner_fds: list[int] = []
    attached: list[int] = []
    try:
        libbpf.check(libbpf.call("bpf_object__load", obj), "loading the shared object")
        prog = libbpf.check_ptr(libbpf.call("bpf_object__find_program_by_name", obj,
                                            b"afxdp_shared"), "finding afxdp_shared")
        prog_fd = libbpf.call("bpf_program__fd", prog)
        outer = libbpf.check_ptr(libbpf.call("bpf_object__find_map_by_name", obj,
                                             b"xsks_by_ifindex"), "finding xsks_by_ifindex")
        outer_fd = libbpf.call("bpf_map__fd", outer)
        each: list[float] = []
        into_map: list[float] = []  # of each: putting the netdev's XSKMAP in the map of maps
        for name in names:
            t = time.perf_counter()
            ifindex = link_info(name).ifindex
            inner = libbpf.xskmap_create(SLOTS)
            inner_fds.append(inner)
            t_map = time.perf_counter()
            libbpf.map_update_u32(outer_fd, ifindex, inner, f"adding {name}'s map")
            into_map.append((time.perf_counter() - t_map) * 1e3)
            libbpf.check(libbpf.call("bpf_xdp_attach", ifindex, prog_fd,
                                     libbpf.XDP_FLAGS_DRV_MODE, None), f"attaching to {name}")
            attached.append(ifindex)
            each.append((time.perf_counter() - t) * 1e3)
        got, stray = check_delivery(inner_fds[0], names, frames)
        t0 = time.perf_counter()
        while attached:
            libbpf.call("bpf_xdp_attach", attached.pop(), -1, libbpf.XDP_FLAGS_DRV_MODE, None)
        detach = time.perf_counter() - t0
    finally:
        for ifindex in attached:
            libbpf.call("bpf_xdp_attach", ifindex, -1, libbpf.XDP_FLAGS_DRV_MODE, None)
        for fd in inner_fds:
            os.close(fd)
        libbpf.call("bpf_object__close", obj)
    return {"way": "shared", "attach_first_40_p50_ms": round(median(each[:40]), 2),
            f"attach_after_{DISPATCHER_MAX}_p50_ms": round(median(each[DISPATCHER_MAX:]), 2),
            "of_which_map_of_maps_update_p50_ms": round(median(into_map), 2),
            "detach_all_s": round(detach, 3), "frames_sent_to_q0": frames,
            "received_on_p0": got, "received_from_q1": stray}


def check_delivery(p0_map: int, names: list[str], frames: int) -> tuple[int, int]:
    """(frames the socket on p0 got from q0, frames it got from q1 afterwards)"""
    rx = XskReceiver.with_own_socket()
    try:
        rx.bind(link_info(names[0]).ifindex, 0)
        rx.insert(p0_map, 0)
        send_frames("q0", frames)
        got = rx.receive(frames, timeout=5.0)
        send_frames("q1", frames)
        stray = rx.receive(frames, timeout=1.0)
    finally:
        rx.close()
    return got, stray


def per_netdev(names: list[str]) -> dict[str, object]:
    each: list[float] = []
    programs: list[NetdevProgram] = []
    try:
        for name in names:
            t = time.perf_counter()
            info = link_info(name)
            programs.append(ensure_attached(name, info.ifindex, info.queue_slots,
                                            XdpMode.NATIVE))
            each.append((time.perf_counter() - t) * 1e3)
        t0 = time.perf_counter()
        while programs:
            programs.pop().detach()
        detach = time.perf_counter() - t0
    finally:
        for p in programs:
            p.detach()
    return {"way": "per-netdev", "attach_first_40_p50_ms": round(median(each[:40]), 2),
            f"attach_after_{DISPATCHER_MAX}_p50_ms": round(median(each[DISPATCHER_MAX:]), 2),
            "detach_all_s": round(detach, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netdevs", type=int, default=60)
    ap.add_argument("--frames", type=int, default=2000)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("shared_program.py: needs root (netns, veth, XDP)")
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                      "netdevs": a.netdevs}))
    names = [f"p{i}" for i in range(a.netdevs)]
    with tempfile.TemporaryDirectory() as work, make_netns() as ns:
        obj = build(Path(work) / "shared.o")
        veth_pairs(ns, a.netdevs)
        with ns.entered():
            print(json.dumps(shared(obj, names, a.frames)), flush=True)
            print(json.dumps(per_netdev(names)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
