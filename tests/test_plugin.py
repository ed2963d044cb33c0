"""The device plugin end to end: ``afxdp daemon`` in a netns, a fake kubelet, real veths.

The daemon runs as a child process (as in a DaemonSet); the fake kubelet runs
in this process and speaks kubelet's real gRPC APIs over Unix sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import cast

import grpc
import pytest

from bpf import bpffs
from cni_server.client import Client, HandshakeError, fetch_map_fd
from tests.fake_kubelet import Container
from tests.k8s_env import (
    ENDPOINT,
    RESOURCE,
    K8s,
    healthy,
    http_get,
    pod_receiver,
    send_frames,
    write_config,
)
from tests.kernel import ClientRuntime, run

pytestmark = pytest.mark.kernel


def rpc_error(e: BaseException) -> tuple[grpc.StatusCode, str]:
    err = cast(grpc.Call, e)
    return err.code(), err.details() or ""


# -- registration and the device list ------------------------------------------------------


def test_registers_after_serving_and_lists_the_pools_devices(k8s: K8s) -> None:
    k8s.start()
    k = k8s.kubelet
    devs = k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    assert set(devs) == {"p0", "p1", "p2"}  # q* are not selected
    reg = k.plugins[RESOURCE]
    assert (reg.request.version, reg.request.endpoint) == ("v1beta1", ENDPOINT)
    assert reg.options.get_preferred_allocation_available and not reg.options.pre_start_required
    assert (k8s.work / "dp" / ENDPOINT).exists()
    # veths have no NUMA node (sysfs: none, or -1): no topology is sent, and kubelet
    # records them under node -1, not under an invented node 0.
    assert k.numa_nodes(RESOURCE) == {"p0": -1, "p1": -1, "p2": -1}
    assert all(not d.HasField("topology") for d in devs.values())


def test_readyz_metrics_and_device_gauge(k8s: K8s) -> None:
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    addr = str(d.wait_ready()["http"])
    with k8s.ns.entered():
        code, _ = http_get(addr, "/readyz")
        assert code == 200
        _, body = http_get(addr, "/metrics")
    assert 'afxdp_devices{health="healthy",pool="pool1"} 3.0' in body


def test_list_follows_links_appearing_going_down_and_disappearing(k8s: K8s) -> None:
    k8s.start()
    k, ns = k8s.kubelet, k8s.ns
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    ns.veth("p7", "q7")
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p7"))
    run("ip", "-n", ns.name, "link", "set", "p1", "down")
    k.wait_devices(RESOURCE, lambda d: d["p1"].health == "Unhealthy")
    run("ip", "-n", ns.name, "link", "set", "p1", "up")
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p1"))
    run("ip", "-n", ns.name, "link", "del", "p2")
    k.wait_devices(RESOURCE, lambda d: "p2" not in d)


def test_excluded_netdevs_are_not_offered_and_the_log_says_why(k8s: K8s) -> None:
    run("ip", "-n", k8s.ns.name, "addr", "add", "10.1.1.1/24", "dev", "p1")
    k8s.config = write_config(k8s.work, excludeAddressed=True)
    d = k8s.start()
    devs = k8s.kubelet.wait_devices(RESOURCE, lambda d: "p0" in d)
    assert "p1" not in devs
    assert "netdev=p1" in d.log() and "has an IP address" in d.log()


# -- Allocate -----------------------------------------------------------------------------


def test_allocate_one_device_serves_its_socket_before_returning(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    resp = k8s.kubelet.allocate(RESOURCE, ["p0"])
    c = resp.container_responses[0]
    [mount] = c.mounts
    assert mount.container_path == "/tmp/afxdp_dp/p0" and mount.read_only
    sock = Path(mount.host_path) / "afxdp.sock"
    assert sock.exists()  # already served: kubelet may start the pod right away
    assert Path(mount.host_path).parent.parent == k8s.work / "sockets"
    assert c.envs["AFXDP_DEVICES_POOL1"] == "p0"
    info = json.loads(c.envs["AFXDP_DEVICES_POOL1_INFO"])
    assert info["p0"]["socket"] == "/tmp/afxdp_dp/p0/afxdp.sock"
    assert info["p0"]["queues"] == 1 and info["p0"]["mode"] == "native"
    assert k8s.ns.xdp_prog_id("p0")
    st = os.stat(sock)
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_allocate_two_devices_and_two_containers(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    two = k8s.kubelet.allocate(RESOURCE, ["p0", "p1"]).container_responses[0]
    assert [m.container_path for m in two.mounts] == ["/tmp/afxdp_dp/p0", "/tmp/afxdp_dp/p1"]
    assert two.envs["AFXDP_DEVICES_POOL1"] == "p0 p1"
    assert len({Path(m.host_path).parent for m in two.mounts}) == 1  # one allocation
    k8s.kubelet.allocate(RESOURCE, ["p2"])
    allocs = k8s.allocations()
    assert sorted(sorted(a["devices"]) for a in allocs) == [["p0", "p1"], ["p2"]]


def test_allocate_for_two_containers_in_one_request(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1"))
    resp = k8s.kubelet.allocate_raw(RESOURCE, ["p0"], ["p1"])
    assert [c.envs["AFXDP_DEVICES_POOL1"] for c in resp.container_responses] == ["p0", "p1"]
    assert len(k8s.allocations()) == 2


@pytest.mark.parametrize("ids,code,text", [
    (["nope0"], grpc.StatusCode.INVALID_ARGUMENT, "unknown device 'nope0'"),
    (["p0", "p0"], grpc.StatusCode.INVALID_ARGUMENT, "requested twice"),
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no device"),
])
def test_bad_device_ids_fail_with_a_grpc_error_that_says_which(
        k8s: K8s, ids: list[str], code: grpc.StatusCode, text: str) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    with pytest.raises(grpc.RpcError) as e:
        k8s.kubelet.allocate(RESOURCE, ids)
    got, details = rpc_error(e.value)
    assert got == code and text in details
    assert k8s.allocations() == [] and k8s.ns.xdp_prog_id("p0") == 0


def test_unhealthy_device_is_refused_and_nothing_is_done(k8s: K8s) -> None:
    k8s.start()
    run("ip", "-n", k8s.ns.name, "link", "set", "p1", "down")
    k8s.kubelet.wait_devices(RESOURCE, lambda d: "p1" in d and d["p1"].health == "Unhealthy")
    with pytest.raises(grpc.RpcError) as e:
        k8s.kubelet.allocate_raw(RESOURCE, ["p0"], ["p1"])
    code, details = rpc_error(e.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'p1' is unhealthy: link down" in details
    assert k8s.allocations() == [] and k8s.ns.xdp_prog_id("p0") == 0


def test_failure_half_way_rolls_back_the_containers_done(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1"))
    run("ip", "-n", k8s.ns.name, "link", "del", "p1")  # gone; the daemon may not know yet
    with pytest.raises(grpc.RpcError):
        k8s.kubelet.allocate_raw(RESOURCE, ["p0"], ["p1"])
    assert k8s.allocations() == []
    assert k8s.ns.xdp_prog_id("p0") == 0
    assert list((k8s.work / "sockets").iterdir()) == []


def test_pool_settings_reach_the_allocation(k8s: K8s) -> None:
    """queues caps the exposed queue slots; udsIdleTimeout closes silent connections."""
    k8s.ns.veth("p5", "q5", queues=4)
    k8s.config = write_config(k8s.work, queues=2, udsIdleTimeout=0.3)
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p5"))
    c = k8s.kubelet.allocate(RESOURCE, ["p5"]).container_responses[0]
    assert json.loads(c.envs["AFXDP_DEVICES_POOL1_INFO"])["p5"]["queues"] == 2
    sock = Path(c.mounts[0].host_path) / "afxdp.sock"
    k8s.kubelet.add_pod("ns1", "pod-q", RESOURCE, ["p5"])
    with k8s.ns.entered(), Client(sock) as client:
        client.connect("pod-q")
        assert client.request("/xsk_socket,p5,2")[0] == "/fd_nak"  # beyond the 2 exposed
        t0 = time.monotonic()
        client.sock.settimeout(30)  # the 0.3 s idle timeout, however slow the machine
        assert client.sock.recv(64) == b""  # closed for silence
        assert time.monotonic() - t0 >= 0.25


def test_a_netdev_matching_two_pools_stops_the_start(k8s: K8s) -> None:
    cfg = json.loads(k8s.config.read_text())
    cfg["pools"].append({"name": "pool2", "drivers": ["veth"]})
    k8s.config.write_text(json.dumps(cfg))
    d = k8s.start(wait=False)
    assert d.proc.wait(15) == 2
    assert "p0 matches pools pool1, pool2" in d.log()


def test_preferred_allocation_keeps_must_include_and_fills_up(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    got = k8s.kubelet.preferred(RESOURCE, ["p0", "p1", "p2"], ["p2"], 2)
    assert got[0] == "p2" and len(got) == 2 and set(got) <= {"p0", "p1", "p2"}


def test_pin_mode_mounts_the_pinned_map_where_dpdk_looks(k8s: K8s) -> None:
    k8s.config = write_config(k8s.work, pinMap="both")
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    c = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0]
    dirs, pin = c.mounts
    assert dirs.container_path == "/tmp/afxdp_dp/p0"
    assert pin.container_path == "/tmp/afxdp_dp/p0/xsks_map"
    assert bpffs.is_bpffs(Path(pin.host_path).parent) and Path(pin.host_path).exists()
    assert (Path(dirs.host_path) / "xsks_map").is_file()  # the mount point for the pin
    assert json.loads(c.envs["AFXDP_DEVICES_POOL1_INFO"])["p0"]["pinnedMap"] == (
        "/tmp/afxdp_dp/p0/xsks_map")


# -- pods: PodResources, hostname check, GC ------------------------------------------------------


def test_connect_is_checked_against_the_pod_that_owns_the_allocation(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    sock = Path(mount.host_path) / "afxdp.sock"
    k8s.kubelet.add_pod("ns1", "pod-a", RESOURCE, ["p0"])
    with k8s.ns.entered():
        # Asked before the daemon polled PodResources: the /connect waits for it.
        fetch_map_fd(sock, "p0", hostname="pod-a").close()
        with Client(sock) as c, pytest.raises(HandshakeError, match="/host_nak"):
            c.connect("pod-b")
    [alloc] = k8s.allocations()
    assert alloc["owner"] == "ns1/pod-a/app" and alloc["hostnames"] == ["pod-a"]


def test_connect_waits_for_a_list_that_started_after_it(k8s: K8s) -> None:
    """A List that began before the pod was admitted must not decide a later /connect."""
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    k.list_delay = 0.8
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    calls = k.list_calls
    k.wait(lambda: k.list_calls > calls, what="the post-Allocate List to begin")
    k.add_pod("ns1", "pod-late", RESOURCE, ["p0"])  # admitted while that List is running
    with k8s.ns.entered():
        fetch_map_fd(Path(mount.host_path) / "afxdp.sock", "p0", hostname="pod-late",
                     timeout=10).close()
    k.list_delay = 0.0


def test_allocation_of_a_vanished_pod_is_garbage_collected(k8s: K8s) -> None:
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k8s.kubelet.add_pod("ns1", "pod-a", RESOURCE, ["p0"])
    k8s.wait(lambda: [a["owner"] for a in k8s.allocations()] == ["ns1/pod-a/app"],
             what="owner mapped")
    k8s.kubelet.remove_pod("ns1", "pod-a")
    k8s.wait(lambda: k8s.allocations() == [], what="allocation released")
    assert not Path(mount.host_path).exists()
    assert k8s.ns.xdp_prog_id("p0") == 0


# -- restarts ---------------------------------------------------------------------------------------


def test_kubelet_restart_is_detected_and_the_plugin_registers_again(k8s: K8s) -> None:
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    assert k.registrations == [RESOURCE]
    k.restart()
    k.wait(lambda: k.registrations == [RESOURCE, RESOURCE], what="re-registration")
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    assert (k8s.work / "dp" / ENDPOINT).exists()


def test_daemon_restart_restores_allocations_on_the_same_paths(k8s: K8s) -> None:
    first = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    sock = Path(mount.host_path) / "afxdp.sock"
    k8s.kubelet.add_pod("ns1", "pod-a", RESOURCE, ["p0"])
    prog = k8s.ns.xdp_prog_id("p0")
    assert first.stop() == 0
    assert k8s.ns.xdp_prog_id("p0") == prog  # running pods keep their data path
    # kubelet, its stream gone, counts every device unhealthy until we are back
    k8s.kubelet.wait_devices(RESOURCE, lambda d: d["p0"].health == "Unhealthy")
    registrations = len(k8s.kubelet.registrations)
    second = k8s.start()
    assert "allocations=1 dropped=0" in second.log()
    assert k8s.ns.xdp_prog_id("p0") == prog
    k8s.kubelet.wait(lambda: len(k8s.kubelet.registrations) > registrations,
                     what="registration of the restarted daemon")
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1"))
    with k8s.ns.entered():
        fetch_map_fd(sock, "p0", hostname="pod-a").close()


# -- the data path ------------------------------------------------------------------------------------


def test_pod_client_receives_frames_through_the_allocated_socket(
        k8s: K8s, client_runtime: ClientRuntime) -> None:
    """Allocate -> uid 65534 client on the returned host path, as the pod -> frames."""
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k8s.kubelet.add_pod("default", "dpdk-pod", RESOURCE, ["p0"])
    with pod_receiver(k8s, client_runtime, f"{mount.host_path}/afxdp.sock", "p0", "dpdk-pod",
                      1000) as finish:
        send_frames(k8s, "q0", 1000)
        report = finish()
    assert (report["received"], report["uid"]) == (1000, 65534)


def test_a_two_device_pod_listed_one_entry_per_device_keeps_both_and_connects(
        k8s: K8s) -> None:
    """Kubelet lists one ContainerDevices per device: the pod must still be found as
    the owner (not garbage-collected after gcGrace) and /connect as the pod."""
    cfg = json.loads(k8s.config.read_text())
    cfg["gcGrace"] = 1
    k8s.config.write_text(json.dumps(cfg))
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1"))
    resp = k8s.kubelet.allocate(RESOURCE, ["p0", "p1"]).container_responses[0]
    k8s.kubelet.add_pod("ns1", "two-dev", RESOURCE, ["p0", "p1"])
    listed = k8s.kubelet.pods[("ns1", "two-dev")].containers[0].devices
    assert [list(d.device_ids) for d in listed] == [["p0"], ["p1"]]  # kubelet's shape
    time.sleep(2.5)  # past gcGrace, several GC rounds
    [alloc] = k8s.allocations()
    assert alloc["owner"] == "ns1/two-dev/app"
    with k8s.ns.entered():
        for mount, dev in zip(resp.mounts, ("p0", "p1"), strict=True):
            fetch_map_fd(Path(mount.host_path) / "afxdp.sock", dev, hostname="two-dev").close()


def test_an_init_container_and_the_app_container_share_one_allocation(k8s: K8s) -> None:
    """Kubelet allocates each container at admission, init containers first, and gives
    the init container's device to the app container: a second Allocate of the same
    device.  Both must mount a directory that exists and hand out the same map."""
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    init = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0]
    app = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0]
    assert [m.host_path for m in app.mounts] == [m.host_path for m in init.mounts]
    assert Path(init.mounts[0].host_path, "afxdp.sock").is_socket()  # not pulled away
    assert len(k8s.allocations()) == 1
    k8s.kubelet.add_pod("default", "with-init", RESOURCE, ["p0"])
    with k8s.ns.entered():
        fetch_map_fd(Path(app.mounts[0].host_path) / "afxdp.sock", "p0",
                     hostname="with-init").close()


# Pods as kubelet admits them (tests/fake_kubelet.py ``admit``).
POD_SHAPES = {
    "two-devices": [Container("app", "app", 2)],
    "init-and-app": [Container("setup", "init", 1), Container("app", "app", 1)],
    "two-containers": [Container("a", "app", 1), Container("b", "app", 1)],
    "sidecar-and-app": [Container("proxy", "sidecar", 1), Container("app", "app", 1)],
}


@pytest.mark.parametrize("shape", POD_SHAPES)
def test_every_pod_shape_gets_its_mounts_a_handshake_as_the_pod_and_every_frame(
        k8s: K8s, client_runtime: ClientRuntime, shape: str) -> None:
    """Each container of the pod, as kubelet admitted it, finds a socket at each of its
    mounts, connects as the pod's hostname and receives 1000/1000 frames through the
    handed-out map: a finished init container first, then the others side by side."""
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    pod = f"{shape}-7f9c"
    responses = k8s.kubelet.admit("default", pod, RESOURCE, POD_SHAPES[shape])
    kinds = {c.name: c.kind for c in POD_SHAPES[shape]}
    mounts = {name: [(Path(m.host_path) / "afxdp.sock", Path(m.container_path).name)
                     for m in resp.container_responses[0].mounts]
              for name, resp in responses.items()}
    for name in [n for n in mounts if kinds[n] == "init"]:
        for sock, dev in mounts[name]:
            with pod_receiver(k8s, client_runtime, str(sock), dev, pod, 1000) as finish:
                send_frames(k8s, dev.replace("p", "q"), 1000)
                assert finish()["received"] == 1000, (name, dev)
    running = [(name, sock, dev) for name in mounts if kinds[name] != "init"
               for sock, dev in mounts[name]]
    with contextlib.ExitStack() as stack:
        finishes = [stack.enter_context(pod_receiver(k8s, client_runtime, str(sock), dev, pod,
                                                     1000)) for _, sock, dev in running]
        for _, _, dev in running:
            send_frames(k8s, dev.replace("p", "q"), 1000)
        got = {(name, dev): f()["received"] for (name, _, dev), f in
               zip(running, finishes, strict=True)}
    assert got == {(name, dev): 1000 for name, _, dev in running}, got
    owners = {a["owner"] for a in k8s.allocations()}
    assert owners and all(o.startswith(f"default/{pod}/") for o in owners), owners


def slow_safety_net(k8s: K8s) -> None:
    """Poll for kubelet restarts only once a minute: what happens sooner is inotify's."""
    cfg = json.loads(k8s.config.read_text())
    cfg["kubeletCheckInterval"] = 60
    k8s.config.write_text(json.dumps(cfg))


