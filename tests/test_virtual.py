"""Virtual device pools: pairs the daemon creates, on the real kernel.

The daemon runs in the test netns (the "node"), which holds bridge br0; each
pod is its own netns; CNI ADD/DEL go through our stdlib-only plugin executable,
as a container runtime would run it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_server.client import fetch_map_fd
from cni_server.netdev import link_info
from cni_server.receiver import XskReceiver
from cni_server.traffic import udp_frame
from plugin.virtual import netkit_supported
from tests.cni_runner import Outcome, Runner
from tests.fake_kubelet import running
from tests.k8s_env import RESOURCE, K8s, healthy, write_config
from tests.kernel import NsFixture, make_netns, run

pytestmark = pytest.mark.kernel
DEVICES = ("pool1v0", "pool1v1", "pool1v2")


@dataclass
class VEnv:
    k8s: K8s
    pods: dict[str, NsFixture]
    cni: Runner

    def conf(self, device: str) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "afxdp-virtual", "type": "afxdp",
                "deviceID": device, "daemonSocket": str(self.k8s.work / "cni.sock")}

    def add(self, pod: str, device: str) -> Outcome:
        return self.cni("ADD", self.conf(device), container=pod,
                        netns=str(self.pods[pod].path), pod=("default", pod))

    def delete(self, pod: str, device: str) -> Outcome:
        return self.cni("DEL", self.conf(device), container=pod,
                        netns=str(self.pods[pod].path))

    def links(self, ns: NsFixture) -> dict[str, dict[str, Any]]:
        return {i["ifname"]: i for i in json.loads(run("ip", "-n", ns.name, "-j", "link").stdout)}

    def allocate(self, pod: str, device: str) -> Path:
        """Allocate ``device`` for ``pod`` and register the pod: its socket's host path."""
        k = self.k8s.kubelet
        mount = k.allocate(RESOURCE, [device]).container_responses[0].mounts[0]
        k.add_pod("default", pod, RESOURCE, [device])
        return Path(mount.host_path) / "afxdp.sock"


def virtual_config(work: Path, **virtual: object) -> Path:
    cfg = write_config(work, node={
        "cniSocket": str(work / "cni.sock"),
        "pools": [{"name": "pool1", "uid": 65534, "gid": 65534,
                   "virtual": {"count": 3, "bridge": "br0", **virtual}}]})
    return cfg


@pytest.fixture
def venv(netns: NsFixture, workdir: Path, cni: Runner) -> Iterator[VEnv]:
    run("ip", "-n", netns.name, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", netns.name, "link", "set", "br0", "up")
    with running(workdir / "dp", workdir / "podres" / "kubelet.sock") as kubelet, \
            make_netns() as pod_a, make_netns() as pod_b:
        k8s = K8s(netns, workdir, kubelet, virtual_config(workdir), [])
        try:
            yield VEnv(k8s, {"pod-a": pod_a, "pod-b": pod_b}, cni)
        finally:
            for d in k8s.daemons:
                d.stop()


def open_socket(env: VEnv, pod: str, device: str, sock: Path) -> XskReceiver:
    """In the pod: the handshake, then an AF_XDP socket on the device's queue 0 in its map."""
    with env.pods[pod].entered(), fetch_map_fd(sock, device, hostname=pod) as map_fd:
        rx = XskReceiver.with_own_socket(frames=1024, ring_size=512, tx_frames=256)
        try:
            rx.bind(link_info(device).ifindex, 0)
            rx.insert(map_fd.fileno(), 0)
        except BaseException:
            rx.close()
            raise
        return rx


def test_two_pods_on_one_bridge_exchange_frames_through_af_xdp(venv: VEnv) -> None:
    k8s, node = venv.k8s, venv.k8s.ns
    d = k8s.start()
    assert "event=virtual_pool pool=pool1 kind=veth count=3 bridge=br0" in d.log()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))
    assert set(venv.links(node)) >= {"br0"} and not set(venv.links(node)) & set(DEVICES)
    socks = {"pod-a": venv.allocate("pod-a", "pool1v0"), "pod-b": venv.allocate("pod-b", "pool1v1")}
    links = venv.links(node)
    assert {"pool1v0", "pool1v0h", "pool1v1", "pool1v1h"} <= set(links)  # created at Allocate
    assert node.xdp_prog_id("pool1v0") and node.xdp_prog_id("pool1v1")
    for pod, dev in (("pod-a", "pool1v0"), ("pod-b", "pool1v1")):
        res = venv.add(pod, dev)
        assert res.code == 0, (res.out, res.stderr)
        assert "net1" in venv.links(venv.pods[pod]) and dev not in venv.links(node)
        assert venv.links(node)[dev + "h"].get("master") == "br0"
        assert venv.pods[pod].xdp_prog_id("net1")  # the program went with it
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))
    with open_socket(venv, "pod-a", "net1", socks["pod-a"]) as a, \
            open_socket(venv, "pod-b", "net1", socks["pod-b"]) as b:
        for src, dst, mac, port in ((a, b, "02:00:00:00:00:0a", 7001),
                                    (b, a, "02:00:00:00:00:0b", 7002)):
            frames = [udp_frame(src_mac=mac, dport=port, payload=i.to_bytes(4, "big"))
                      for i in range(300)]
            assert src.transmit(frames) == 300
            seqs = receive_from(dst, bytes.fromhex(mac.replace(":", "")), 300)
            assert sorted(seqs) == list(range(300))  # each frame once, none lost


