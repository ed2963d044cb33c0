"""The redirect program and its libbpf loader, on the real kernel."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf import bpffs, libbpf
from bpf.errors import BpffsError, ForeignProgram, LibbpfError, ObjectInvalid, ObjectMissing
from bpf.program import (
    LoadedProgram,
    XdpMode,
    attach,
    detach,
    ensure_attached,
    identify,
    query,
)
from cni_server.netdev import link_info
from cni_server.receiver import XskReceiver
from cni_server.traffic import send_frames
from tests.kernel import ROOT, NsFixture, run

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def test_objects() -> Iterator[dict[str, Path]]:
    """Compile the test-only BPF programs (the build compiles only bpf/*.bpf.c)."""
    out = Path(tempfile.mkdtemp(prefix="afxdp-bpfobj-"))
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    objs = {}
    for name in ("foreign_pass", "no_xskmap"):
        obj = out / f"{name}.bpf.o"
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
                        str(ROOT / "tests" / "bpf" / f"{name}.bpf.c"), "-o", str(obj)], check=True)
        objs[name] = obj
    yield objs
    for f in out.iterdir():
        f.unlink()
    out.rmdir()


@pytest.fixture
def veth(netns: NsFixture) -> Iterator[tuple[NsFixture, int]]:
    netns.veth("va", "vb", queues=4)
    with netns.entered():
        yield netns, link_info("va").ifindex


def test_default_object_exists_and_libbpf_is_the_distros() -> None:
    assert (ROOT / "bpf" / "afxdp_redirect.bpf.o").is_file()
    assert libbpf.version().startswith("1.")


def test_xskmap_is_sized_to_the_netdevs_queue_count(veth: tuple[NsFixture, int]) -> None:
    ns, ifindex = veth
    with ns.entered():
        info = link_info("va")
        assert info.queue_slots == 4
        np = ensure_attached("va", ifindex, info.queue_slots)
        try:
            assert np.program.map_entries == 4
            assert libbpf.map_info(np.map_fd).type == libbpf.BPF_MAP_TYPE_XSKMAP
        finally:
            np.detach()


@pytest.mark.parametrize("mode,expected", [(XdpMode.NATIVE, "native"), (XdpMode.SKB, "skb"),
                                           (XdpMode.AUTO, "native")])
def test_attach_in_each_mode_then_detach(veth: tuple[NsFixture, int], mode: XdpMode,
                                         expected: str) -> None:
    ns, ifindex = veth
    with ns.entered():
        np = ensure_attached("va", ifindex, 4, mode)
        state = query(ifindex)
        assert (np.mode, state.mode, identify(state), state.prog_id) == (
            expected, expected, "this build", np.program.prog_id)
        assert np.detach() is True
        assert not query(ifindex).attached


def test_auto_falls_back_to_skb_where_native_is_unsupported(netns: NsFixture) -> None:
    nodrv = "br0"
    subprocess.run(["ip", "-n", netns.name, "link", "add", nodrv, "type", "bridge"], check=True)
    with netns.entered():
        info = link_info(nodrv)
        np = ensure_attached(nodrv, info.ifindex, 1, XdpMode.AUTO)
        try:
            assert np.mode == "skb"
            assert query(info.ifindex).mode == "skb"
        finally:
            np.detach()
        with pytest.raises(LibbpfError, match="native mode"):
            ensure_attached(nodrv, info.ifindex, 1, XdpMode.NATIVE)


def test_reattaching_our_program_adopts_it_and_keeps_its_map(veth: tuple[NsFixture, int]) -> None:
    ns, ifindex = veth
    with ns.entered():
        first = ensure_attached("va", ifindex, 4)
        second = ensure_attached("va", ifindex, 4)
        try:
            assert second.adopted and not first.adopted
            assert second.program.prog_id == first.program.prog_id
            assert second.program.map_id == first.program.map_id
        finally:
            second.close()
            first.detach()
        assert ns.xdp_prog_id("va") == 0


def test_detaching_a_program_someone_else_already_detached_says_so(
        veth: tuple[NsFixture, int], caplog: pytest.LogCaptureFixture) -> None:
    ns, ifindex = veth
    with ns.entered():
        np = ensure_attached("va", ifindex, 4)
        run("ip", "-n", ns.name, "link", "set", "va", "xdp", "off")
        with caplog.at_level("WARNING", logger="bpf.program"):
            assert np.detach() is False
    text = caplog.text
    assert "event=xdp_detach_skipped netdev=va" in text
    assert "already detached by someone else" in text and "replaced" not in text


def test_foreign_program_is_refused_unless_forced(veth: tuple[NsFixture, int],
                                                  test_objects: dict[str, Path]) -> None:
    ns, ifindex = veth
    with ns.entered():
        foreign = LoadedProgram.load(1, test_objects["foreign_pass"], "fw_pass")
        try:
            attach(ifindex, foreign, XdpMode.SKB, ifname="va")
            with pytest.raises(ForeignProgram, match=r"not ours.*--force"):
                ensure_attached("va", ifindex, 4)
            assert query(ifindex).prog_id == foreign.prog_id
            ours = ensure_attached("va", ifindex, 4, force=True)
            try:
                state = query(ifindex)
                assert identify(state) == "this build" and state.prog_id == ours.program.prog_id
                assert state.mode == "native"
            finally:
                ours.detach()
        finally:
            foreign.close()
        assert not query(ifindex).attached


def test_detach_leaves_a_program_that_replaced_ours_alone(veth: tuple[NsFixture, int],
                                                          test_objects: dict[str, Path]) -> None:
    ns, ifindex = veth
    with ns.entered():
        ours = ensure_attached("va", ifindex, 4, XdpMode.SKB)
        foreign = LoadedProgram.load(1, test_objects["foreign_pass"], "fw_pass")
        try:
            libbpf.check(libbpf.call("bpf_xdp_attach", ifindex, foreign.prog_fd,
                                     libbpf.XDP_FLAGS_SKB_MODE, None), "replace")
            assert detach(ifindex, ours.program, "skb") is False
            assert query(ifindex).prog_id == foreign.prog_id
        finally:
            ours.close()
            libbpf.call("bpf_xdp_attach", ifindex, -1, libbpf.XDP_FLAGS_SKB_MODE, None)
            foreign.close()


def test_missing_object_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing, match="make bpf"):
        LoadedProgram.load(1, tmp_path / "nope.bpf.o")


def test_object_without_xsks_map_is_rejected_by_name(test_objects: dict[str, Path]) -> None:
    with pytest.raises(ObjectInvalid, match="no map named 'xsks_map'"):
        LoadedProgram.load(1, test_objects["no_xskmap"])


def test_object_without_our_program_is_rejected_by_name() -> None:
    with pytest.raises(ObjectInvalid, match="no program named 'nope'"):
        LoadedProgram.load(1, None, "nope")


def test_pin_in_a_bpffs_we_mount_then_unpin_and_unmount() -> None:
    base = Path(tempfile.mkdtemp(prefix="afxdp-pins-"))
    try:
        mounted = bpffs.ensure_bpffs(base / "pins")
        assert mounted == base / "pins" and bpffs.is_bpffs(mounted)
        fd = libbpf.xskmap_create(2)
        try:
            pin = mounted / "xsks_map"
            bpffs.pin(fd, pin, uid=65534, gid=65534, mode=0o660)
            st = os.stat(pin)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o660)
            again = bpffs.open_pinned(pin)
            try:
                assert libbpf.map_info(again).id == libbpf.map_info(fd).id
            finally:
                os.close(again)
            bpffs.pin(fd, pin)  # replacing a stale pin is allowed
            bpffs.unpin(pin)
            assert not pin.exists()
            bpffs.unpin(pin)  # idempotent
        finally:
            os.close(fd)
            bpffs.unmount(mounted)
        assert not bpffs.is_bpffs(mounted)
    finally:
        for d in sorted(base.rglob("*"), reverse=True):
            d.rmdir()
        base.rmdir()


def test_pin_outside_bpffs_is_refused(tmp_path: Path) -> None:
    fd = libbpf.xskmap_create(1)
    try:
        with pytest.raises(BpffsError, match="not on a bpffs"):
            bpffs.pin(fd, tmp_path / "xsks_map")
    finally:
        os.close(fd)


def test_auto_falls_back_when_the_driver_refuses_native_for_its_own_reasons(
        netns: NsFixture) -> None:
    """A veth with fewer RX queues than its peer has TX queues refuses native XDP (ENOSPC).

    Needs a peer with more than one TX queue: it gets one per CPU by default."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the peer gets one TX queue per CPU; this machine has one CPU")
    subprocess.run(["ip", "-n", netns.name, "link", "add", "va", "numrxqueues", "1",
                    "numtxqueues", "1", "type", "veth", "peer", "vb"], check=True)  # peer: 1/CPU
    for dev in ("va", "vb"):  # the driver checks the queue counts of running links
        subprocess.run(["ip", "-n", netns.name, "link", "set", dev, "up"], check=True)
    with netns.entered():
        info = link_info("va")
        with pytest.raises(LibbpfError, match="rx queues"):
            ensure_attached("va", info.ifindex, 1, XdpMode.NATIVE)
        np = ensure_attached("va", info.ifindex, 1, XdpMode.AUTO)
        try:
            assert np.mode == "skb"
        finally:
            np.detach()


def test_test_run_reports_the_programs_verdict_and_its_cost() -> None:
    """BPF_PROG_TEST_RUN (used by benchmarks/datapath.py): an empty slot passes the frame."""
    frame = bytes(14) + bytes(50)
    with LoadedProgram.load(1) as prog:
        retval, ns = libbpf.test_run(prog.prog_fd, frame, 1000)
    assert retval == 2 and ns > 0  # XDP_PASS


def test_udp_steer_example_sends_only_the_chosen_port_to_the_socket(netns: NsFixture) -> None:
    """bpf/afxdp_udp_steer.bpf.c on real traffic: port 4789 to AF_XDP, port 9 to the kernel."""
    netns.veth("va", "vb")
    with netns.entered():
        ifindex = link_info("va").ifindex
        obj = ROOT / "bpf" / "afxdp_udp_steer.bpf.o"
        with LoadedProgram.load(1, obj, "afxdp_udp_steer") as prog:
            ports = libbpf.map_fd_by_name(prog.prog_fd, "udp_ports")
            try:
                libbpf.map_update_bytes(ports, struct.pack("=H", 4789), b"\1", "adding port 4789")
            finally:
                os.close(ports)
            mode = attach(ifindex, prog, XdpMode.AUTO, ifname="va")
            try:
                with XskReceiver.with_own_socket(frames=1024, ring_size=1024) as rx:
                    rx.bind(ifindex, 0)
                    rx.insert(prog.map_fd, 0)
                    before = rx_packets(netns, "va")
                    assert send_frames("vb", 200, dport=9) == 200
                    assert rx.receive(1, 0.5) == 0  # not ours: the kernel's
                    assert rx_packets(netns, "va") - before >= 200
                    kept: list[bytes] = []
                    assert send_frames("vb", 300, dport=4789) == 300
                    assert rx.receive(300, 5, kept) == 300
                    assert rx.receive(1, 0.3) == 0
                    assert {struct.unpack_from("!H", f, 36)[0] for f in kept} == {4789}
            finally:
                detach(ifindex, prog, mode, ifname="va")


def rx_packets(ns: NsFixture, dev: str) -> int:
    doc = json.loads(run("ip", "-n", ns.name, "-s", "-j", "link", "show", dev).stdout)
    return int(doc[0]["stats64"]["rx"]["packets"])
