#!/usr/bin/env python3
"""The pod-start critical path: Allocate + CNI ADD + the first handshake, p50/p99.

    sudo .venv/bin/python benchmarks/podstart.py [--runs 50]

What a pod waits for before its first packet, in the order kubelet and the
runtime do it, against ``afxdp daemon`` and the in-process fake kubelet:

1. kubelet's Allocate for one device (attach our program, create the
   allocation, serve its socket);
2. the runtime's CNI ADD (our executable as ``afxdp install-cni`` installs it,
   on the host's python3, moving the netdev into the pod's netns as ``net1``);
3. the pod's first DPDK handshake (connect .. fin, map fd received) from inside
   its netns, with its pod name as hostname.

Each run uses a fresh netdev (so Allocate attaches a program each time);
between runs, CNI DEL and the pod's removal (not timed) clean up.
``--together K``: K pods admitted, then their K CNI ADDs started at once.
``--netdevs N``: N netdevs in the pool (at least one per run), as on a node with
many VFs: every link event then costs the inventory's work over all of them.
``--warm N``: the daemon's warmPrograms (0: each Allocate loads its program);
``--gap S``: S seconds between one pod's removal and the next pod's Allocate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni_server.client import fetch_map_fd
from tests.cni_runner import CNI_PATH, install_plugin
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import Daemon, make_netns, veth_pairs
from tests.load import pct
from tests.machine import measuring


def cni_env(command: str, pod_ns: Path, cid: str, cni_path: str, ifname: str = "net1"
            ) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": str(pod_ns),
            "CNI_IFNAME": ifname, "CNI_PATH": cni_path, "PATH": "/usr/sbin:/usr/bin",
            # the pod, as the runtime names it (here the container id is the pod's name)
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}"}


def cni(node_cmd: list[str], command: str, conf: dict[str, Any], pod_ns: Path, cid: str,
        cni_path: str, ifname: str = "net1") -> None:
    proc = subprocess.run(node_cmd, input=json.dumps(conf).encode(),
                          env=cni_env(command, pod_ns, cid, cni_path, ifname), capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"CNI {command} failed: {proc.stdout.decode()}{proc.stderr.decode()}")


def adds_together(node_cmd: list[str], confs: list[dict[str, Any]], pod_ns: Path,
                  names: list[str], cni_path: str) -> list[float]:
    """The CNI ADDs of pods admitted together, started at once (as a runtime does for
    pods scheduled together): each one's seconds, start to exit."""
    def add(j: int) -> float:
        t0 = time.perf_counter()
        cni(node_cmd, "ADD", confs[j], pod_ns, names[j], cni_path, f"net{j}")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(add, range(len(names))))


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, .5) * 1e3, 1), "p99_ms": round(pct(values, .99) * 1e3, 1),
            "max_ms": round(max(values) * 1e3, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--together", type=int, default=1, metavar="K",
                    help="K pods admitted, then their K CNI ADDs at once (pods scheduled "
                         "together); reports Allocate and CNI ADD only")
    ap.add_argument("--netdevs", type=int, default=0, metavar="N",
                    help="netdevs in the pool (default: one per run)")
    ap.add_argument("--attach-ahead", action="store_true",
                    help="the pool's attachAhead: every free device already carries a fresh "
                         "program when its pod comes (the runs start once all do)")
    ap.add_argument("--gap", type=float, default=0.0, metavar="SECONDS",
                    help="pause between one pod's removal and the next pod's Allocate "
                         "(default 0: back to back)")
    ap.add_argument("--warm", type=int, default=None, metavar="N",
                    help="the daemon's warmPrograms (default: its default; 0: off)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("podstart.py: needs root (netns, veth, XDP)")
    netdevs = max(a.netdevs, a.runs)
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-", dir="/tmp"))
    work.chmod(0o755)
    phases: dict[str, list[float]] = {"allocate": [], "cni_add": [], "first_handshake": [],
                                      "total": []}
    try:
        with make_netns() as node, make_netns() as pod, \
                running(work / "dp", work / "podres" / "kubelet.sock") as kubelet:
            veth_pairs(node, netdevs)
            warm = {} if a.warm is None else {"warmPrograms": a.warm}
            cfg = write_config(work, node={"cniSocket": str(work / "cni.sock"), **warm},
                               attachAhead=a.attach_ahead)
            d = Daemon(node, work, "--config", str(cfg), mode="daemon",
                       control=work / "control.sock")
            bindir = install_plugin(work / "bin")
            cni_path = f"{bindir}:{CNI_PATH}"
            plugin = [str(bindir / "afxdp")]  # executed from the node's netns, as a runtime does
            try:
                kubelet.wait_devices(RESOURCE, lambda devs: len(devs) == netdevs, 30 + netdevs / 20)
                if a.attach_ahead:
                    deadline = time.monotonic() + 60 + netdevs / 10
                    while not all(node.xdp_prog_id(f"p{i}") for i in range(netdevs)):
                        if time.monotonic() > deadline:
                            raise SystemExit("podstart.py: programs not attached ahead in time")
                        time.sleep(0.1)
                # this thread: the node's kubelet and runtime
                with node.entered(), measuring() as steal:
                    for first in range(0, a.runs if a.together > 1 else 0, a.together):
                        group = range(first, min(first + a.together, a.runs))
                        confs = [{"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                                  "deviceID": f"p{i}", "daemonSocket": str(work / "cni.sock")}
                                 for i in group]
                        for i in group:
                            t0 = time.perf_counter()
                            kubelet.allocate(RESOURCE, [f"p{i}"])
                            kubelet.add_pod("default", f"pod-{i}", RESOURCE, [f"p{i}"])
                            phases["allocate"].append(time.perf_counter() - t0)
                        phases["cni_add"] += adds_together(plugin, confs, pod.path,
                                                           [f"pod-{i}" for i in group], cni_path)
                        for j, i in enumerate(group):
                            cni(plugin, "DEL", confs[j], pod.path, f"pod-{i}", cni_path,
                                f"net{j}")
                            kubelet.remove_pod("default", f"pod-{i}")
                    for i in range(a.runs if a.together <= 1 else 0):
                        dev, name = f"p{i}", f"pod-{i}"
                        conf = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                                "deviceID": dev, "daemonSocket": str(work / "cni.sock")}
                        t0 = time.perf_counter()
                        mount = kubelet.allocate(RESOURCE, [dev]).container_responses[0].mounts[0]
                        kubelet.add_pod("default", name, RESOURCE, [dev])  # admitted
                        t1 = time.perf_counter()
                        cni(plugin, "ADD", conf, pod.path, name, cni_path)
                        t2 = time.perf_counter()
                        with pod.entered():
                            fetch_map_fd(f"{mount.host_path}/afxdp.sock", dev, hostname=name,
                                         timeout=10).close()
                        t3 = time.perf_counter()
                        for key, v in (("allocate", t1 - t0), ("cni_add", t2 - t1),
                                       ("first_handshake", t3 - t2), ("total", t3 - t0)):
                            phases[key].append(v)
                        cni(plugin, "DEL", conf, pod.path, name, cni_path)
                        kubelet.remove_pod("default", name)
                        time.sleep(a.gap)
            except BaseException:
                print(d.log()[-3000:], file=sys.stderr)
                raise
            finally:
                d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                      "runs": a.runs, "netdevs": netdevs, "attach_ahead": a.attach_ahead,
                      "warm_programs": a.warm, "gap_s": a.gap,
                      "together": a.together, "steal_pct": round(100 * steal.share, 1),
                      **{k: summary(v) for k, v in phases.items() if v}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
