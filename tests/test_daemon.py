"""``afxdp serve`` end to end on the real kernel, with clients as users run them.

The daemon runs as a child process in a test netns serving one end of a veth
pair; frames are injected on the other end.  Clients run as uid 65534 with only
CAP_NET_RAW + CAP_IPC_LOCK (map and pinned modes) or with no capability at all
(``/xsk_socket`` + ``/xsk_bind``), never with CAP_NET_ADMIN: a client holding it
would detach the program when it exits, which is not how users run them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bpf import bpffs
from bpf.program import prog_name
from cni_server.client import Client, HandshakeError, fetch_map_fd
from tests.k8s_env import http_get
from tests.kernel import (
    ROOT,
    ClientRuntime,
    Daemon,
    NsFixture,
    compile_test_program,
    run,
    setpriv,
    wait_for,
)

pytestmark = pytest.mark.kernel
MAP_CAPS = ("net_raw", "ipc_lock")
FRAMES = 1000
Start = Callable[..., Daemon]


def serve_args(workdir: Path, *netdevs: str, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["--socket-dir", str(workdir / "sock"), "--socket-owner", "65534:65534"]
    for n in netdevs:
        args += ["--netdev", n]
    return [*args, *extra]


def receive_unprivileged(ns: NsFixture, rt: ClientRuntime, workdir: Path, caps: tuple[str, ...],
                         *args: str, count: int = FRAMES, flows: int = 1,
                         queues: tuple[int, ...] = (0,)) -> dict[str, object]:
    """Start a uid-65534 receiver, inject ``count`` frames on vb once it is ready, return its report."""
    ready = workdir / "out" / f"ready-{os.urandom(4).hex()}"
    qargs = [a for q in queues for a in ("--queue", str(q))]
    argv = ns.cmd(*setpriv(*caps), *rt.argv("receive", "--netdev", "va", "--count", str(count),
                                              "--timeout", "15", "--json", "--ready-file",
                                              str(ready), *qargs, *args))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=rt.env(), cwd=rt.dir)
    try:
        wait_for(ready, 15, proc)
        sent = run(*ns.cmd(sys.executable, "-m", "cni_server.cli", "send", "--netdev", "vb",
                           "--count", str(count), "--flows", str(flows), "--json"))
        assert json.loads(sent.stdout)["sent"] == count
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"receiver exited {proc.returncode}: {out}{err}"
    report: dict[str, object] = json.loads(out)
    return report


def test_unprivileged_client_receives_every_frame_through_the_handed_out_map(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    r = receive_unprivileged(netns, client_runtime, workdir, MAP_CAPS, "--socket", str(sock))
    assert (r["received"], r["uid"], r["mode"]) == (FRAMES, 65534, "map")
    assert "result=granted" in d.log() and "peer_uid=65534" in d.log()


def test_client_with_no_capabilities_receives_through_a_daemon_made_socket(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth()
    start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    r = receive_unprivileged(netns, client_runtime, workdir, (), "--socket", str(sock),
                             "--mode", "xsk")
    assert (r["received"], r["uid"], r["mode"]) == (FRAMES, 65534, "xsk")


def test_client_without_net_raw_cannot_make_its_own_socket(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    """The reason /xsk_socket exists: map mode needs CAP_NET_RAW in the client."""
    netns.veth()
    start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    res = subprocess.run(
        netns.cmd(*setpriv(), *client_runtime.argv("receive", "--netdev", "va", "--socket",
                                                   str(sock), "--count", "1", "--timeout", "1")),
        capture_output=True, text=True, env=client_runtime.env(), cwd=client_runtime.dir)
    assert res.returncode == 1
    assert "Operation not permitted" in res.stderr


def test_pinned_map_is_usable_by_an_unprivileged_client(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth()
    pins = workdir / "pins"
    d = start_daemon(*serve_args(workdir, "va", extra=("--pin-dir", str(pins))))
    pin = pins / "va" / "xsks_map"
    assert bpffs.is_bpffs(pins)  # the daemon mounted a bpffs there
    st = os.stat(pin)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o660)
    r = receive_unprivileged(netns, client_runtime, workdir, MAP_CAPS, "--mode", "pinned",
                             "--pin", str(pin))
    assert (r["received"], r["mode"]) == (FRAMES, "pinned")
    assert d.stop() == 0
    assert not pin.exists() and not bpffs.is_bpffs(pins)


def test_multi_queue_netdev_every_queue_gets_a_socket_and_all_frames_arrive(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth(queues=4)
    d = start_daemon(*serve_args(workdir, "va"))
    dev = d.wait_ready()["allocations"][0]["devices"]["va"]  # type: ignore[index]
    assert dev["queue_slots"] == 4 and dev["queues"] == 4
    sock = workdir / "sock" / "va" / "afxdp.sock"
    r = receive_unprivileged(netns, client_runtime, workdir, MAP_CAPS, "--socket", str(sock),
                             "--frames", "512", flows=64, queues=(0, 1, 2, 3))
    assert r["received"] == FRAMES
    # One connection per queue, as DPDK makes them.
    assert d.log().count("result=granted") == 4


def test_peer_in_another_netns_is_refused_and_others_still_served(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    # This test process is in the host netns, not the one holding va.
    with Client(sock) as c, pytest.raises(HandshakeError, match="/host_nak"):
        c.connect()
    with netns.entered():
        fetch_map_fd(sock, "va").close()


def test_operator_can_turn_the_netns_check_off(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    start_daemon(*serve_args(workdir, "va", extra=("--no-peer-netns-check",)))
    # From the host netns: refused by default (see above), accepted now.
    fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va").close()


def test_refusals_get_their_documented_answers_and_the_daemon_keeps_serving(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    netns.veth("vc", "vd")
    d = start_daemon(*serve_args(workdir, "va", "vc"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    with netns.entered():
        with Client(sock) as c:
            assert c.request("/version")[0] == "/nak"  # before connect
            assert c.request("/connect,not-this-host")[0] == "/host_nak"
            c.connect()
            assert c.request("/xsk_map_fd,vc")[0] == "/fd_nak"  # another socket's netdev
            assert c.request("/xsk_map_fd,vb")[0] == "/fd_nak"  # not served at all
            assert c.request(b"\x00\xff garbage")[0] == "/nak"
            assert c.request(b"/connect," + b"x" * 5000)[0] == "/nak"
            r, w = os.pipe()
            try:
                reply, fd = c.request("/version", [r, w])
                assert (reply, fd) == ("/nak", None)
            finally:
                os.close(r)
                os.close(w)
            assert c.request("/version")[0] == "0.1"
        fetch_map_fd(sock, "va").close()
    assert d.proc.poll() is None


def test_sigterm_detaches_and_removes_everything_it_made(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    netns.veth("vc", "vd")
    pins = workdir / "pins"
    d = start_daemon(*serve_args(workdir, "va", "vc", extra=("--pin-dir", str(pins))))
    assert netns.xdp_prog_id("va") and netns.xdp_prog_id("vc")
    assert d.stop(signal.SIGTERM) == 0
    assert netns.xdp_prog_id("va") == 0 and netns.xdp_prog_id("vc") == 0
    assert not (workdir / "sock").exists()
    assert not pins.exists() or not any(pins.iterdir())
    assert not bpffs.is_bpffs(pins)
    assert not d.control.exists() and not d.ready.exists()
    assert "event=stopped" in d.log()


def test_sigterm_lets_a_handshake_in_flight_finish_and_refuses_new_ones(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    with netns.entered(), Client(sock) as c:
        c.connect()
        d.proc.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 1.5  # within the daemon's 2 s drain
        while not refused and time.monotonic() < deadline:
            try:
                Client(sock, timeout=1).close()
                time.sleep(0.01)
            except ConnectionRefusedError:
                refused = True  # the listener is closed: new clients are refused...
        assert refused
        assert c.version() == "0.1"  # ...while this one finishes its handshake
        c.xsk_map_fd("va").close()
        c.fin()
    assert d.stop() == 0
    assert netns.xdp_prog_id("va") == 0


def test_sigint_also_stops_cleanly(netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va"))
    assert d.stop(signal.SIGINT) == 0
    assert netns.xdp_prog_id("va") == 0


def test_restart_after_sigkill_adopts_the_program_and_replaces_the_stale_socket(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    first = start_daemon(*serve_args(workdir, "va"))
    prog = netns.xdp_prog_id("va")
    first.stop(signal.SIGKILL)
    assert netns.xdp_prog_id("va") == prog  # a crash leaves the data path alone
    second = start_daemon(*serve_args(workdir, "va"))
    assert "event=xdp_adopted" in second.log() and "stale_socket_removed" in second.log()
    assert netns.xdp_prog_id("va") == prog
    assert second.stop() == 0
    assert netns.xdp_prog_id("va") == 0


def test_serve_with_a_custom_program_attaches_hands_out_and_adopts_it(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    steer = ("--bpf-object", str(ROOT / "bpf" / "afxdp_udp_steer.bpf.o"),
             "--program-name", "afxdp_udp_steer")
    first = start_daemon(*serve_args(workdir, "va", extra=steer))
    prog = netns.xdp_prog_id("va")
    assert prog_name(prog) == "afxdp_udp_steer"
    with netns.entered():
        fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va").close()
    first.stop(signal.SIGKILL)
    second = start_daemon(*serve_args(workdir, "va", extra=steer))
    assert netns.xdp_prog_id("va") == prog and "event=xdp_adopted" in second.log()
    assert second.stop() == 0
    assert netns.xdp_prog_id("va") == 0


def test_unknown_netdev_fails_start_and_undoes_the_others(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va", "nosuch0"), wait=False)
    assert d.proc.wait(15) == 1
    assert "no netdev named 'nosuch0'" in d.log()
    assert netns.xdp_prog_id("va") == 0
    assert not (workdir / "sock").exists()


def test_foreign_program_fails_start_unless_forced(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    obj = compile_test_program("foreign_pass", workdir / "f.o")
    run("ip", "-n", netns.name, "link", "set", "va", "xdpgeneric", "obj", str(obj), "sec", "xdp")
    foreign = netns.xdp_prog_id("va")
    assert foreign
    d = start_daemon(*serve_args(workdir, "va"), wait=False)
    assert d.proc.wait(15) == 1
    assert "not ours" in d.log() and "--force" in d.log()
    assert netns.xdp_prog_id("va") == foreign
    forced = start_daemon(*serve_args(workdir, "va", extra=("--force",)))
    assert netns.xdp_prog_id("va") not in (0, foreign)
    assert forced.stop() == 0
    assert netns.xdp_prog_id("va") == 0


def test_request_execs_a_command_with_the_map_fd_inherited(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth()
    start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    probe = ("import os; fd = os.environ['AFXDP_XSKMAP_FD']; "
             "print(open(f'/proc/self/fdinfo/{fd}').read())")
    res = subprocess.run(
        netns.cmd(*setpriv(), *client_runtime.argv(
            "request", "--socket", str(sock), "--netdev", "va", "--",
            client_runtime.python, "-c", probe)),
        capture_output=True, text=True, env=client_runtime.env(), cwd=client_runtime.dir)
    assert res.returncode == 0, res.stderr
    assert "map_type:\t17" in res.stdout  # BPF_MAP_TYPE_XSKMAP
    assert "/fd_ack" in res.stderr  # the handshake is reported on stderr when exec'ing


def test_request_prints_the_handshake_and_fails_clearly_when_refused(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    start_daemon(*serve_args(workdir, "va"))
    sock = workdir / "sock" / "va" / "afxdp.sock"
    base = [sys.executable, "-m", "cni_server.cli", "request", "--socket", str(sock)]
    ok = run(*netns.cmd(*base, "--netdev", "va", "--json"))
    doc = json.loads(ok.stdout)
    assert [s["reply"] for s in doc["steps"]] == ["/host_ok", "0.1", "/fd_ack", "/fin_ack"]
    assert doc["map"]["type"] == 17
    refused = run(*netns.cmd(*base, "--netdev", "va", "--hostname", "intruder"), check=False)
    assert refused.returncode == 3 and "/host_nak" in refused.stderr
    missing = run(*netns.cmd(*base.copy()[:-2], "--socket", str(workdir / "none.sock"),
                             "--netdev", "va"), check=False)
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_status_shows_what_is_attached_and_served(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va"))
    with netns.entered():
        fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va").close()
    res = run(*netns.cmd(sys.executable, "-m", "cni_server.cli", "status", "--control-socket",
                         str(d.control), "--json"))
    doc = json.loads(res.stdout)
    alloc = doc["daemon"]["allocations"][0]
    assert alloc["devices"]["va"]["prog_id"] == netns.xdp_prog_id("va")
    assert doc["daemon"]["server"]["fds_sent"] == 1
    [row] = doc["xdp"]
    assert {k: row[k] for k in ("netdev", "prog_id", "mode", "name", "ours", "build")} == {
        "netdev": "va", "prog_id": netns.xdp_prog_id("va"), "mode": "native",
        "name": "afxdp_redirect", "ours": True, "build": "this build"}
    assert row["served_by"].startswith(f"pid {d.proc.pid}, standalone mode"), row
    text = run(*netns.cmd(sys.executable, "-m", "cni_server.cli", "status", "--control-socket",
                          str(d.control))).stdout
    assert "va: prog" in text and f"(ours, this build, served by daemon pid {d.proc.pid}" in text


def test_metrics_healthz_and_readyz(netns: NsFixture, workdir: Path, start_daemon: Start
                                    ) -> None:
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va", extra=("--metrics-address", "127.0.0.1:0")))
    addr = str(d.wait_ready()["http"])
    with netns.entered():
        fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va").close()
        with Client(workdir / "sock" / "va" / "afxdp.sock") as c:
            assert c.request("/version")[0] == "/nak"
        assert http_get(addr, "/healthz") == (200, "ok\n")
        assert http_get(addr, "/readyz") == (200, "ready\n")
        assert http_get(addr, "/nope")[0] == 404
        deadline = time.monotonic() + 5
        while 'result="refused"' not in http_get(addr, "/metrics")[1] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        body = http_get(addr, "/metrics")[1]
    for line in ('afxdp_handshakes_total{result="granted"} 1.0',
                 'afxdp_fds_handed_out_total{kind="xsk_map"} 1.0',
                 'afxdp_program_operations_total{operation="attach",result="ok"} 1.0',
                 'afxdp_allocations 1.0',
                 'afxdp_log_bytes_waiting 0.0',  # (a file: written at once)
                 'afxdp_replies_total{reason="before connect",reply="/nak",request="/version"} 1.0',
                 "afxdp_handshake_duration_seconds_count 2.0"):
        assert line in body, line


def test_a_full_log_pipe_does_not_stop_the_handshakes(netns: NsFixture, workdir: Path,
                                                      start_daemon: Start) -> None:
    """Under a container runtime stderr is a pipe; one that nobody drains for a while
    (the runtime behind on a busy disk) must not stop the daemon serving.  500
    handshakes log ~125 KB, twice what the pipe holds; then the lines are all there,
    in order."""
    netns.veth()
    d = start_daemon(*serve_args(workdir, "va"), wait=False, output=subprocess.PIPE)
    wait_for(d.ready, proc=d.proc)  # (the ready line waits in the pipe, unread)
    n = 500
    with netns.entered():
        for i in range(n):
            try:
                fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va", timeout=5).close()
            except (HandshakeError, OSError) as e:
                pytest.fail(f"handshake {i} of {n} failed while the log pipe was full: {e}")
    out = d.proc.stdout
    assert out is not None
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(out.read()), daemon=True)
    reader.start()  # the runtime catches up
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    reader.join(10)
    lines = [ln for ln in b"".join(read).decode().splitlines() if "event=handshake" in ln]
    assert len(lines) == n and all("result=granted" in ln for ln in lines)


def test_bad_configuration_exits_2_naming_the_field(workdir: Path) -> None:
    res = run(sys.executable, "-m", "cni_server.cli", "serve", "--netdev", "eth 0", check=False)
    assert res.returncode == 2 and "netdevs[0]" in res.stderr
    cfg = workdir / "c.yaml"
    cfg.write_text("netdevs: [va]\nxdpMode: turbo\n")
    res = run(sys.executable, "-m", "cni_server.cli", "serve", "--config", str(cfg), check=False)
    assert res.returncode == 2 and "xdpMode" in res.stderr


def test_config_file_serves_like_flags(netns: NsFixture, workdir: Path,
                                       start_daemon: Start) -> None:
    netns.veth()
    cfg = workdir / "afxdp.yaml"
    cfg.write_text(f"netdevs: [va]\nsocketDir: {workdir / 'sock'}\nxdpMode: skb\n"
                   f"socketOwner: nobody\nallowHosts: [{socket.gethostname()}]\n")
    d = start_daemon("--config", str(cfg))
    dev = d.wait_ready()["allocations"][0]["devices"]["va"]  # type: ignore[index]
    assert dev["mode"] == "skb"
    st = os.stat(workdir / "sock" / "va" / "afxdp.sock")
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o660)
    st = os.stat(workdir / "sock" / "va")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)  # ours: access is on the socket
