"""A hostile local user against the daemon's directories and our clients, on the real kernel.

The user (uid 65534 here) can write in world-writable sticky directories such as
/tmp (``workdir/out`` is one) and, with earlier releases, owned the per-netdev
directories.  Each test performs an attack and checks it fails: nothing is
chowned, created or attached where the attacker pointed, and the client cannot
remove the daemon's socket or pin.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kernel import ROOT, UNPRIV, Daemon, NsFixture, setpriv

pytestmark = pytest.mark.kernel
Start = Callable[..., Daemon]


def as_attacker(path: Path) -> Path:
    os.lchown(path, UNPRIV, UNPRIV)
    return path


def refused(ns: NsFixture, workdir: Path, *args: str) -> str:
    d = Daemon(ns, workdir, *args, wait=False)
    assert d.proc.wait(30) == 1, d.log()
    out = d.log()
    d.stop()
    return out


def owner_mode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


def assert_untouched(victim: Path, ns: NsFixture) -> None:
    """The attack changed nothing: the victim directory is as made, nothing attached."""
    assert owner_mode(victim) == (0, 0o700) and list(victim.iterdir()) == []
    assert ns.xdp_prog_id("va") == 0


@pytest.fixture
def victim(workdir: Path) -> Path:
    """A root-owned private directory the attacker would like the daemon to hand over."""
    v = workdir / "victim"
    v.mkdir(mode=0o700)
    return v


def test_a_socket_root_created_by_another_user_with_a_symlink_in_it_is_refused(
        netns: NsFixture, workdir: Path, victim: Path) -> None:
    netns.veth("va", "vb")
    root = workdir / "out" / "afxdp_dp"  # out/ is 1777, like /tmp
    root.mkdir()
    as_attacker(root)
    (root / "va").symlink_to(victim)
    as_attacker(root / "va")
    out = refused(netns, workdir, "--netdev", "va", "--socket-dir", str(root), "--socket-owner",
                  f"{UNPRIV}:{UNPRIV}")
    assert f"socket directory (--socket-dir, socketDir) {root} exists and is owned by uid " \
        f"{UNPRIV}" in out, out
    assert f"rm -r {root}" in out
    assert_untouched(victim, netns)


def test_a_socket_root_that_is_a_symlink_is_refused(
        netns: NsFixture, workdir: Path, victim: Path) -> None:
    netns.veth("va", "vb")
    root = workdir / "out" / "afxdp_dp"
    root.symlink_to(victim)
    as_attacker(root)
    out = refused(netns, workdir, "--netdev", "va", "--socket-dir", str(root), "--socket-owner",
                  f"{UNPRIV}:{UNPRIV}")
    assert f"{root} is a symlink; refusing to use it" in out, out
    assert_untouched(victim, netns)


def test_a_socket_root_under_a_directory_others_can_write_is_refused(
        netns: NsFixture, workdir: Path) -> None:
    netns.veth("va", "vb")
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable without the sticky bit: entries can be swapped
    out = refused(netns, workdir, "--netdev", "va", "--socket-dir", str(shared / "sock"))
    assert f"its parent {shared} is owned by uid 0 with mode 0777" in out, out
    assert not (shared / "sock").exists()


def test_the_client_can_connect_but_cannot_remove_or_replace_the_daemons_socket(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    root = workdir / "out" / "afxdp_dp"  # where an attacker could have been first
    start_daemon("--netdev", "va", "--socket-dir", str(root), "--socket-owner",
                 f"{UNPRIV}:{UNPRIV}")
    assert owner_mode(root) == (0, 0o755)
    assert owner_mode(root / "va") == (0, 0o755)
    assert owner_mode(root / "va" / "afxdp.sock") == (UNPRIV, 0o660)
    sock = root / "va" / "afxdp.sock"
    attack = (f"import os, socket\n"
              f"s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect({str(sock)!r})\n"
              f"for f in (lambda: os.unlink({str(sock)!r}),\n"
              f"          lambda: os.rename({str(sock)!r}, {str(sock)!r} + '.x'),\n"
              f"          lambda: os.mkdir({str(root / 'va' / 'x')!r})):\n"
              f"    try:\n        f(); print('DONE')\n"
              f"    except PermissionError: print('EACCES')\n")
    res = subprocess.run([*setpriv(), "/usr/bin/python3", "-c", attack], capture_output=True,
                         text=True, timeout=30)
    assert res.stdout.split() == ["EACCES"] * 3, res
    assert sock.is_socket()


def test_a_per_netdev_directory_an_earlier_release_gave_the_client_is_taken_back(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    root = workdir / "sock"
    root.mkdir(mode=0o755)
    old = root / "va"
    old.mkdir(mode=0o750)
    as_attacker(old)
    d = start_daemon("--netdev", "va", "--socket-dir", str(root), "--socket-owner",
                     f"{UNPRIV}:{UNPRIV}")
    assert owner_mode(old) == (0, 0o755)
    assert f"event=directory_taken_back path={old} was_owner={UNPRIV}" in d.log()
    assert (old / "afxdp.sock").is_socket()


def test_a_pin_directory_created_by_another_user_is_refused_before_mounting(
        netns: NsFixture, workdir: Path, victim: Path) -> None:
    netns.veth("va", "vb")
    pins = workdir / "out" / "pins"
    pins.symlink_to(victim)
    as_attacker(pins)
    out = refused(netns, workdir, "--netdev", "va", "--socket-dir", str(workdir / "sock"),
                  "--pin-dir", str(pins))
    assert f"pin directory (--pin-dir, pinDir) {pins} is a symlink" in out, out
    assert_untouched(victim, netns)


def test_pins_are_the_clients_to_open_but_not_to_remove(
        netns: NsFixture, workdir: Path, start_daemon: Start) -> None:
    netns.veth("va", "vb")
    pins = workdir / "pins"
    start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--pin-dir",
                 str(pins), "--socket-owner", f"{UNPRIV}:{UNPRIV}")
    pin = pins / "va" / "xsks_map"
    assert owner_mode(pins / "va") == (0, 0o755)
    assert owner_mode(pin) == (UNPRIV, 0o660)
    res = subprocess.run([*setpriv(), "/usr/bin/python3", "-c",
                          f"import os\ntry:\n os.unlink({str(pin)!r})\n"
                          "except PermissionError: print('EACCES')"],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "EACCES", res
    assert pin.exists()


_FAKE_SERVER = r"""
import array, os, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(path)
os.chmod(path, 0o666)
srv.listen(4)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        while True:
            req = conn.recv(256)
            if not req:
                break
            if req.startswith(b"/xsk_map_fd"):
                r, w = os.pipe()  # "the map"
                conn.sendmsg([b"/fd_ack"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [r]))])
                os.close(r); os.close(w)
            elif req.startswith(b"/connect"):
                conn.send(b"/host_ok")
            elif req == b"/version":
                conn.send(b"0.1")
            else:
                conn.send(b"/fin_ack")
"""


def fake_server(workdir: Path, *run_as: str) -> tuple[subprocess.Popen[str], Path]:
    d = workdir / "out" / f"fake-{len(run_as)}"
    d.mkdir()
    d.chmod(0o777)
    path = d / "afxdp.sock"
    proc = subprocess.Popen([*run_as, "/usr/bin/python3", "-c", _FAKE_SERVER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, path


def afxdp_request(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cni_server.cli", "request", "--netdev", "va",
                           "--socket", str(path)], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)


def test_our_client_refuses_a_server_that_does_not_run_as_the_daemons_uid(workdir: Path
                                                                         ) -> None:
    proc, path = fake_server(workdir, *setpriv())
    try:
        res = afxdp_request(path)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode != 0
    assert f"the server at {path} (pid {proc.pid}) runs as uid {UNPRIV}, not the daemon's " \
        "uid 0: refusing to trust it" in res.stderr, res.stderr


def test_our_client_refuses_an_fd_that_is_not_the_map_it_asked_for(workdir: Path) -> None:
    proc, path = fake_server(workdir)
    try:
        res = afxdp_request(path)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode != 0
    assert "with an fd that is not an XSKMAP" in res.stderr, res.stderr
