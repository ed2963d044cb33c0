"""Network namespaces: handles, identity, and running code inside one.

Python 3.11 has no ``os.setns``; we call ``setns(2)`` through ctypes.  Work in
another namespace runs on a long-lived worker thread that entered it once (one
per namespace, ended after a few idle seconds): no thread of the daemon, least
of all the event loop's, ever changes namespace, and a flood of requests for a
pod's namespace costs a queue hand-off each, not a thread started and joined.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cni_server.fds import OwnedFd

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int


class NetnsError(Exception):
    """A namespace cannot be opened or entered."""


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (the daemon needs CAP_SYS_ADMIN to enter it)" if err == errno.EPERM else ""
        raise NetnsError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}{hint}")


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
    def private(cls, name: str = "private") -> Netns:
        """A new network namespace of our own, named nowhere (no bind mount): it
        lives as long as this handle (and workers running in it) and goes with the
        process, whatever way it ends.  Made on a thread of its own, which
        unshare(2) moves into it and which then ends."""
        made: concurrent.futures.Future[Netns] = concurrent.futures.Future()

        def make() -> None:
            try:
                if _libc.unshare(CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetnsError(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
                made.set_result(cls.open(Path("/proc/thread-self/ns/net"), name))
            except BaseException as e:
                made.set_exception(e)

        thread = threading.Thread(target=make, name="netns-private", daemon=True)
        thread.start()
        thread.join()
        return made.result()

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
        """Call ``fn`` in this namespace and return what it returns (or raise).

        When the caller is already there, ``fn`` runs right here; otherwise on the
        namespace's worker thread, and the caller waits.
        """
        if thread_netns_inode() == self.inode:
            return fn()
        return _submit(self, fn).result()

    async def run_async(self, fn: Callable[[], T]) -> T:
        """:meth:`run` without blocking the event loop (for slow work such as netlink)."""
        if thread_netns_inode() == self.inode:
            return fn()
        return await asyncio.wrap_future(_submit(self, fn))

    def __repr__(self) -> str:
        return f"Netns({self.name}, inode={self.inode})"


IDLE_EXIT = 5.0  # seconds a worker waits for work before it ends (and lets go of its netns)


class _Worker:
    """One thread inside one network namespace, running what is submitted in turn."""

    def __init__(self, ns: Netns) -> None:
        self.inode = ns.inode
        self._fd = OwnedFd(os.dup(ns.fileno()))  # the namespace stays ours while we run
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        self.alive = True
        self.thread = threading.Thread(target=self._loop, name=f"netns-{self.inode}",
                                       daemon=True)
        self._entered: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread.start()
        self._entered.result()  # raises NetnsError when the namespace cannot be entered

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _loop(self) -> None:
        try:
            setns(self._fd.fileno())
        except BaseException as e:
            self._entered.set_exception(e)
            self._retire()
            return
        self._entered.set_result(None)
        while True:
            try:
                fn, future = self._jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with _workers_lock:
                    if not self._jobs.empty():
                        continue  # work came in as we were leaving
                    self._retire()
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _retire(self) -> None:
        self.alive = False
        if _workers.get(self.inode) is self:
            del _workers[self.inode]
        self._fd.close()


_workers: dict[int, _Worker] = {}
_workers_lock = threading.Lock()


def _submit(ns: Netns, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Queue ``fn`` on the worker for ``ns`` (started on first use).  Under the lock
    a retiring worker takes to check that no work is left, so no job is ever queued
    on a worker that has already decided to end."""
    with _workers_lock:
        worker = _workers.get(ns.inode)
        if worker is None or not worker.alive:
            worker = _workers[ns.inode] = _Worker(ns)
        return worker.submit(fn)
