"""What of the node's own settings the daemon points out at start-up (cni_server.tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni_server import tuning
from tests.fakes import SYSFS_HALT_POLL_NS, SYSFS_IDLE_DRIVER, fake_sysfs


def test_a_guest_whose_idle_vcpus_halt_without_polling_gets_a_hint(tmp_path: Path) -> None:
    assert tuning.node_hints(fake_sysfs(tmp_path, "haltpoll", "0")) == ["guest_halt_poll_off"]


@pytest.mark.parametrize(("driver", "poll"), [
    ("haltpoll", "200000"),   # the driver's default: polls before halting
    ("intel_idle", "0"),      # not a guest's haltpoll driver: the value means nothing
    ("haltpoll", None),       # module parameters not visible
    (None, "0"),              # no cpuidle driver visible
])
def test_no_hint_otherwise(tmp_path: Path, driver: str | None, poll: str | None) -> None:
    assert tuning.node_hints(fake_sysfs(tmp_path, driver, poll)) == []


def test_an_empty_sysfs_gives_no_hint(tmp_path: Path) -> None:
    assert tuning.node_hints(tmp_path) == []


def test_the_real_files_read_as_the_check_expects() -> None:
    """Where this machine has them, the kernel's files hold what the fake tree holds:
    a driver name and a decimal count of nanoseconds, each on one line."""
    driver, poll = Path("/sys") / SYSFS_IDLE_DRIVER, Path("/sys") / SYSFS_HALT_POLL_NS
    if not driver.exists() or not poll.exists():
        pytest.skip("no cpuidle driver or haltpoll module on this machine")
    name, value = driver.read_text(), poll.read_text()
    assert name.endswith("\n") and name.strip().isidentifier()
    assert value.endswith("\n") and value.strip().isdigit()
    expected = name.strip() == "haltpoll" and int(value) == 0
    assert bool(tuning.node_hints()) == expected
