#!/usr/bin/python3 -IS
"""afxdp CNI plugin launcher, installed by ``afxdp install-cni`` as DEST/afxdp.

It runs the plugin (``plugin/cni.py``), installed beside it as the module
DEST/afxdp.d/afxdp_cni.py.  A script run by path is compiled on every run (8-9 ms
for the plugin, as much as starting Python); a module is compiled once, by the
host's own interpreter, into afxdp.d/__pycache__.  Every file it runs must be
root's and writable by nobody else (else anybody's code would run in every pod's
set-up): checked on each run, under a umask that keeps the bytecode cache as
closed.  Only posix and sys, which the interpreter has loaded before it runs this
file (os would cost 1.5 ms of imports: see the plugin's).
"""

import posix
import sys

MODULE = "afxdp_cni"
UNSAFE = 112  # the plugin's own files are not safe to run (docs/cni.md)


def _refuse(msg: str) -> None:
    # No json: a fixed message, with the path only as a file name, made safe.
    name = "".join(c for c in msg if c.isalnum() or c in " ._-/:(),'")
    sys.stdout.write(f'{{"cniVersion": "1.0.0", "code": {UNSAFE}, "msg": "{name}"}}\n')
    sys.exit(1)


def _resolved(path: str) -> str:
    """``path`` with symlinks to it followed: the file whose afxdp.d is beside it."""
    for _ in range(40):  # the kernel's own limit
        try:
            target = posix.readlink(path)
        except OSError:  # not a symlink (any more)
            return path
        head, slash, _ = path.rpartition("/")
        path = target if target.startswith("/") else head + slash + target
    _refuse(f"{path}: too many levels of symbolic links")
    return path


def main() -> None:
    posix.umask(0o022)
    lib = _resolved(__file__) + ".d"
    for path in (lib, f"{lib}/{MODULE}.py", f"{lib}/__pycache__"):
        try:
            st = posix.lstat(path)
        except FileNotFoundError:
            if path.endswith("__pycache__"):
                continue  # made on first run, under our umask
            _refuse(f"{path} is missing: reinstall the plugin with afxdp install-cni")
        if st.st_uid != 0 or st.st_mode & 0o022 or (st.st_mode & 0o170000) == 0o120000:
            _refuse(f"{path} is not root's alone (owner, mode or a symlink): reinstall the "
                    "plugin with afxdp install-cni")
    sys.path.insert(0, lib)
    plugin = __import__(MODULE)
    code = plugin.main()
    # Out without the interpreter's teardown (freeing every module: 1.5-3 ms of
    # each ADD and DEL).  The plugin has closed its sockets and waited for its
    # children, and its log lines are flushed as written; stdout is flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    posix._exit(code)


if __name__ == "__main__":
    main()
