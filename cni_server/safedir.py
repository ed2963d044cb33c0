"""Directories the root daemon creates and writes in, safe against local users.

The socket root (``/tmp/afxdp_dp`` by default) usually sits in a world-writable
directory.  A local user who creates it first, or puts a symlink in its place,
must not get the daemon to chown, chmod or bind anything anywhere else.  The
rules, applied before the daemon writes anything:

- every ancestor of a directory we use is a real directory (not a symlink)
  owned by root or by us, and not writable by others unless it is sticky (like
  ``/tmp``: others cannot rename or remove what we own there);
- the directory itself we create (``mkdir``, then check it is ours), or, when
  it exists, it must be a real directory owned by us and writable by nobody
  else.  Anything else is refused with a message that says what to remove: we
  do not move other people's files aside;
- directories a client must traverse stay owned by us (root) with mode 0755:
  access is granted on the socket or pin file itself (owner, group, mode),
  never by ownership of a directory, so a client cannot unlink or replace the
  daemon's socket.

One exception keeps upgrades working: a per-netdev directory *inside* a root
that passed these checks, but owned by another uid (earlier releases handed
them to the pool's uid), is taken back (``lchown`` to us, mode 0755): nobody
but us can have created it there.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o755


class UnsafeDirectory(Exception):
    """A directory (or an ancestor) we would write in is not safe to use."""


def _describe(st: os.stat_result) -> str:
    return f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}"


def _check_ancestors(path: Path, what: str) -> None:
    euid = os.geteuid()
    for ancestor in reversed(path.parents):
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            return  # created below by us
        if stat.S_ISLNK(st.st_mode):
            # A symlink owned by root (e.g. /var/run -> /run) is the system's own.
            if st.st_uid == 0:
                continue
            raise UnsafeDirectory(f"{what} {path}: {ancestor} is a symlink owned by uid "
                                  f"{st.st_uid}; refusing to follow it")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeDirectory(f"{what} {path}: {ancestor} is not a directory")
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in (0, euid) or (writable_by_others and not st.st_mode & stat.S_ISVTX):
            raise UnsafeDirectory(
                f"{what} {path}: its parent {ancestor} is {_describe(st)}, so another user "
                "could replace what the daemon creates there; use a directory under one "
                "only root can write")


def ensure_dir(path: Path, what: str, *, mode: int = DIR_MODE, inside: Path | None = None
               ) -> bool:
    """Make ``path`` a directory owned by us with ``mode``, safely (see the module
    docstring); returns True if we created it.

    ``what`` names it in errors ("socket directory").  ``inside``: a directory
    already made safe by this function that holds ``path`` (its ancestors are
    then not checked again, and an existing ``path`` of another owner is taken
    back).
    """
    path = Path(os.path.abspath(path))
    if inside is None:
        _check_ancestors(path, what)
    elif path.parent != Path(os.path.abspath(inside)):
        raise ValueError(f"{path} is not directly inside {inside}")
    created = False
    try:
        os.mkdir(path, mode)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        if inside is not None:
            raise
        # Missing parents: create them the same way, top down.
        ensure_dir(path.parent, what, mode=mode)
        return ensure_dir(path, what, mode=mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirectory(f"{what} {path} is {kind}; refusing to use it: remove it "
                              f"(rm {path}) and start again")
    euid = os.geteuid()
    if st.st_uid != euid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if inside is None or created:
            raise UnsafeDirectory(
                f"{what} {path} exists and is {_describe(st)}: it was not made by this "
                f"daemon (uid {euid}), and another user could control what is in it; "
                f"remove it (rm -r {path}) and start again")
        os.lchown(path, euid, os.getegid())
        log.warning("event=directory_taken_back path=%s was_owner=%d was_mode=%04o", path,
                    st.st_uid, stat.S_IMODE(st.st_mode))
    if stat.S_IMODE(st.st_mode) != mode or st.st_uid != euid:
        os.chmod(path, mode)  # mkdir's mode went through the umask
    return created
