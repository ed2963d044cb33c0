"""What a newcomer sees: every error says what went wrong and where (the option, the
path), and ``--help`` gives defaults and units."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.k8s_env import K8s
from tests.kernel import ROOT, ClientRuntime, Daemon, NsFixture, run, setpriv

Start = Callable[..., Daemon]


def afxdp(*args: str, netns: NsFixture | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cni_server.cli", *args]
    return subprocess.run(netns.cmd(*argv) if netns else argv, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@contextlib.contextmanager
def read_only_dir(base: Path) -> Iterator[Path]:
    ro = base / "ro"
    ro.mkdir()
    run("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro))
    try:
        yield ro
    finally:
        run("umount", str(ro), check=False)


def test_serve_without_a_netdev_names_the_option() -> None:
    res = afxdp("serve", "--no-control-socket")
    assert res.returncode == 2
    assert "no netdev to serve: give --netdev NAME" in res.stderr, res.stderr


@pytest.mark.parametrize("owner", ["1000:1000:1000", "-5", ""])
def test_a_malformed_socket_owner_is_a_format_error(owner: str) -> None:
    res = afxdp("serve", "--netdev", "lo", "--socket-owner", owner)
    assert res.returncode == 2
    assert f"socketOwner: {owner!r} is not USER[:GROUP]" in res.stderr, res.stderr
    assert "no such user" not in res.stderr


def test_an_unknown_socket_owner_still_says_so() -> None:
    res = afxdp("serve", "--netdev", "lo", "--socket-owner", "no-such-user-here")
    assert res.returncode == 2 and "no such user or group" in res.stderr, res.stderr


def test_socket_uid_and_gid_are_not_settings_of_their_own(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("netdevs: [lo]\nsocketUid: 5\n")
    res = afxdp("serve", "--config", str(cfg))
    assert res.returncode == 2 and "socketUid: unknown setting" in res.stderr, res.stderr


@pytest.mark.kernel
def test_an_unwritable_socket_dir_is_named_with_its_option_before_anything_is_attached(
        netns: NsFixture, workdir: Path) -> None:
    netns.veth("va", "vb")
    with read_only_dir(workdir) as ro:
        res = afxdp("serve", "--netdev", "va", "--socket-dir", str(ro / "sock"),
                    "--no-control-socket", netns=netns)
    assert res.returncode == 1
    assert (f"socket directory {ro / 'sock'} (--socket-dir, socketDir): cannot create it in "
            f"{ro}: read-only file system") in res.stderr, res.stderr
    assert "Errno" not in res.stderr
    assert "xdp_attached" not in res.stderr
    assert netns.xdp_prog_id("va") == 0


@pytest.mark.kernel
def test_an_unwritable_control_socket_is_named_with_its_option_before_anything_is_attached(
        netns: NsFixture, workdir: Path) -> None:
    netns.veth("va", "vb")
    with read_only_dir(workdir) as ro:
        res = afxdp("serve", "--netdev", "va", "--socket-dir", str(workdir / "sock"),
                    "--control-socket", str(ro / "c.sock"), netns=netns)
    assert res.returncode == 1
    assert f"control socket {ro / 'c.sock'} (--control-socket, controlSocket" in res.stderr, \
        res.stderr
    assert "read-only file system" in res.stderr
    assert "xdp_attached" not in res.stderr and netns.xdp_prog_id("va") == 0


def test_status_without_a_daemon_says_it_once_and_how_to_point_at_one(tmp_path: Path) -> None:
    res = afxdp("status", "--control-socket", str(tmp_path / "none.sock"))
    assert res.returncode != 0
    first = res.stdout.splitlines()[0]
    assert first.count("not reachable") == 1 and "daemon: daemon" not in first, first
    assert str(tmp_path / "none.sock") in first and "--control-socket" in first


@pytest.mark.kernel
def test_status_text_against_a_kubernetes_daemon_lists_pools(k8s: K8s) -> None:
    d = k8s.start()
    res = afxdp("status", "--control-socket", str(k8s.work / "control.sock"), netns=k8s.ns)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert f"daemon: pid {d.proc.pid}" in res.stdout and "kubernetes mode" in res.stdout
    assert "pool pool1 (afxdp/pool1" in res.stdout, res.stdout


@pytest.mark.kernel
def test_receive_without_access_to_the_socket_names_it(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth("va", "vb")
    start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"))  # root:root 0660
    sock = workdir / "sock" / "va" / "afxdp.sock"
    res = subprocess.run(
        netns.cmd(*setpriv(), *client_runtime.argv("receive", "--netdev", "va", "--mode", "xsk",
                                                    "--socket", str(sock), "--timeout", "1")),
        capture_output=True, text=True, env=client_runtime.env(), cwd=client_runtime.dir)
    assert res.returncode != 0
    assert f"cannot connect to the handout socket {sock}: Permission denied" in res.stderr, \
        res.stderr
    assert "--socket-owner" in res.stderr


@pytest.mark.kernel
def test_map_mode_without_capabilities_says_what_it_needs_and_the_alternative(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth("va", "vb")
    start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--socket-owner",
                 "65534:65534")
    res = subprocess.run(
        netns.cmd(*setpriv(), *client_runtime.argv(
            "receive", "--netdev", "va", "--socket", str(workdir / "sock" / "va" / "afxdp.sock"),
            "--timeout", "1")),
        capture_output=True, text=True, env=client_runtime.env(), cwd=client_runtime.dir)
    assert res.returncode != 0
    assert "creating an AF_XDP socket: Operation not permitted" in res.stderr, res.stderr
    assert "CAP_NET_RAW" in res.stderr and "CAP_IPC_LOCK" in res.stderr
    assert "--mode xsk" in res.stderr


@pytest.mark.parametrize(("command", "expected"), [
    ("serve", ["(required, unless the --config file lists netdevs)", "(default auto)",
               "(default 4096)", "(default 128)", "(default info)", "(default 30)",
               "(default /tmp/afxdp_dp)", "SECONDS"]),
    ("receive", ["(default: 1000)", "(default: 10.0)", "SECONDS", "(default: 2048)"]),
    ("send", ["(default: 1000)", "(default: 64)", "(default: ff:ff:ff:ff:ff:ff)"]),
    ("request", ["(default: 5.0)", "SECONDS"]),
])
def test_help_gives_every_default_and_unit(command: str, expected: list[str]) -> None:
    res = afxdp(command, "--help")
    text = " ".join(res.stdout.split())  # argparse wraps lines
    for want in expected:
        assert want in text, (want, res.stdout)
    assert "(default: None)" not in text


def test_the_json_status_of_no_daemon_is_still_json(tmp_path: Path) -> None:
    res = afxdp("status", "--json", "--control-socket", str(tmp_path / "none.sock"))
    doc = json.loads(res.stdout)
    assert doc["daemon"] is None and "not reachable" in doc["daemon_error"]
    assert os.path.basename(str(tmp_path / "none.sock")) in doc["daemon_error"]
