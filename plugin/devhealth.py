"""A pool device's health, worked out from the node view and the registry.

Healthy: the link is up (administratively up, operationally UP/UNKNOWN), no
other afxdp daemon serves it and, if it is allocated, it still carries the
program we attached.  An allocated netdev not in our netns is healthy while it
is in its pod (or being moved there) and unhealthy once gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bpf.errors import BpfError
from bpf.program import query
from cni_server.ownership import describe_holder
from cni_server.registry import Registry
from plugin.discovery import Netdev

GONE = "is gone"
LOST_PROGRAM = "lost its XDP program"


@dataclass(frozen=True, slots=True)
class DeviceState:
    name: str
    netdev: Netdev | None  # None: allocated but no longer present
    healthy: bool
    reason: str = ""  # why it is unhealthy

    @property
    def numa_node(self) -> int | None:
        return self.netdev.numa_node if self.netdev else None

    @property
    def nic(self) -> str:
        return self.netdev.nic if self.netdev else ""


def _attached_now(ifindex: int) -> int:
    """The program the kernel has on ``ifindex`` right now.  The netlink view lags
    behind our own attaches (the event comes after the attach returns): asked only
    when the view disagrees with the program we hold, so that a device we are
    attaching or replacing is never reported Unhealthy for the few milliseconds
    the view is stale."""
    try:
        return query(ifindex).prog_id
    except BpfError:
        return 0


class DeviceHealth:
    """Health of every pool member, remembered from one reclassification to the next."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # netdev -> (what its health was worked out from, that health): see of()
        self._kept: dict[str, tuple[tuple[Any, ...], DeviceState]] = {}

    def judge(self, members: dict[str, dict[str, Netdev]],
              others: dict[str, dict[str, Any]]) -> dict[str, dict[str, DeviceState]]:
        """pool -> netdev -> health, for the pools' members (Classification.members)."""
        kept: dict[str, tuple[tuple[Any, ...], DeviceState]] = {}
        judged = {pool: {name: self.of(dev, others, kept) for name, dev in devs.items()}
                  for pool, devs in members.items()}
        self._kept = kept
        return judged

    def away(self, name: str) -> DeviceState:
        """An allocated netdev not in our netns: in its pod (CNI ADD moved it), or gone."""
        allocation = self.registry.by_netdev(name)
        if self.registry.is_moving(name):
            return DeviceState(name, None, True, "being moved by CNI")
        if allocation is not None and allocation.netdevs[name].netns is not self.registry.netns:
            return DeviceState(name, None, True, "in its pod's network namespace")
        return DeviceState(name, None, False, GONE)

    def of(self, dev: Netdev, others: dict[str, dict[str, Any]],
           healths: dict[str, tuple[tuple[Any, ...], DeviceState]]) -> DeviceState:
        """``others``: the netdevs another daemon serves (Claims.others).

        A netdev whose inputs (its Netdev, whether it is moving, another daemon's
        claim, our program on it) are those of the last reclassification keeps its
        DeviceState, so an event about one netdev of 1,000 works out one health and
        the pools compare equal by identity.  Not kept: a health that needed the
        kernel's word because the view disagreed with our program (the view lags
        behind our own attaches; the next event settles it).  ``healths`` collects
        what is kept for the next call of :meth:`judge`."""
        program = self.registry.programs.get(dev.name)
        prog_id = program.program.prog_id if program is not None else 0
        inputs = (dev, self.registry.is_moving(dev.name), others.get(dev.name), prog_id)
        hit = self._kept.get(dev.name)
        if hit is not None and hit[0] == inputs:
            healths[dev.name] = hit
            return hit[1]
        state = self._work_out_health(dev, *inputs[1:])
        if not prog_id or dev.xdp_prog_id == prog_id:
            healths[dev.name] = (inputs, state)
        return state

    @staticmethod
    def _work_out_health(dev: Netdev, moving: bool, other: dict[str, Any] | None,
                         prog_id: int) -> DeviceState:
        if moving:  # taken down to move it, or back up
            return DeviceState(dev.name, dev, True, "being moved by CNI")
        if not dev.up:
            return DeviceState(dev.name, dev, False, "link down")
        if other is not None:
            return DeviceState(dev.name, dev, False, "served by another afxdp daemon "
                                                     f"({describe_holder(other)})")
        if prog_id and dev.xdp_prog_id != prog_id and _attached_now(dev.ifindex) != prog_id:
            return DeviceState(dev.name, dev, False, LOST_PROGRAM)
        return DeviceState(dev.name, dev, True)
