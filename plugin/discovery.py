"""Netdev discovery: what the node has, and which pool each netdev belongs to.

:func:`scan` reads the node's links with three rtnetlink dumps (links,
addresses, main-table routes), whatever their number, plus sysfs for the
driver, PCI address and NUMA node of devices that have one; it runs in the
calling thread's netns (call it from a worker thread).  :func:`classify` is
pure: pools' selectors and exclusion rules applied to a scan.

Selectors: every kind a pool gives (``devices`` regexes, ``drivers``,
``pciAddresses``, ``macs``) must match; within a kind, any entry may.
Exclusions (logged with the reason): loopback, the default-route interface, a
foreign XDP program (any program not named ``afxdp_redirect``), ``exclude``
regexes, and with ``excludeAddressed`` any netdev with an IP address.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from bpf.errors import BpfError
from bpf.program import PROGRAM_NAME
from bpf.program import query as xdp_query
from plugin.config import PoolConfig

log = logging.getLogger(__name__)
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
SYSFS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class Netdev:
    name: str
    ifindex: int
    mac: str
    kind: str  # rtnetlink link kind ("veth", ...); "" for physical devices
    driver: str  # sysfs driver name, else the link kind
    pci_address: str
    numa_node: int | None
    up: bool  # administratively up and operationally UP/UNKNOWN
    addressed: bool
    loopback: bool
    default_route: bool
    xdp_prog_id: int
    xdp_prog_name: str

    @property
    def foreign_xdp(self) -> bool:
        return self.xdp_prog_id != 0 and self.xdp_prog_name != PROGRAM_NAME

    @property
    def nic(self) -> str:
        """The physical device (PCI domain:bus:device without the function), or ''."""
        return self.pci_address.rsplit(".", 1)[0] if self.pci_address else ""


def _sysfs(name: str, ifindex: int) -> tuple[str, str, int | None]:
    """(driver, pci_address, numa_node) from sysfs, when sysfs shows this very link.

    In a process that entered another netns without remounting /sys, sysfs
    still shows the original namespace; the ifindex check avoids mixing them up.
    """
    base = SYSFS_NET / name
    try:
        if int((base / "ifindex").read_text()) != ifindex:
            return "", "", None
    except (OSError, ValueError):
        return "", "", None
    driver = pci = ""
    numa: int | None = None
    with contextlib.suppress(OSError):
        driver = os.path.basename(os.readlink(base / "device" / "driver"))
    with contextlib.suppress(OSError):
        if "/pci" in os.path.realpath(base / "device"):
            pci = os.path.basename(os.path.realpath(base / "device")).lower()
    with contextlib.suppress(OSError, ValueError):
        node = int((base / "device" / "numa_node").read_text())
        numa = node if node >= 0 else None
    return driver, pci, numa


def scan() -> dict[str, Netdev]:
    """Every link in this netns, by name."""
    with IPRoute() as ipr:
        links = list(ipr.get_links())
        # Link-local (scope 253) and host (254) addresses come by themselves; only
        # configured ones (universe 0, site 200) mean the netdev is in use.
        addressed = {int(a["index"]) for a in ipr.get_addr() if int(a["scope"]) < 253}
        default = {int(r.get("oif") or 0) for r in ipr.get_routes(table=254)
                   if r["dst_len"] == 0}
        default |= {int(r.get("oif") or 0) for r in ipr.get_routes(family=10, table=254)
                    if r["dst_len"] == 0}
    out: dict[str, Netdev] = {}
    for link in links:
        name = str(link.get("ifname"))
        ifindex = int(link["index"])
        xdp = link.get("xdp")
        prog_id = int((xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else 0) or 0)
        prog_name = ""
        if prog_id:
            with contextlib.suppress(BpfError):
                prog_name = xdp_query(ifindex).name
        kind = str(link.get(("linkinfo", "kind")) or "")
        driver, pci, numa = _sysfs(name, ifindex)
        flags = int(link["flags"])
        out[name] = Netdev(
            name=name, ifindex=ifindex, mac=str(link.get("address") or "").lower(), kind=kind,
            driver=driver or kind, pci_address=pci, numa_node=numa,
            up=bool(flags & IFF_UP) and link.get("operstate") in ("UP", "UNKNOWN"),
            addressed=ifindex in addressed, loopback=bool(flags & IFF_LOOPBACK),
            default_route=ifindex in default, xdp_prog_id=prog_id, xdp_prog_name=prog_name,
        )
    return out


def selects(pool: PoolConfig, dev: Netdev) -> bool:
    """Whether the pool's selectors pick ``dev`` (before exclusions)."""
    if pool.devices and not any(p.fullmatch(dev.name) for p in pool.devices):
        return False
    if pool.drivers and dev.driver not in pool.drivers:
        return False
    if pool.pci_addresses and dev.pci_address not in pool.pci_addresses:
        return False
    return not (pool.macs and dev.mac not in pool.macs)


def exclusion(pool: PoolConfig, dev: Netdev) -> str:
    """Why a selected netdev is not offered ('' when it is)."""
    if dev.loopback:
        return "loopback"
    if dev.default_route:
        return "carries the default route"
    if dev.foreign_xdp:
        return f"carries a foreign XDP program '{dev.xdp_prog_name or '?'}' (id {dev.xdp_prog_id})"
    if any(p.fullmatch(dev.name) for p in pool.exclude):
        return "matches exclude"
    if pool.exclude_addressed and dev.addressed:
        return "has an IP address (excludeAddressed)"
    return ""


@dataclass
class Classification:
    members: dict[str, dict[str, Netdev]] = field(default_factory=dict)  # pool -> name -> dev
    excluded: dict[str, dict[str, str]] = field(default_factory=dict)  # pool -> name -> why
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # netdev -> pools


def classify(netdevs: dict[str, Netdev], pools: list[PoolConfig],
             keep: dict[str, str] | None = None) -> Classification:
    """Assign netdevs to pools.  ``keep`` (netdev -> pool) are allocated netdevs: they stay
    in their pool even when they now carry our program or an address a pod gave them."""
    keep = keep or {}
    c = Classification({p.name: {} for p in pools}, {p.name: {} for p in pools})
    for dev in netdevs.values():
        chosen = [p for p in pools if selects(p, dev)]
        if len(chosen) > 1:
            c.conflicts[dev.name] = [p.name for p in chosen]
            continue
        if not chosen:
            continue
        pool = chosen[0]
        why = "" if keep.get(dev.name) == pool.name else exclusion(pool, dev)
        if why:
            c.excluded[pool.name][dev.name] = why
        else:
            c.members[pool.name][dev.name] = dev
    return c
