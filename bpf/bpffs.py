"""bpffs: find or mount it, and pin/unpin maps in it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from pathlib import Path

from bpf import libbpf
from bpf.errors import BpffsError, LibbpfError

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
SYSTEM_BPFFS = Path("/sys/fs/bpf")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


def fs_magic(path: Path) -> int:
    """f_type of the filesystem holding ``path`` (statfs(2))."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(str(path).encode(), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: Path) -> bool:
    try:
        return fs_magic(path) == BPF_FS_MAGIC
    except FileNotFoundError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def _mount_bpffs(target: Path) -> None:
    if _libc.mount(b"bpf", str(target).encode(), b"bpf", 0, b"mode=0755") != 0:
        err = ctypes.get_errno()
        raise BpffsError(f"mounting bpffs at {target}: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
    log.info("event=bpffs_mounted path=%s", target)


def ensure_bpffs(directory: Path) -> Path | None:
    """Make ``directory`` usable for pins; returns the mount point we mounted, if any.

    - Already inside a bpffs: create the directory there; nothing mounted.
    - Under /sys/fs/bpf with no bpffs there: mount the system bpffs at /sys/fs/bpf
      (the conventional, shared place; it stays mounted, others rely on it).
    - Anywhere else: create the directory and mount a bpffs instance on it; the
      caller unmounts it (:func:`unmount`) when done.
    """
    directory = directory.absolute()
    if is_bpffs(_nearest_existing(directory)):
        directory.mkdir(parents=True, exist_ok=True)
        return None
    if directory == SYSTEM_BPFFS or SYSTEM_BPFFS in directory.parents:
        _mount_bpffs(SYSTEM_BPFFS)
        directory.mkdir(parents=True, exist_ok=True)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    _mount_bpffs(directory)
    return directory


def unmount(mount_point: Path) -> None:
    """Lazily unmount a bpffs instance we mounted (pins in it go with it)."""
    if _libc.umount2(str(mount_point).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise BpffsError(f"unmounting {mount_point}: {os.strerror(err)}")
    log.info("event=bpffs_unmounted path=%s", mount_point)


def pin(fd: int, path: Path, *, uid: int = -1, gid: int = -1, mode: int = 0o600) -> None:
    """Pin the BPF object ``fd`` at ``path`` (replacing a stale pin), owned by uid:gid."""
    if not is_bpffs(path.parent):
        raise BpffsError(f"cannot pin at {path}: {path.parent} is not on a bpffs")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        log.info("event=stale_pin_removed path=%s", path)
    try:
        libbpf.check(libbpf.call("bpf_obj_pin", fd, str(path).encode()), f"pinning at {path}")
    except LibbpfError as e:
        raise BpffsError(str(e)) from e
    try:
        # Mode first, while the pin is still ours (see cni_server/server.py).
        os.chmod(path, mode)
        os.chown(path, uid, gid)
    except OSError as e:
        path.unlink()
        raise BpffsError(f"cannot hand the pin {path} to {uid}:{gid} with mode {mode:04o}: "
                         f"{e.strerror}") from e


def open_pinned(path: Path) -> int:
    """bpf_obj_get: a new fd for the object pinned at ``path`` (caller owns it)."""
    return libbpf.check(libbpf.call("bpf_obj_get", str(path).encode()), f"opening pinned {path}")


def unpin(path: Path) -> None:
    """Remove a pin; a missing pin is not an error."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
