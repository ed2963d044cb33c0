#!/usr/bin/env python3
"""A running pod's handshakes while other pods come and go, on a quiet or a busy disk.

    sudo .venv/bin/python benchmarks/churn.py [--handshakes 400] [--disk-load]

Against ``afxdp daemon`` and the in-process fake kubelet: a steady pod holds
``p0`` (allocated, admitted, CNI ADD into its netns) and makes DPDK handshakes
from inside its netns, one every 5 ms, as a pod reconnecting would.  Meanwhile
another thread plays kubelet and the runtime for pods that come and go on the
other devices: Allocate, admission, CNI ADD, CNI DEL, removal (the daemon then
releases the allocation).  Each such pod changes the daemon's state four or
five times, and each change is saved to ``state.json`` (written, fsynced,
renamed, the directory fsynced).

As on a node, the state is on disk (under /var/tmp here, for /var/lib) and the
run directory (claims) and the socket directories are on a tmpfs (/run);
``--run-on-disk``: those on disk too, as on a host whose /run is not a tmpfs.
``--disk-load``: a writer keeps the disk busy meanwhile (1 MiB writes, an fsync
every 64 MiB), as image pulls do on a node.

Reported: the steady pod's handshake p50/p99/max: quiet, during the churn, and
with ``--disk-load`` during the load alone and the load with the churn; and how
many pods came and went (and how many a second: the churn's own pace).
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
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni_server.client import fetch_map_fd
from tests.cni_runner import CNI_PATH, install_plugin
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, write_config
from tests.kernel import Daemon, NsFixture, make_netns, veth_pairs
from tests.load import pct

POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}"


def cni(plugin: list[str], command: str, conf: dict[str, Any], pod_ns: Path, name: str,
        cni_path: str, ifname: str) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": name, "CNI_NETNS": str(pod_ns),
           "CNI_IFNAME": ifname, "CNI_PATH": cni_path, "PATH": "/usr/sbin:/usr/bin",
           "CNI_ARGS": POD_ARGS.format(name)}
    proc = subprocess.run(plugin, input=json.dumps(conf).encode(), env=env, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"CNI {command} failed: {proc.stdout.decode()}{proc.stderr.decode()}")


def handshakes(pod: NsFixture, sock: str, n: int) -> list[float]:
    """``n`` handshakes of the steady pod from inside its netns, 5 ms apart (seconds each)."""
    lat = []
    with pod.entered():
        for _ in range(n):
            t0 = time.perf_counter()
            fetch_map_fd(sock, "p0", hostname="steady", timeout=10).close()
            lat.append(time.perf_counter() - t0)
            time.sleep(0.005)
    return lat


def summary(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(lat, .5) * 1e3, 2), "p99_ms": round(pct(lat, .99) * 1e3, 2),
            "max_ms": round(max(lat) * 1e3, 2)}


class Churn(threading.Thread):
    """Pods on p1..p<devices-1>, one after another, until stopped."""

    first = 0  # device numbers go on from one churn to the next

    def __init__(self, node: NsFixture, pod: NsFixture, kubelet: Any, devices: int,
                 conf: dict[str, Any], plugin: list[str], cni_path: str) -> None:
        super().__init__()
        self.node, self.pod, self.kubelet, self.devices = node, pod, kubelet, devices
        self.conf, self.plugin, self.cni_path = conf, plugin, cni_path
        self.stop = threading.Event()
        self.pods = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.node.entered():  # the node's kubelet and runtime
                while not self.stop.is_set():
                    n = Churn.first + self.pods
                    dev, name = f"p{1 + n % (self.devices - 1)}", f"churn-{n}"
                    conf = dict(self.conf, deviceID=dev)
                    self.kubelet.allocate(RESOURCE, [dev])
                    self.kubelet.add_pod("default", name, RESOURCE, [dev])
                    cni(self.plugin, "ADD", conf, self.pod.path, name, self.cni_path, "net1")
                    cni(self.plugin, "DEL", conf, self.pod.path, name, self.cni_path, "net1")
                    self.kubelet.remove_pod("default", name)
                    self.pods += 1
            Churn.first += self.pods
        except BaseException as e:  # reported by the main thread
            self.error = e


def measure_churn(churn: Churn, pod: NsFixture, sock: str, n: int) -> dict[str, float]:
    """The steady pod's handshakes while ``churn`` runs."""
    t0 = time.perf_counter()
    churn.start()
    try:
        lat = handshakes(pod, sock, n)
    finally:
        churn.stop.set()
        churn.join(60)
    if churn.error is not None:
        raise churn.error
    return {**summary(lat), "pods_came_and_went": churn.pods,
            "pods_per_s": round(churn.pods / (time.perf_counter() - t0), 1)}


