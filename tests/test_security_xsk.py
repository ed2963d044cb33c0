"""The zero-capability socket is not a raw-socket capability (real kernel, real daemon).

A client granted netdev A, as uid 65534 with no capability at all, tries to get
an AF_XDP socket it could bind to netdev B (another netdev of the same netns),
to send raw frames there and lock B's own client out.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kernel import ClientRuntime, Daemon, NsFixture, setpriv
from tests.test_daemon import receive_unprivileged

pytestmark = pytest.mark.kernel
Start = Callable[..., Daemon]

_ATTACK = r"""
import json, socket, sys
from cni_server import client, xsk
from cni_server.client import Client, HandshakeError
path, other = sys.argv[1], sys.argv[2]
out = {}
with Client(path) as c:
    c.connect(socket.gethostname())
    try:
        c.xsk_socket("va", 0).close()
        out["unbound"] = "granted"
    except HandshakeError as e:
        out["unbound"] = e.reply
sock, umem = client.fetch_bound_xsk(path, "va", 0, 64, 2048)
try:
    xsk.bind(sock.fileno(), socket.if_nametoindex(other), 0)
    out["rebind"] = "bound"
except OSError as e:
    out["rebind"] = e.errno
try:
    xsk.create_socket().close()
    out["own_socket"] = "created"
except OSError as e:
    out["own_socket"] = e.errno
print(json.dumps(out))
"""


def attack(ns: NsFixture, rt: ClientRuntime, sock: Path) -> dict[str, object]:
    res = subprocess.run(ns.cmd(*setpriv(), rt.python, "-s", "-B", "-c", _ATTACK, str(sock),
                                "wa"),
                         capture_output=True, text=True, env=rt.env(), cwd=rt.dir, timeout=60)
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def test_a_client_with_no_capability_gets_no_socket_it_could_bind_to_another_netdev(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth("va", "vb")
    netns.veth("wa", "wb")
    start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--socket-owner",
                 "65534:65534")
    got = attack(netns, client_runtime, workdir / "sock" / "va" / "afxdp.sock")
    assert got == {"unbound": "/fd_nak", "rebind": 16, "own_socket": 1}, got  # EBUSY, EPERM
    # And the granted use still works, with no capability.
    report = receive_unprivileged(netns, client_runtime, workdir, (), "--socket",
                                  str(workdir / "sock" / "va" / "afxdp.sock"), "--mode", "xsk")
    assert report["received"] == 1000


def test_unbound_sockets_are_an_explicit_opt_in(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth("va", "vb")
    start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--socket-owner",
                 "65534:65534", "--allow-unbound-xsk")
    report = receive_unprivileged(netns, client_runtime, workdir, (), "--socket",
                                  str(workdir / "sock" / "va" / "afxdp.sock"), "--mode",
                                  "xsk-unbound")
    assert report["received"] == 1000


def test_umem_requests_over_the_configured_limit_are_refused(
        netns: NsFixture, workdir: Path, start_daemon: Start, client_runtime: ClientRuntime
) -> None:
    netns.veth("va", "vb")
    d = start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--socket-owner",
                     "65534:65534", "--max-umem-bytes", str(64 * 2048))
    res = subprocess.run(
        netns.cmd(*setpriv(), *client_runtime.argv(
            "receive", "--netdev", "va", "--socket", str(workdir / "sock" / "va" / "afxdp.sock"),
            "--mode", "xsk", "--frames", "128", "--timeout", "1")),
        capture_output=True, text=True, env=client_runtime.env(), cwd=client_runtime.dir)
    assert res.returncode != 0 and "/fd_nak" in res.stderr, res
    assert "umem_over_the_limit" in d.log()
