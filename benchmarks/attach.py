#!/usr/bin/env python3
"""Attaching our program to many veths: what it costs, and what changes it.

    sudo .venv/bin/python benchmarks/attach.py [--netdevs 200] [--threads 4]

In a private netns with ``--netdevs`` veth pairs, our program is attached to
every ``p<i>`` (load + attach + XSKMAP sized to the queues, as the daemon does
it) and detached again, in four ways, each timed as a whole:

- ``native``: one after another, at the driver's hook (what the daemon does);
- ``skb``: one after another, at the generic hook;
- ``native-threads``: ``--threads`` threads at once, each with its own netlink
  and BPF work, to see whether the kernel's part runs in parallel;
- ``native-warm``: one after another, each taking a warm program (the
  daemon's ``warmPrograms``: loaded and attached to a placeholder in a netns of
  its own beforehand, see ``cni_server/warm.py``); the refill each waited for
  is timed apart (``warming_p50_ms``), as the daemon does it in the background;
- ``load-only``: the BPF object loaded and closed, no attach: our share.

Prints one JSON line per way, with the median single attach among the first 40
and after the 48th: the kernel's XDP dispatcher makes the first 48 distinct
programs attached on the node (all namespaces, anyone's) wait for an RCU grace
period each.  On a machine that runs other XDP programs the split moves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpf.program import DEFAULT_PROGRAM, NetdevProgram, XdpMode, ensure_attached
from cni_server.netdev import link_info
from cni_server.warm import WarmPrograms
from tests.kernel import make_netns, veth_pairs
from tests.loop_thread import loop_thread

DISPATCHER_MAX = 48  # BPF_DISPATCHER_MAX in the kernel (kernel/bpf/dispatcher.c)


def attach_all(names: list[str], mode: XdpMode, threads: int
               ) -> tuple[float, float, str, list[float]]:
    """(attach all s, detach all s, mode used, each attach's ms in order)"""
    each: list[float] = []

    def one(name: str) -> NetdevProgram:
        t = time.perf_counter()
        info = link_info(name)
        program = ensure_attached(name, info.ifindex, info.queue_slots, mode)
        each.append((time.perf_counter() - t) * 1e3)
        return program

    t0 = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            programs = list(pool.map(one, names))
    else:
        programs = [one(n) for n in names]
    attach = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in programs:
        p.detach()
    return attach, time.perf_counter() - t0, programs[0].mode, each


async def _at_once() -> None:
    """The node is always quiet here: refill at once."""


def attach_warm(names: list[str]) -> tuple[list[float], list[float], float]:
    """(each attach's ms, each wait for a warm program's ms, detach all s); the
    first attach loads its own (nothing is warm before the first ask)."""
    each: list[float] = []
    waits: list[float] = []
    with loop_thread() as loop:
        warm = WarmPrograms(1, _at_once)
        asyncio.run_coroutine_threadsafe(warm.start(), loop).result()
        try:
            programs = []
            for i, name in enumerate(names):
                info = link_info(name)
                t = time.perf_counter()
                while i and not warm.describe()["warm"]:
                    time.sleep(0.0005)
                waits.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                programs.append(ensure_attached(name, info.ifindex, info.queue_slots,
                                                XdpMode.NATIVE, warm=warm))
                each.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            for p in programs:
                p.detach()
            detach = time.perf_counter() - t
        finally:
            asyncio.run_coroutine_threadsafe(warm.stop(), loop).result()
    return each, waits[1:], detach


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def load_only(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        DEFAULT_PROGRAM.load(1).close()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netdevs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("attach.py: needs root (netns, veth, XDP)")
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                      "netdevs": a.netdevs}))
    names = [f"p{i}" for i in range(a.netdevs)]
    with make_netns() as ns:
        veth_pairs(ns, a.netdevs)
        with ns.entered():  # threads started here inherit this netns
            for way, mode, threads in (("native", XdpMode.NATIVE, 1),
                                       ("skb", XdpMode.SKB, 1),
                                       ("native-threads", XdpMode.NATIVE, a.threads)):
                attach, detach, got, each = attach_all(names, mode, threads)
                # The kernel's XDP dispatcher takes the first DISPATCHER_MAX distinct
                # programs attached on the node, and each change to it waits for an
                # RCU grace period; later programs bypass it (docs/benchmarks.md).
                print(json.dumps({"way": way, "mode": got, "threads": threads,
                                  "attach_all_s": round(attach, 2),
                                  "attach_each_ms": round(attach / a.netdevs * 1e3, 2),
                                  "attach_first_40_p50_ms": round(median(each[:40]), 2),
                                  f"attach_after_{DISPATCHER_MAX}_p50_ms":
                                      round(median(each[DISPATCHER_MAX:]), 2),
                                  "detach_all_s": round(detach, 2)}), flush=True)
            each, waits, detach = attach_warm(names)
            print(json.dumps({"way": "native-warm", "mode": "native", "threads": 1,
                              "attach_first_40_p50_ms": round(median(each[1:41]), 2),
                              f"attach_after_{DISPATCHER_MAX}_p50_ms":
                                  round(median(each[DISPATCHER_MAX:]), 2),
                              "warming_p50_ms": round(median(waits[:40]), 2),
                              "detach_all_s": round(detach, 2)}), flush=True)
            took = load_only(a.netdevs)
            print(json.dumps({"way": "load-only", "all_s": round(took, 2),
                              "each_ms": round(took / a.netdevs * 1e3, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