def disk_load(where: Path) -> subprocess.Popen[bytes]:
    """A writer on ``where``'s file system until killed: 1 MiB writes, fsync every 64 MiB."""
    script = (f"while :; do dd if=/dev/zero of={where} bs=1M count=64 conv=fsync "
              "status=none; done")
    return subprocess.Popen(["sh", "-c", script])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--disk-load", action="store_true")
    ap.add_argument("--run-on-disk", action="store_true")
    ap.add_argument("--devices", type=int, default=40,
                    help="pool devices: p0 for the steady pod, the rest for the churn (a "
                         "device is used again only after all others, by when its pod's "
                         "allocation has been released)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("churn.py: needs root (netns, veth, XDP)")
    work = Path(tempfile.mkdtemp(prefix="afxdp-bench-", dir="/var/tmp"))
    work.chmod(0o755)
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()}}
    load: subprocess.Popen[bytes] | None = None
    run = work / "run"
    run.mkdir()
    if not a.run_on_disk:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "afxdp-bench", run],
                       check=True)
    os.environ["AFXDP_RUN_DIR"] = str(run / "afxdp")  # the daemon's and make_netns' claims
    try:
        with make_netns() as node, make_netns() as steady, make_netns() as pods, \
                running(work / "dp", work / "podres" / "kubelet.sock") as kubelet:
            veth_pairs(node, a.devices)
            cfg = write_config(work, node={"cniSocket": str(work / "cni.sock"),
                                      "socketRoot": str(run / "sockets")})
            d = Daemon(node, work, "--config", str(cfg), mode="daemon",
                       control=work / "control.sock")
            bindir = install_plugin(work / "bin")
            cni_path = f"{bindir}:{CNI_PATH}"
            plugin = [str(bindir / "afxdp")]
            conf = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                    "daemonSocket": str(work / "cni.sock")}
            try:
                kubelet.wait_devices(RESOURCE, lambda devs: len(devs) == a.devices, 30)
                with node.entered():
                    mount = kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
                    kubelet.add_pod("default", "steady", RESOURCE, ["p0"])
                    cni(plugin, "ADD", dict(conf, deviceID="p0"), steady.path, "steady",
                        cni_path, "net1")
                sock = f"{mount.host_path}/afxdp.sock"
                handshakes(steady, sock, 50)  # warm
                res["quiet"] = summary(handshakes(steady, sock, a.handshakes))
                churn_args = (node, pods, kubelet, a.devices, conf, plugin, cni_path)
                res["churn"] = measure_churn(Churn(*churn_args), steady, sock, a.handshakes)
                if a.disk_load:
                    load = disk_load(work / "load")
                    time.sleep(1.0)  # the writer under way
                    res["disk_load"] = summary(handshakes(steady, sock, a.handshakes))
                    res["disk_load_and_churn"] = measure_churn(Churn(*churn_args), steady, sock,
                                                               a.handshakes)
            except BaseException:
                print(d.log()[-3000:], file=sys.stderr)
                raise
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
                d.stop()
    finally:
        if not a.run_on_disk:
            subprocess.run(["umount", run], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