def receive_from(rx: XskReceiver, mac: bytes, count: int, timeout: float = 5.0) -> list[int]:
    """Sequence numbers of frames from ``mac`` until ``count`` arrived (then 0.2 s more, to
    see duplicates).  Frames the kernel sends on its own (IGMP reports) are skipped."""
    seqs: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kept: list[bytes] = []
        rx.receive(1, 0.2 if len(seqs) >= count else deadline - time.monotonic(), kept)
        if not kept and len(seqs) >= count:
            break
        seqs += [int.from_bytes(f[-4:], "big") for f in kept if f[6:12] == mac]
    return seqs


def test_del_returns_the_pod_end_and_unplugs_the_node_end_and_release_deletes_the_pair(
        venv: VEnv) -> None:
    k8s, node = venv.k8s, venv.k8s.ns
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))
    venv.allocate("pod-a", "pool1v2")
    assert venv.add("pod-a", "pool1v2").code == 0
    assert venv.delete("pod-a", "pool1v2").code == 0
    links = venv.links(node)
    assert "pool1v2" in links and "master" not in links["pool1v2h"]
    assert not {"pool1v2", "net1"} & set(venv.links(venv.pods["pod-a"]))
    k8s.wait(lambda: bool(k8s.allocations()[0]["owner"]), what="owner known")
    k8s.kubelet.remove_pod("default", "pod-a")
    k8s.wait(lambda: not k8s.allocations(), what="the allocation released")
    k8s.wait(lambda: not {"pool1v2", "pool1v2h"} & set(venv.links(node)), what="pair deleted")
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))


def test_a_daemon_restart_keeps_a_pods_virtual_device_and_its_program(venv: VEnv) -> None:
    k8s = venv.k8s
    first = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))
    sock = venv.allocate("pod-a", "pool1v0")
    assert venv.add("pod-a", "pool1v0").code == 0
    prog = venv.pods["pod-a"].xdp_prog_id("net1")
    assert first.stop() == 0
    second = k8s.start()
    assert "allocations=1 dropped=0" in second.log()
    assert venv.pods["pod-a"].xdp_prog_id("net1") == prog
    open_socket(venv, "pod-a", "net1", sock).close()


def test_add_fails_cleanly_when_the_bridge_is_missing(venv: VEnv) -> None:
    k8s, node = venv.k8s, venv.k8s.ns
    run("ip", "-n", node.name, "link", "del", "br0")
    d = k8s.start()
    assert "event=virtual_bridge_missing pool=pool1 bridge=br0" in d.log()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, *DEVICES))
    venv.allocate("pod-a", "pool1v0")
    res = venv.add("pod-a", "pool1v0")
    assert res.code != 0 and "bridge br0 does not exist" in json.dumps(res.out), res.out
    assert "pool1v0" in venv.links(node)  # nothing moved
    assert "pool1v0" not in venv.links(venv.pods["pod-a"])


def test_netkit_on_a_kernel_without_it_fails_the_start_with_the_reason(venv: VEnv) -> None:
    with venv.k8s.ns.entered():
        if netkit_supported():
            pytest.skip("this kernel has netkit")
    venv.k8s.config = virtual_config(venv.k8s.work, kind="netkit")
    d = venv.k8s.start(wait=False)
    assert d.proc.wait(15) == 2
    assert "pools[0].virtual.kind: this kernel" in d.log() and "CONFIG_NETKIT" in d.log()


def test_auto_picks_veth_on_a_kernel_without_netkit(venv: VEnv) -> None:
    venv.k8s.config = virtual_config(venv.k8s.work, kind="auto")
    d = venv.k8s.start()
    with venv.k8s.ns.entered():
        want = "netkit" if netkit_supported() else "veth"
    assert f"event=virtual_pool pool=pool1 kind={want}" in d.log()
