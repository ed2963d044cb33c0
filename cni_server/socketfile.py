"""A listening Unix SOCK_SEQPACKET socket at a path, with the owner and mode asked for.

The socket file is made as the daemon (root), given its mode first while it is
still ours (changing the mode of a file handed to another uid would need
CAP_FOWNER, which the daemon lacks), then its owner.  A leftover socket file is
replaced only when no server answers on it; anything else at the path is left
alone and refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)
SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL


class SocketFileError(Exception):
    """The path cannot be served; the message says why."""


def listen_on(path: Path, mode: int, uid: int, gid: int) -> tuple[socket.socket, int]:
    """A non-blocking listening socket bound at ``path``, and the file's inode (to
    tell later whether the file there is still ours)."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SocketFileError(f"socket path too long for a Unix socket (max {SUN_PATH_MAX} "
                              f"bytes): {path}")
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        os.chown(path, uid, gid)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        inode = os.stat(path).st_ino
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise SocketFileError(f"cannot serve {path}: {e.strerror or e}") from e
    return sock, inode


def clear_stale(path: Path) -> None:
    """Remove a leftover socket file, refusing if a live server still answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketFileError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketFileError(f"cannot check existing socket {path}: {e.strerror}") from e
        path.unlink(missing_ok=True)
        log.info("event=stale_socket_removed socket=%s", path)
        return
    finally:
        probe.close()
    raise SocketFileError(f"another server is already serving {path}")
