"""The persisted state file: versions, migrations, what is never lost, and writing it
off the event loop (no kernel)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cni_server import state as state_mod
from cni_server.state import VERSION, StateError, StateFile, StateTooNew, StateWriter

RECORD = {"id": "pool1-abc", "netdevs": ["p0"], "hostnames": [], "socket_base": "/x"}


def write(path: Path, doc: Any) -> str:
    text = json.dumps(doc)
    path.write_text(text)
    return text


def test_a_state_a_newer_release_wrote_stops_the_daemon_and_is_left_as_it_is(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    text = write(path, {"version": VERSION + 1, "allocations": [RECORD], "new": "field"})
    with pytest.raises(StateTooNew, match=rf"state version {VERSION + 1}; this one reads up "
                                          rf"to {VERSION}\).*move the file aside"):
        StateFile(path).load()
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_older_state_is_migrated_step_by_step(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The mechanism a schema change uses: each step takes version n to n+1."""
    steps: list[int] = []

    def step(n: int) -> Any:
        def up(doc: dict[str, Any]) -> dict[str, Any]:
            steps.append(n)
            return {**doc, "version": n + 1,
                    "allocations": [{**r, "hostnames": [*r["hostnames"], f"v{n + 1}"]}
                                    for r in doc["allocations"]]}
        return up

    monkeypatch.setattr(state_mod, "VERSION", 3)
    monkeypatch.setattr(state_mod, "MIGRATIONS", {1: step(1), 2: step(2)})
    path = tmp_path / "state.json"
    write(path, {"version": 1, "allocations": [RECORD]})
    [record] = StateFile(path).load()
    assert steps == [1, 2] and record["hostnames"] == ["v2", "v3"]


@pytest.mark.parametrize("doc", [
    {"version": "1", "allocations": []},  # not an integer
    {"version": True, "allocations": []},
    {"version": 0, "allocations": []},  # older than any release: no migration
    {"allocations": []},
    [1, 2],
])
def test_a_state_without_a_known_version_is_set_aside_and_the_daemon_starts_empty(
        tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "state.json"
    text = write(path, doc)
    assert StateFile(path).load() == []
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert aside.read_text() == text  # kept for the operator


# -- writing off the event loop ---------------------------------------------------------


class GatedFile(StateFile):
    """A state file whose writes wait for ``gate`` and are counted (as overlapping too)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.writes: list[list[dict[str, Any]]] = []
        self.fail_next = False
        self._busy = 0
        self.overlapped = False

    def save(self, records: list[dict[str, Any]]) -> None:
        self._busy += 1
        self.overlapped |= self._busy > 1
        self.started.release()
        try:
            self.gate.wait(10)
            if self.fail_next:
                self.fail_next = False
                raise StateError("disk full (test)")
            super().save(records)
            self.writes.append(records)
        finally:
            self._busy -= 1


async def _started(file: GatedFile) -> None:
    assert await asyncio.to_thread(file.started.acquire, True, 10), "no write started"


def _writer(tmp_path: Path) -> tuple[GatedFile, list[dict[str, str]], StateWriter]:
    """A gated file, the state (a list to change), and a writer of it."""
    file = GatedFile(tmp_path / "state.json")
    state = [{"id": "one"}]
    return file, state, StateWriter(file, lambda: list(state))


async def _first_write_under_way(writer: StateWriter, file: GatedFile) -> asyncio.Future[None]:
    saving = asyncio.ensure_future(writer.save())
    await _started(file)
    return saving


def test_the_loop_goes_on_while_the_state_is_written(tmp_path: Path) -> None:
    file, _state, writer = _writer(tmp_path)

    async def body() -> None:
        saving = await _first_write_under_way(writer, file)
        ticks = 0
        for _ in range(20):  # the loop runs while the write waits
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 20 and not saving.done()
        file.gate.set()
        await saving
    asyncio.run(body())
    writer.close()
    assert json.loads((tmp_path / "state.json").read_text())["allocations"] == [{"id": "one"}]


def test_saves_asked_during_a_write_share_one_write_of_the_newest_state(tmp_path: Path) -> None:
    file, state, writer = _writer(tmp_path)

    async def body() -> None:
        first = await _first_write_under_way(writer, file)
        state.append({"id": "two"})
        second = asyncio.ensure_future(writer.save())
        state.append({"id": "three"})
        third = asyncio.ensure_future(writer.save())
        await asyncio.sleep(0.05)
        assert not (first.done() or second.done() or third.done())
        file.gate.set()
        await asyncio.gather(first, second, third)
    asyncio.run(body())
    writer.close()
    assert file.writes == [[{"id": "one"}], [{"id": "one"}, {"id": "two"}, {"id": "three"}]]
    assert not file.overlapped


def test_a_failed_write_is_the_callers_error_and_the_next_save_writes_again(
        tmp_path: Path) -> None:
    file = GatedFile(tmp_path / "state.json")
    file.gate.set()
    file.fail_next = True
    writer = StateWriter(file, lambda: [RECORD])

    async def body() -> None:
        with pytest.raises(StateError, match="disk full"):
            await writer.save()
        await writer.save()
    asyncio.run(body())
    writer.close()
    assert file.writes == [[RECORD]]


def test_a_cancelled_save_still_finishes_its_write_before_the_next_one(tmp_path: Path) -> None:
    file, state, writer = _writer(tmp_path)

    async def body() -> None:
        first = await _first_write_under_way(writer, file)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        state.append({"id": "two"})
        second = asyncio.ensure_future(writer.save())
        await asyncio.sleep(0.05)
        file.gate.set()
        await second
    asyncio.run(body())
    writer.close()
    assert file.writes == [[{"id": "one"}], [{"id": "one"}, {"id": "two"}]]
    assert not file.overlapped


def test_a_save_after_the_writer_closed_is_a_state_error(tmp_path: Path) -> None:
    file, _state, writer = _writer(tmp_path)
    file.gate.set()
    writer.close()
    with pytest.raises(StateError, match="the daemon is stopping"):
        asyncio.run(writer.save())
    assert file.writes == []