def test_kubelet_socket_recreated_alone_makes_the_plugin_register_again(k8s: K8s) -> None:
    slow_safety_net(k8s)
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    before = len(k.registrations)
    k.recreate_socket()  # our plugin socket untouched
    k.wait(lambda: len(k.registrations) > before, 5, "registration after kubelet.sock came back")
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))


def test_plugin_socket_removed_alone_is_served_and_registered_again(k8s: K8s) -> None:
    slow_safety_net(k8s)
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    before = len(k.registrations)
    ours = k8s.work / "dp" / ENDPOINT
    ours.unlink()
    k.wait(lambda: len(k.registrations) > before and ours.is_socket(), 5,
           "our socket served and registered again")


def test_no_health_flip_while_the_daemon_attaches_programs_for_a_multi_device_allocate(
        k8s: K8s) -> None:
    """The netlink view lags behind our own attaches: the daemon must not report a
    device it is attaching as Unhealthy ('lost its XDP program') meanwhile."""
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    for i in range(4):
        k.allocate(RESOURCE, ["p0", "p1", "p2"])
        k.add_pod("default", f"multi-{i}", RESOURCE, ["p0", "p1", "p2"])
        k8s.wait(lambda: len(k8s.allocations()) == 1 and bool(k8s.allocations()[0]["owner"]),
                 what="the allocation owned")
        k.remove_pod("default", f"multi-{i}")
        k8s.wait(lambda: k8s.allocations() == [], what="the allocation released")
        k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    seen = [(dev.ID, dev.health) for lst in k.plugins[RESOURCE].lists for dev in lst]
    assert ("p0", "Unhealthy") not in seen and ("p1", "Unhealthy") not in seen \
        and ("p2", "Unhealthy") not in seen, [s for s in seen if s[1] == "Unhealthy"]
    assert "lost its XDP program" not in k8s.daemons[-1].log()


