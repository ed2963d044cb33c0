"""Facts about a netdev, read over rtnetlink (pyroute2) in the calling thread's netns.

pyroute2's synchronous API refuses to run inside a running event loop; call
these from a worker thread (``asyncio.to_thread`` or ``Netns.run_async``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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
        return _info(get_link(ipr, name))


def _info(link: Any) -> LinkInfo:
    return LinkInfo(
        name=link.get("ifname"),
        ifindex=int(link["index"]),
        mac=str(link.get("address") or ""),
        num_rx_queues=int(link.get("num_rx_queues") or 1),
        num_tx_queues=int(link.get("num_tx_queues") or 1),
        up=bool(link["flags"] & 1),
    )


def _settings(link: Any) -> dict[str, str]:
    return {"orig_up": "1" if link["flags"] & 1 else "0",
            "orig_mtu": str(link.get("mtu") or 0),
            "orig_mac": str(link.get("address") or "")}


def get_link(ipr: IPRoute, name: str) -> Any:
    """The link called ``name`` here; NetdevMissing when there is none."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == 19:  # ENODEV
            raise NetdevMissing(f"no netdev named {name!r} in this network namespace") from e
        raise


def move_into(name: str, target_fd: int, new_name: str, mtu: int) -> dict[str, str]:
    """Move ``name`` into the netns ``target_fd`` refers to, named ``new_name`` there,
    with ``mtu`` (0: as it is), in one netlink request.  The kernel applies the move
    first: a refused name or MTU leaves the device moved (the caller checks the name
    before and brings it home after a failure).  Returns its settings from before
    (admin state, MTU, MAC), for DEL to give back."""
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        kw: dict[str, Any] = {"net_ns_fd": target_fd}
        if new_name != name:
            kw["ifname"] = new_name
        if mtu:
            kw["mtu"] = mtu
        ipr.link("set", index=int(link["index"]), **kw)
        return _settings(link)


def bring_home(ifname: str, orig: str, home_fd: int, settings: dict[str, str] | None = None
               ) -> None:
    """In a pod's netns: take ``ifname`` down, give it back its original name, MTU and
    MAC (``settings``, from move_into at ADD) and move it to the netns ``home_fd``
    refers to (the move drops its addresses).  Renamed before the move, so a name
    taken on the node makes the move fail and leaves it in the pod, not half-moved
    under the pod's name.  A device found under ``orig`` already (an earlier attempt
    renamed it) is moved as it is.  Its admin state is given back at home (set_up)."""
    settings = settings or {}
    with IPRoute() as ipr:
        try:
            idx = int(get_link(ipr, ifname)["index"])
        except NetdevMissing:
            if ifname == orig:
                raise
            idx = int(get_link(ipr, orig)["index"])
        ipr.link("set", index=idx, state="down")  # (a device that is up cannot be renamed)
        kw: dict[str, Any] = {}
        if ifname != orig:
            kw["ifname"] = orig
        if int(settings.get("orig_mtu") or 0):
            kw["mtu"] = int(settings["orig_mtu"])
        if settings.get("orig_mac"):
            kw["address"] = settings["orig_mac"]
        if kw:
            ipr.link("set", index=idx, **kw)
        ipr.link("set", index=idx, net_ns_fd=home_fd)


def set_up_info(name: str) -> LinkInfo:
    """``name`` administratively up, and what it is then: one call, for one hop from
    the event loop to a worker thread."""
    with IPRoute() as ipr:
        link = get_link(ipr, name)
        ipr.link("set", index=int(link["index"]), state="up")
    return replace(_info(link), up=True)


def set_up(name: str) -> None:
    """Administratively up (in the calling thread's netns)."""
    set_up_info(name)
