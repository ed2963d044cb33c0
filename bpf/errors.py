"""Exceptions raised by the bpf package."""

from __future__ import annotations

import os


class BpfError(Exception):
    """Base class: something about loading, attaching or pinning failed."""


class LibbpfMissing(BpfError):
    """libbpf.so.1 cannot be loaded."""


class LibbpfError(BpfError):
    """A libbpf call failed; carries the errno and what was being done."""

    def __init__(self, what: str, errno: int, details: list[str] | None = None) -> None:
        self.what = what
        self.errno = errno
        self.details = details or []
        text = f"{what}: {os.strerror(errno)} (errno {errno})"
        if self.details:
            text += "\n" + "\n".join(self.details)
        super().__init__(text)


class ObjectMissing(BpfError):
    """The compiled BPF object is not where we expect it."""


class ObjectInvalid(BpfError):
    """The BPF object lacks the program or map the loader needs."""


class ForeignProgram(BpfError):
    """The netdev carries an XDP program that is not ours."""


class BpffsError(BpfError):
    """bpffs is missing, cannot be mounted, or a pin path is unusable."""