# -- warm programs --------------------------------------------------------------------------------


def test_an_allocate_after_the_first_attaches_a_warm_program(k8s: K8s) -> None:
    """By default the daemon keeps fresh programs on placeholders of its own: the
    first Allocate loads its program, later ones take a warm one (no grace period
    in their attach), each a program no one had before."""
    d = k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0", "p1", "p2"))
    k.allocate(RESOURCE, ["p0"])
    assert re.search(r"event=xdp_attached netdev=p0 .* warm=no", d.log())
    k8s.wait(lambda: d.log().count("event=xdp_warmed") == 2, what="two programs warmed")
    warmed = {int(m) for m in re.findall(r"event=xdp_warmed prog_id=(\d+)", d.log())}
    k.allocate(RESOURCE, ["p1"])
    assert re.search(r"event=xdp_attached netdev=p1 .* warm=yes", d.log())
    assert k8s.ns.xdp_prog_id("p1") in warmed
    assert k8s.ns.xdp_prog_id("p0") not in warmed
    k8s.wait(lambda: d.log().count("event=xdp_warmed") == 3, what="the stash refilled")
    k.allocate(RESOURCE, ["p2"])
    assert k8s.ns.xdp_prog_id("p2") in warmed - {k8s.ns.xdp_prog_id("p1")}


