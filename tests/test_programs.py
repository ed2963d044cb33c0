"""Custom XDP programs per pool, in Kubernetes mode on the real kernel."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bpf.program import prog_name
from cni_server.client import fetch_map_fd
from cni_server.netdev import link_info
from cni_server.receiver import XskReceiver
from cni_server.traffic import send_frames
from tests.k8s_env import RESOURCE, K8s, healthy, write_config
from tests.kernel import ROOT, compile_test_program, run

pytestmark = pytest.mark.kernel
STEER: dict[str, object] = {"object": str(ROOT / "bpf" / "afxdp_udp_steer.bpf.o"),
                            "name": "afxdp_udp_steer"}


def scratch_links(k8s: K8s) -> list[str]:
    links = json.loads(run("ip", "-n", k8s.ns.name, "-j", "link", "show").stdout)
    return [link["ifname"] for link in links if link["ifname"].startswith("afxdpchk")]


def test_a_pools_custom_program_is_verified_attached_handed_out_and_adopted(k8s: K8s) -> None:
    k8s.config = write_config(k8s.work, program=STEER)
    first = k8s.start()
    assert "event=program_verified pool=pool1" in first.log()
    assert scratch_links(k8s) == []  # the scratch dummy is gone
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k.add_pod("default", "pod-a", RESOURCE, ["p0"])
    prog = k8s.ns.xdp_prog_id("p0")
    assert prog_name(prog) == "afxdp_udp_steer"
    sock = Path(mount.host_path) / "afxdp.sock"
    with k8s.ns.entered():
        fetch_map_fd(sock, "p0", hostname="pod-a").close()
    assert first.stop() == 0
    second = k8s.start()
    assert "allocations=1 dropped=0" in second.log()
    assert k8s.ns.xdp_prog_id("p0") == prog  # adopted, not replaced
    assert "event=xdp_adopted netdev=p0" in second.log()
    with k8s.ns.entered():
        fetch_map_fd(sock, "p0", hostname="pod-a").close()


@pytest.mark.parametrize("source,name,expect", [
    ("no_xskmap", "afxdp_redirect", "defines no map named 'xsks_map'"),
    ("unchecked_access", "unchecked", "invalid access to packet"),
])
def test_a_bad_program_fails_the_start_with_the_reason(
        k8s: K8s, source: str, name: str, expect: str) -> None:
    obj = compile_test_program(source, k8s.work / f"{source}.o")
    k8s.config = write_config(k8s.work, program={"object": str(obj), "name": name})
    d = k8s.start(wait=False)
    assert d.proc.wait(15) == 1
    log = d.log()
    assert f"pool pool1: program '{name}'" in log and expect in log, log[-2000:]
    assert scratch_links(k8s) == []
    assert all(k8s.ns.xdp_prog_id(f"p{i}") == 0 for i in range(3))


def test_map_keys_from_the_config_steer_a_pods_port_to_its_socket(k8s: K8s) -> None:
    """End to end: the pool's program with udp_ports {4789}, its map handed out to the pod."""
    k8s.config = write_config(k8s.work, program={**STEER, "mapKeys": {"udp_ports": [4789]}})
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k.add_pod("default", "pod-a", RESOURCE, ["p0"])
    assert_only_port_4789_reaches_the_pod(k8s, Path(mount.host_path) / "afxdp.sock")


def assert_only_port_4789_reaches_the_pod(k8s: K8s, sock: Path) -> None:
    """From inside the daemon's netns, as pod-a: frames to port 9 go to the kernel,
    frames to 4789 to the pod's AF_XDP socket on p0."""
    with k8s.ns.entered(), fetch_map_fd(sock, "p0", hostname="pod-a") as map_fd, \
            XskReceiver.with_own_socket(frames=1024, ring_size=1024) as rx:
        rx.bind(link_info("p0").ifindex, 0)
        rx.insert(map_fd.fileno(), 0)
        assert send_frames("q0", 200, dport=9) == 200
        assert rx.receive(1, 0.5) == 0  # not in udp_ports: the kernel's
        kept: list[bytes] = []
        assert send_frames("q0", 300, dport=4789) == 300
        assert rx.receive(300, 5, kept) == 300
        assert {struct.unpack_from("!H", f, 36)[0] for f in kept} == {4789}


@pytest.mark.parametrize("keys,expect", [
    ({"nope": [1]}, "uses no map named 'nope'"),
    ({"udp_ports": [70000]}, "does not fit map 'udp_ports'"),
])
def test_map_keys_that_do_not_fit_the_program_fail_the_start(
        k8s: K8s, keys: dict[str, list[int]], expect: str) -> None:
    k8s.config = write_config(k8s.work, program={**STEER, "mapKeys": keys})
    d = k8s.start(wait=False)
    assert d.proc.wait(15) == 1
    assert expect in d.log(), d.log()[-2000:]
    assert scratch_links(k8s) == []
