"""The Kubernetes front end: ``afxdp daemon --config FILE``.

The node daemon (``cni_server.node``) serving pools.  Start-up: restore
persisted allocations (same socket paths, adopted programs and maps, so running
pods keep working), scan the node's netdevs into pools, serve and register one
device-plugin resource per pool, then watch netlink, kubelet and PodResources.
SIGTERM/SIGINT: stop serving and registering, keep programs, pins and state for
the pods that use them and for the next start.
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
from cni_server.node import NodeDaemon
from cni_server.provision import NetdevFactory
from cni_server.safedir import ensure_dir
from cni_server.server import Limits
from cni_server.state import StateFile
from plugin.ahead import AttachAhead
from plugin.cniendpoint import CniEndpoint
from plugin.config import PluginConfig
from plugin.deviceplugin import PluginServer
from plugin.inventory import Inventory
from plugin.owners import Owners
from plugin.pool import PoolBackend, restored_spec_check
from plugin.virtual import VirtualDevices, VirtualError, resolve_kind

log = logging.getLogger(__name__)


def kubernetes_daemon(cfg: PluginConfig, *, supervise_interval: float | None = None
                      ) -> NodeDaemon:
    return NodeDaemon(cfg, KubernetesFront(cfg, supervise_interval=supervise_interval))


class KubernetesFront:
    mode = "kubernetes"
    release_on_stop = False  # pods keep their devices; the next start adopts them
    # Each allocation's program, map and listening socket and the daemon's own: the
    # default connection limit (4096) gives the 8192 fds it always had.
    fd_headroom = 4096
    force_replace = False

    def __init__(self, cfg: PluginConfig, *, supervise_interval: float | None = None) -> None:
        self.cfg = cfg
        self.warm_programs = cfg.warm_programs
        self.supervise_interval = (cfg.kubelet_check_interval if supervise_interval is None
                                   else supervise_interval)
        self.inventory: Inventory | None = None
        self.owners: Owners | None = None
        self.plugins: dict[str, PluginServer] = {}
        self.cni: CniEndpoint | None = None
        self.ahead: AttachAhead | None = None

    def claim_facts(self) -> dict[str, str]:
        return {"sockets": str(self.cfg.socket_root)}

    def idle_timeout(self) -> float:
        return Limits.idle_timeout  # each pool sets its own (udsIdleTimeout)

    async def prepare(self, node: NodeDaemon) -> None:
        cfg = self.cfg
        await asyncio.to_thread(verify_programs, cfg)
        await asyncio.to_thread(resolve_virtual, cfg)
        if any(p.pin_map != "socket" for p in cfg.pools):
            bpffs.ensure_bpffs(cfg.bpffs_root)  # stays mounted: pods' pins live there
            ensure_dir(cfg.bpffs_root, "bpffsRoot")
        ensure_dir(cfg.socket_root, "socketRoot")
        ensure_dir(cfg.state_dir, "stateDir", mode=0o700)

    def registry_parts(self) -> tuple[StateFile | None, NetdevFactory | None]:
        return StateFile(self.cfg.state_dir / "state.json"), VirtualDevices()

    async def start(self, node: NodeDaemon) -> None:
        cfg, registry = self.cfg, node.registry
        assert registry is not None
        restored, dropped = await registry.restore(restored_spec_check(cfg))
        log.info("event=state_restored allocations=%d dropped=%d", len(restored), len(dropped))
        self.owners = Owners(registry, cfg.pod_resources_socket,
                             {p.name: cfg.resource_name(p) for p in cfg.pools},
                             gc_interval=cfg.gc_interval, gc_grace=cfg.gc_grace)
        self.cni = CniEndpoint(cfg.cni_socket, registry, self.owners.check_pod)
        await self.cni.start()
        node.server.resolve_owner = self.owners.resolve
        self.ahead = AttachAhead(cfg, registry)
        self.inventory = Inventory(cfg, registry, self._devices_changed, self.ahead.update)
        self.ahead.start()
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

    async def stop(self, node: NodeDaemon) -> None:
        for plugin in self.plugins.values():
            await plugin.stop()
        self.plugins.clear()
        if self.inventory is not None:
            await self.inventory.stop()
        if self.ahead is not None:  # its programs were for Allocates to come
            await self.ahead.stop()
            self.ahead = None
        if self.owners is not None:
            await self.owners.stop()
        if self.cni is not None:
            await self.cni.close()
            self.cni = None

    async def cleanup(self, node: NodeDaemon) -> None:
        pass  # programs, pins, sockets and state stay for the pods and the next start

    def ready(self) -> tuple[bool, str]:
        """Ready once every pool is registered with kubelet."""
        waiting = [n for n, p in self.plugins.items() if not p.registered]
        return (not waiting), f"not registered with kubelet: {', '.join(waiting)}"

    async def _devices_changed(self, pools: set[str]) -> None:
        for name in pools:
            plugin = self.plugins.get(name)
            if plugin is not None:
                await plugin.notify()

    def status(self, node: NodeDaemon) -> dict[str, Any]:
        inv = self.inventory
        return {
            "node": self.cfg.node_name,
            "pools": {name: {"resource": self.cfg.resource_name(self.cfg.pool(name)),
                             "registered": plugin.registered,
                             "devices": {d: {"healthy": st.healthy, "reason": st.reason}
                                         for d, st in (inv.pools[name].items() if inv else [])}}
                      for name, plugin in self.plugins.items()},
        }

    def ready_line(self, node: NodeDaemon) -> str:
        return (f"node={self.cfg.node_name} pools=" +
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
