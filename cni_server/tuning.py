"""Settings of the node itself that slow the handout server down, found at start-up.

The daemon cannot change them (they belong to the node's operator); it says so
once in its log, with what to look at.  Each check reads sysfs and nothing
else, and a file that is missing or unreadable means "nothing to say".
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SYSFS = Path("/sys")
_IDLE_DRIVER = "devices/system/cpu/cpuidle/current_driver"
_HALT_POLL_NS = "module/haltpoll/parameters/guest_halt_poll_ns"


# What each hint says beside its name: our own constant text, key=value.
_DETAILS = {
    "guest_halt_poll_off": ("cpuidle_driver=haltpoll guest_halt_poll_ns=0 "
                            "effect=handshakes_wake_idle_vcpus_slowly "
                            "see=docs/troubleshooting.md"),
}


def node_hints(sysfs: Path | None = None) -> list[str]:
    """The names of what on this node slows handshakes down (keys of ``_DETAILS``)."""
    root = sysfs or SYSFS
    hints = []
    if _read(root / _IDLE_DRIVER) == "haltpoll" and _read(root / _HALT_POLL_NS) == "0":
        # A KVM guest whose idle vCPUs halt at once: every reply that wakes a client
        # on an idle vCPU waits for the hypervisor to run that vCPU again.  With
        # the driver's default poll (200 us) a vCPU about to be needed is still
        # polling.  Measured on a 2-vCPU guest: sequential handshakes 1,080-2,873/s
        # with it at 0, 5,326-7,564/s at 200000 (docs/benchmarks.md).
        hints.append("guest_halt_poll_off")
    return hints


def log_node_hints() -> None:
    for name in node_hints():
        # Constant text only: no value from outside goes into the line.
        log.info(f"event=tuning_hint hint={name} {_DETAILS[name]}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
