"""The persisted state file: versions, migrations, and what is never lost (no kernel)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cni_server import state as state_mod
from cni_server.state import VERSION, StateFile, StateTooNew

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
