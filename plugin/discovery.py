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

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from bpf.errors import BpfError
from bpf.program import PROGRAM_NAME, kernel_name, prog_name
from cni_server import rtread
from plugin.config import PoolConfig

log = logging.getLogger(__name__)
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
SYSFS_NET = Path("/sys/class/net")


@dataclass(frozen=True, slots=True)
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

    def foreign_xdp(self, ours: str = PROGRAM_NAME) -> bool:
        """Carries an XDP program that is neither our default one nor ``ours`` (a pool's)."""
        return self.xdp_prog_id != 0 and self.xdp_prog_name not in (PROGRAM_NAME,
                                                                     kernel_name(ours))

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


@dataclass(frozen=True, slots=True)
class _Link:
    name: str
    ifindex: int
    mac: str
    kind: str
    flags: int
    operstate: str
    xdp_prog_id: int


def _link(msg: Any) -> _Link:
    if isinstance(msg, rtread.LinkEvent):
        return _Link(*msg["facts"])
    xdp = msg.get("xdp")
    return _Link(
        name=str(msg.get("ifname")), ifindex=int(msg["index"]),
        mac=str(msg.get("address") or "").lower(), kind=str(msg.get(("linkinfo", "kind")) or ""),
        flags=int(msg["flags"]), operstate=str(msg.get("operstate") or ""),
        xdp_prog_id=int((xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else 0) or 0),
    )


def _addr_key(msg: Any) -> tuple[int, str, int] | None:
    """Configured addresses only: link-local (scope 253) and host (254) ones come by themselves."""
    if int(msg["scope"]) >= 253:
        return None
    return int(msg["family"]), str(msg.get("address")), int(msg["prefixlen"])


def _default_key(msg: Any) -> tuple[int, int, int] | None:
    """A default route of the main table: (family, oif, metric)."""
    if msg["dst_len"] != 0 or int(msg.get("table") or 0) != 254:
        return None
    return int(msg["family"]), int(msg.get("oif") or 0), int(msg.get("priority") or 0)


PROC_NET = Path("/proc/thread-self/net")  # the calling thread's netns
_V6_SCOPES_NOT_KEPT = {"10", "20"}  # host, link (if_inet6's scope column, hex)
_RTF_REJECT = 0x0200  # the kernel's own "unreachable" entry of each table shows as ::/0


def _ipv6_worth_dumping() -> tuple[bool, bool]:
    """(any IPv6 address the view keeps, any IPv6 default route) in the calling
    thread's netns, from procfs: each True when there is one or procfs cannot tell.

    ``if_inet6`` lists every IPv6 address with its scope, and ``ipv6_route`` every
    IPv6 route of every table: none there means none in the dumps either."""
    try:
        addresses = (PROC_NET / "if_inet6").read_text()
        routes = (PROC_NET / "ipv6_route").read_text()
    except OSError:
        return True, True
    kept = any(len(f) >= 4 and f[3] not in _V6_SCOPES_NOT_KEPT
               for f in (line.split() for line in addresses.splitlines()))
    default = "0" * 32 + " 00 "
    defaults = any(len(f) >= 9 and not int(f[8], 16) & _RTF_REJECT
                   for f in (line.split() for line in routes.splitlines()
                             if line.startswith(default)))
    return kept, defaults


