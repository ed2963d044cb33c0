"""The AF_XDP device-plugin backend for one pool: devices, Allocate, preferred allocation.

Allocate (per container) creates one allocation in the registry with its own
host directory ``<socketRoot>/<id>/`` and a socket per device, serving before
it returns, and answers:

- mounts: ``<socketRoot>/<id>/<netdev>`` at ``/tmp/afxdp_dp/<netdev>`` (where
  DPDK looks for ``afxdp.sock`` by default); with ``pinMap: pin`` the bpffs
  directory holding the pinned map instead; with ``pinMap: both`` also the
  pinned map at ``/tmp/afxdp_dp/<netdev>/xsks_map``.  Read-only: a Unix socket
  can be connected to, and a pinned map opened, through a read-only bind mount.
- env ``AFXDP_DEVICES_<POOL>`` (names) and ``AFXDP_DEVICES_<POOL>_INFO`` (JSON).

A request naming an unknown or unhealthy device fails with a gRPC error that
says which; a failure for one container rolls back the others of the request.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from cni_server.allocation import Allocation
from cni_server.registry import Registry
from cni_server.spec import AllocationSpec
from plugin.api import deviceplugin_v1beta1_pb2 as pb
from plugin.config import PluginConfig, PoolConfig
from plugin.devhealth import DeviceState
from plugin.deviceplugin import HEALTHY, UNHEALTHY, AllocateError
from plugin.inventory import Inventory
from plugin.owners import Owners

log = logging.getLogger(__name__)
CONTAINER_DIR = Path("/tmp/afxdp_dp")  # DPDK's default dp_path root


class PoolBackend:
    def __init__(self, cfg: PluginConfig, pool: PoolConfig, registry: Registry,
                 inventory: Inventory, owners: Owners | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.registry = registry
        self.inventory = inventory
        self.owners = owners
        self.resource = cfg.resource_name(pool)

    def states(self) -> dict[str, DeviceState]:
        return self.inventory.pools[self.pool.name]

    def devices(self) -> list[pb.Device]:
        out = []
        for name, st in sorted(self.states().items()):
            dev = pb.Device(ID=name, health=HEALTHY if st.healthy else UNHEALTHY)
            if st.numa_node is not None:
                dev.topology.nodes.append(pb.NUMANode(ID=st.numa_node))
            out.append(dev)
        return out

    # -- Allocate ----------------------------------------------------------------

    async def allocate(self, requests: list[pb.ContainerAllocateRequest]
                       ) -> list[pb.ContainerAllocateResponse]:
        for req in requests:  # validate all before changing anything
            self._check(list(req.devices_ids))
        created: list[str] = []
        try:
            responses = []
            for req in requests:
                reused = self._reusable(list(req.devices_ids))
                if reused is not None:
                    responses.append(self._response(reused))
                    continue
                allocation = await self._create(list(req.devices_ids))
                created.append(allocation.id)
                responses.append(self._response(allocation))
        except BaseException:
            for allocation_id in reversed(created):
                await self.registry.release(allocation_id)
            raise
        return responses

    def _reusable(self, ids: list[str]) -> Allocation | None:
        """An allocation of exactly these devices that no pod has taken into its
        netns yet: the same pod's next container (kubelet allocates each container
        at admission, init containers first, and gives an init container's devices
        to the app containers).  It is answered as it is, so every container mounts
        the same directory; releasing it would pull the mount from under the init
        container.  Once CNI has moved a device, a new Allocate of it means its
        pod is gone and the allocation is replaced."""
        allocation = self.registry.by_netdev(ids[0]) if ids else None
        if allocation is None or set(allocation.netdevs) != set(ids):
            return None
        if self.registry.spec(allocation.id).attached:
            return None
        log.info("event=allocation_reused id=%s netdevs=%s reason=%r", allocation.id,
                 ",".join(ids), "another container of the pod (device reuse)")
        return allocation

    def _check(self, ids: list[str]) -> None:
        if not ids:
            raise AllocateError(grpc.StatusCode.INVALID_ARGUMENT, "no device requested")
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise AllocateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"device(s) {', '.join(dupes)} requested twice")
        states = self.states()
        for i in ids:
            st = states.get(i)
            if st is None:
                raise AllocateError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"unknown device {i!r}: not in pool {self.pool.name} "
                                    f"({self.resource}) on node {self.cfg.node_name}")
            if not st.healthy:
                raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"device {i!r} is unhealthy: {st.reason}")

    async def _create(self, ids: list[str]) -> Allocation:
        for netdev in ids:
            old = self.registry.by_netdev(netdev)
            if old is not None:
                # kubelet only hands out free devices: the old pod is gone.
                log.warning("event=allocation_replaced id=%s owner=%s netdev=%s", old.id,
                            old.owner or "-", netdev)
                await self.registry.release(old.id)
        pool = self.pool
        allocation_id = f"{pool.name}-{uuid.uuid4().hex[:12]}"
        spec = AllocationSpec(
            id=allocation_id, netdevs=tuple(ids), hostnames=frozenset(),
            socket_base=self.cfg.socket_root / allocation_id, own_socket_base=True,
            pin_base=self.cfg.bpffs_root / allocation_id if pool.pin_map != "socket" else None,
            serve_socket=pool.pin_map != "pin", pin_placeholder=pool.pin_map == "both",
            xdp_mode=pool.xdp_mode.value, queues=pool.queues, uid=pool.uid, gid=pool.gid,
            mode=pool.socket_mode, check_peer_netns=self.cfg.check_peer_netns, pool=pool.name,
            idle_timeout=pool.uds_idle_timeout,
            allow_unbound_xsk=pool.allow_unbound_xsk, umem_limit=pool.max_umem_bytes,
            await_cni=pool.move_with_cni or pool.virtual is not None,
            **program_fields(pool),
            virtual_kind=pool.virtual.kind if pool.virtual else "",
            virtual_bridge=pool.virtual.bridge if pool.virtual else "",
        )
        allocation = await self.registry.create(spec)
        if self.owners is not None:
            self.owners.allocated(allocation_id)
        return allocation

    def _response(self, allocation: Allocation) -> pb.ContainerAllocateResponse:
        spec = self.registry.spec(allocation.id)
        resp = pb.ContainerAllocateResponse()
        info: dict[str, dict[str, object]] = {}
        for name, dev in allocation.netdevs.items():
            inside = CONTAINER_DIR / name
            host = spec.socket_dir(name) if spec.serve_socket else (dev.pin.parent if dev.pin
                                                                   else spec.socket_dir(name))
            resp.mounts.append(pb.Mount(container_path=str(inside), host_path=str(host),
                                        read_only=True))
            if spec.serve_socket and spec.pin_placeholder and dev.pin is not None:
                resp.mounts.append(pb.Mount(container_path=str(inside / "xsks_map"),
                                            host_path=str(dev.pin), read_only=True))
            info[name] = {
                "socket": str(inside / "afxdp.sock") if spec.serve_socket else None,
                "pinnedMap": str(inside / "xsks_map") if dev.pin is not None else None,
                "queues": dev.queue_count,
                "mode": dev.program.mode,
            }
        env = self.pool.env_name()
        resp.envs[env] = " ".join(allocation.netdevs)
        resp.envs[env + "_INFO"] = json.dumps(info, sort_keys=True)
        resp.annotations[f"{self.cfg.resource_prefix}/allocation"] = allocation.id
        return resp

    # -- GetPreferredAllocation ------------------------------------------------------

    def preferred(self, req: pb.ContainerPreferredAllocationRequest) -> list[str]:
        """``must_include`` first, then devices on the same NUMA node and the same NIC."""
        states = self.states()
        size = req.allocation_size
        chosen = list(req.must_include_deviceIDs)[:size]
        pool = [d for d in req.available_deviceIDs if d not in chosen]

        def attr(dev: str, what: str) -> object:
            st = states.get(dev)
            return getattr(st, what) if st is not None else None

        while len(chosen) < size and pool:
            anchor = chosen or pool
            numa = Counter(attr(d, "numa_node") for d in anchor).most_common(1)[0][0]
            nic = Counter(attr(d, "nic") for d in anchor).most_common(1)[0][0]
            pool.sort(key=lambda d: (attr(d, "numa_node") != numa,
                                     not nic or attr(d, "nic") != nic, d))
            chosen.append(pool.pop(0))
        return chosen


def program_fields(pool: PoolConfig) -> dict[str, Any]:
    """The pool's custom program, as AllocationSpec records it ("" for ours)."""
    spec = pool.program
    if spec is None:
        return {}
    return {"program_object": str(spec.object_path or ""), "program_name": spec.name,
            "program_source": str(spec.source_path or ""),
            "program_kernel_headers": str(spec.kernel_headers or ""),
            "program_map_keys": dict(pool.program_map_keys)}


