#!/usr/bin/env python3
"""CNI ADD/DEL wall time: our plugin beside Debian's host-device doing the same move.

    sudo .venv/bin/python benchmarks/cni.py [--runs 200]

Each run is one process, timed from start to exit, as a runtime sees it.
Ours: the stdlib-only executable on the host's python3 (``python3 -I -S``),
talking to ``afxdp daemon`` (which moves the netdev, sets it up, records it).
host-device: ``/usr/lib/cni/host-device`` (Go) moving another veth end the same
way.  Neither uses IPAM, so only the move is compared.  Both are started
through ``nsenter`` into the node netns, so both pay the same exec overhead.
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

from tests.cni_runner import CNI_PATH
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import ROOT, Daemon, make_netns


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


def measure(argv: list[str], conf: dict[str, Any], pod_ns: Path, runs: int
            ) -> dict[str, float]:
    env = {"CNI_CONTAINERID": "bench", "CNI_NETNS": str(pod_ns), "CNI_IFNAME": "net1",
           "CNI_PATH": CNI_PATH, "PATH": "/usr/sbin:/usr/bin",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench"}
    add, dele = [], []
    for _ in range(runs):
        add.append(timed(argv, dict(env, CNI_COMMAND="ADD"), conf))
        dele.append(timed(argv, dict(env, CNI_COMMAND="DEL"), conf))
    return {"add_p50_ms": pct(add, .5) * 1e3, "add_p99_ms": pct(add, .99) * 1e3,
            "del_p50_ms": pct(dele, .5) * 1e3, "del_p99_ms": pct(dele, .99) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
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
                cfg = write_config(work)
                doc = json.loads(cfg.read_text())
                doc["cniSocket"] = str(work / "cni.sock")
                cfg.write_text(json.dumps(doc))
                daemon = Daemon(node, work, "--config", str(cfg), mode="daemon",
                                control=work / "control.sock")
                try:
                    kubelet.wait_devices(RESOURCE, lambda d: "p0" in d)
                    kubelet.allocate(RESOURCE, ["p0"])
                    kubelet.add_pod("default", "bench", RESOURCE, ["p0"])  # admitted
                    ours = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                            "deviceID": "p0", "daemonSocket": str(work / "cni.sock")}
                    res["afxdp"] = measure(
                        node.cmd("/usr/bin/python3", "-I", "-S", str(ROOT / "plugin" / "cni.py")),
                        ours, pod.path, a.runs)
                    hd = {"cniVersion": "1.0.0", "name": "hd-net", "type": "host-device",
                          "device": "hd0"}
                    res["host-device"] = measure(node.cmd(f"{CNI_PATH}/host-device"), hd,
                                                 pod.path, a.runs)
                finally:
                    daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"machine: {res['machine']}; {a.runs} ADD+DEL rounds each")
    for name in ("afxdp", "host-device"):
        r = res[name]
        print(f"{name:12s} ADD p50 {r['add_p50_ms']:6.1f} ms  p99 {r['add_p99_ms']:6.1f} ms   "
              f"DEL p50 {r['del_p50_ms']:6.1f} ms  p99 {r['del_p99_ms']:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
