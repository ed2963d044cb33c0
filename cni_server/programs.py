"""Our XDP program per netdev, shared (reference-counted) by the allocations that use it.

A netdev gets the program once, whoever asks first (attached, or adopted when it
is ours already), and loses it when the last allocation using it lets go (unless
the caller keeps it).  Each netdev is claimed for this daemon before it is
touched (``cni_server.ownership``).

A program can also be attached ahead of any allocation (:meth:`ProgramTable.attach_ahead`,
a pool's ``attachAhead``): a fresh program and map that no one has been given,
which the next :meth:`ProgramTable.acquire` of that netdev takes instead of
attaching then.  The kernel's attach is slow while the node has few XDP programs
(docs/benchmarks.md): done ahead, it is off kubelet's Allocate.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from bpf.program import (
    DEFAULT_PROGRAM,
    FreshPrograms,
    MapKeys,
    NetdevProgram,
    ProgramSpec,
    XdpMode,
    attach,
    ensure_attached,
    fill_map_keys,
    query,
)
from cni_server.metrics import Metrics
from cni_server.netdev import link_info
from cni_server.netns import Netns
from cni_server.ownership import Claims
from cni_server.rtread import facts_of

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """The registry (or its program table) refuses an operation; the message says why."""


@dataclass(frozen=True)
class ProgramChoice:
    """Which XDP program a netdev gets, and keys to put in its own maps."""

    spec: ProgramSpec = DEFAULT_PROGRAM  # no object or source: the table's default object
    map_keys: MapKeys = ()  # keys to add to the program's own maps (see fill_map_keys)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class _Ahead:
    """A program attached ahead of any allocation: fresh, and never handed out."""

    program: NetdevProgram
    choice: ProgramChoice
    mode: XdpMode  # as asked for (auto, native, skb)


@dataclass
class _Shared:
    program: NetdevProgram
    choice: ProgramChoice
    netns: Netns | None = None  # where the netdev is now; None: the daemon's own
    users: int = 0


@dataclass
class ProgramTable:
    """Our program per netdev, shared by the allocations that use it."""

    force_replace: bool = False
    bpf_object: Path | None = None
    metrics: Metrics | None = None
    # This daemon's claims on netdevs (one daemon per netdev); None: no claims
    # (a table in a test that is not a daemon).
    claims: Claims | None = None
    # Fresh programs attached ahead to placeholders (cni_server.warm): attaching
    # one costs no grace period.  None: every attach loads its own.
    warm: FreshPrograms | None = None
    _table: dict[str, _Shared] = field(default_factory=dict)
    _ahead: dict[str, _Ahead] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def acquire(self, netdev: str, mode: XdpMode, netns: Netns | None = None,
                      ifname: str = "", choice: ProgramChoice | None = None) -> NetdevProgram:
        """Our program on ``netdev`` (named ``ifname`` in ``netns`` if it lives in a pod's)."""
        choice = choice or ProgramChoice()
        async with self._lock:
            shared = self._table.get(netdev)
            if shared is not None and shared.choice != choice:
                raise RegistryError(f"{netdev} already carries program {shared.choice.name!r} "
                                    f"for another allocation, not {choice.name!r}")
            if shared is None and netdev in self._ahead:
                program = await self._take_ahead(netdev, mode, choice)
                if program is not None:
                    self._count("attach", "ahead")
                    shared = self._table[netdev] = _Shared(program, choice, netns)
            if shared is None:
                name = ifname or netdev

                def attach() -> NetdevProgram:
                    info = link_info(name)
                    return self._ensure(name, info.ifindex, info.queue_slots, mode, choice)

                claimed_here = self.claims is not None and not self.claims.holds(netdev)
                try:
                    if self.claims is not None:
                        self.claims.take(netdev)  # before touching it: NetdevBusy
                    program = await (netns.run_async(attach) if netns
                                     else asyncio.to_thread(attach))
                except Exception:
                    if claimed_here and self.claims is not None:
                        self.claims.drop(netdev)
                    self._count("attach", "error")
                    raise
                self._count("attach", "adopted" if program.adopted else "ok")
                shared = self._table[netdev] = _Shared(program, choice, netns)
            shared.users += 1
            return shared.program

    async def attach_ahead(self, netdev: str, mode: XdpMode, choice: ProgramChoice) -> bool:
        """Attach a fresh program to ``netdev`` (in the daemon's netns) for its next
        acquire().  Only on a netdev with nothing attached and no allocation: a
        program found there may have had its map handed out, so it is left to
        acquire()'s own rules.  Returns whether one was attached; NetdevBusy if
        another daemon holds the netdev."""
        async with self._lock:
            if netdev in self._table or netdev in self._ahead:
                return False
            claimed_here = self.claims is not None and not self.claims.holds(netdev)
            if self.claims is not None:
                self.claims.take(netdev)

            def attach_fresh() -> NetdevProgram | None:
                info = link_info(netdev)
                if query(info.ifindex).attached:
                    return None
                return self._ensure(netdev, info.ifindex, info.queue_slots, mode, choice)

            try:
                program = await asyncio.to_thread(attach_fresh)
            except Exception:
                self._count("attach_ahead", "error")
                if claimed_here and self.claims is not None:
                    self.claims.drop(netdev)
                raise
            if program is None:
                if claimed_here and self.claims is not None:
                    self.claims.drop(netdev)
                return False
            self._ahead[netdev] = _Ahead(program, choice, mode)
            self._count("attach_ahead", "ok")
            return True

    async def _take_ahead(self, netdev: str, mode: XdpMode, choice: ProgramChoice
                          ) -> NetdevProgram | None:
        """The program attached ahead on ``netdev``, if it suits this acquire and the
        kernel still has it there; else it is withdrawn, and None.  (Lock held.  It
        leaves the ahead table only once decided: a cancelled acquire leaves it
        there, recorded.)"""
        ahead = self._ahead[netdev]
        program = ahead.program

        def still_there() -> bool:  # one RTM_GETLINK: the name, its ifindex, its program
            facts = facts_of(netdev)
            return facts is not None and facts[1] == program.ifindex \
                and facts[6] == program.program.prog_id

        suits = ahead.choice == choice and ahead.mode is mode
        try:
            there = suits and await asyncio.to_thread(still_there)
        except Exception:  # the netdev is gone, say: acquire's own path tells
            there = False
        del self._ahead[netdev]
        if there:
            log.info("event=xdp_attached_ahead_taken netdev=%s prog_id=%d", netdev,
                     program.program.prog_id)
            return program
        try:  # detached only if it is still the one there
            await asyncio.shield(asyncio.to_thread(program.detach))
            log.info("event=xdp_attached_ahead_dropped netdev=%s", netdev)
        except Exception as e:
            log.info("event=xdp_attached_ahead_dropped netdev=%s error=%r", netdev, str(e))
        finally:  # (also when this acquire is cancelled meanwhile)
            program.close()
            if self.claims is not None:  # acquire's own path takes it again
                self.claims.drop(netdev)
        return None

    async def withdraw_ahead(self, netdev: str | None = None) -> None:
        """Detach the program(s) attached ahead (``None``: all), e.g. at stop or when
        a netdev leaves its pool, and give up the netdev's claim."""
        async with self._lock:
            for name in [netdev] if netdev is not None else list(self._ahead):
                ahead = self._ahead.pop(name, None)
                if ahead is None:
                    continue
                try:
                    ok = await asyncio.to_thread(ahead.program.detach)  # closes our fds
                    self._count("detach", "ok" if ok else "skipped")
                    log.info("event=xdp_attached_ahead_withdrawn netdev=%s ok=%s", name, ok)
                except Exception as e:
                    self._count("detach", "error")
                    log.warning("event=xdp_attached_ahead_withdraw_failed netdev=%s error=%r",
                                name, str(e))
                finally:
                    ahead.program.close()
                    if self.claims is not None:
                        self.claims.drop(name)

    def ahead(self) -> set[str]:
        """The netdevs carrying a program attached ahead."""
        return set(self._ahead)

    def relocate(self, netdev: str, netns: Netns | None, ifname: str, ifindex: int) -> None:
        """The netdev moved (CNI ADD/DEL): detach there later, bind by its new ifindex."""
        shared = self._table.get(netdev)
        if shared is not None:
            shared.netns = netns
            shared.program.netdev = ifname
            shared.program.ifindex = ifindex

    async def release(self, netdev: str, *, detach: bool = True) -> None:
        async with self._lock:
            shared = self._table.get(netdev)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del self._table[netdev]
            try:
                if detach:
                    where = shared.netns
                    try:
                        ok = await (where.run_async(shared.program.detach) if where
                                    else asyncio.to_thread(shared.program.detach))
                    except Exception:
                        self._count("detach", "error")
                        raise
                    self._count("detach", "ok" if ok else "skipped")
                    log.info("event=xdp_detached netdev=%s ok=%s", netdev, ok)
                else:
                    shared.program.close()
            finally:
                if self.claims is not None:
                    self.claims.drop(netdev)

    async def repair(self, netdev: str, mode: XdpMode) -> str:
        """Our program is missing from ``netdev`` (in the daemon's netns): put it back.

        - The same netdev (same ifindex) with nothing attached (e.g. a DPDK run
          as root detached it on exit): re-attach the program we hold, so its
          XSKMAP, and the sockets pods put there, work again ("reattached").
        - The netdev was deleted and re-created (new ifindex): the old map went
          with the old netdev's sockets; load a fresh program and map
          ("replaced").  Every AllocatedDevice sharing the NetdevProgram sees
          the new one: it is swapped in place, on the loop thread.
        - A foreign program is attached: ForeignProgram, unless force_replace.
        """
        async with self._lock:
            shared = self._table.get(netdev)
            if shared is None or shared.netns is not None:
                return "skipped"
            current = shared.program

            def fix() -> NetdevProgram | None:
                info = link_info(netdev)
                if info.ifindex == current.ifindex and not query(info.ifindex).attached:
                    attach(info.ifindex, current.program, XdpMode(current.mode), ifname=netdev)
                    return None
                return self._ensure(netdev, info.ifindex, info.queue_slots, mode, shared.choice)

            try:
                fresh = await asyncio.to_thread(fix)
            except Exception:
                self._count("repair", "error")
                raise
            if fresh is None:
                self._count("repair", "reattached")
                return "reattached"
            current.program.close()
            current.program, current.ifindex = fresh.program, fresh.ifindex
            current.mode, current.adopted = fresh.mode, fresh.adopted
            self._count("repair", "replaced")
            return "replaced"

    def _ensure(self, netdev: str, ifindex: int, queues: int, mode: XdpMode,
                choice: ProgramChoice) -> NetdevProgram:
        spec = choice.spec
        if spec.object_path is None and spec.source_path is None:
            spec = replace(spec, object_path=self.bpf_object)
        program = ensure_attached(netdev, ifindex, queues, mode, force=self.force_replace,
                                  spec=spec, warm=self.warm)
        try:
            fill_map_keys(program.program, choice.map_keys)
        except BaseException:
            program.detach()
            raise
        return program

    def _count(self, operation: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.program_ops.labels(operation, result).inc()

    def get(self, netdev: str) -> NetdevProgram | None:
        shared = self._table.get(netdev)
        return shared.program if shared else None

    def netdevs(self) -> list[str]:
        return list(self._table)
