"""Kubernetes-mode configuration (``afxdp daemon --config FILE``): typed, validated at load.

Every error names the field path and the bad value, e.g.
``pools[1].devices[0]: 'eth[' is not a valid regular expression``.
Per-node overrides (``pools[].nodes.<node-name>``) are merged into the pool for
the node the daemon runs on before validation.  See docs/kubernetes.md.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bpf.program import PROGRAM_NAME, ProgramSpec, XdpMode
from cni_server.config import (
    NODE_SETTINGS,
    ConfigError,
    NodeSettings,
    Setting,
    check_known,
    choice,
    int_in,
    parse_mode,
    read_settings,
    read_yaml,
    seconds,
    umem_limit,
)
from cni_server.config import boolean as _bool
from cni_server.config import number as _number
from cni_server.config import path as _path
from cni_server.protocol import DEFAULT_UMEM_LIMIT
from plugin.virtual import host_end

_POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_PCI = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_MAC = re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}")
PIN_MODES = ("socket", "pin", "both")


@dataclass
class PoolConfig:
    name: str
    devices: list[re.Pattern[str]] = field(default_factory=list)
    drivers: list[str] = field(default_factory=list)
    pci_addresses: list[str] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    exclude: list[re.Pattern[str]] = field(default_factory=list)
    exclude_addressed: bool = False
    xdp_mode: XdpMode = XdpMode.AUTO
    pin_map: str = "socket"  # socket | pin | both
    uds_idle_timeout: float = 30.0
    uid: int = 0
    gid: int = 0
    socket_mode: int = 0o660
    queues: int = 0  # 0: every queue the netdev has
    # A custom XDP program instead of ours: a compiled BPF object or C source
    # (bcc) and the program's name in it (it must use an XSKMAP named xsks_map).
    program: ProgramSpec | None = None
    program_map_keys: dict[str, list[int]] = field(default_factory=dict)
    virtual: VirtualConfig | None = None
    # /xsk_socket may hand out unbound AF_XDP sockets (see docs/security.md)
    allow_unbound_xsk: bool = False
    max_umem_bytes: int = DEFAULT_UMEM_LIMIT  # per /xsk_bound_socket
    # Pods get the pool's netdevs through the CNI plugin: hand out nothing of an
    # allocation until CNI ADD has moved its netdev into the pod.
    move_with_cni: bool = False
    # Keep a fresh program attached to every free, healthy netdev of the pool, for
    # the next Allocate to take (the kernel's attach is off kubelet's call).
    attach_ahead: bool = False

    @property
    def program_name(self) -> str:
        return self.program.name if self.program else PROGRAM_NAME

    def env_name(self) -> str:
        """AFXDP_DEVICES_<POOL>: the pool name upper-cased, other characters as '_'."""
        return "AFXDP_DEVICES_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper())


@dataclass
class PluginConfig(NodeSettings):
    pools: list[PoolConfig] = field(default_factory=list)
    resource_prefix: str = "afxdp"
    node_name: str = ""
    state_dir: Path = Path("/var/lib/afxdp")
    socket_root: Path = Path("/var/run/afxdp/sockets")
    bpffs_root: Path = Path("/sys/fs/bpf/afxdp")
    device_plugins_dir: Path = Path("/var/lib/kubelet/device-plugins")
    pod_resources_socket: Path = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    cni_socket: Path = Path("/run/afxdp/cni.sock")
    # /metrics, /healthz, /readyz; "": off.  Loopback unless told otherwise: the
    # DaemonSet passes the node's address (--metrics-address) for probes and scraping.
    metrics_address: str = "127.0.0.1:9402"
    gc_interval: float = 30.0
    gc_grace: float = 300.0  # an allocation no pod claims is released after this long
    rescan_interval: float = 60.0  # full dumps; events keep the view current in between
    # How often the device plugin checks its socket and kubelet's as a safety net;
    # inotify on the plugins directory reports a kubelet restart at once.
    kubelet_check_interval: float = 10.0
    # Fresh XDP programs kept attached to placeholders so that an Allocate's attach
    # waits for no grace period (cni_server.warm); 0: off.
    warm_programs: int = 2

    def resource_name(self, pool: PoolConfig) -> str:
        return f"{self.resource_prefix}/{pool.name}"

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.pools if p.name == name)


_PROG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_POOL = {
    "name", "devices", "drivers", "pciAddresses", "macs", "exclude", "excludeAddressed",
    "xdpMode", "pinMap", "udsIdleTimeout", "uid", "gid", "socketMode", "queues", "nodes",
    "program", "virtual", "allowUnboundXsk", "maxUmemBytes", "moveWithCni", "attachAhead",
}
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
VIRTUAL_KINDS = ("auto", "veth", "netkit")


@dataclass(frozen=True)
class VirtualConfig:
    """``virtual: {count, kind, bridge, prefix}``: devices the daemon creates itself.

    Device i is a pair: ``<prefix><i>``, the end the pod gets, and
    ``<prefix><i>h``, the end that stays on the node (enslaved to ``bridge``
    while the pod runs, if one is named).
    """

    count: int
    kind: str = "auto"  # auto: netkit where the kernel has it, else veth
    bridge: str = ""
    prefix: str = ""

    def names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]

    def all_names(self) -> set[str]:
        """Both ends of every device: no other pool may take these."""
        return {n for name in self.names() for n in (name, host_end(name))}


def _str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {value!r} is not a list of non-empty strings")
    return list(value)


def _patterns(value: object, where: str) -> list[re.Pattern[str]]:
    out = []
    for i, text in enumerate(_str_list(value, where)):
        try:
            out.append(re.compile(text))
        except re.error as e:
            raise ConfigError(f"{where}[{i}]: {text!r} is not a valid regular expression ({e})"
                              ) from None
    return out


def _pool(raw: object, where: str, node: str) -> PoolConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    for key in raw:
        if key not in _POOL:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(_POOL))})")
    nodes = raw.get("nodes") or {}
    if not isinstance(nodes, dict):
        raise ConfigError(f"{where}.nodes: must map node names to pool settings")
    merged = dict(raw)
    merged.pop("nodes", None)
    override = nodes.get(node)
    if override is not None:
        if not isinstance(override, dict):
            raise ConfigError(f"{where}.nodes.{node}: must be a mapping of pool settings")
        for key in override:
            if key not in _POOL or key in ("name", "nodes"):
                raise ConfigError(f"{where}.nodes.{node}.{key}: cannot be overridden per node")
        merged.update(override)
    name = merged.get("name")
    if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: {name!r} is not a valid pool name "
                          "(lower-case letters, digits and '-', at most 63)")
    pool = PoolConfig(name=name)
    for key, value in merged.items():
        at = f"{where}.{key}"
        if key == "devices":
            pool.devices = _patterns(value, at)
        elif key == "exclude":
            pool.exclude = _patterns(value, at)
        elif key == "drivers":
            pool.drivers = _str_list(value, at)
        elif key == "pciAddresses":
            pool.pci_addresses = [a.lower() for a in _str_list(value, at)]
            for i, a in enumerate(pool.pci_addresses):
                if not _PCI.fullmatch(a):
                    raise ConfigError(f"{at}[{i}]: {a!r} is not a PCI address like 0000:3b:00.1")
        elif key == "macs":
            pool.macs = [m.lower() for m in _str_list(value, at)]
            for i, m in enumerate(pool.macs):
                if not _MAC.fullmatch(m):
                    raise ConfigError(f"{at}[{i}]: {m!r} is not a MAC address")
        elif key == "excludeAddressed":
            pool.exclude_addressed = _bool(value, at)
        elif key == "xdpMode":
            try:
                pool.xdp_mode = XdpMode(value)
            except ValueError:
                raise ConfigError(f"{at}: {value!r} is not one of auto, native, skb") from None
        elif key == "pinMap":
            pool.pin_map = choice(value, at, PIN_MODES)
        elif key == "udsIdleTimeout":
            pool.uds_idle_timeout = float(_number(value, at, above=True))
        elif key in ("uid", "gid"):
            setattr(pool, key, _number(value, at, integer=True))
        elif key == "socketMode":
            pool.socket_mode = parse_mode(value, at)
        elif key == "queues":
            pool.queues = _number(value, at, integer=True)
        elif key == "program":
            pool.program, pool.program_map_keys = _program(value, at)
        elif key == "virtual":
            pool.virtual = _virtual(value, at, name)
        elif key == "allowUnboundXsk":
            pool.allow_unbound_xsk = _bool(value, at)
        elif key == "moveWithCni":
            pool.move_with_cni = _bool(value, at)
        elif key == "attachAhead":
            pool.attach_ahead = _bool(value, at)
        elif key == "maxUmemBytes":
            pool.max_umem_bytes = umem_limit(value, at)
    selectors = pool.devices or pool.drivers or pool.pci_addresses or pool.macs
    if pool.virtual is not None and selectors:
        raise ConfigError(f"{where}: a virtual pool creates its devices: it takes no devices, "
                          "drivers, pciAddresses or macs")
    if pool.virtual is None and not selectors:
        raise ConfigError(f"{where}: selects nothing: give devices, drivers, pciAddresses or macs "
                          "(or virtual)")
    if pool.virtual is not None and pool.attach_ahead:
        raise ConfigError(f"{where}.attachAhead: a virtual pool's devices are created at "
                          "Allocate: there is nothing to attach to ahead")
    return pool


def _virtual(value: object, where: str, pool: str) -> VirtualConfig:
    """``virtual: {count: 4, kind: auto|veth|netkit, bridge: br0, prefix: vx}``."""
    known = ("bridge", "count", "kind", "prefix")
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with count")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(known)})")
    count = value.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        raise ConfigError(f"{where}.count: {count!r} is not a device count from 1 to 1024")
    kind = choice(value.get("kind", "auto"), f"{where}.kind", VIRTUAL_KINDS)
    bridge = value.get("bridge") or ""
    if not isinstance(bridge, str) or (bridge and not _IFNAME.fullmatch(bridge)):
        raise ConfigError(f"{where}.bridge: {bridge!r} is not an interface name")
    prefix = value.get("prefix", re.sub(r"[^a-z0-9]", "", pool)[:8] + "v")
    longest = f"{prefix}{count - 1}h"
    if not isinstance(prefix, str) or not _IFNAME.fullmatch(longest):
        raise ConfigError(f"{where}.prefix: {prefix!r} does not make interface names "
                          f"(like {longest!r}: letters, digits, '_.-', at most 15)")
    return VirtualConfig(count, kind, bridge, prefix)


def _program(value: object, where: str) -> tuple[ProgramSpec, dict[str, list[int]]]:
    """``program: {object: /path/prog.bpf.o | source: /path/prog.c, name: prog_fn,
    mapKeys: {map: [1, 2]}, kernelHeaders: /path}``."""
    known = ("kernelHeaders", "mapKeys", "name", "object", "source")
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with object (or source) and name")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(known)})")
    if ("object" in value) == ("source" in value):
        raise ConfigError(f"{where}: give either object (a compiled BPF object) or source "
                          "(C compiled by bcc), not both or neither")
    paths: dict[str, Path] = {}
    for key, what in (("object", "a BPF object"), ("source", "a C source file"),
                      ("kernelHeaders", "a kernel header tree")):
        if key in value:
            text = value[key]
            if not isinstance(text, str) or not text.startswith("/"):
                raise ConfigError(f"{where}.{key}: {text!r} is not an absolute path to {what}")
            paths[key] = Path(text)
    if "kernelHeaders" in paths and "source" not in paths:
        raise ConfigError(f"{where}.kernelHeaders: only programs from source (bcc) use it")
    name = value.get("name")
    if not isinstance(name, str) or not _PROG_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: {name!r} is not a BPF program (function) name")
    spec = ProgramSpec(name, paths.get("object"), paths.get("source"), paths.get("kernelHeaders"))
    keys = value.get("mapKeys", {})
    if not isinstance(keys, dict):
        raise ConfigError(f"{where}.mapKeys: must map map names to lists of integers")
    for map_name, ints in keys.items():
        at = f"{where}.mapKeys.{map_name}"
        if not isinstance(map_name, str) or not _PROG_NAME.fullmatch(map_name):
            raise ConfigError(f"{at}: {map_name!r} is not a BPF map name")
        if not isinstance(ints, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise ConfigError(f"{at}: must be a list of non-negative integers")
    return spec, {str(m): list(k) for m, k in keys.items()}


def resource_prefix(value: object, where: str) -> str:
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.fullmatch(value) or len(value) > 253:
        raise ConfigError(f"{where}: {value!r} is not a DNS subdomain")
    return value


# The node daemon's keys, then Kubernetes mode's (pools and nodeName are read first).
PLUGIN_SETTINGS: tuple[Setting, ...] = (
    *NODE_SETTINGS,
    Setting("pools", None),
    Setting("nodeName", None),
    Setting("resourcePrefix", resource_prefix),
    Setting("stateDir", _path),
    Setting("socketRoot", _path),
    Setting("bpffsRoot", _path),
    Setting("devicePluginsDir", _path),
    Setting("podResourcesSocket", _path),
    Setting("cniSocket", _path),
    Setting("gcInterval", seconds),
    Setting("gcGrace", seconds),
    Setting("rescanInterval", seconds),
    Setting("kubeletCheckInterval", seconds),
    Setting("warmPrograms", lambda v, w: warm_programs(v, w)),
)


MAX_WARM_PROGRAMS = 16  # each holds a slot of the kernel's dispatcher (48 node-wide)


def warm_programs(value: object, where: str) -> int:
    """``warmPrograms``: 0 (off) to MAX_WARM_PROGRAMS."""
    return int_in(value, where, 0, MAX_WARM_PROGRAMS, "programs", "; 0 turns it off")


def validate(raw: object, *, node_name: str | None = None) -> PluginConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping")
    check_known(raw, PLUGIN_SETTINGS)
    node = node_name or raw.get("nodeName") or os.environ.get("NODE_NAME") or socket.gethostname()
    if not isinstance(node, str) or not node:
        raise ConfigError(f"nodeName: {node!r} is not a node name")
    pools_raw = raw.get("pools")
    if not isinstance(pools_raw, list) or not pools_raw:
        raise ConfigError("pools: must be a non-empty list")
    pools = [_pool(p, f"pools[{i}]", node) for i, p in enumerate(pools_raw)]
    seen: dict[str, int] = {}
    for i, p in enumerate(pools):
        if p.name in seen:
            raise ConfigError(f"pools[{i}].name: {p.name!r} is already pools[{seen[p.name]}]")
        seen[p.name] = i
    _check_literal_overlap(pools)
    cfg = PluginConfig(pools=pools, node_name=node)
    read_settings(cfg, raw, PLUGIN_SETTINGS)
    return cfg


def _check_literal_overlap(pools: list[PoolConfig]) -> None:
    """A netdev named literally in two pools is an error at load (regex overlaps are
    found at discovery, where the daemon refuses to start)."""
    owner: dict[str, tuple[int, str]] = {}
    for i, p in enumerate(pools):
        for j, pat in enumerate(p.devices):
            if re.fullmatch(r"[\w.-]+", pat.pattern):
                if pat.pattern in owner and owner[pat.pattern][1] != p.name:
                    k, other = owner[pat.pattern]
                    raise ConfigError(f"pools[{i}].devices[{j}]: {pat.pattern!r} is already in "
                                      f"pools[{k}] ({other}); a netdev belongs to one pool")
                owner[pat.pattern] = (i, p.name)


def load(path: Path, *, node_name: str | None = None) -> PluginConfig:
    return validate(read_yaml(path), node_name=node_name)
