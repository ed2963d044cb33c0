"""What the machine itself was doing while a benchmark measured: CPU time stolen by
the hypervisor.

On a virtual machine the host may run other guests on our vCPUs; the guest
kernel counts that time as *steal* in ``/proc/stat``.  A benchmark run in an
hour with 20% steal is not comparable with one at 1%, so the benchmarks report
it beside their figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The aggregate "cpu" line: user nice system idle iowait irq softirq steal (guest
# and guest_nice are already counted in user and nice).
_FIELDS = 8
_STEAL = 7


def cpu_ticks(stat: Path = Path("/proc/stat")) -> list[int]:
    """The aggregate CPU line of ``/proc/stat``: ticks in each state since boot."""
    for line in stat.read_text().splitlines():
        if line.startswith("cpu "):
            return [int(v) for v in line.split()[1:1 + _FIELDS]]
    raise ValueError(f"{stat}: no aggregate cpu line")


def steal_share(before: list[int], after: list[int]) -> float:
    """The share (0..1) of all CPU time between two :func:`cpu_ticks` that was stolen."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent)
    return spent[_STEAL] / total if total > 0 else 0.0


class Steal:
    """Filled in by :func:`measuring`: the share stolen during the block."""

    share = 0.0

    def __str__(self) -> str:
        return f"{100 * self.share:.1f}%"


@contextmanager
def measuring() -> Iterator[Steal]:
    """``with measuring() as steal: ...``; then ``steal.share`` covers the block."""
    steal = Steal()
    before = cpu_ticks()
    try:
        yield steal
    finally:
        steal.share = steal_share(before, cpu_ticks())
