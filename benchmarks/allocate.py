#!/usr/bin/env python3
"""Device-plugin figures: Allocate latency, daemon start-up time and RSS at scale.

    sudo .venv/bin/python benchmarks/allocate.py [--netdevs 1000] [--one 200] [--eight 50]

In a private netns with ``--netdevs`` veth pairs (``p<i>`` in the pool, ``q<i>``
peers), ``afxdp daemon`` starts against the in-process fake kubelet (real gRPC
over Unix sockets).  Reported: time from process start to registered-and-ready,
the daemon's RSS then and after the Allocate runs, and the latency of kubelet's
Allocate call (attach program, create allocation, serve sockets, reply) for
1-device and 8-device containers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import Daemon, make_netns, run, veth_pairs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:  # e.g. --eight 0
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netdevs", type=int, default=1000)
    ap.add_argument("--one", type=int, default=200, help="1-device Allocate calls")
    ap.add_argument("--eight", type=int, default=50, help="8-device Allocate calls")
    ap.add_argument("--after", type=float, default=0.0, metavar="S",
                    help="wait S seconds after the full list before the first Allocate "
                         "(0: at once, as pods pending at a restart do; 2: steady state, "
                         "after the daemon's post-start heap settling)")
    ap.add_argument("--ipv6", action="store_true",
                    help="IPv6 on in the netns, as on a node (the tests' namespaces turn it "
                         "off): every link then has its link-local address and routes, which "
                         "the start-up dump reads too; waits 8 s for them to settle")
    ap.add_argument("--attach-ahead", action="store_true",
                    help="the pool's attachAhead (docs/kubernetes.md); give --after enough "
                         "seconds for the daemon to attach to every device first")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("allocate.py: needs root (netns, veth, XDP)", file=sys.stderr)
        return 2
    if a.one + 8 * a.eight > a.netdevs:
        print("allocate.py: not enough netdevs for that many allocations", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-", dir="/tmp"))
    work.chmod(0o755)
    res: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                              "netdevs": a.netdevs}
    try:
        with make_netns() as ns:
            if a.ipv6:
                run("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w",
                    "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
            res["create_veths_s"] = veth_pairs(ns, a.netdevs)
            if a.ipv6:
                time.sleep(8)
                res["ipv6_routes"] = run("ip", "-n", ns.name, "-6", "route", "show", "table",
                                         "all").stdout.count("\n")
            with running(work / "dp", work / "podres" / "kubelet.sock") as kubelet:
                cfg = write_config(work, attachAhead=a.attach_ahead)
                t0 = time.perf_counter()
                daemon = Daemon(ns, work, "--config", str(cfg), mode="daemon",
                                control=work / "control.sock")
                try:
                    devs = kubelet.wait_devices(RESOURCE, lambda d: len(d) == a.netdevs, 60)
                    res["startup_to_full_list_s"] = time.perf_counter() - t0
                    res["devices_listed"] = len(devs)
                    res["rss_mib_idle"] = rss_mib(daemon.proc.pid)
                    time.sleep(a.after)
                    ready_at = time.perf_counter()
                    slow: list[tuple[float, str, float]] = []  # (ms, which, s after the list)
                    names = [f"p{i}" for i in range(a.netdevs)]
                    one = []
                    for i in range(a.one):
                        t = time.perf_counter()
                        kubelet.allocate(RESOURCE, [names[i]])
                        one.append(time.perf_counter() - t)
                        slow.append((one[-1] * 1e3, f"1-device #{i}", t - ready_at))
                    eight = []
                    base = a.one
                    for i in range(a.eight):
                        ids = names[base + 8 * i: base + 8 * i + 8]
                        t = time.perf_counter()
                        kubelet.allocate(RESOURCE, ids)
                        eight.append(time.perf_counter() - t)
                        slow.append((eight[-1] * 1e3, f"8-device #{i}", t - ready_at))
                    res["allocate_1_device_ms"] = {"n": len(one), "p50": pct(one, .5) * 1e3,
                                                   "p99": pct(one, .99) * 1e3}
                    res["allocate_8_devices_ms"] = {"n": len(eight), "p50": pct(eight, .5) * 1e3,
                                                    "p99": pct(eight, .99) * 1e3}
                    res["slowest"] = [{"ms": ms, "call": which, "at_s": at}
                                      for ms, which, at in sorted(slow, reverse=True)[:3]]
                    res["rss_mib_after"] = rss_mib(daemon.proc.pid)
                    res["allocations"] = a.one + a.eight
                finally:
                    daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    o, e = res["allocate_1_device_ms"], res["allocate_8_devices_ms"]
    assert isinstance(o, dict) and isinstance(e, dict)
    print(f"machine: {res['machine']}")
    print(f"{a.netdevs} veth pairs created in {res['create_veths_s']:.1f} s"
          + (f"; IPv6 on, {res['ipv6_routes']} IPv6 routes" if a.ipv6 else ""))
    print(f"daemon start to the full list of {res['devices_listed']} devices at kubelet: "
          f"{res['startup_to_full_list_s']:.2f} s; RSS {res['rss_mib_idle']:.1f} MiB")
    if a.after:
        print(f"(first Allocate {a.after:g} s after the full list)")
    print(f"Allocate, 1 device:  p50 {o['p50']:.1f} ms  p99 {o['p99']:.1f} ms  (n={o['n']})")
    print(f"Allocate, 8 devices: p50 {e['p50']:.1f} ms  p99 {e['p99']:.1f} ms  (n={e['n']})")
    slowest = res["slowest"]
    assert isinstance(slowest, list)
    print("slowest calls: " + ", ".join(f"{c['call']} {c['ms']:.0f} ms at +{c['at_s']:.2f} s"
                                        for c in slowest))
    print(f"RSS after {res['allocations']} allocations: {res['rss_mib_after']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
