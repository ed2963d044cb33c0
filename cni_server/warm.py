"""Fresh XDP programs kept warm, so that attaching one to a netdev costs no RCU
grace period.

The kernel calls every XDP program through a dispatcher (``kernel/bpf/dispatcher.c``)
that holds up to 48 distinct programs, node-wide.  Adding a program to it, or
taking one out, waits for an RCU grace period (10-20 ms on our machines) with
the rtnl lock held: on a node with fewer than 48 programs, that is most of an
Allocate.  A program already attached somewhere is already in the dispatcher,
and attaching it to another netdev leaves the dispatcher as it is (0.1 ms
instead of ~13 ms, ``docs/benchmarks.md``).

So the daemon keeps a few fresh programs, each with its own XSKMAP, loaded and
attached in skb mode to placeholder veths in a network namespace of its own
(unnamed: it goes with the daemon, however that ends).  An attach takes one
(:meth:`WarmPrograms.take`), and once it is on the netdev, lets go of its
placeholder (:meth:`WarmPrograms.placed`: a reference dropped, no grace
period).  The stash is refilled in the background when the node is quiet
(``Registry.wait_quiet``), with programs of each kind asked for lately: a
pool's program, with its XSKMAP sized to the netdev's queues.

A warm program is as fresh as one loaded at the attach: nobody has been given
its map, and no frame reaches it (a placeholder is down, with no peer outside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from pyroute2 import IPRoute

from bpf.program import LoadedProgram, ProgramSpec, XdpMode, attach, detach
from cni_server.lifecycle import cancel_tasks
from cni_server.metrics import Metrics
from cni_server.netns import Netns

log = logging.getLogger(__name__)

Key = tuple[ProgramSpec, int]  # a kind: the program, and its XSKMAP's size
# Kinds kept warm: the MAX_KINDS last asked for (a node's pools, by program and
# queue count), ``count`` of each, and MAX_HELD programs in all: each holds one of
# the dispatcher's 48 places while it waits.
MAX_KINDS = 4
MAX_HELD = 16


@dataclass
class _Spare:
    key: Key
    program: LoadedProgram
    slot: int  # the placeholder's ifindex, in the private netns


class WarmPrograms:
    """Up to ``count`` fresh programs attached to placeholders, for :meth:`take`."""

    def __init__(self, count: int, quiet: Callable[[], Awaitable[None]],
                 metrics: Metrics | None = None) -> None:
        self.count = count
        self._quiet = quiet
        self._metrics = metrics
        self._ns: Netns | None = None
        self._lock = threading.Lock()  # take() and placed() run on worker threads
        self._kinds: dict[Key, None] = {}  # kinds asked for, the latest last
        self._spares: list[_Spare] = []
        self._lent: dict[int, _Spare] = {}  # prog id -> taken, not yet placed
        self._slots: list[int] = []  # free placeholders
        self._pairs = 0  # placeholder veth pairs made
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[_Spare] | None = None

    async def start(self) -> None:
        """Make the private netns and start refilling (on the first take).  Without
        the netns (no CAP_SYS_ADMIN, say) every attach loads its own program."""
        if self.count <= 0:
            return
        try:
            self._ns = await asyncio.to_thread(Netns.private, "warm-programs")
        except Exception as e:
            log.warning("event=xdp_warm_off error=%r", str(e))
            return
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="warm-programs")

    async def stop(self) -> None:
        """Detach and close every spare; the namespace and its placeholders go."""
        await cancel_tasks(self._task)
        self._task = None
        ns, self._ns = self._ns, None  # take() finds none from here on
        if ns is None:
            return
        with self._lock:
            spares, self._spares = self._spares, []
        if self._inflight is not None:  # warming when cancelled: finished, not kept
            with contextlib.suppress(Exception):
                spares.append(await self._inflight)
            self._inflight = None
        try:
            for spare in spares:
                with contextlib.suppress(Exception):  # (closed either way)
                    await ns.run_async(partial(self._drop, spare))
            await ns.run_async(self._remove_placeholders)
        except Exception as e:  # the namespace, and all in it, goes with its last fd
            log.warning("event=xdp_warm_stop_failed error=%r", str(e))
        finally:
            ns.close()

    # -- for attaches (any thread) -------------------------------------------------

    def take(self, spec: ProgramSpec, map_entries: int) -> LoadedProgram | None:
        """A warm program of this kind, now the caller's (attach it, then call
        :meth:`placed`), or None: load one.  Either way this kind is kept warm
        from now on (while it is among the MAX_KINDS last asked for)."""
        if self._ns is None:
            return None
        key = (spec, map_entries)
        with self._lock:
            self._kinds.pop(key, None)
            self._kinds[key] = None
            while len(self._kinds) > MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            spare = next((s for s in self._spares if s.key == key), None)
            if spare is not None:
                self._spares.remove(spare)
                self._lent[spare.program.prog_id] = spare
        self._count("taken" if spare is not None else "missed")
        if spare is None:
            self._refill()
        return spare.program if spare is not None else None

    def placed(self, program: LoadedProgram) -> None:
        """``program`` is attached where it is wanted, or failed to be and is about
        to be closed: take it off its placeholder, if it came from here (before the
        caller closes it)."""
        with self._lock:
            spare = self._lent.pop(program.prog_id, None)
        ns = self._ns
        if spare is None or ns is None:
            return
        try:
            ns.run(lambda: detach(spare.slot, program, XdpMode.SKB.value))
        except Exception as e:  # the placeholder stays taken; the program goes with it
            log.warning("event=xdp_warm_detach_failed prog_id=%d error=%r", program.prog_id,
                        str(e))
        else:
            with self._lock:
                self._slots.append(spare.slot)
        self._refill()

    def _refill(self) -> None:
        """Have the stash looked at (from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    # -- refilling (on the loop; kernel work in the private netns) ------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (key := await self._wanted()) is not None:
                await self._quiet()
                assert self._ns is not None
                # Left to finish if stop() cancels this task: stop() drops what it made.
                self._inflight = asyncio.ensure_future(
                    self._ns.run_async(partial(self._warm, key)))
                try:
                    spare = await asyncio.shield(self._inflight)
                except Exception as e:  # tried again at the next take
                    self._inflight = None
                    self._count("error")
                    log.warning("event=xdp_warm_failed error=%r", str(e))
                    break
                self._inflight = None
                with self._lock:
                    self._spares.append(spare)
                self._count("warmed")
                log.info("event=xdp_warmed prog_id=%d map_entries=%d", spare.program.prog_id,
                         spare.key[1])

    async def _wanted(self) -> Key | None:
        """The kind to warm one more of, if any is short.  Spares of kinds no
        longer kept are dropped first."""
        with self._lock:
            stale = [s for s in self._spares if s.key not in self._kinds]
            self._spares = [s for s in self._spares if s.key in self._kinds]
            key = self._short()
        assert self._ns is not None
        if stale:
            await self._quiet()  # a program leaving the dispatcher waits too
        for spare in stale:
            await asyncio.shield(self._ns.run_async(partial(self._drop, spare)))
        return key

    def _short(self) -> Key | None:
        """(Lock held.)  The latest kind with fewer than ``count`` warm or lent,
        unless MAX_HELD are held in all."""
        held = [*self._spares, *self._lent.values()]
        if len(held) >= MAX_HELD:
            return None
        for key in reversed(self._kinds):
            if sum(1 for s in held if s.key == key) < self.count:
                return key
        return None

    def _warm(self, key: Key) -> _Spare:
        """In the private netns: a fresh program of ``key``'s kind on a free placeholder."""
        with self._lock:
            slot = self._slots.pop() if self._slots else 0
        if not slot:
            slot = self._new_placeholders()
        spec, entries = key
        program: LoadedProgram | None = None
        try:
            program = spec.load(entries)
            attach(slot, program, XdpMode.SKB, ifname=f"placeholder {slot}")
        except BaseException:
            if program is not None:
                program.close()
            with self._lock:
                self._slots.append(slot)
            raise
        return _Spare(key, program, slot)

    def _new_placeholders(self) -> int:
        """Two more placeholders (a veth pair, down); returns one, keeps the other."""
        name = f"warm{self._pairs}"
        self._pairs += 1
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="veth", peer=f"{name}p")
            first, second = (ipr.link_lookup(ifname=n)[0] for n in (name, f"{name}p"))
        with self._lock:
            self._slots.append(second)
        return int(first)

    def _drop(self, spare: _Spare) -> None:
        try:
            detach(spare.slot, spare.program, XdpMode.SKB.value)
            with self._lock:
                self._slots.append(spare.slot)
        finally:
            spare.program.close()

    def _remove_placeholders(self) -> None:
        with IPRoute() as ipr:
            for i in range(self._pairs):
                for index in ipr.link_lookup(ifname=f"warm{i}"):
                    ipr.link("del", index=index)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.program_ops.labels("warm", result).inc()

    def describe(self) -> dict[str, object]:
        """For the status: how many are warm, of what kind."""
        with self._lock:
            kinds = [{"program": spec.name, "map_entries": entries,
                      "warm": sum(1 for s in self._spares if s.key == (spec, entries))}
                     for spec, entries in self._kinds]
            return {"count": self.count, "warm": len(self._spares), "kinds": kinds,
                    "filling": self._ns is not None and self._short() is not None,
                    "on": self._ns is not None,
                    "prog_ids": sorted(s.program.prog_id
                                       for s in [*self._spares, *self._lent.values()])}
