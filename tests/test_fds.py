"""fd ownership: each fd closed exactly once, detaching is explicit."""

from __future__ import annotations

import os
import warnings

import pytest

from cni_server.fds import OwnedFd, close_all


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_is_idempotent_and_closes_once() -> None:
    r, w = os.pipe()
    os.close(w)
    f = OwnedFd(r)
    f.close()
    assert not _is_open(r) and f.closed
    f.close()  # a second close must not close an fd number reused meanwhile
    r2, w2 = os.pipe()
    try:
        f.close()
        assert _is_open(r2)
    finally:
        os.close(r2)
        os.close(w2)


def test_detach_hands_over_ownership() -> None:
    r, w = os.pipe()
    f = OwnedFd(r)
    raw = f.detach()
    f.close()
    assert _is_open(raw)
    os.close(raw)
    os.close(w)
    with pytest.raises(ValueError):
        f.fileno()


def test_forgotten_owner_closes_and_warns() -> None:
    r, w = os.pipe()
    f = OwnedFd(r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del f
    assert not _is_open(r)
    assert any(issubclass(c.category, ResourceWarning) for c in caught)
    os.close(w)


def test_close_all_closes_everything() -> None:
    pipes = [os.pipe() for _ in range(3)]
    owned = [OwnedFd(r) for r, _ in pipes]
    close_all(owned)
    assert all(f.closed for f in owned)
    for r, w in pipes:
        assert not _is_open(r)
        os.close(w)


def test_negative_fd_is_rejected() -> None:
    with pytest.raises(ValueError):
        OwnedFd(-1)
