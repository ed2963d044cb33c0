"""Warm programs (cni_server.warm) on the real kernel: fresh programs kept on
placeholders in a private netns, taken by an attach, never given twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import pytest

from bpf.errors import LibbpfError
from bpf.program import DEFAULT_PROGRAM, XdpMode, ensure_attached, query
from cni_server.netdev import link_info
from cni_server.warm import MAX_KINDS, WarmPrograms
from tests.kernel import NsFixture, program_exists
from tests.loop_thread import loop_thread

pytestmark = pytest.mark.kernel
T = TypeVar("T")


async def _at_once() -> None:
    """A node that is always quiet."""


class Stash:
    """A WarmPrograms on an event loop of its own, driven from the test's thread
    (as attaches drive it from worker threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.warm = WarmPrograms(count, _at_once)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def spares(self) -> list[int]:
        """The prog ids waiting on placeholders."""
        with self.warm._lock:
            return [s.program.prog_id for s in self.warm._spares]

    def kinds(self) -> dict[int, int]:
        """Map size -> spares, for each kind kept warm (as the status reports it)."""
        kinds = cast(list[dict[str, int]], self.warm.describe()["kinds"])
        return {k["map_entries"]: k["warm"] for k in kinds}

    def wait_for(self, n: int, timeout: float = 5.0, *, besides: int = 0) -> list[int]:
        """``n`` spares, none of them ``besides``."""
        deadline = time.monotonic() + timeout
        while len(self.spares()) != n or besides in self.spares():
            assert time.monotonic() < deadline, f"{self.spares()} spares, not {n}"
            time.sleep(0.01)
        return self.spares()


@pytest.fixture
def stash() -> Iterator[Stash]:
    with loop_thread() as loop:
        s = Stash(loop, 1)
        s.call(s.warm.start)
        try:
            yield s
        finally:
            s.call(s.warm.stop)


def _warmed(stash: Stash) -> int:
    """Ask once (a miss), so the stash warms one; its prog id."""
    assert stash.warm.take(DEFAULT_PROGRAM, 1) is None  # nothing warm before the first ask
    return stash.wait_for(1)[0]


def _freed(prog_id: int, timeout: float = 5.0) -> bool:
    """The kernel lets go of program ``prog_id`` (no fd, no netdev holds it) within
    ``timeout``: it frees a program after an RCU grace period."""
    deadline = time.monotonic() + timeout
    while program_exists(prog_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_attach_takes_the_warm_program_and_the_stash_warms_a_fresh_one(
        stash: Stash, netns: NsFixture) -> None:
    warm_id = _warmed(stash)
    netns.veth("va", "vb")
    with netns.entered():
        ifindex = link_info("va").ifindex
        np = ensure_attached("va", ifindex, 1, XdpMode.NATIVE, warm=stash.warm)
        try:
            assert np.program.prog_id == warm_id
            assert query(ifindex).prog_id == warm_id and np.mode == "native"
            stash.wait_for(1, besides=warm_id)  # a fresh one: its map is nobody's
            assert stash.warm._lent == {}  # off its placeholder
        finally:
            np.detach()
    assert _freed(warm_id)


def test_a_warm_program_is_given_once(stash: Stash) -> None:
    warm_id = _warmed(stash)
    with ThreadPoolExecutor(2) as pool:  # two takers, as two Allocates on two threads
        first, second = pool.map(lambda _: stash.warm.take(DEFAULT_PROGRAM, 1), range(2))
    if first is None:
        first, second = second, first
    assert first is not None and first.prog_id == warm_id
    assert second is None or second.prog_id != warm_id
    for program in (first, second):
        if program is not None:
            stash.warm.placed(program)
            program.close()
    assert _freed(warm_id)


def test_each_kind_asked_for_is_kept_warm_and_one_of_another_size_is_never_taken(
        stash: Stash) -> None:
    """Two pools (say, 1-queue veths and 4-queue NICs): a map of another size is
    never handed over, and both kinds stay warm, so pods of the two pools taking
    turns each find theirs."""
    warm_id = _warmed(stash)
    assert stash.warm.take(DEFAULT_PROGRAM, 4) is None  # sized for 1 queue: not this one
    stash.wait_for(2)
    assert warm_id in stash.spares()
    for entries in (4, 1, 4):
        program = stash.warm.take(DEFAULT_PROGRAM, entries)
        assert program is not None and program.map_entries == entries
        stash.warm.placed(program)
        program.close()
        stash.wait_for(2)
    assert stash.kinds() == {1: 1, 4: 1}


def test_only_the_latest_kinds_are_kept_and_the_others_dropped(stash: Stash) -> None:
    first = _warmed(stash)  # a kind of 1 slot
    for entries in range(2, MAX_KINDS + 2):  # then MAX_KINDS others
        assert stash.warm.take(DEFAULT_PROGRAM, entries) is None
    ids = stash.wait_for(MAX_KINDS)
    assert first not in ids and _freed(first)
    assert sorted(stash.kinds()) == list(range(2, MAX_KINDS + 2))


def test_a_failed_attach_lets_go_of_the_warm_program(stash: Stash, netns: NsFixture) -> None:
    warm_id = _warmed(stash)
    with netns.entered(), pytest.raises(LibbpfError):
        ensure_attached("gone", 99999, 1, XdpMode.SKB, warm=stash.warm)
    assert stash.warm._lent == {}
    assert _freed(warm_id)
    stash.wait_for(1, besides=warm_id)  # and a fresh one is warm again


def test_stop_leaves_no_program_behind() -> None:
    with loop_thread() as loop:
        s = Stash(loop, 2)
        s.call(s.warm.start)
        try:
            assert s.warm.take(DEFAULT_PROGRAM, 1) is None
            ids = s.wait_for(2)
        finally:
            s.call(s.warm.stop)
    assert all(_freed(i) for i in ids)
    assert s.warm.take(DEFAULT_PROGRAM, 1) is None  # stopped: nothing handed out


def test_off_when_the_count_is_zero() -> None:
    with loop_thread() as loop:
        s = Stash(loop, 0)
        s.call(s.warm.start)
        assert s.warm.take(DEFAULT_PROGRAM, 1) is None
        assert s.warm.describe()["on"] is False
        s.call(s.warm.stop)
