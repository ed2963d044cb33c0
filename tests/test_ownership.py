"""One daemon per netdev, and it keeps its program there: a second daemon is refused
and the first keeps working; a program taken off a served netdev is put back.

Each test judges only what it created: its own netns, the program id it saw
attached, the daemon processes it started.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bpf import libbpf
from cni_server.client import Client, HandshakeError, fetch_map_fd
from tests.k8s_env import RESOURCE, K8s, healthy
from tests.kernel import (
    ClientRuntime,
    Daemon,
    NsFixture,
    compile_test_program,
    held_bpf_ids,
    run,
)
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
    assert "xdp_upgraded" not in second.log()  # the same build: adopted, not replaced
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


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_standalone_daemon_puts_back_a_program_taken_off_its_netdev(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    """As a DPDK run as root does on exit: the program goes, the daemon notices and
    re-attaches the same program, so the map (and sockets in it) work again."""
    netns.veth("va", "vb")
    d = start_daemon(*serve_args(workdir, "va"), "--watch-interval", "0.1")
    prog = netns.xdp_prog_id("va")
    sock = workdir / "sock" / "va" / "afxdp.sock"
    with netns.entered(), fetch_map_fd(sock, "va") as fd:
        before = libbpf.map_info(fd.fileno()).id
    run("ip", "-n", netns.name, "link", "set", "va", "xdp", "off")
    assert wait_until(lambda: netns.xdp_prog_id("va") == prog), d.log()
    # (the line is written once the attach has returned: a moment after the kernel shows it)
    assert wait_until(lambda: "event=xdp_repaired netdev=va allocation=va result=reattached"
                      in d.log()), d.log()
    assert "event=xdp_lost netdev=va" in d.log()
    with netns.entered(), fetch_map_fd(sock, "va") as fd:
        assert libbpf.map_info(fd.fileno()).id == before
    report = receive_unprivileged(netns, client_runtime, workdir, MAP_CAPS, "--socket", str(sock))
    assert report["received"] == 1000


def test_a_standalone_daemon_leaves_a_foreign_program_and_refuses_handouts_until_it_goes(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    d = start_daemon(*serve_args(workdir, "va"), "--watch-interval", "0.1")
    prog = netns.xdp_prog_id("va")
    sock = workdir / "sock" / "va" / "afxdp.sock"
    foreign = compile_test_program("foreign_pass", workdir / "f.o")
    # In one step (-force replaces the attached program): the watch would put ours
    # back between a detach and an attach.
    run("ip", "-force", "-n", netns.name, "link", "set", "va", "xdp", "obj", str(foreign),
        "sec", "xdp")
    foreign_id = netns.xdp_prog_id("va")
    assert foreign_id not in (0, prog)
    assert wait_until(lambda: "event=xdp_repair_failed netdev=va" in d.log()), d.log()
    assert netns.xdp_prog_id("va") == foreign_id  # left alone
    with netns.entered(), Client(sock) as c:
        c.connect(socket.gethostname())
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("va")
    run("ip", "-n", netns.name, "link", "set", "va", "xdp", "off")
    assert wait_until(lambda: netns.xdp_prog_id("va") == prog), d.log()
    # handed out again once the repair has returned, a moment after the kernel shows it
    assert wait_until(lambda: "event=xdp_repaired netdev=va" in d.log()), d.log()
    with netns.entered():
        fetch_map_fd(sock, "va").close()


def test_a_standalone_daemon_refuses_handouts_for_a_netdev_that_is_gone(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    d = start_daemon(*serve_args(workdir, "va"), "--watch-interval", "0.1")
    run("ip", "-n", netns.name, "link", "del", "va")
    assert wait_until(lambda: "event=netdev_gone netdev=va" in d.log()), d.log()
    with netns.entered(), Client(workdir / "sock" / "va" / "afxdp.sock") as c:
        c.connect(socket.gethostname())
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("va")
