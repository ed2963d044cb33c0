"""Faults on the real kernel, in Kubernetes mode: the daemon killed, netdevs deleted and
re-created, kubelet restarting during an Allocate.

(CNI DEL while the daemon is down is in test_cni.py; a full disk while persisting
state in test_registry.py; bpffs mounted when missing in test_daemon.py/test_plugin.py.)
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest

from bpf import bpffs, libbpf
from bpf.program import PROGRAM_NAME, prog_name
from cni_server.client import Client, HandshakeError, fetch_map_fd
from tests.k8s_env import RESOURCE, K8s, healthy, pod_receiver, send_frames, write_config
from tests.kernel import (
    ClientRuntime,
    Daemon,
    compile_test_program,
    held_bpf_ids,
    program_exists,
    run,
)

pytestmark = pytest.mark.kernel


def only_ours(k8s: K8s, daemon: Daemon, expected: list[int], gone: tuple[int, ...] = ()) -> None:
    """The daemon under test holds exactly the programs ``expected`` (attached to the
    test's netdevs) besides those it keeps warm, and programs it dropped (``gone``)
    are freed.  Judged by the daemon's own fds and by program id, never by a
    host-wide count: other copies of the product may run on this host.  The kernel
    frees a released program after an RCU grace period, so wait a moment."""
    def held() -> set[int]:
        return held_bpf_ids(daemon.proc.pid)[0] - k8s.warm_ids()

    k8s.kubelet.wait(lambda: held() == set(expected)
                     and not any(program_exists(p) for p in gone), 5,
                     f"the daemon to hold programs {sorted(expected)} (holds {sorted(held())})"
                     f" and {list(gone)} to be freed")


def map_id(fd: int) -> int:
    return int(libbpf.map_info(fd).id)


def pinned_map_id(pin: Path) -> int:
    fd = bpffs.open_pinned(pin)
    try:
        return map_id(fd)
    finally:
        os.close(fd)


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_sigkill_while_a_pod_receives_traffic_keeps_flowing_and_restart_restores(
        k8s: K8s, client_runtime: ClientRuntime) -> None:
    k8s.config = write_config(k8s.work, pinMap="both")
    first = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mounts = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts
    sock_dir, pin = Path(mounts[0].host_path), Path(mounts[1].host_path)
    k8s.kubelet.add_pod("default", "rx-pod", RESOURCE, ["p0"])
    with pod_receiver(k8s, client_runtime, f"{sock_dir}/afxdp.sock", "p0", "rx-pod", 2000,
                      timeout=30) as finish:
        prog = k8s.ns.xdp_prog_id("p0")
        k8s.wait_warm()
        warm = k8s.warm_ids()
        assert warm  # (the first Allocate had it warm two)
        first.stop(signal.SIGKILL)
        send_frames(k8s, "q0", 1000)  # the daemon is dead: the data path does not need it
        # Its warm programs went with it: their netns was its own, named nowhere.
        k8s.wait(lambda: not any(program_exists(p) for p in warm), 5,
                 what=f"the dead daemon's warm programs {sorted(warm)} freed")

        second = k8s.start()
        assert "allocations=1 dropped=0" in second.log()
        send_frames(k8s, "q0", 1000)  # and after the restart, through the same map
        report = finish()
    assert report["received"] == 2000, report
    # Same program, no duplicate loaded, same socket path served, the same pin.
    assert k8s.ns.xdp_prog_id("p0") == prog
    only_ours(k8s, second, [prog])
    with k8s.ns.entered(), fetch_map_fd(sock_dir / "afxdp.sock", "p0", hostname="rx-pod") as fd:
        served_map = map_id(fd.fileno())
    assert pinned_map_id(pin) == served_map
    bpf_root = k8s.work / "bpf"
    ours = [p.relative_to(bpf_root).as_posix() for p in sorted(bpf_root.rglob("*"))]
    assert [p for p in ours if not p.endswith(".debug")] == [  # *.debug: bpffs' own files
        sock_dir.parent.name, f"{sock_dir.parent.name}/p0", f"{sock_dir.parent.name}/p0/xsks_map"]


def test_netdev_deleted_and_recreated_is_unhealthy_then_healthy_with_a_fresh_map(
        k8s: K8s) -> None:
    k8s.config = write_config(k8s.work, pinMap="both")
    d = k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    mounts = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts
    sock, pin = Path(mounts[0].host_path) / "afxdp.sock", Path(mounts[1].host_path)
    k.add_pod("default", "pod-a", RESOURCE, ["p0"])
    with k8s.ns.entered(), fetch_map_fd(sock, "p0", hostname="pod-a") as fd:
        old_map = map_id(fd.fileno())
    k8s.wait_warm()
    fds_before = daemon_fds(d.proc.pid)
    old_prog = k8s.ns.xdp_prog_id("p0")

    run("ip", "-n", k8s.ns.name, "link", "del", "p0")
    k.wait_devices(RESOURCE, lambda devs: devs["p0"].health == "Unhealthy")
    # Deleting a veth first takes it down (Unhealthy, map still valid), then removes it.
    k8s.wait(lambda: k8s.allocations()[0]["devices"]["p0"]["unavailable"] == "netdev is gone",
             what="the daemon to see p0 gone")
    with k8s.ns.entered(), Client(sock) as c:
        c.connect("pod-a")
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("p0")  # no stale map for a netdev that is not there

    k8s.ns.veth("p0", "q0")
    k.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    assert k8s.ns.xdp_prog_id("p0")
    with k8s.ns.entered(), fetch_map_fd(sock, "p0", hostname="pod-a") as fd:
        new_map = map_id(fd.fileno())
    assert new_map != old_map
    assert pinned_map_id(pin) == new_map  # re-pinned where the pod looks
    # The old program and map are gone; the daemon holds as many fds as before.
    only_ours(k8s, d, [k8s.ns.xdp_prog_id("p0")], gone=(old_prog,))
    k.wait(lambda: daemon_fds(d.proc.pid) <= fds_before, 5, "the daemon's fd count back")
    assert "event=xdp_repaired netdev=p0" in d.log() and "result=replaced" in d.log()


def test_program_detached_from_an_allocated_netdev_is_put_back_with_the_same_map(
        k8s: K8s) -> None:
    """A DPDK run as root detaches the program on exit: the pod's other sockets come back."""
    k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    sock = Path(k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0].host_path)
    k.add_pod("default", "pod-a", RESOURCE, ["p0"])
    with k8s.ns.entered(), fetch_map_fd(sock / "afxdp.sock", "p0", hostname="pod-a") as fd:
        before = map_id(fd.fileno())
    prog = k8s.ns.xdp_prog_id("p0")
    run("ip", "-n", k8s.ns.name, "link", "set", "p0", "xdp", "off")
    k.wait(lambda: any(
        {x.ID: x.health for x in lst}.get("p0") == "Unhealthy"
        for lst in k.plugins[RESOURCE].lists), what="p0 reported Unhealthy")
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    assert k8s.ns.xdp_prog_id("p0") == prog
    with k8s.ns.entered(), fetch_map_fd(sock / "afxdp.sock", "p0", hostname="pod-a") as fd:
        assert map_id(fd.fileno()) == before


