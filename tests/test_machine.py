"""The benchmarks' report of CPU time stolen by the hypervisor."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.machine import cpu_ticks, measuring, steal_share


def test_steal_is_the_stolen_share_of_all_cpu_time_between_two_samples(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 1 2 3 4 5 6 7 8\nintr 1\n")
    before = cpu_ticks(stat)
    stat.write_text("cpu  160 0 80 850 10 0 10 95 9 0\ncpu0 1 2 3 4 5 6 7 8\nintr 1\n")
    after = cpu_ticks(stat)
    assert before == [100, 0, 50, 800, 10, 0, 5, 35]  # guest time is in user already
    assert steal_share(before, after) == pytest.approx(60 / 205)
    assert steal_share(after, after) == 0.0


def test_a_stat_file_without_the_aggregate_line_is_an_error(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu0 1 2 3 4 5 6 7 8\n")
    with pytest.raises(ValueError, match="no aggregate cpu line"):
        cpu_ticks(stat)


def test_measuring_reads_this_machines_counters() -> None:
    with measuring() as steal:
        sum(range(100_000))
    assert 0.0 <= steal.share <= 1.0
    assert str(steal).endswith("%")
