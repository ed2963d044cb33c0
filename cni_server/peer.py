"""Kernel-verified identity of a Unix-socket peer, including its network namespace.

Order of preference for the peer's network namespace:

1. ``SO_PEERPIDFD`` (Linux 6.5+) and ``ioctl(PIDFD_GET_NET_NAMESPACE)`` (6.11+):
   race-free and independent of our PID namespace (no hostPID needed).
2. ``SO_PEERPIDFD`` and ``/proc/<pid>/ns/net``, then a liveness check of the
   pidfd: still race-free (a recycled pid would mean the pidfd's process died).
3. ``SO_PEERCRED`` pid and ``/proc/<pid>/ns/net``: has a pid-reuse window if
   the client exits right after connecting; documented in docs/security.md.

Reading another process's namespace needs ptrace-read access to it (root with
CAP_SYS_PTRACE, or the same uid).  When nothing works the netns is None and the
session refuses the peer unless the operator disabled the netns check.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import signal
import socket
import struct

from cni_server.protocol import Peer

SO_PEERPIDFD = 77
PIDFD_GET_NET_NAMESPACE = 0xFF04  # _IO(PIDFS_IOCTL_MAGIC=0xFF, 4)
_UCRED = struct.Struct("iII")


def identify(sock: _socket.socket, *, netns: bool = True) -> Peer:
    """Who is connected on ``sock``: pid/uid/gid from SO_PEERCRED, plus (if asked) their netns."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if not netns:
        return Peer(pid=pid, uid=uid, gid=gid, netns=None, netns_error="not checked")
    inode, why = _netns(sock, pid)
    return Peer(pid=pid, uid=uid, gid=gid, netns=inode, netns_error=why)


def _netns(sock: _socket.socket, pid: int) -> tuple[int | None, str]:
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            return None, f"SO_PEERPIDFD: {e.strerror}"
        return _netns_from_proc(pid)
    try:
        try:
            nsfd = fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return None, "peer exited"
            if e.errno in (errno.EACCES, errno.EPERM):
                return None, (f"PIDFD_GET_NET_NAMESPACE: {e.strerror} (the daemon needs "
                              "CAP_SYS_PTRACE to see another user's namespaces)")
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return None, f"PIDFD_GET_NET_NAMESPACE: {e.strerror}"
            inode, why = _netns_from_proc(pid)
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                return None, "peer exited"
            return inode, why
        try:
            return os.fstat(nsfd).st_ino, ""
        finally:
            os.close(nsfd)
    finally:
        os.close(pidfd)


def _netns_from_proc(pid: int) -> tuple[int | None, str]:
    if pid <= 0:
        return None, "peer pid not visible in our pid namespace"
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino, ""
    except OSError as e:
        hint = (" (the daemon needs CAP_SYS_PTRACE to see another user's namespaces)"
                if e.errno in (errno.EACCES, errno.EPERM) else "")
        return None, f"/proc/{pid}/ns/net: {e.strerror}{hint}"
