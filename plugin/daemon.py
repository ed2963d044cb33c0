"""The Kubernetes-mode daemon: ``afxdp daemon --config FILE``.

Start-up: restore persisted allocations (same socket paths, adopted programs
and maps, so running pods keep working), scan the node's netdevs into pools,
serve and register one device-plugin resource per pool, then watch netlink,
kubelet and PodResources.  SIGTERM/SIGINT: stop serving and registering, keep
programs, pins and state for the pods that use them and for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import replace
from typing import Any

from pyroute2 import IPRoute

from bpf import bpffs
from bpf.errors import BpfError
from bpf.program import map_keys_from, verify
from cni_server.config import ConfigError
from cni_server.control import ControlServer
from cni_server.health import HealthServer
from cni_server.lifecycle import raise_fd_limit, report_ready, run_until_signal
from cni_server.netns import Netns
from cni_server.ownership import Claims
from cni_server.registry import ProgramTable, Registry
from cni_server.safedir import ensure_dir
from cni_server.server import HandoutServer, Limits
from cni_server.state import StateFile
from plugin.cniendpoint import CniEndpoint
from plugin.config import PluginConfig
from plugin.deviceplugin import PluginServer
from plugin.inventory import Inventory
from plugin.owners import Owners
from plugin.pool import PoolBackend, restored_spec_check
from plugin.virtual import VirtualDevices, VirtualError, resolve_kind

log = logging.getLogger(__name__)
DRAIN_SECONDS = 2.0


class KubernetesDaemon:
    def __init__(self, cfg: PluginConfig, *, supervise_interval: float | None = None) -> None:
        self.cfg = cfg
        self.supervise_interval = (cfg.kubelet_check_interval if supervise_interval is None
                                   else supervise_interval)
        self.server = HandoutServer(limits=Limits(
            handshake_spin=cfg.handshake_spin_us / 1e6, max_connections=cfg.max_connections,
            max_connections_per_socket=cfg.max_connections_per_socket))
        self.netns: Netns | None = None
        self.registry: Registry | None = None
        self.inventory: Inventory | None = None
        self.owners: Owners | None = None
        self.plugins: dict[str, PluginServer] = {}
        self._control: ControlServer | None = None
        self.cni: CniEndpoint | None = None
        self.http: HealthServer | None = None
        self._started = False
        self._stop = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        # Connections, plus each allocation's program, map and listening socket and
        # the daemon's own: the default (4096) gives the 8192 it always had.
        raise_fd_limit(cfg.max_connections + 4096)
        self.netns = Netns.current()
        try:
            await asyncio.to_thread(verify_programs, cfg)
            await asyncio.to_thread(resolve_virtual, cfg)
            if any(p.pin_map != "socket" for p in cfg.pools):
                bpffs.ensure_bpffs(cfg.bpffs_root)  # stays mounted: pods' pins live there
                ensure_dir(cfg.bpffs_root, "bpffsRoot")
            ensure_dir(cfg.socket_root, "socketRoot")
            ensure_dir(cfg.state_dir, "stateDir", mode=0o700)
            registry = self.registry = Registry(
                self.server, self.netns,
                ProgramTable(bpf_object=cfg.bpf_object, metrics=self.server.metrics,
                             claims=Claims(self.netns.inode, {
                                 "pid": os.getpid(), "mode": "kubernetes",
                                 "sockets": str(cfg.socket_root),
                                 "control": str(cfg.control_socket or "")})),
                StateFile(cfg.state_dir / "state.json"), VirtualDevices())
            restored, dropped = await registry.restore(restored_spec_check(cfg))
            log.info("event=state_restored allocations=%d dropped=%d", len(restored),
                     len(dropped))
            self.owners = Owners(registry, cfg.pod_resources_socket,
                                 {p.name: cfg.resource_name(p) for p in cfg.pools},
                                 gc_interval=cfg.gc_interval, gc_grace=cfg.gc_grace)
            self.cni = CniEndpoint(cfg.cni_socket, registry, self.owners.check_pod)
            await self.cni.start()
            self.server.resolve_owner = self.owners.resolve
            self.inventory = Inventory(cfg, registry, self._devices_changed)
            await self.inventory.rescan(strict=True)
            for pool in cfg.pools:
                backend = PoolBackend(cfg, pool, registry, self.inventory, self.owners)
                plugin = PluginServer(cfg.resource_name(pool), f"afxdp-{pool.name}.sock",
                                      cfg.device_plugins_dir, backend,
                                      supervise_interval=self.supervise_interval)
                self.plugins[pool.name] = plugin
                await plugin.start()
            await self.inventory.start()
            self.owners.start()
            if cfg.control_socket is not None:
                self._control = ControlServer(cfg.control_socket)
                self._control.register("status", self._status_op)
                await self._control.start()
            if cfg.metrics_address:
                self.http = HealthServer(cfg.metrics_address, self.server.metrics, self.ready)
                await self.http.start()
        except BaseException:
            await self.stop()
            raise
        self._report_ready()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        await run_until_signal(self.start, self.stop, self._stop)


    def ready(self) -> tuple[bool, str]:
        """Ready: started, and every pool registered with kubelet."""
        if not self._started:
            return False, "starting"
        waiting = [n for n, p in self.plugins.items() if not p.registered]
        return (not waiting), f"not registered with kubelet: {', '.join(waiting)}"

    async def stop(self) -> None:
        self._started = False
        if self.http is not None:
            await self.http.close()
            self.http = None
        for plugin in self.plugins.values():
            await plugin.stop()
        self.plugins.clear()
        if self.inventory is not None:
            await self.inventory.stop()
        if self.owners is not None:
            await self.owners.stop()
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self.cni is not None:
            await self.cni.close()
            self.cni = None
        await self.server.drain(DRAIN_SECONDS)  # let handshakes in flight finish
        if self.registry is not None:
            await self.registry.shutdown(release=False)
        self.server.close()
        if self.cfg.ready_file is not None:
            self.cfg.ready_file.unlink(missing_ok=True)
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    async def _devices_changed(self, pools: set[str]) -> None:
        for name in pools:
            plugin = self.plugins.get(name)
            if plugin is not None:
                await plugin.notify()

    def status(self) -> dict[str, Any]:
        inv = self.inventory
        return {
            "pid": os.getpid(),
            "node": self.cfg.node_name,
            "hostname": socket.gethostname(),
            "pools": {name: {"resource": self.cfg.resource_name(self.cfg.pool(name)),
                             "registered": plugin.registered,
                             "devices": {d: {"healthy": st.healthy, "reason": st.reason}
                                         for d, st in (inv.pools[name].items() if inv else [])}}
                      for name, plugin in self.plugins.items()},
            "allocations": [a.describe() for a in (self.registry.allocations.values()
                                                   if self.registry else [])],
            "server": self.server.stats(),
            "http": self.http.address if self.http else None,
        }

    async def _status_op(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    def _report_ready(self) -> None:
        self._started = True
        report_ready(self.cfg.ready_file, self.status())
        log.info("event=ready node=%s pools=%s", self.cfg.node_name,
                 ",".join(f"{n}:{len(self.inventory.pools[n]) if self.inventory else 0}"
                          for n in self.plugins))


def resolve_virtual(cfg: PluginConfig) -> None:
    """Settle each virtual pool's pair kind for this kernel (auto: netkit, else veth).

    Raises ConfigError when a pool asks for netkit and the kernel has none.
    """
    for i, pool in enumerate(cfg.pools):
        if pool.virtual is None:
            continue
        try:
            kind = resolve_kind(pool.virtual.kind)
        except VirtualError as e:
            raise ConfigError(f"pools[{i}].virtual.kind: {e}") from e
        pool.virtual = replace(pool.virtual, kind=kind)
        bridge = pool.virtual.bridge
        if bridge and not socket_if_exists(bridge):
            log.warning("event=virtual_bridge_missing pool=%s bridge=%s effect=%r", pool.name,
                        bridge, "CNI ADD fails until the bridge exists")
        log.info("event=virtual_pool pool=%s kind=%s count=%d bridge=%s", pool.name, kind,
                 pool.virtual.count, bridge or "-")


def socket_if_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def verify_programs(cfg: PluginConfig) -> None:
    """Load and attach each pool's custom program on a scratch veth, then remove it.

    Raises BpfError naming the pool, with libbpf's (and the verifier's) messages.
    """
    pools = [p for p in cfg.pools if p.program is not None]
    if not pools:
        return
    scratch = f"afxdpchk{os.getpid() % 100000}"
    with IPRoute() as ipr:
        # A veth pair: every kernel with XDP has veth (not every one has dummy).
        ipr.link("add", ifname=scratch, kind="veth", peer=f"{scratch}p")
        try:
            ipr.link("set", index=ipr.link_lookup(ifname=scratch)[0], state="up")
            for pool in pools:
                spec = pool.program
                assert spec is not None
                try:
                    verify(spec, scratch, map_keys_from(pool.program_map_keys))
                except BpfError as e:
                    raise BpfError(f"pool {pool.name}: program {spec.name!r} from "
                                   f"{spec.origin} cannot be used: {e}") from e
                kind, _, where = spec.origin.partition(" ")  # "object PATH" / "source PATH"
                log.info(f"event=program_verified pool=%s {kind}=%s program=%s", pool.name,
                         where, spec.name)
        finally:
            ipr.link("del", ifname=scratch)  # takes its peer along