# -- attachAhead ----------------------------------------------------------------------------------


def map_id(fd: int) -> int:
    from bpf.libbpf import map_info
    return int(map_info(fd).id)


def test_attach_ahead_an_allocate_takes_the_program_attached_before_and_release_brings_a_fresh_one(
        k8s: K8s) -> None:
    """With attachAhead every free device already carries a fresh program when
    Allocate comes: Allocate takes that one (same program, same map, no attach),
    a released device gets a new program and map (the pod's map is never the next
    pod's), a netdev that leaves the pool loses its program, and at stop the
    daemon detaches what it attached ahead."""
    write_config(k8s.work, attachAhead=True, excludeAddressed=True)
    d = k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0", "p1", "p2"))
    k8s.wait(lambda: all(k8s.ns.xdp_prog_id(f"p{i}") for i in range(3)),
             what="programs attached ahead")
    ahead = k8s.ns.xdp_prog_id("p0")
    run("ip", "-n", k8s.ns.name, "addr", "add", "10.9.9.9/24", "dev", "p2")  # leaves the pool
    k8s.wait(lambda: k8s.ns.xdp_prog_id("p2") == 0, what="p2's program withdrawn")
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    assert k8s.ns.xdp_prog_id("p0") == ahead  # taken, not attached again
    assert "event=xdp_attached_ahead_taken netdev=p0" in d.log()
    k.add_pod("ns1", "pod-a", RESOURCE, ["p0"])
    k8s.wait(lambda: [a["owner"] for a in k8s.allocations()] == ["ns1/pod-a/app"],
             what="owner mapped")
    with k8s.ns.entered():
        fd = fetch_map_fd(Path(mount.host_path) / "afxdp.sock", "p0", hostname="pod-a")
    first_map = map_id(fd.fileno())
    fd.close()
    k.remove_pod("ns1", "pod-a")
    k8s.wait(lambda: k8s.allocations() == [], what="allocation released")
    k8s.wait(lambda: k8s.ns.xdp_prog_id("p0") not in (0, ahead), what="a fresh program ahead")
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k.add_pod("ns1", "pod-b", RESOURCE, ["p0"])
    k8s.wait(lambda: [a["owner"] for a in k8s.allocations()] == ["ns1/pod-b/app"],
             what="owner mapped")
    with k8s.ns.entered():
        fd = fetch_map_fd(Path(mount.host_path) / "afxdp.sock", "p0", hostname="pod-b")
    assert map_id(fd.fileno()) != first_map
    fd.close()
    assert d.stop() == 0
    assert k8s.ns.xdp_prog_id("p1") == 0  # withdrawn
    assert k8s.ns.xdp_prog_id("p0")  # the running pod's stays
