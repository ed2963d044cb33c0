"""Program identity and upgrades: another build of our program is swapped atomically.

Two builds of the redirect program (the product's and a test copy with one extra
instruction) have the same name and map layout but different tags.  A daemon
that finds the other build attached replaces it with ``XDP_FLAGS_REPLACE`` on
the same XSKMAP, so a socket a client put in the map receives before, during and
after the change.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bpf.program import DEFAULT_PROGRAM, LoadedProgram, expected_tag, identify, query
from cni_server.client import fetch_map_fd
from cni_server.receiver import XskReceiver, receive_all
from cni_server.traffic import send_frames
from tests.kernel import Daemon, NsFixture, compile_test_program, program_exists, run
from tests.test_daemon import serve_args

pytestmark = pytest.mark.kernel
Start = Callable[..., Daemon]


def map_id_of(prog_id: int) -> int:
    with LoadedProgram.adopt(prog_id) as program:
        return program.map_id


def test_another_build_is_replaced_atomically_on_the_same_map_and_frames_keep_flowing(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    other = compile_test_program("redirect_other_build", workdir / "other.o")
    first = start_daemon(*serve_args(workdir, "va"), "--bpf-object", str(other))
    old_prog = netns.xdp_prog_id("va")
    old_map = map_id_of(old_prog)
    sent = received = 0
    with netns.entered():
        ifindex = socket.if_nametoindex("va")
        assert identify(query(ifindex)) == "another build"
        with fetch_map_fd(workdir / "sock" / "va" / "afxdp.sock", "va") as map_fd, \
                XskReceiver.with_own_socket(frames=4096, ring_size=4096) as rx:
            rx.bind(ifindex, 0)
            rx.insert(map_fd.fileno(), 0)

            def exchange(n: int) -> None:
                nonlocal sent, received
                sent += send_frames("vb", n)
                received += receive_all([rx], n, 5)

            first.stop(signal.SIGKILL)  # the pod keeps receiving without a daemon
            exchange(200)
            second = start_daemon(*serve_args(workdir, "va"), wait=False)
            batches_before = 0
            while query(ifindex).prog_id == old_prog:
                exchange(20)  # while the new daemon starts and swaps the program
                batches_before += 1
                assert second.proc.poll() is None, second.log()
            for _ in range(10):
                exchange(20)
            second.wait_ready()
            exchange(200)
    assert batches_before >= 1  # frames were flowing when the swap happened
    assert (received, sent) == (sent, 200 + 20 * batches_before + 200 + 200)
    new_prog = netns.xdp_prog_id("va")
    assert new_prog != old_prog
    assert map_id_of(new_prog) == old_map  # same map: the client's socket is still in it
    with netns.entered():
        state = query(socket.if_nametoindex("va"))
    assert state.tag == expected_tag(DEFAULT_PROGRAM) and identify(state) == "this build"
    assert f"event=xdp_upgraded netdev=va old_prog_id={old_prog}" in second.log()
    deadline = time.monotonic() + 5  # freed after an RCU grace period
    while program_exists(old_prog) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not program_exists(old_prog), "the old build was never freed"


def test_a_program_named_like_ours_without_our_map_is_foreign(
        netns: NsFixture, workdir: Path) -> None:
    netns.veth("va", "vb")
    impostor = compile_test_program("same_name_no_xskmap", workdir / "impostor.o")
    run("ip", "-n", netns.name, "link", "set", "va", "xdpgeneric", "obj", str(impostor),
        "sec", "xdp")
    with netns.entered():
        state = query(socket.if_nametoindex("va"))
    assert state.name == "afxdp_redirect" and identify(state) == "foreign"
    d = Daemon(netns, workdir, *serve_args(workdir, "va"), wait=False)
    assert d.proc.wait(30) != 0
    assert "not ours" in d.log()
    d.stop()
    assert netns.xdp_prog_id("va") == state.prog_id  # left alone
