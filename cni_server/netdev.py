"""Facts about a netdev, read over rtnetlink (pyroute2) in the calling thread's netns.

pyroute2's synchronous API refuses to run inside a running event loop; call
these from a worker thread (``asyncio.to_thread`` or ``Netns.run_async``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class NetdevMissing(LookupError):
    """No netdev of that name in this network namespace."""


@dataclass(frozen=True)
class LinkInfo:
    name: str
    ifindex: int
    mac: str
    num_rx_queues: int
    num_tx_queues: int
    up: bool

    @property
    def queue_slots(self) -> int:
        """XSKMAP slots to cover every queue an AF_XDP socket may bind to.

        num_rx/tx_queues are the counts the driver allocated (its maximum), so
        they cover the current and any later combined channel count.
        """
        return max(self.num_rx_queues, self.num_tx_queues, 1)


def link_info(name: str) -> LinkInfo:
    """Look up ``name``; raises NetdevMissing when there is no such link here."""
    with IPRoute() as ipr:
        try:
            links = ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code == 19:  # ENODEV
                raise NetdevMissing(f"no netdev named {name!r} in this network namespace") from e
            raise
        link = links[0]
        return LinkInfo(
            name=link.get("ifname"),
            ifindex=int(link["index"]),
            mac=str(link.get("address") or ""),
            num_rx_queues=int(link.get("num_rx_queues") or 1),
            num_tx_queues=int(link.get("num_tx_queues") or 1),
            up=bool(link["flags"] & 1),
        )


def link_settings(name: str) -> dict[str, str]:
    """What CNI ADD changes and DEL gives back: admin state, MTU, MAC (as strings, the
    way an attachment record keeps them)."""
    with IPRoute() as ipr:
        try:
            link = ipr.link("get", ifname=name)[0]
        except NetlinkError as e:
            if e.code == 19:
                raise NetdevMissing(f"no netdev named {name!r} in this network namespace") from e
            raise
        return {"orig_up": "1" if link["flags"] & 1 else "0",
                "orig_mtu": str(link.get("mtu") or 0),
                "orig_mac": str(link.get("address") or "")}


def bring_home(ifname: str, orig: str, home_fd: int, settings: dict[str, str] | None = None
               ) -> None:
    """In a pod's netns: take ``ifname`` down, drop its addresses, give it back its
    original name, MTU and MAC (``settings``, from link_settings before ADD) and move
    it to the netns ``home_fd`` refers to.  Its admin state is given back there
    (set_up), since a move leaves a netdev down."""
    settings = settings or {}
    with IPRoute() as ipr:
        idx = link_info(ifname).ifindex
        ipr.link("set", index=idx, state="down")
        ipr.flush_addr(index=idx)
        if ifname != orig:
            ipr.link("set", index=idx, ifname=orig)
        mtu = int(settings.get("orig_mtu") or 0)
        if mtu:
            ipr.link("set", index=idx, mtu=mtu)
        if settings.get("orig_mac"):
            ipr.link("set", index=idx, address=settings["orig_mac"])
        ipr.link("set", index=idx, net_ns_fd=home_fd)


def set_up(name: str) -> None:
    """Administratively up (in the calling thread's netns)."""
    with IPRoute() as ipr:
        ipr.link("set", index=link_info(name).ifindex, state="up")