class NodeView:
    """Links, configured addresses and default routes of one netns.

    Built from one dump (:meth:`dump`, three rtnetlink requests whatever the
    number of links), then kept current by :meth:`apply` with each event, so a
    change costs one small message, not a dump of every link.  Changes go through
    :meth:`apply` only: it notes which links they touch, and :meth:`netdevs` works
    out those again, not every link.
    """

    def __init__(self) -> None:
        self.links: dict[int, _Link] = {}
        self.addrs: dict[int, set[tuple[int, str, int]]] = {}
        self.defaults: set[tuple[int, int, int]] = set()
        self._sysfs: dict[tuple[str, int], tuple[str, str, int | None]] = {}
        self._prog_names: dict[int, str] = {}
        # ifindex -> (the facts a Netdev was built from, that Netdev)
        self._built: dict[int, tuple[tuple[_Link, bool, bool], Netdev]] = {}
        self._netdevs: dict[str, Netdev] = {}  # what netdevs() returned last, kept current
        self._dirty: set[int] | None = None  # links to work out again; None: every link
        # The names whose Netdev changed, came or went between the last two calls of
        # netdevs() (None: not known, e.g. at the first call), and how many calls
        # there were (for a caller to tell whether another one came in between).
        self.changed: set[str] | None = None
        self.calls = 0

    @classmethod
    def dump(cls) -> NodeView:
        """A fresh view of the calling thread's netns (call it from a worker thread:
        it runs an event loop of its own).

        Streamed: each message is read into the view as it is parsed, not after the
        whole dump is.  pyroute2's synchronous API returns a dump as one tuple: with
        1,000 veth pairs that held ~410,000 parsed objects at once (the process grew
        by 57 MiB and kept most of it) and left them as cyclic garbage for a full
        collection; streamed, the young collections free them as they go (peak
        +12 MiB, 14,000 objects left)."""
        return asyncio.run(cls._dump())

    @classmethod
    async def _dump(cls) -> NodeView:
        view = cls()
        # IPv6 gives every link a link-local address and routes, none of which
        # the view keeps: parsing them (~0.2 ms each) was half of start-up with
        # 1,000 veth pairs.  Whether there is anything to keep is read from
        # procfs first; if there is, or procfs cannot tell, the dump is as before.
        v6_addresses, v6_defaults = _ipv6_worth_dumping()
        async with AsyncIPRoute() as ipr:
            async for facts in rtread.links(ipr):
                view.links[facts[1]] = _Link(*facts)
            async for msg in rtread.kept_addresses(ipr, 0 if v6_addresses else 2):
                key = _addr_key(msg)
                if key is not None:
                    view.addrs.setdefault(int(msg["index"]), set()).add(key)
            for family in (2, 10) if v6_defaults else (2,):
                async for msg in rtread.default_routes_of(ipr, family):
                    dkey = _default_key(msg)
                    if dkey is not None:
                        view.defaults.add(dkey)
        return view

    def apply(self, msg: Any) -> bool:
        """Apply one rtnetlink event; True if it may change what we report."""
        event = msg.get("event")
        if event == "RTM_NEWLINK":
            link = _link(msg)
            changed = self.links.get(link.ifindex) != link
            self.links[link.ifindex] = link
            return self._touched(link.ifindex, changed)
        if event == "RTM_DELLINK":
            ifindex = int(msg["index"])
            self.addrs.pop(ifindex, None)
            self.defaults = {d for d in self.defaults if d[1] != ifindex}
            return self._touched(ifindex, self.links.pop(ifindex, None) is not None)
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            key = _addr_key(msg)
            if key is None:
                return False
            ifindex = int(msg["index"])
            addrs = self.addrs.setdefault(ifindex, set())
            before = bool(addrs)
            (addrs.add if event == "RTM_NEWADDR" else addrs.discard)(key)
            return self._touched(ifindex, before != bool(addrs))
        if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            dkey = _default_key(msg)
            if dkey is None:
                return False
            (self.defaults.add if event == "RTM_NEWROUTE" else self.defaults.discard)(dkey)
            return self._touched(dkey[1], True)
        return False

    def _touched(self, ifindex: int, changed: bool) -> bool:
        if changed and self._dirty is not None:
            self._dirty.add(ifindex)
        return changed

    def inherit_caches(self, older: NodeView) -> None:
        """Keep what never changes for a given link or program across dumps."""
        self._sysfs = {k: v for k, v in older._sysfs.items()
                       if k[1] in self.links and self.links[k[1]].name == k[0]}
        self._prog_names = dict(older._prog_names)
        self._built = dict(older._built)  # checked against each link's facts on use

    def _prog_name(self, prog_id: int) -> str:
        if prog_id not in self._prog_names:
            with contextlib.suppress(BpfError):
                self._prog_names[prog_id] = prog_name(prog_id)
        return self._prog_names.get(prog_id, "")

    def netdevs(self) -> dict[str, Netdev]:
        """Every link, by name, with its sysfs facts (cached per name and ifindex).

        Only the links :meth:`apply` touched since the last call are worked out
        again (every link at the first call), and one whose facts did not change
        keeps its Netdev: an event about one link of 1,000 rebuilds one.
        :attr:`changed` then names what changed since the last call."""
        default = {d[1] for d in self.defaults}
        if self._dirty is None:
            built: dict[int, tuple[tuple[_Link, bool, bool], Netdev]] = {}
            out: dict[str, Netdev] = {}
            for link in self.links.values():
                built[link.ifindex] = self._build(link, default)
                out[link.name] = built[link.ifindex][1]
            self._built, self._netdevs, self.changed = built, out, None
        else:
            changed: set[str] = set()
            for ifindex in self._dirty:
                old = self._built.pop(ifindex, None)
                if old is not None and self._netdevs.get(old[1].name) is old[1]:
                    del self._netdevs[old[1].name]  # (unless a renamed link took the name)
                    changed.add(old[1].name)
                now = self.links.get(ifindex)
                if now is not None:
                    entry = self._built[ifindex] = self._build(now, default, old)
                    self._netdevs[now.name] = entry[1]
                    if old is None or entry[1] is not old[1]:
                        changed.add(now.name)
                    else:
                        changed.discard(now.name)  # put back as it was
            self.changed = changed
        self._dirty = set()
        self.calls += 1
        return dict(self._netdevs)

    def _build(self, link: _Link, default: set[int],
               old: tuple[tuple[_Link, bool, bool], Netdev] | None = None
               ) -> tuple[tuple[_Link, bool, bool], Netdev]:
        """(facts, Netdev) of ``link``: the one built before (``old``, else the last
        full call's) when its facts are the same."""
        facts = (link, bool(self.addrs.get(link.ifindex)), link.ifindex in default)
        old = old or self._built.get(link.ifindex)
        if old is not None and old[0] == facts:
            return old
        key = (link.name, link.ifindex)
        if key not in self._sysfs:
            self._sysfs[key] = _sysfs(link.name, link.ifindex)
        driver, pci, numa = self._sysfs[key]
        return facts, Netdev(
            name=link.name, ifindex=link.ifindex, mac=link.mac, kind=link.kind,
            driver=driver or link.kind, pci_address=pci, numa_node=numa,
            up=bool(link.flags & IFF_UP) and link.operstate in ("UP", "UNKNOWN"),
            addressed=facts[1], loopback=bool(link.flags & IFF_LOOPBACK),
            default_route=facts[2], xdp_prog_id=link.xdp_prog_id,
            xdp_prog_name=self._prog_name(link.xdp_prog_id) if link.xdp_prog_id else "",
        )


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
    if dev.foreign_xdp(pool.program_name):
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


