"""Standalone mode: notice when a served netdev loses our program, and put it back.

A client run as root (DPDK detaches the interface's program when it exits),
an operator's ``ip link set dev X xdp off``, or another tool can take our
program off a netdev.  Every ``interval`` seconds the watch asks the kernel
which program each served netdev carries (one XDP query per netdev) and, when
it is not the one we hold, repairs it through :meth:`Registry.repair`: the same
program and map go back on the same netdev, a fresh one on a re-created netdev;
a foreign program is left alone (unless the daemon runs with ``--force``).
Until the netdev carries our program again its handshakes get ``/fd_nak``, so
no client puts a socket in a map that receives nothing.

(The Kubernetes daemon follows the same through its netlink inventory.)
"""

from __future__ import annotations

import asyncio
import logging

from bpf.errors import BpfError
from bpf.program import query
from cni_server.lifecycle import cancel_tasks
from cni_server.netdev import ifindex_of
from cni_server.registry import Registry

log = logging.getLogger(__name__)


class ProgramWatch:
    def __init__(self, registry: Registry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        # netdev -> (ifindex, prog id) a repair already failed for: not retried until
        # either changes.
        self._failed: dict[str, tuple[int, int]] = {}

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception as e:  # never let the watch die silently
                log.error("event=xdp_watch_failed error=%r", str(e))

    def _served(self) -> dict[str, int]:
        """Served netdevs in the daemon's netns -> the program id we hold for each."""
        reg = self.registry
        out = {}
        for allocation in reg.allocations.values():
            for name, device in allocation.netdevs.items():
                program = reg.programs.get(name)
                if device.netns is reg.netns and program is not None:
                    out[name] = program.program.prog_id
        return out

    async def check(self) -> None:
        """One look at every served netdev; repairs what lost our program."""
        served = self._served()
        if not served:
            return
        seen = await asyncio.to_thread(_attached, list(served))
        for name, held in served.items():
            allocation = self.registry.by_netdev(name)
            if allocation is None or name not in allocation.netdevs or name not in seen:
                continue  # released meanwhile, or the kernel could not say this time
            ifindex, prog_id = seen[name]
            if ifindex == 0:
                if self.registry.set_unavailable(name, "netdev is gone"):
                    log.warning("event=netdev_gone netdev=%s", name)
                continue
            if prog_id == held:
                if self.registry.set_unavailable(name, ""):
                    log.info("event=netdev_serving_again netdev=%s", name)
                self._failed.pop(name, None)
                continue
            if self._failed.get(name) == (ifindex, prog_id):
                continue
            log.warning("event=xdp_lost netdev=%s expected_prog_id=%d found_prog_id=%d", name,
                        held, prog_id)
            self.registry.set_unavailable(name, "netdev lost its XDP program")
            try:
                await self.registry.repair(name)
            except Exception as e:
                self._failed[name] = (ifindex, prog_id)
                log.error("event=xdp_repair_failed netdev=%s error=%r", name, str(e))
                continue
            self.registry.set_unavailable(name, "")
            self._failed.pop(name, None)


def _attached(names: list[str]) -> dict[str, tuple[int, int]]:
    """netdev -> (ifindex, attached program id); (0, 0) for a netdev that is gone.
    A netdev the kernel could not be asked about (e.g. out of fds) is left out:
    that is no evidence either way."""
    out = {}
    for name in names:
        try:
            ifindex = ifindex_of(name)
        except OSError:
            continue
        if ifindex is None:
            out[name] = (0, 0)
            continue
        try:
            out[name] = (ifindex, query(ifindex).prog_id)
        except (OSError, BpfError):
            continue
    return out
