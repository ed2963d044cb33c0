"""The Kubernetes-mode test environment: ``afxdp daemon`` in a netns, a fake kubelet, veths."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bpf import bpffs
from cni_server.control import call
from plugin.api import deviceplugin_v1beta1_pb2 as pb
from tests.fake_kubelet import FakeKubelet, running
from tests.kernel import (
    ClientRuntime,
    Daemon,
    NsFixture,
    make_netns,
    run,
    setpriv,
    unique,
    wait_for,
)

RESOURCE = "afxdp/pool1"
ENDPOINT = "afxdp-pool1.sock"


@dataclass
class K8s:
    ns: NsFixture
    work: Path
    kubelet: FakeKubelet
    config: Path
    daemons: list[Daemon]

    def start(self, wait: bool = True, wrap: tuple[str, ...] = (),
              program: tuple[str, ...] | None = None) -> Daemon:
        d = Daemon(self.ns, self.work, "--config", str(self.config), wait=wait, mode="daemon",
                   control=self.work / "control.sock", wrap=wrap, program=program)
        self.daemons.append(d)
        return d

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = call(self.work / "control.sock", {"op": "status"})["status"]
        return doc

    def allocations(self) -> list[dict[str, Any]]:
        allocs: list[dict[str, Any]] = self.status()["allocations"]
        return allocs

    def warm_ids(self) -> set[int]:
        """The programs the daemon keeps warm (fresh, on its own placeholders)."""
        warm = self.status()["warm_programs"]
        return set(warm["prog_ids"]) if warm else set()

    def wait_warm(self) -> None:
        """Until the daemon's warm programs are all there (its fds and programs are
        then as they stay until the next attach)."""
        def full() -> bool:
            warm = self.status()["warm_programs"]
            return not warm or not warm["filling"]
        self.wait(full, what="the warm programs warmed")

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise TimeoutError(what or "condition")


def write_config(work: Path, *, node: dict[str, object] | None = None, **pool: object) -> Path:
    """A daemon config under ``work``: ``node`` adds or replaces node-level settings
    (``cniSocket``...), ``pool`` the one pool's."""
    cfg = {
        "nodeName": "testnode",
        "stateDir": str(work / "state"),
        "socketRoot": str(work / "sockets"),
        "bpffsRoot": str(work / "bpf"),
        "devicePluginsDir": str(work / "dp"),
        "podResourcesSocket": str(work / "podres" / "kubelet.sock"),
        "controlSocket": str(work / "control.sock"),
        "gcInterval": 0.5,
        "rescanInterval": 30,  # events must do the work; dumps are only a safety net
        "metricsAddress": "127.0.0.1:0",
        "pools": [{"name": "pool1", "devices": ["p[0-9]+"], "uid": 65534, "gid": 65534,
                   **pool}],
        **(node or {}),
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture
def k8s(netns: NsFixture, workdir: Path) -> Iterator[K8s]:
    for i in range(3):
        netns.veth(f"p{i}", f"q{i}")
    with running(workdir / "dp", workdir / "podres" / "kubelet.sock") as kubelet:
        env = K8s(netns, workdir, kubelet, write_config(workdir), [])
        try:
            yield env
        finally:
            for d in env.daemons:
                d.stop()
            if bpffs.is_bpffs(workdir / "bpf"):
                bpffs.unmount(workdir / "bpf")


@contextlib.contextmanager
def cni_node(netns: NsFixture, workdir: Path, **config: object) -> Iterator[tuple[K8s, NsFixture]]:
    """A node for CNI tests: p0/p1 (peers q0/q1) in ``netns``, a fake kubelet, a pod
    netns, and a daemon config with its CNI endpoint at ``workdir/cni.sock`` (plus
    ``config``).  Daemons started on it are stopped at the end."""
    for i in range(2):
        netns.veth(f"p{i}", f"q{i}")
    with running(workdir / "dp", workdir / "podres" / "kubelet.sock") as kubelet, \
            make_netns() as pod:
        cfg = write_config(workdir, node={"cniSocket": str(workdir / "cni.sock"), **config})
        k8s = K8s(netns, workdir, kubelet, cfg, [])
        try:
            yield k8s, pod
        finally:
            for d in k8s.daemons:
                d.stop()


def healthy(devs: dict[str, pb.Device], *names: str) -> bool:
    return all(n in devs and devs[n].health == "Healthy" for n in names)


def http_get(address: str, path: str) -> tuple[int, str]:
    """GET from the daemon's HTTP endpoint (call inside the daemon's netns)."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def pod_receiver(k8s: K8s, runtime: ClientRuntime, socket_path: str, netdev: str,
                 hostname: str, count: int, timeout: float = 15.0
                 ) -> Iterator[Callable[[], dict[str, Any]]]:
    """``afxdp receive`` as the pod would run it (uid 65534, NET_RAW+IPC_LOCK), ready
    (socket bound and in the map) when the block starts.  The block gets a function
    that waits for the receiver to finish and returns its JSON report."""
    ready = k8s.work / "out" / unique(f"ready-{hostname}-")  # one per receiver
    proc = subprocess.Popen(
        k8s.ns.cmd(*setpriv("net_raw", "ipc_lock"), *runtime.argv(
            "receive", "--socket", socket_path, "--netdev", netdev, "--hostname", hostname,
            "--count", str(count), "--timeout", str(timeout), "--json",
            "--ready-file", str(ready))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runtime.env(),
        cwd=runtime.dir)

    def finish() -> dict[str, Any]:
        out, err = proc.communicate(timeout=timeout + 15)
        assert proc.returncode == 0, f"receiver exited {proc.returncode}: {out}{err}"
        report: dict[str, Any] = json.loads(out)
        return report

    try:
        wait_for(ready, 15, proc)
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def send_frames(k8s: K8s, netdev: str, count: int) -> None:
    """Inject ``count`` test frames on ``netdev`` (a veth peer) in the test netns."""
    run(*k8s.ns.cmd(sys.executable, "-m", "cni_server.cli", "send", "--netdev", netdev,
                    "--count", str(count)))
