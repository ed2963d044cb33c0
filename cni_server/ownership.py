"""One daemon per netdev: a kernel-backed claim that dies with its holder.

Before a daemon touches a netdev (attach, adopt, detach) it takes an exclusive
``flock`` on ``<run dir>/netdevs/<netns inode>-<netdev>.lock``.  The kernel
drops the lock when the holder exits, however it exits, so:

- a second daemon, in any mode and with any socket directory, is refused with
  a message naming the daemon that holds the netdev (its pid and sockets),
  before it has changed anything;
- a daemon restarted after SIGKILL takes the claim again at once and adopts its
  own program, as before.

The run directory is fixed for the host (``/run/afxdp``; ``AFXDP_RUN_DIR``
overrides it, for tests and unusual hosts), not a per-daemon setting: two
daemons that disagreed about it could not see each other's claims.  A daemon in
a container must mount the host's run directory (the DaemonSet does).  The
directory and the lock files are created by root and must not be writable by
anyone else: a pre-existing one owned by another user is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cni_server.safedir import UnsafeDirectory, ensure_dir

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/afxdp")
_LOCKS = "netdevs"


class NetdevBusy(Exception):
    """Another live daemon serves the netdev."""


class OwnershipError(Exception):
    """The run directory cannot be trusted or used."""


def run_dir() -> Path:
    return Path(os.environ.get("AFXDP_RUN_DIR") or DEFAULT_RUN_DIR)


class NetdevClaim:
    """Owner of one held lock file (the claim on one netdev)."""

    def __init__(self, netdev: str, path: Path, fd: int) -> None:
        self.netdev = netdev
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Give the netdev up: remove the lock file while still holding it (a claim
        that opened it meanwhile sees it unlinked and starts over), then unlock."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)

    def __enter__(self) -> NetdevClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_name(netns_inode: int, netdev: str) -> str:
    if not netdev or "/" in netdev or netdev in (".", ".."):
        raise ValueError(f"not a netdev name: {netdev!r}")
    return f"{netns_inode}-{netdev}.lock"


def describe_holder(info: dict[str, Any]) -> str:
    pid = info.get("pid", "?")
    what = [f"pid {pid}"]
    if info.get("mode"):
        what.append(f"{info['mode']} mode")
    if info.get("sockets"):
        what.append(f"sockets {info['sockets']}")
    if info.get("control"):
        what.append(f"control socket {info['control']}")
    return ", ".join(what)


def claim(netdev: str, netns_inode: int, holder: dict[str, Any]) -> NetdevClaim:
    """Claim ``netdev`` (in the netns with inode ``netns_inode``) for this daemon.

    ``holder`` (pid, mode, sockets, control socket) is written into the lock
    file for whoever is refused next.  Raises :class:`NetdevBusy` when a live
    daemon holds it, :class:`OwnershipError` when the run directory is unsafe.
    """
    base = run_dir()
    name = _lock_name(netns_inode, netdev)
    try:
        ensure_dir(base, "run directory")
        ensure_dir(base / _LOCKS, "run directory", inside=base)
        locks = os.open(base / _LOCKS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                        | os.O_CLOEXEC)
    except (UnsafeDirectory, OSError) as e:
        raise OwnershipError(str(e)) from e
    try:
        for _attempt in range(100):
            fd = _lock(locks, base / _LOCKS / name, name, netdev)
            if fd >= 0:
                break
        else:
            raise OwnershipError(f"{base / _LOCKS / name} keeps changing under us")
    finally:
        os.close(locks)
    try:
        # Written, then cut to its length (a dead holder's may have been longer); not
        # emptied first: ext4 writes a file emptied and written again out to disk when
        # it is closed, which on a busy disk held the event loop for tens of ms at
        # each release (when /run is not a tmpfs).
        data = json.dumps(holder).encode() + b"\n"
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except BaseException:
        os.close(fd)
        raise
    log.debug("event=netdev_claimed netdev=%s", netdev)
    return NetdevClaim(netdev, base / _LOCKS / name, fd)


def _lock(locks: int, path: Path, name: str, netdev: str) -> int:
    """Open and lock the lock file; -1 when it was removed meanwhile (try again)."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=locks)
    except OSError as e:
        raise OwnershipError(f"cannot open {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OwnershipError(f"{path} is not a regular file of uid {os.geteuid()}: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NetdevBusy(
                f"{netdev} is already served by another afxdp daemon "
                f"({describe_holder(_read(fd))}); stop that daemon first, or serve another "
                "netdev") from None
        # The previous holder unlinks the file before it lets go: a lock on an
        # unlinked file claims nothing.
        try:
            now = os.stat(name, dir_fd=locks, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or now.st_ino != st.st_ino:
            os.close(fd)
            return -1
    except BaseException:
        os.close(fd)
        raise
    return fd


def holder_of(netdev: str, netns_inode: int) -> dict[str, Any] | None:
    """Who holds ``netdev`` now (None: nobody), without touching the lock (a probe
    that took the lock, even shared, could make a starting daemon's claim fail)."""
    try:
        path = run_dir() / _LOCKS / _lock_name(netns_inode, netdev)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not _flocked(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return None
        return _read(fd)
    finally:
        os.close(fd)


def _flocked(major: int, minor: int, inode: int) -> bool:
    """Whether /proc/locks lists an flock() on that file."""
    return f"{major:02x}:{minor:02x}:{inode}" in _flocked_files()


def _flocked_files() -> set[str]:
    """``major:minor:inode`` of every file /proc/locks lists an flock() on."""
    found: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; blocked waiters
            # add a "->" field before the type.
            if "FLOCK" in fields:
                found.update(x for x in fields if x.count(":") == 2)
    return found


def _read(fd: int) -> dict[str, Any]:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Claims:
    """The claims one daemon holds, by netdev name in the daemon's own netns."""

    def __init__(self, netns_inode: int, holder: dict[str, Any]) -> None:
        self.netns_inode = netns_inode
        self.holder = holder
        self._held: dict[str, NetdevClaim] = {}

    def take(self, netdev: str) -> None:
        """Claim ``netdev`` unless we hold it already."""
        if netdev not in self._held:
            self._held[netdev] = claim(netdev, self.netns_inode, self.holder)

    def drop(self, netdev: str) -> None:
        held = self._held.pop(netdev, None)
        if held is not None:
            held.close()

    def holds(self, netdev: str) -> bool:
        return netdev in self._held

    def others(self) -> dict[str, dict[str, Any]]:
        """Every netdev of our netns another live daemon holds, with its holder: one
        scan of the claims directory and one read of /proc/locks, for a caller that
        asks about many netdevs at once (the inventory, about each of its 1,000)."""
        prefix = f"{self.netns_inode}-"
        names: dict[str, str] = {}  # netdev -> lock file
        try:
            with os.scandir(run_dir() / _LOCKS) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(prefix) and name.endswith(".lock"):
                        netdev = name[len(prefix):-len(".lock")]
                        if netdev not in self._held:
                            names[netdev] = entry.path
        except OSError:
            return {}
        if not names:
            return {}
        locked = _flocked_files()
        out: dict[str, dict[str, Any]] = {}
        for netdev, path in names.items():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
                if key in locked:
                    info = _read(fd)
                    if info.get("pid") != os.getpid():
                        out[netdev] = info
            finally:
                os.close(fd)
        return out

    def close(self) -> None:
        for netdev in list(self._held):
            self.drop(netdev)
