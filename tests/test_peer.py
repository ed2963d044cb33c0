"""Kernel-verified peer identity (SO_PEERCRED, SO_PEERPIDFD, the peer's netns)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from cni_server.netns import thread_netns_inode
from cni_server.peer import identify


def test_identifies_pid_uid_gid_and_netns_of_the_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        peer = identify(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.netns == thread_netns_inode() and peer.netns_error == ""


def test_netns_lookup_is_skipped_when_not_asked_for() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        peer = identify(a, netns=False)
    assert peer.pid == os.getpid() and peer.netns is None and peer.netns_error == "not checked"


def test_a_peer_that_exited_is_not_given_a_netns() -> None:
    """The identity belongs to the process that connected; once it is gone, nothing is vouched for."""
    path = f"/tmp/afxdp-peer-{os.getpid()}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        srv.bind(path)
        srv.listen(1)
        code = f"import socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect({path!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
        conn, _ = srv.accept()
        with conn:
            peer = identify(conn)
        assert peer.netns is None and peer.netns_error == "peer exited"
    finally:
        srv.close()
        os.unlink(path)