# What classification decided for one netdev: the pool that selects it and why it
# is excluded from it ("" when offered), or the pools it is in conflict between,
# or None when no pool selects it.
Outcome = tuple[str, str] | list[str] | None


class Classifier:
    """Assigns netdevs to pools (:func:`classify`), remembering each netdev's outcome.

    A netdev's outcome depends only on its :class:`Netdev` and on the pool it is
    kept in, and :meth:`NodeView.netdevs` returns the same ``Netdev`` object for a
    link whose facts did not change: so after an event about one link of 1,000,
    one outcome is worked out again, not 1,000.  Told which netdevs changed
    (``NodeView.changed``), it does not even look at the others."""

    def __init__(self, pools: list[PoolConfig]) -> None:
        self.pools = pools
        self._virtual = {n: p.name for p in pools if p.virtual for n in p.virtual.all_names()}
        self._memo: dict[str, tuple[Netdev, str | None, Outcome]] = {}
        self._last: tuple[Classification, dict[str, str]] | None = None  # (result, its keep)

    def __call__(self, netdevs: dict[str, Netdev], keep: dict[str, str] | None = None,
                 changed: set[str] | None = None) -> Classification:
        """``keep`` (netdev -> pool) are allocated netdevs: they stay in their pool
        even when they now carry our program or an address a pod gave them.
        ``changed``: the names whose Netdev changed, came or went since the last
        call (None: not known; every netdev is looked at)."""
        keep = keep or {}
        if changed is None or self._last is None:
            c = self._classify_all(netdevs, keep)
        else:
            c = self._classify_changes(netdevs, keep, changed, *self._last)
        self._last = (c, dict(keep))
        return c

    def _classify_all(self, netdevs: dict[str, Netdev], keep: dict[str, str]
                      ) -> Classification:
        c = Classification({p.name: {} for p in self.pools}, {p.name: {} for p in self.pools})
        memo: dict[str, tuple[Netdev, str | None, Outcome]] = {}
        for name, dev in netdevs.items():
            kept = keep.get(name)
            outcome = self._remembered(self._memo.get(name), dev, kept)
            memo[name] = (dev, kept, outcome)
            _place(c, name, dev, outcome)
        self._memo = memo
        return c

    def _classify_changes(self, netdevs: dict[str, Netdev], keep: dict[str, str],
                          changed: set[str], last: Classification, last_keep: dict[str, str]
                          ) -> Classification:
        """The last classification with ``changed`` and the netdevs whose kept pool
        changed worked out again (the result is a new object: the last is not altered)."""
        dirty = set(changed)
        if keep != last_keep:
            dirty.update(name for name, _pool in keep.items() ^ last_keep.items())
        c = Classification({p: dict(m) for p, m in last.members.items()},
                           {p: dict(e) for p, e in last.excluded.items()}, dict(last.conflicts))
        for name in dirty:
            hit = self._memo.pop(name, None)
            if hit is not None:
                _unplace(c, name, hit[2])
            dev = netdevs.get(name)
            if dev is None:
                continue
            kept = keep.get(name)
            outcome = self._remembered(hit, dev, kept)
            self._memo[name] = (dev, kept, outcome)
            _place(c, name, dev, outcome)
        return c

    def _remembered(self, hit: tuple[Netdev, str | None, Outcome] | None, dev: Netdev,
                    kept: str | None) -> Outcome:
        """``hit``'s outcome if it was worked out for this very Netdev and kept pool."""
        if hit is not None and hit[0] is dev and hit[1] == kept:
            return hit[2]
        return self._outcome(dev, kept)

    def _outcome(self, dev: Netdev, kept: str | None) -> Outcome:
        if dev.name in self._virtual:  # both ends of a virtual pool's devices are that pool's
            pool_name = self._virtual[dev.name]
            return (pool_name, "") if kept == pool_name else None
        chosen = [p for p in self.pools if p.virtual is None and selects(p, dev)]
        if len(chosen) > 1:
            return [p.name for p in chosen]
        if not chosen:
            return None
        pool = chosen[0]
        return pool.name, "" if kept == pool.name else exclusion(pool, dev)


def _place(c: Classification, name: str, dev: Netdev, outcome: Outcome) -> None:
    if isinstance(outcome, list):
        c.conflicts[name] = outcome
    elif outcome is not None:
        pool, why = outcome
        if why:
            c.excluded[pool][name] = why
        else:
            c.members[pool][name] = dev


def _unplace(c: Classification, name: str, outcome: Outcome) -> None:
    if isinstance(outcome, list):
        c.conflicts.pop(name, None)
    elif outcome is not None:
        c.excluded[outcome[0]].pop(name, None)
        c.members[outcome[0]].pop(name, None)


def classify(netdevs: dict[str, Netdev], pools: list[PoolConfig],
             keep: dict[str, str] | None = None) -> Classification:
    """Assign netdevs to pools.  ``keep`` (netdev -> pool) are allocated netdevs: they stay
    in their pool even when they now carry our program or an address a pod gave them."""
    return Classifier(pools)(netdevs, keep)
