"""One daemon per netdev: a second daemon is refused and the first keeps working.

Each test judges only what it created: its own netns, the program id it saw
attached, the daemon processes it started.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from cni_server.client import fetch_map_fd
from tests.k8s_env import RESOURCE, K8s, healthy
from tests.kernel import ClientRuntime, Daemon, NsFixture, held_bpf_ids
from tests.test_daemon import MAP_CAPS, receive_unprivileged, serve_args

pytestmark = pytest.mark.kernel
Start = Callable[..., Daemon]


def second_daemon(ns: NsFixture, workdir: Path, *args: str) -> tuple[int, str]:
    """Run another ``afxdp serve`` to completion: (exit code, output)."""
    d = Daemon(ns, workdir, *args, wait=False)
    code = d.proc.wait(30)
    out = d.log()
    d.stop()
    return code, out


@pytest.mark.parametrize("same_socket_dir", [True, False])
def test_a_second_daemon_on_a_served_netdev_is_refused_and_the_first_keeps_working(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime,
        same_socket_dir: bool) -> None:
    netns.veth("va", "vb")
    first = start_daemon(*serve_args(workdir, "va"))
    prog = netns.xdp_prog_id("va")
    sock_dir = workdir / ("sock" if same_socket_dir else "other")
    code, out = second_daemon(netns, workdir, "--netdev", "va", "--socket-dir", str(sock_dir),
                              "--socket-owner", "65534:65534")
    assert code == 1
    # The refusal names the netdev and the daemon that serves it.
    assert f"va is already served by another afxdp daemon (pid {first.proc.pid}" in out, out
    assert str(workdir / "sock" / "<netdev>" / "afxdp.sock") in out, out
    # Nothing of the first daemon was touched: same program, its socket, frames arrive.
    assert netns.xdp_prog_id("va") == prog
    assert (workdir / "sock" / "va" / "afxdp.sock").is_socket()
    if not same_socket_dir:
        assert not sock_dir.exists()
    report = receive_unprivileged(netns, client_runtime, workdir, MAP_CAPS, "--socket",
                                  str(workdir / "sock" / "va" / "afxdp.sock"))
    assert report["received"] == 1000
    assert "xdp_detach_skipped" not in first.log()
    assert first.proc.poll() is None


def test_a_daemon_restarted_after_sigkill_takes_the_netdev_back_and_adopts_its_program(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    first = start_daemon(*serve_args(workdir, "va"))
    prog = netns.xdp_prog_id("va")
    first.stop(signal.SIGKILL)
    second = start_daemon(*serve_args(workdir, "va"))
    assert netns.xdp_prog_id("va") == prog
    assert f"event=xdp_adopted netdev=va prog_id={prog}" in second.log()
    assert prog in held_bpf_ids(second.proc.pid)[0]


def test_a_refused_daemon_leaves_the_other_netdevs_it_asked_for_untouched(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    netns.veth("wa", "wb")
    first = start_daemon(*serve_args(workdir, "va"))
    code, out = second_daemon(netns, workdir, *serve_args(workdir / "two", "wa", "va"))
    assert code != 0 and f"pid {first.proc.pid}" in out
    assert netns.xdp_prog_id("wa") == 0  # claims come before any attach
    assert not (workdir / "two").exists()


def test_a_standalone_daemon_cannot_take_a_netdev_a_kubernetes_daemon_allocated(
        k8s: K8s) -> None:
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    sock = Path(k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0]
                .mounts[0].host_path) / "afxdp.sock"
    prog = k8s.ns.xdp_prog_id("p0")
    code, out = second_daemon(k8s.ns, k8s.work, "--netdev", "p0", "--socket-dir",
                              str(k8s.work / "standalone"))
    assert code != 0
    assert f"p0 is already served by another afxdp daemon (pid {d.proc.pid}, kubernetes mode" \
        in out, out
    assert k8s.ns.xdp_prog_id("p0") == prog
    k8s.kubelet.add_pod("default", "pod-a", RESOURCE, ["p0"])
    with k8s.ns.entered(), fetch_map_fd(sock, "p0", hostname="pod-a"):
        pass


def test_a_kubernetes_daemon_reports_a_netdev_another_daemon_serves_as_unhealthy(
        k8s: K8s, start_daemon: Start) -> None:
    other = start_daemon("--netdev", "p1", "--socket-dir", str(k8s.work / "standalone"))
    prog = k8s.ns.xdp_prog_id("p1")
    k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0")
                             and devs.get("p1") is not None and devs["p1"].health == "Unhealthy")
    reason = k8s.status()["pools"]["pool1"]["devices"]["p1"]["reason"]
    assert f"pid {other.proc.pid}" in reason, reason
    assert k8s.ns.xdp_prog_id("p1") == prog
