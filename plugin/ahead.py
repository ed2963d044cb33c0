"""``attachAhead``: a fresh program on every free, healthy netdev of a pool, before
kubelet's Allocate asks for it.

Attaching an XDP program is the slowest part of an Allocate on a node with few
XDP programs: the kernel's XDP dispatcher waits for an RCU grace period on each
of the first 48 programs (docs/benchmarks.md), and some NIC drivers reconfigure
their rings.  With ``attachAhead`` the daemon attaches a fresh program and map
to each free netdev of the pool in the background; Allocate takes it
(``ProgramTable.attach_ahead`` and ``acquire``).  Every allocation still gets a
program and map no one else was given: a released netdev's program is detached
as before, and a fresh one is attached ahead after that.

After each reclassification the inventory calls :meth:`AttachAhead.update`:
netdevs that are free (no allocation, not being moved), healthy and carry no
program are queued; a worker attaches one at a time.  Netdevs that left the
pool lose their program.  A netdev whose attach failed is not tried again until
its ifindex changes.  At stop every program attached ahead is detached.
"""

from __future__ import annotations

import asyncio
import logging

from cni_server.lifecycle import cancel_tasks
from cni_server.programs import ProgramChoice
from cni_server.registry import Registry
from cni_server.spec import program_choice
from plugin.config import PluginConfig, PoolConfig
from plugin.devhealth import DeviceState
from plugin.pool import program_fields

log = logging.getLogger(__name__)


class AttachAhead:
    def __init__(self, cfg: PluginConfig, registry: Registry) -> None:
        self.pools = [p for p in cfg.pools if p.attach_ahead]
        self._choices = {p.name: pool_program(p) for p in self.pools}
        self.registry = registry
        self._queue: dict[str, tuple[PoolConfig, int]] = {}  # netdev -> (pool, ifindex)
        self._leaving: set[str] = set()
        self._failed: dict[str, int] = {}  # netdev -> the ifindex a failed attach had
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def update(self, pools: dict[str, dict[str, DeviceState]]) -> None:
        """What to attach ahead and what to withdraw, from the pools' new states."""
        if not self.pools:
            return
        ahead = self.registry.programs.ahead()
        members: set[str] = set()
        for pool in self.pools:
            for name, state in pools.get(pool.name, {}).items():
                members.add(name)
                dev = state.netdev
                if dev is None or not state.healthy or dev.xdp_prog_id or name in ahead \
                        or self._failed.get(name) == dev.ifindex or not self._free(name):
                    continue
                self._queue[name] = (pool, dev.ifindex)
        self._leaving = ahead - members
        if self._queue or self._leaving:
            self._wake.set()

    def _free(self, netdev: str) -> bool:
        return self.registry.by_netdev(netdev) is None and not self.registry.is_moving(netdev)

    def start(self) -> None:
        if self.pools:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="attach-ahead")

    async def stop(self) -> None:
        """Stop attaching, and detach every program attached ahead."""
        await cancel_tasks(self._task)
        self._task = None
        if self.pools:
            await self.registry.programs.withdraw_ahead()

    async def _run(self) -> None:
        programs = self.registry.programs
        while True:
            await self._wake.wait()
            self._wake.clear()
            for name in sorted(self._leaving):
                await programs.withdraw_ahead(name)
            self._leaving = set()
            while self._queue:
                name = next(iter(self._queue))
                pool, ifindex = self._queue.pop(name)
                # Yields to pods (Registry.wait_quiet): on a node that never
                # pauses, Allocate attaches by itself, as without attachAhead.
                await self.registry.wait_quiet()
                if not self._free(name):
                    continue
                try:
                    # Shielded: an attach under way when stop() cancels this task
                    # finishes and is recorded, so that stop() withdraws it too.
                    if await asyncio.shield(programs.attach_ahead(name, pool.xdp_mode,
                                                                  self._choices[pool.name])):
                        log.info("event=xdp_attached_ahead pool=%s netdev=%s", pool.name, name)
                except Exception as e:
                    self._failed[name] = ifindex
                    log.warning("event=xdp_attach_ahead_failed pool=%s netdev=%s error=%r",
                                pool.name, name, str(e))


def pool_program(pool: PoolConfig) -> ProgramChoice:
    """The program an Allocate from ``pool`` asks for (as its AllocationSpec would)."""
    f = program_fields(pool)
    return program_choice(f.get("program_name", ""), f.get("program_object", ""),
                          f.get("program_source", ""), f.get("program_kernel_headers", ""),
                          f.get("program_map_keys"))
