"""File descriptor ownership: one owner object per fd, closed exactly once."""

from __future__ import annotations

import array
import os
import socket
import warnings


class OwnedFd:
    """Owns one file descriptor.

    ``close()`` is idempotent and closes the fd exactly once; ``detach()`` hands
    ownership to someone else (the caller) as a deliberate, named step.  An
    owner garbage-collected while still open closes its fd and warns, so a
    forgotten close shows up in tests instead of as a leak.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("file descriptor already closed or detached")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership and return the raw fd (the caller must close it)."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"OwnedFd {self._fd} was never closed", ResourceWarning, stacklevel=1)
            self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def close_all(fds: list[OwnedFd]) -> None:
    """Close every fd in ``fds`` (each at most once), even if one close fails."""
    errors: list[OSError] = []
    for f in fds:
        try:
            f.close()
        except OSError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    """Own every fd that arrived in SCM_RIGHTS control messages (from ``recvmsg``).

    The caller closes them; a partial trailing int (truncated control data) is ignored.
    """
    fds: list[OwnedFd] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(OwnedFd(fd) for fd in arr)
    return fds