_NETNS_PATH = re.compile(r"/(var/)?run/netns/[A-Za-z0-9._-]+|/proc/[0-9]+/ns/net")


def restored_spec_check(cfg: PluginConfig) -> Callable[[AllocationSpec], AllocationSpec]:
    """Registry.restore's check: the state file is input like any other, so a
    record must be one this configuration could have produced (its pool, its id
    format, paths under socketRoot/bpffsRoot, netdev names the pool selects).
    Access (uid, gid, mode) and the program come from the configuration as it is
    now, not from the file."""
    def check(spec: AllocationSpec) -> AllocationSpec:
        pools = {p.name: p for p in cfg.pools}
        pool = pools.get(spec.pool)
        if pool is None:
            raise ValueError(f"pool: {spec.pool!r} is not a pool of this configuration")
        if not re.fullmatch(rf"{re.escape(pool.name)}-[0-9a-f]{{12}}", spec.id):
            raise ValueError(f"id: {spec.id!r} is not an allocation id of pool {pool.name}")
        if spec.socket_base != cfg.socket_root / spec.id or not spec.own_socket_base:
            raise ValueError(f"socket_base: {str(spec.socket_base)!r} is not "
                             f"{cfg.socket_root / spec.id} (socketRoot/<id>)")
        pin_base = cfg.bpffs_root / spec.id if pool.pin_map != "socket" else None
        if spec.pin_base != pin_base:
            raise ValueError(f"pin_base: {str(spec.pin_base)!r} is not {pin_base} for pool "
                             f"{pool.name} (pinMap {pool.pin_map})")
        for i, netdev in enumerate(spec.netdevs):
            if pool.virtual is not None:
                ok = netdev in pool.virtual.names()
            else:
                ok = not pool.devices or any(p.fullmatch(netdev) for p in pool.devices)
            if not ok:
                raise ValueError(f"netdevs[{i}]: {netdev!r} is not a device of pool {pool.name}")
        for netdev, record in spec.attached.items():
            if record.get("netns") and not _NETNS_PATH.fullmatch(record["netns"]):
                raise ValueError(f"attached.{netdev}.netns: {record['netns']!r} is not a "
                                 "network namespace path a runtime gives (/run/netns/NAME, "
                                 "/var/run/netns/NAME, /proc/PID/ns/net)")
        return replace(
            spec, uid=pool.uid, gid=pool.gid, mode=pool.socket_mode,
            allow_unbound_xsk=pool.allow_unbound_xsk, umem_limit=pool.max_umem_bytes,
            await_cni=pool.move_with_cni or pool.virtual is not None,
            serve_socket=pool.pin_map != "pin", pin_placeholder=pool.pin_map == "both",
            virtual_kind=pool.virtual.kind if pool.virtual else "",
            virtual_bridge=pool.virtual.bridge if pool.virtual else "",
            **{"program_object": "", "program_name": "", "program_source": "",
               "program_kernel_headers": "", "program_map_keys": {}, **program_fields(pool)})

    return check
