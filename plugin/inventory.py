"""The node's pool devices and their health, kept current from netlink events and rescans.

Health (``plugin.devhealth``): a device is Healthy when its link is up
(administratively up, operationally UP/UNKNOWN) and, if it is allocated, it
still carries the program we attached.  An allocated device that vanished
stays listed as Unhealthy (its pod still holds it); an unallocated one that
vanished is removed from the list.

The node view comes from one dump at start-up, then from the netlink events
themselves (each a small message); a full dump repeats every
``rescan_interval`` seconds as a safety net.  After events (debounced) the
pools are reclassified; pools whose device list or health changed are
reported to ``on_change``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cni_server.lifecycle import cancel_tasks
from cni_server.registry import Registry
from plugin.config import PluginConfig
from plugin.devhealth import GONE, LOST_PROGRAM, DeviceHealth, DeviceState
from plugin.discovery import Classifier, NodeView
from plugin.linkwatch import LinkWatch

log = logging.getLogger(__name__)

# A burst of events, one reclassification: it runs once DEBOUNCE seconds pass with no
# event, and at the latest MAX_DELAY seconds after the burst's first.  An 8-device
# Allocate's attaches send events ~10 ms apart for ~100 ms: reclassifying after each
# 20 ms (5-6 ms each with 1,000 netdevs, on the loop the Allocate's steps run on)
# made it ~30% slower.  Nor does it run while a CNI operation moves a netdev (its
# own events start the burst): it would hold up the pod's next step by its length.
DEBOUNCE = 0.02
MAX_DELAY = 0.25


class PoolConflict(Exception):
    """A netdev matches the selectors of more than one pool."""


class Inventory:
    def __init__(self, cfg: PluginConfig, registry: Registry,
                 on_change: Callable[[set[str]], Awaitable[None]],
                 on_reclassified: Callable[[dict[str, dict[str, DeviceState]]], None] | None
                 = None) -> None:
        """``on_change``: the pools whose device list or health changed.
        ``on_reclassified``: every pool's states after each reclassification."""
        self.cfg = cfg
        self.registry = registry
        self.on_change = on_change
        self.on_reclassified = on_reclassified
        self.pools: dict[str, dict[str, DeviceState]] = {p.name: {} for p in cfg.pools}
        self.view: NodeView | None = None
        self._dumping = False
        self._pending: list[Any] = []
        self._excluded: dict[tuple[str, str], str] = {}
        self._conflicts: dict[str, list[str]] = {}
        self._lock = asyncio.Lock()
        self._kick: asyncio.Event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: LinkWatch | None = None
        self._rescan_task: asyncio.Task[None] | None = None
        self._lost = False  # events were dropped since the last rescan began
        self._repairing: set[str] = set()
        self._repair_failed: dict[str, tuple[int, int]] = {}
        self._repair_tasks: set[asyncio.Task[None]] = set()
        self._classify = Classifier(cfg.pools)
        self._classified: tuple[NodeView, int] | None = None  # the view and call classified
        self.health = DeviceHealth(registry)
        registry.on_changed.append(lambda _netdev: self._kick.set())

    # -- scanning ----------------------------------------------------------------

    async def rescan(self, *, strict: bool = False) -> set[str]:
        """Dump the node afresh (start-up, and a periodic safety net), then reclassify.

        ``strict``: a netdev matching two pools raises PoolConflict (start-up);
        later it is only excluded and logged.
        """
        self._pending = []
        self._dumping = True
        try:
            view = await asyncio.to_thread(NodeView.dump)
        finally:
            self._dumping = False
        if strict:
            # Start-up: the dump's parsed messages are cyclic garbage (pyroute2's
            # messages refer to themselves).  Collected now, before anything
            # long-lived is allocated among them, the memory they took is freed
            # whole: with IPv6 on every link (2,000 link-local routes and
            # addresses to parse) the daemon keeps ~2 MiB less.  Later rescans
            # leave theirs to the collector's own pace.
            gc.collect()
        for msg in self._pending:  # events that raced with the dump
            view.apply(msg)
        self._pending = []
        if self.view is not None:
            view.inherit_caches(self.view)
        self.view = view
        return await self.reclassify(strict=strict)

    async def reclassify(self, *, strict: bool = False) -> set[str]:
        """Pools and health from the current view; returns (and reports) the pools that changed."""
        assert self.view is not None
        async with self._lock:
            netdevs = self.view.netdevs()
            keep = {n: a.pool for a in self.registry.allocations.values() for n in a.netdevs}
            # What changed since the last classification, if the view's last call was it.
            follows = self._classified == (self.view, self.view.calls - 1)
            c = self._classify(netdevs, keep, self.view.changed if follows else None)
            self._classified = (self.view, self.view.calls)
            if c.conflicts and strict:
                raise PoolConflict("; ".join(f"{n} matches pools {', '.join(p)}"
                                             for n, p in sorted(c.conflicts.items())))
            self._log_exclusions(c.excluded, c.conflicts)
            changed: set[str] = set()
            claims = self.registry.programs.claims
            others = claims.others() if claims is not None else {}  # one scan for all
            judged = self.health.judge(c.members, others)
            for pool in self.cfg.pools:
                states = judged[pool.name]
                for name, pool_name in keep.items():
                    if pool_name == pool.name and name not in states:
                        states[name] = self.health.away(name)
                if pool.virtual is not None:  # created at Allocate: always available
                    for name in pool.virtual.names():
                        states.setdefault(name, DeviceState(name, None, True))
                metrics = self.registry.server.metrics
                for health in (True, False):
                    metrics.devices.labels(pool.name, "healthy" if health else "unhealthy").set(
                        sum(1 for st in states.values() if st.healthy is health))
                if states != self.pools[pool.name]:
                    changed.add(pool.name)
                    self._log_changes(pool.name, self.pools[pool.name], states)
                    self.pools[pool.name] = states
                for name in keep.keys() & states.keys():
                    self._follow_allocated(states[name])
            if self.on_reclassified is not None:
                self.on_reclassified(self.pools)
        if changed:
            await self.on_change(changed)
        return changed

    def _follow_allocated(self, state: DeviceState) -> None:
        """Keep an allocated device's handout in step with its health, and repair it.

        A netdev that is gone or lost our program must not have its map handed
        out (a socket put there would receive nothing): handshakes for it get
        /fd_nak until it is back.  A present netdev without our program gets
        it back (see Registry.repair): the same program if the netdev is the
        same, a fresh program and map if it was re-created.  A failed repair
        (e.g. a foreign program took its place) is not retried for the same
        netdev and program until something changes.
        """
        if self.registry.by_netdev(state.name) is None:
            return
        stale = state.reason in (GONE, LOST_PROGRAM)
        self.registry.set_unavailable(
            state.name, f"netdev {state.reason}" if stale and not state.healthy else "")
        if state.reason != LOST_PROGRAM or state.netdev is None or state.name in self._repairing:
            return
        key = (state.netdev.ifindex, state.netdev.xdp_prog_id)
        if self._repair_failed.get(state.name) == key:
            return
        self._repairing.add(state.name)

        async def repair() -> None:
            try:
                await self.registry.repair(state.name)
                self._repair_failed.pop(state.name, None)
            except Exception as e:
                self._repair_failed[state.name] = key
                log.error("event=xdp_repair_failed netdev=%s error=%r", state.name, str(e))
            finally:
                self._repairing.discard(state.name)
                self._kick.set()  # reclassify: report the outcome

        task = asyncio.get_running_loop().create_task(repair())
        self._repair_tasks.add(task)
        task.add_done_callback(self._repair_tasks.discard)

    def _on_message(self, msg: Any) -> None:
        """An rtnetlink event (on the loop thread): update the view, reclassify soon."""
        if self._dumping:
            self._pending.append(msg)
        if self.view is not None and self.view.apply(msg):
            self._kick.set()

    def _log_exclusions(self, excluded: dict[str, dict[str, str]],
                        conflicts: dict[str, list[str]]) -> None:
        now = {(pool, name): why for pool, names in excluded.items() for name, why in names.items()}
        for key, why in now.items():
            if self._excluded.get(key) != why:
                log.info("event=netdev_excluded pool=%s netdev=%s reason=%r", key[0], key[1], why)
        self._excluded = now
        for name, pools in conflicts.items():
            if self._conflicts.get(name) != pools:
                log.error("event=netdev_in_two_pools netdev=%s pools=%s action=excluded", name,
                          ",".join(pools))
        self._conflicts = conflicts

    @staticmethod
    def _log_changes(pool: str, before: dict[str, DeviceState],
                     after: dict[str, DeviceState]) -> None:
        for name in after.keys() - before.keys():
            log.info("event=device_added pool=%s netdev=%s healthy=%s", pool, name,
                     after[name].healthy)
        for name in before.keys() - after.keys():
            log.info("event=device_removed pool=%s netdev=%s", pool, name)
        for name in after.keys() & before.keys():
            if after[name].healthy != before[name].healthy:
                log.info("event=device_health pool=%s netdev=%s healthy=%s reason=%r", pool, name,
                         after[name].healthy, after[name].reason)

    # -- watching ------------------------------------------------------------------

    async def start(self) -> None:
        """Follow rtnetlink events (``plugin.linkwatch``) and rescan periodically, and
        at once when the kernel had to drop events."""
        self._watch = LinkWatch(asyncio.get_running_loop(), self._on_message,
                                self._events_lost)
        await self._watch.start()
        self._tasks = [asyncio.create_task(self._on_events(), name="inventory-events"),
                       asyncio.create_task(self._periodic(), name="inventory-periodic")]

    async def stop(self) -> None:
        await cancel_tasks(*self._tasks, *self._repair_tasks, self._rescan_task)
        self._tasks = []
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _events_lost(self) -> None:
        """Events came faster than they were read and the kernel dropped some: the
        view is stale until it is dumped afresh.  Losses during a rescan (whose dump
        may have read those links before they changed) bring one more after it."""
        log.warning("event=netlink_events_lost action=rescan")
        self.registry.server.metrics.netlink_events_lost.inc()
        self._lost = True
        if self._rescan_task is None or self._rescan_task.done():
            self._rescan_task = asyncio.get_running_loop().create_task(self._rescan_lost())

    async def _rescan_lost(self) -> None:
        while self._lost:
            self._lost = False
            await self._safe_rescan()

    async def _on_events(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            deadline = loop.time() + MAX_DELAY
            while (wait := min(DEBOUNCE, deadline - loop.time())) > 0:
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), wait)
                except TimeoutError:
                    if not self.registry.any_moving():
                        break  # quiet
                    # A CNI ADD or DEL is under way, its steps on this loop: it
                    # goes first (the move's end kicks us again).
            self._kick.clear()
            try:
                await self.reclassify()
            except Exception:
                log.exception("event=reclassify_failed")

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rescan_interval)
            await self._safe_rescan()

    async def _safe_rescan(self) -> None:
        try:
            await self.rescan()
        except Exception:
            log.exception("event=rescan_failed")
