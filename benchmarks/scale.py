#!/usr/bin/env python3
"""Scale: 1,000 netdevs and 500 live allocations.

    sudo .venv/bin/python benchmarks/scale.py [--netdevs 1000] [--allocations 500]

In a private netns with ``--netdevs`` veth pairs (``p<i>`` in the pool):

1. attach/detach: our program attached to every ``p<i>`` (load + native attach
   + XSKMAP sized to the queues, as the daemon does it), then detached from all;
   wall time for each pass.
2. ``afxdp daemon`` against the fake kubelet: start to the full device list,
   RSS; then the ListAndWatch update latency: a link set down (or up) by
   netlink until kubelet receives the list with that device's new health.
3. ``--allocations`` 1-device allocations made and owned by pods: daemon RSS and
   open fds; then handshake latency with all of them live: one measuring
   client doing sequential handshakes on random allocations' sockets while
   50 closed-loop clients (4 processes) hammer random sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyroute2 import NetNS

from bpf.program import NetdevProgram, ensure_attached
from cni_server.client import fetch_map_fd
from cni_server.netdev import link_info
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import Daemon, NsFixture, make_netns, veth_pairs
from tests.load import hammer_results, hammering, pct

HOST = socket.gethostname()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(pct(values, .5) * 1e3, 2),
            "p99_ms": round(pct(values, .99) * 1e3, 2), "max_ms": round(max(values) * 1e3, 2)}


def emit(name: str, **fields: object) -> None:
    print(json.dumps({"figure": name, **fields}), flush=True)


def attach_detach(ns: NsFixture, n: int) -> None:
    with ns.entered():
        t0 = time.perf_counter()
        programs: list[NetdevProgram] = []
        for i in range(n):
            info = link_info(f"p{i}")
            programs.append(ensure_attached(f"p{i}", info.ifindex, info.queue_slots))
        attach = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in programs:
            p.detach()
        detach = time.perf_counter() - t0
    emit("attach_detach", netdevs=n, attach_all_s=round(attach, 2),
         attach_each_ms=round(attach / n * 1e3, 2), detach_all_s=round(detach, 2),
         detach_each_ms=round(detach / n * 1e3, 2), mode=programs[0].mode)


def list_latency(ns: NsFixture, kubelet: object, rounds: int) -> None:
    from tests.fake_kubelet import FakeKubelet

    assert isinstance(kubelet, FakeKubelet)
    lat: list[float] = []
    with NetNS(ns.name) as ipr:
        for _ in range(rounds):
            name = f"p{random.randrange(50, 100)}"
            idx = ipr.link_lookup(ifname=name)[0]
            for state, health in (("down", "Unhealthy"), ("up", "Healthy")):
                t0 = time.perf_counter()
                ipr.link("set", index=idx, state=state)
                def arrived(devs: dict[str, Any], n: str = name, h: str = health) -> bool:
                    return bool(devs[n].health == h)

                kubelet.wait_devices(RESOURCE, arrived, 10)
                lat.append(time.perf_counter() - t0)
    emit("list_and_watch_update", **ms(lat), first_ms=round(lat[0] * 1e3, 1),
         worst_ms=sorted(round(x * 1e3) for x in lat)[-4:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netdevs", type=int, default=1000)
    ap.add_argument("--allocations", type=int, default=500)
    ap.add_argument("--handshakes", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the hammer phase")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scale.py: needs root (netns, veth, XDP)")
    if a.allocations + 100 > a.netdevs:
        raise SystemExit("scale.py: need --netdevs >= --allocations + 100")
    emit("machine", cpus=os.cpu_count(), kernel=platform.release())
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-", dir="/tmp"))
    work.chmod(0o755)
    with make_netns() as ns, running(work / "dp", work / "podres" / "kubelet.sock") as kubelet:
        emit("create_veths", netdevs=a.netdevs, seconds=round(veth_pairs(ns, a.netdevs), 2))
        attach_detach(ns, a.netdevs)

        cfg = write_config(work)
        t0 = time.perf_counter()
        d = Daemon(ns, work, "--config", str(cfg), mode="daemon", control=work / "control.sock")
        try:
            kubelet.wait_devices(RESOURCE, lambda devs: len(devs) == a.netdevs, 60)
            emit("daemon_start_to_full_list", seconds=round(time.perf_counter() - t0, 2),
                 rss_mib=rss_mib(d.proc.pid), fds=len(os.listdir(f"/proc/{d.proc.pid}/fd")))
            list_latency(ns, kubelet, 20)

            targets: list[tuple[str, str]] = []
            t0 = time.perf_counter()
            for i in range(100, 100 + a.allocations):
                mount = kubelet.allocate(RESOURCE, [f"p{i}"]).container_responses[0].mounts[0]
                kubelet.add_pod(f"ns{i}", HOST, RESOURCE, [f"p{i}"])  # pod name = our hostname
                targets.append((f"{mount.host_path}/afxdp.sock", f"p{i}"))
            made = time.perf_counter() - t0
            with ns.entered():  # every owner known: a handshake on each
                for path, dev in targets:
                    fetch_map_fd(path, dev, timeout=10).close()
            emit("live_allocations", allocations=a.allocations, allocate_all_s=round(made, 2),
                 rss_mib=rss_mib(d.proc.pid), fds=len(os.listdir(f"/proc/{d.proc.pid}/fd")))

            tfile = work / "targets.json"
            tfile.write_text(json.dumps(targets))
            rng = random.Random(1)
            with hammering(ns.cmd(), tfile, clients=50) as procs, ns.entered():
                time.sleep(0.5)
                lat: list[float] = []
                started = time.perf_counter()
                while len(lat) < a.handshakes or time.perf_counter() - started < a.seconds:
                    path, dev = rng.choice(targets)
                    t = time.perf_counter()
                    fetch_map_fd(path, dev).close()
                    lat.append(time.perf_counter() - t)
                    time.sleep(0.002)
                wall = time.perf_counter() - started
            done = hammer_results(procs)
            emit("handshakes_with_all_live_under_load", measured=ms(lat),
                 hammer_clients=50, hammer_per_s=round(done["handshakes"] / (wall + 0.5)),
                 hammer_failures=done["failures"], rss_mib=rss_mib(d.proc.pid),
                 fds=len(os.listdir(f"/proc/{d.proc.pid}/fd")))
        finally:
            d.stop()
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
