#!/usr/bin/env python3
"""CNI ADD/DEL wall time: our plugin beside Debian's host-device doing the same job.

    sudo .venv/bin/python benchmarks/cni.py [--runs 50]

Each call is one process, timed from start to exit, as a runtime sees it, and the
two plugins alternate (ADD+DEL of one, then of the other) so machine drift hits
both alike.  Ours: the executable as ``afxdp install-cni`` installs it (system
python3, isolated), talking to ``afxdp daemon`` (which moves the netdev, names it
CNI_IFNAME, sets it up, records it).  host-device: ``/usr/lib/cni/host-device``
(Go) moving another veth end into the same pod.  Both delegate to Debian's
host-local IPAM (one address each).  Both are executed directly from the node
netns (this process enters it), as a runtime on the node does: no ``nsenter``
in the timed call.  Target: ours within 1.25x of host-device for ADD and DEL p50.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cni_runner import CNI_PATH, install_plugin
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import Daemon, make_netns
from tests.machine import measuring


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(argv: list[str], env: dict[str, str], conf: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[-1]} {env['CNI_COMMAND']} failed: {proc.stdout.decode()}")
    return elapsed


def cni_env(pod_ns: Path, cni_path: str, command: str, ifname: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "bench", "CNI_NETNS": str(pod_ns),
            "CNI_IFNAME": ifname, "CNI_PATH": cni_path, "PATH": "/usr/sbin:/usr/bin",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench"}


def measure(plugins: dict[str, tuple[list[str], dict[str, Any], str]], pod_ns: Path,
            cni_path: str, runs: int) -> dict[str, dict[str, float]]:
    """ADD then DEL of each plugin in turn, ``runs`` rounds."""
    times: dict[str, dict[str, list[float]]] = {n: {"add": [], "del": []} for n in plugins}
    for _ in range(runs):
        for name, (argv, conf, ifname) in plugins.items():
            for cmd in ("ADD", "DEL"):
                times[name][cmd.lower()].append(
                    timed(argv, cni_env(pod_ns, cni_path, cmd, ifname), conf))
    return {name: {f"{cmd}_{q}_ms": pct(t[cmd], v) * 1e3 for cmd in ("add", "del")
                   for q, v in (("p50", .5), ("p99", .99))} for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("cni.py: needs root (netns, veth, XDP)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-", dir="/tmp"))
    work.chmod(0o755)
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                           "runs": a.runs}
    try:
        with make_netns() as node, make_netns() as pod:
            node.veth("p0", "q0")
            node.veth("hd0", "hd1")
            with running(work / "dp", work / "podres" / "kubelet.sock") as kubelet:
                cfg = write_config(work, node={"cniSocket": str(work / "cni.sock")})
                daemon = Daemon(node, work, "--config", str(cfg), mode="daemon",
                                control=work / "control.sock")
                try:
                    kubelet.wait_devices(RESOURCE, lambda d: "p0" in d)
                    kubelet.allocate(RESOURCE, ["p0"])
                    kubelet.add_pod("default", "bench", RESOURCE, ["p0"])  # admitted
                    bindir = install_plugin(work / "bin")
                    cni_path = f"{bindir}:{CNI_PATH}"

                    def ipam(net: str) -> dict[str, Any]:
                        return {"type": "host-local", "dataDir": str(work / "ipam"),
                                "ranges": [[{"subnet": "10.77.0.0/24" if net == "a"
                                             else "10.78.0.0/24"}]]}
                    ours = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                            "deviceID": "p0", "daemonSocket": str(work / "cni.sock"),
                            "ipam": ipam("a")}
                    hd = {"cniVersion": "1.0.0", "name": "hd-net", "type": "host-device",
                          "device": "hd0", "ipam": ipam("b")}
                    with node.entered(), measuring() as steal:  # the runtime's netns
                        res.update(measure({
                            "afxdp": ([str(bindir / "afxdp")], ours, "net1"),
                            "host-device": ([f"{CNI_PATH}/host-device"], hd, "net2"),
                        }, pod.path, cni_path, a.runs))
                    res["steal_pct"] = round(100 * steal.share, 1)
                finally:
                    daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"machine: {res['machine']}; {a.runs} ADD+DEL rounds each, alternating, "
          f"host-local IPAM on both; CPU time stolen by the hypervisor: {res['steal_pct']}%")
    for name in ("afxdp", "host-device"):
        r = res[name]
        print(f"{name:12s} ADD p50 {r['add_p50_ms']:6.1f} ms  p99 {r['add_p99_ms']:6.1f} ms   "
              f"DEL p50 {r['del_p50_ms']:6.1f} ms  p99 {r['del_p99_ms']:6.1f} ms")
    ours, ref = res["afxdp"], res["host-device"]
    print(f"ratio (ours / host-device, p50): ADD {ours['add_p50_ms'] / ref['add_p50_ms']:.2f}x"
          f"  DEL {ours['del_p50_ms'] / ref['del_p50_ms']:.2f}x   (target <= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
