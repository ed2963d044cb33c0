"""Fakes of the daemon's kernel-facing parts, for testing the handout server without
root or a kernel: the protocol and the server run for real (Unix sockets, epoll,
SCM_RIGHTS, peer identity), only what a grant would do to the kernel is faked.

- FakeProgram stands for a netdev's attached program; its "XSKMAP" is a memfd, so a
  test can tell the fd a client received is the one the server meant to send.
- FakeBroker performs grants on FakeProgram: the XSKMAP fd for /xsk_map_fd, a
  refusal (as the real broker gives one) for what needs AF_XDP; it records each grant.
- FakeProgramTable is the registry's program table without a kernel: each netdev
  gets one FakeProgram, shared and counted as the real table shares ours, closed
  with its last user; it records each call, and can be told to refuse a netdev.
- fake_sysfs writes the sysfs files cni_server.tuning reads, as the kernel shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_server.allocation import AllocatedDevice, Allocation
from cni_server.broker import Broker, Outcome
from cni_server.fds import OwnedFd
from cni_server.netns import Netns
from cni_server.programs import RegistryError
from cni_server.protocol import Grant, Op


@dataclass
class _FakeLoaded:
    map_fd: int
    closed: bool = False


class FakeProgram:
    """What the server and broker read of a NetdevProgram."""

    def __init__(self, netdev: str, queues: int = 1) -> None:
        self.netdev = netdev
        self._queues = queues
        self.program = _FakeLoaded(os.memfd_create(f"fake-xskmap-{netdev}", os.MFD_CLOEXEC))

    @property
    def map_fd(self) -> int:
        return self.program.map_fd

    @property
    def queue_slots(self) -> int:
        return self._queues

    def describe(self) -> dict[str, Any]:
        return {"program": "fake"}

    def close(self) -> None:
        self.program.closed = True
        os.close(self.program.map_fd)


@dataclass
class FakeBroker(Broker):
    grants: list[Grant] = field(default_factory=list)

    def perform(self, allocation: Allocation, grant: Grant, received: list[OwnedFd]
                ) -> Outcome:
        self.grants.append(grant)
        if grant.op is Op.MAP_FD:
            device = allocation.netdevs[allocation.resolve(grant.netdev)]
            return Outcome(True, fd=device.program.map_fd)
        return Outcome(False, reason=f"{grant.op.value} failed")


def fake_allocation(here: Netns, *netdevs: str, hostnames: frozenset[str],
                    socket_paths: tuple[Any, ...]) -> tuple[Allocation, list[FakeProgram]]:
    programs = [FakeProgram(n) for n in netdevs]
    alloc = Allocation(
        id="fake", socket_paths=socket_paths, hostnames_allowed=hostnames,
        netdevs={p.netdev: AllocatedDevice(p.netdev, p, here)  # type: ignore[arg-type]
                 for p in programs})
    return alloc, programs


@dataclass
class FakeProgramTable:
    refuse: set[str] = field(default_factory=set)  # acquire raises for these
    claims: Any = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    programs: dict[str, FakeProgram] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    async def acquire(self, netdev: str, mode: Any, netns: Netns | None = None,
                      ifname: str = "", choice: Any = None) -> FakeProgram:
        self.calls.append(("acquire", netdev))
        if netdev in self.refuse:
            raise RegistryError(f"{netdev}: refused by the test")
        if netdev not in self.programs:
            self.programs[netdev] = FakeProgram(netdev)
        self.users[netdev] = self.users.get(netdev, 0) + 1
        return self.programs[netdev]

    async def release(self, netdev: str, *, detach: bool = True) -> None:
        self.calls.append(("release", netdev, detach))
        self.users[netdev] -= 1
        if not self.users[netdev]:
            del self.users[netdev]
            self.programs.pop(netdev).close()

    def relocate(self, netdev: str, netns: Netns | None, ifname: str, ifindex: int) -> None:
        self.calls.append(("relocate", netdev, ifname, ifindex))

    async def repair(self, netdev: str, mode: Any) -> str:
        self.calls.append(("repair", netdev))
        return "reattached"

    def get(self, netdev: str) -> FakeProgram | None:
        return self.programs.get(netdev)

    def netdevs(self) -> list[str]:
        return list(self.programs)


SYSFS_IDLE_DRIVER = "devices/system/cpu/cpuidle/current_driver"
SYSFS_HALT_POLL_NS = "module/haltpoll/parameters/guest_halt_poll_ns"


def fake_sysfs(root: Path, driver: str | None, halt_poll_ns: str | None) -> Path:
    """A sysfs tree under ``root`` with the cpuidle driver and the haltpoll module's
    poll time as the kernel writes them (the value, a newline); None leaves a file out."""
    for rel, value in ((SYSFS_IDLE_DRIVER, driver), (SYSFS_HALT_POLL_NS, halt_poll_ns)):
        if value is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(value + "\n")
    return root