def test_a_foreign_program_in_its_place_is_left_alone_and_stays_unhealthy(k8s: K8s) -> None:
    d = k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    k.allocate(RESOURCE, ["p0"])
    foreign = compile_test_program("foreign_pass", k8s.work / "f.o")
    # In one step (-force replaces the attached program): the daemon would put ours
    # back between a detach and an attach.
    run("ip", "-force", "-n", k8s.ns.name, "link", "set", "p0", "xdp", "obj", str(foreign),
        "sec", "xdp")
    k.wait_devices(RESOURCE, lambda devs: devs["p0"].health == "Unhealthy")
    k.wait(lambda: "event=xdp_repair_failed netdev=p0" in d.log(), what="the repair to fail")
    assert "not ours" in d.log()
    assert prog_name(k8s.ns.xdp_prog_id("p0")) != PROGRAM_NAME  # left in place
    assert k.devices(RESOURCE)["p0"].health == "Unhealthy"


def test_kubelet_restart_during_allocate_ends_with_one_consistent_allocation(k8s: K8s) -> None:
    d = k8s.start()
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1", "p2"))
    outcome: list[object] = []

    def allocate() -> None:
        try:
            outcome.append(k.allocate(RESOURCE, ["p0", "p1", "p2"]))
        except grpc.RpcError as e:
            outcome.append(e)

    t = threading.Thread(target=allocate)
    t.start()
    registrations = len(k.registrations)
    k.restart(down_for=0.05)  # the in-flight call's channel is closed under it
    t.join(30)
    assert len(outcome) == 1
    k.wait(lambda: len(k.registrations) > registrations, what="re-registration")
    # The new kubelet allocates again for the pod it is admitting (as after a real restart).
    resp = k.allocate(RESOURCE, ["p0", "p1", "p2"])
    k.add_pod("default", "pod-r", RESOURCE, ["p0", "p1", "p2"])
    [alloc] = k8s.allocations()
    assert sorted(alloc["devices"]) == ["p0", "p1", "p2"]
    sock_base = Path(resp.container_responses[0].mounts[0].host_path).parent
    assert [p.name for p in (k8s.work / "sockets").iterdir()] == [sock_base.name]
    with k8s.ns.entered():
        for dev in ("p0", "p1", "p2"):
            fetch_map_fd(sock_base / dev / "afxdp.sock", dev, hostname="pod-r").close()
    only_ours(k8s, d, [k8s.ns.xdp_prog_id(dev) for dev in ("p0", "p1", "p2")])
