"""Which pod owns which allocation (kubelet's PodResources API), and garbage collection.

``Allocate`` carries only device IDs.  Once kubelet has admitted the pod,
PodResources ``List`` shows the container holding those devices: the
allocation whose pool resource and device set match the container's devices of
that resource (the union of its entries) belongs to that container, and its
pod's hostname is what ``/connect`` must name.

Garbage collection: an owned allocation whose container no longer holds its
devices is released; an allocation no pod claims within ``gcGrace`` seconds
(a pod that failed admission after Allocate) is released too.  When kubelet
cannot be reached nothing is released.  The releases run after the refresh
that found them, in a task of their own: a caller waiting for a fresh ``List``
(a CNI ADD checking its pod) does not wait for them.

Calls are coalesced: concurrent requests for a refresh share one ``List``
(kubelet rate-limits PodResources at about 100 qps, burst 10).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cni_server.allocation import Allocation
from cni_server.lifecycle import cancel_tasks
from cni_server.registry import Registry
from plugin.api import podresources_v1_pb2 as pr
from plugin.api import podresources_v1_pb2_grpc as pr_grpc

log = logging.getLogger(__name__)
# List calls: at most 20 a second sustained, in bursts of up to 5: a fifth and a
# half of what kubelet allows all its PodResources clients together (about 100
# qps, burst 10).  A CNI ADD right after admission needs a fresh List to check the
# pod: pods starting together each need one, and with a fixed 50 ms between Lists
# the later ones of a burst waited 50 ms more each.
LIST_RATE = 20.0
LIST_BURST = 5


class ListBudget:
    """A token bucket: how long the next List must wait (0: it may go now)."""

    def __init__(self, rate: float = LIST_RATE, burst: int = LIST_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> float:
        """Spend one List; the seconds to wait before making it."""
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(frozen=True)
class Holder:
    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: frozenset[str]

    @property
    def owner(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"


def pod_hostname(pod_name: str) -> str:
    """The hostname kubelet gives a pod without spec.hostname: its name, cut to 63 characters."""
    return pod_name[:63].rstrip("-.")


class PodResources:
    """kubelet's PodResources ``List``, over one channel kept between calls.

    A channel per call cost ~1 ms (connect, HTTP/2 set-up) of every CNI ADD's owner
    check.  A call that finds kubelet unavailable drops the channel: the next call
    opens a new one at once, rather than after grpc's reconnect backoff (~1 s)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._channel: grpc.aio.Channel | None = None

    async def holders(self, timeout: float = 5.0) -> list[Holder]:
        """Who holds what: one Holder per container and resource, with the union of its
        devices.  Kubelet lists one ContainerDevices entry *per device* (a container
        with two devices of a resource has two entries of one ID each); other
        versions and fakes give one entry with all IDs: both shapes give the same."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.socket_path}")
        try:
            reply = await pr_grpc.PodResourcesListerStub(self._channel).List(
                pr.ListPodResourcesRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                await self.close()
            raise
        union: dict[tuple[str, str, str, str], set[str]] = {}
        for pod in reply.pod_resources:
            for c in pod.containers:
                for d in c.devices:
                    union.setdefault((pod.namespace, pod.name, c.name, d.resource_name),
                                     set()).update(d.device_ids)
        return [Holder(ns, pod_name, container, resource, frozenset(ids))
                for (ns, pod_name, container, resource), ids in union.items()]

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


class Owners:
    def __init__(self, registry: Registry, socket_path: Path, resource_of_pool: dict[str, str],
                 *, gc_interval: float, gc_grace: float) -> None:
        self.registry = registry
        self.kubelet = PodResources(socket_path)
        self.resource_of_pool = resource_of_pool
        self.gc_interval = gc_interval
        self.gc_grace = gc_grace
        self.created: dict[str, float] = {}  # allocation id -> monotonic time first seen
        self._inflight: asyncio.Task[bool] | None = None
        self._inflight_collects = False
        self._list_started: float | None = None  # when the in-flight run's List began
        self._budget = ListBudget()
        self._tasks: set[asyncio.Task[None]] = set()
        self._releasing: set[str] = set()  # found gone; being released (_release_all)
        self._loop_task: asyncio.Task[None] | None = None

    # -- refresh -------------------------------------------------------------------

    async def refresh(self, *, collect: bool = False, fresh_since: float | None = None) -> bool:
        """List pods once (shared by concurrent callers); map owners; optionally GC.

        ``fresh_since`` (a monotonic time): only a List that starts at or after it
        will do, e.g. for a /connect that must see a pod admitted a moment ago.
        Returns False when kubelet could not be asked.
        """
        while True:
            task = self._inflight
            if task is None or task.done():
                self._inflight_collects = collect
                self._list_started = None
                self._inflight = asyncio.create_task(self._refresh(collect))
                return await asyncio.shield(self._inflight)
            fresh = (fresh_since is None or self._list_started is None
                     or self._list_started >= fresh_since)
            if fresh and (not collect or self._inflight_collects):
                return await asyncio.shield(task)
            await asyncio.shield(task)  # wait it out, then run one of our own

    async def _refresh(self, collect: bool) -> bool:
        wait = self._budget.take()
        if wait > 0:
            await asyncio.sleep(wait)
        self._list_started = time.monotonic()
        try:
            holders = await self.kubelet.holders()
        except grpc.aio.AioRpcError as e:
            log.warning("event=podresources_unavailable socket=%s code=%s detail=%r",
                        self.kubelet.socket_path, e.code().name, e.details())
            return False
        by_devices = {(h.resource, h.device_ids): h for h in holders}
        now = time.monotonic()
        gone: list[str] = []
        for alloc_id, alloc in list(self.registry.allocations.items()):
            if alloc_id in self._releasing:
                continue
            self.created.setdefault(alloc_id, now)
            key = (self.resource_of_pool.get(alloc.pool, ""), frozenset(alloc.netdevs))
            holder = by_devices.get(key)
            if holder is not None:
                if alloc.owner != holder.owner:
                    self.registry.set_owner(alloc_id, holder.owner,
                                            frozenset({pod_hostname(holder.pod)}))
                    log.info("event=allocation_owner id=%s owner=%s hostname=%s", alloc_id,
                             holder.owner, pod_hostname(holder.pod))
                continue
            if not collect:
                continue
            if alloc.owner:
                log.info("event=allocation_gc id=%s owner=%s reason=pod_gone", alloc_id,
                         alloc.owner)
                gone.append(alloc_id)
            elif now - self.created[alloc_id] > self.gc_grace:
                log.info("event=allocation_gc id=%s reason=unclaimed_for_%ds", alloc_id,
                         int(self.gc_grace))
                gone.append(alloc_id)
        if gone:
            self._releasing.update(gone)
            self._spawn(self._release_all(gone))
        return True

    async def _release_all(self, alloc_ids: list[str]) -> None:
        """Release what a refresh found gone, after the refresh: a CNI ADD or a /connect
        waiting for a fresh List waits for the List only, not for these releases
        (each detach waits for an RCU grace period, and GC collects in batches)."""
        for alloc_id in alloc_ids:
            try:
                self.created.pop(alloc_id, None)
                if alloc_id in self.registry.allocations:
                    await self.registry.release(alloc_id)
            except Exception:
                log.exception("event=gc_release_failed id=%s", alloc_id)
            finally:
                self._releasing.discard(alloc_id)

    async def resolve(self, allocation: Allocation) -> None:
        """For the handout server: a /connect arrived before we knew the pod; ask kubelet
        with a List that starts now or later (an older one may predate the pod)."""
        await self.refresh(fresh_since=time.monotonic())

    async def check_pod(self, allocation: Allocation, namespace: str, pod: str) -> str:
        """For CNI ADD: "" when pod ``namespace/pod`` holds ``allocation``'s devices
        (per kubelet), else why not.  Asks kubelet afresh when the owner is not
        known yet (PodResources lists a pod from admission, before CNI ADD).

        A List already under way (the one :meth:`allocated` asks for a moment after
        Allocate, say) is waited for first: if it names the pod, no List of our
        own is needed.  Whichever List names an owner, that is the owner: an
        allocation is made for one pod's Allocate and never passes to another."""
        inflight = self._inflight
        if not allocation.owner and inflight is not None and not inflight.done():
            await asyncio.shield(inflight)
        if not allocation.owner:
            await self.refresh(fresh_since=time.monotonic())
        if not allocation.owner:
            return "kubelet (PodResources) lists no pod holding it"
        owner_ns, owner_pod, _container = allocation.owner.split("/", 2)
        if (owner_ns, owner_pod) != (namespace, pod):
            return f"kubelet lists it for pod {owner_ns}/{owner_pod}"
        return ""

    def allocated(self, alloc_id: str) -> None:
        """A new allocation: ask kubelet soon, and a few times, who got it.

        kubelet records which container got the devices as soon as Allocate returns,
        during the pod's admission, and creates the pod's sandbox (the CNI ADD)
        after that: asked a few milliseconds after Allocate, it usually names the
        pod already, and the ADD finds its owner known (or being learnt)."""
        self.created[alloc_id] = time.monotonic()

        async def kicks() -> None:
            for delay in (0.005, 0.3, 1.0, 3.0, 10.0):
                await asyncio.sleep(delay)
                alloc = self.registry.allocations.get(alloc_id)
                if alloc is None or alloc.owner:
                    return
                await self.refresh()

        self._spawn(kicks())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the GC loop -----------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="owners-gc")

    async def stop(self) -> None:
        await cancel_tasks(*self._tasks, self._loop_task, self._inflight)
        self._tasks.clear()
        self._loop_task = None
        await self.kubelet.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            try:
                await self.refresh(collect=True)
            except Exception:
                log.exception("event=gc_failed")
