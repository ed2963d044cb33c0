"""Network namespaces: handles, identity, and running code inside one.

Python 3.11 has no ``os.setns``; we call ``setns(2)`` through ctypes.  A thread
that enters another namespace is a fresh thread that exits afterwards, so no
thread of the daemon (least of all the event loop's) is ever left in the wrong
namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cni_server.fds import OwnedFd

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(Exception):
    """A namespace cannot be opened or entered."""


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def thread_netns_inode() -> int:
    """Inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


class Netns:
    """Owner of an fd for one network namespace; ``inode`` is its identity."""

    def __init__(self, fd: OwnedFd, name: str = "") -> None:
        self._fd = fd
        self.inode: int = os.fstat(fd.fileno()).st_ino
        self.name = name or f"net:[{self.inode}]"

    @classmethod
    def current(cls) -> Netns:
        """The calling thread's namespace."""
        return cls.open(Path("/proc/thread-self/ns/net"), "self")

    @classmethod
    def open(cls, path: Path, name: str = "") -> Netns:
        try:
            fd = OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise NetnsError(f"cannot open network namespace {path}: {e.strerror}") from e
        try:
            return cls(fd, name or str(path))
        except BaseException:
            fd.close()
            raise

    def fileno(self) -> int:
        return self._fd.fileno()

    def close(self) -> None:
        self._fd.close()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` with the calling thread's view switched to this namespace.

        When the caller is already there, ``fn`` runs right here; otherwise in a
        fresh thread that enters the namespace and then ends.
        """
        if thread_netns_inode() == self.inode:
            return fn()
        box: dict[str, object] = {}

        def body() -> None:
            try:
                setns(self.fileno())
                box["value"] = fn()
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=body, name=f"netns-{self.inode}", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    async def run_async(self, fn: Callable[[], T]) -> T:
        """:meth:`run` without blocking the event loop (for slow work such as netlink)."""
        if thread_netns_inode() == self.inode:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(None, self.run, fn)

    def __repr__(self) -> str:
        return f"Netns({self.name}, inode={self.inode})"
