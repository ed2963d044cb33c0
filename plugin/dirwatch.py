"""inotify on one directory: which names were created or removed there.

The device plugin learns of a kubelet restart the way kubelet's own plugins do:
kubelet re-creates ``kubelet.sock`` (possibly with the same inode number, so
comparing inodes is not enough) and deletes the plugins' sockets.  The standard
library has no inotify; this is the three calls we need through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
CREATED = IN_CREATE | IN_MOVED_TO
REMOVED = IN_DELETE | IN_MOVED_FROM
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, NUL-padded)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class DirWatch:
    """Owner of one inotify fd watching one directory for names coming and going."""

    def __init__(self, directory: Path) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int = int(fd)
        mask = CREATED | REMOVED | IN_DELETE_SELF
        if _libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"watching {directory}: {os.strerror(err)}")
        self.directory = directory
        self.gone = False  # the directory itself was removed: watch it again later

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[tuple[int, str]]:
        """The (mask, name) events waiting, oldest first; [] when none."""
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return []
        except OSError as e:
            if e.errno == errno.EINTR:
                return []
            raise
        out = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size: offset + _EVENT.size + length]
            offset += _EVENT.size + length
            if mask & (IN_DELETE_SELF | IN_IGNORED):
                self.gone = True
            out.append((mask, raw.rstrip(b"\0").decode("utf-8", "replace")))
        return out

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
