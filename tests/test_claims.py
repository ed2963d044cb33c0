"""Claim files: what a claim writes for whoever is refused next, and giving it up
(no kernel: flock on files in a private run directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_server.ownership import _LOCKS, claim, holder_of


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AFXDP_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def test_a_claim_over_a_file_a_dead_holder_left_holds_exactly_its_own_holder(
        run_dir: Path) -> None:
    locks = run_dir / _LOCKS
    locks.mkdir(parents=True, mode=0o755)
    run_dir.chmod(0o755)
    stale = locks / "4026531840-p0.lock"
    stale.write_text(json.dumps({"pid": 1, "sockets": "/a/much/longer/path/than/ours" * 4}))
    with claim("p0", 4026531840, {"pid": 42}) as held:
        assert json.loads(stale.read_text()) == {"pid": 42}
        assert holder_of("p0", 4026531840) == {"pid": 42}
        assert held.held
    assert not stale.exists()
    assert holder_of("p0", 4026531840) is None
