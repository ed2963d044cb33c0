"""rtnetlink messages read for the facts wanted: the node view's dumps and events, lookups.

pyroute2 decodes every attribute of every message into objects of its own: a
link carries about forty (statistics, each family's settings, queues...), and
with 1,000 veth pairs parsing the link dump took ~0.7 s, most of the daemon's
start-up; every event on the node (each pod's veth, address and route, whoever
made it) was parsed the same way.  pyroute2 lets a request bring its own parser
(``NetlinkRequest``'s ``parser``, as its ``get_default_routes`` does), and a
message class its own ``decode`` (as its docs for ``nlmsg.decode`` suggest).
Here both read only what the view keeps, straight from the message's bytes:

- the start-up dumps (:func:`links`, :func:`kept_addresses`,
  :func:`default_routes_of`): the socket, the request, multi-part replies, the
  dump's end and errors stay pyroute2's;
- the events (:func:`read_events_lean`, for the event socket's own marshal):
  a link event carries its facts; an address of link or host scope and a route
  that is not a default route carry only what says so; the others are decoded
  by pyroute2 in full;
- one link's facts by name (:func:`facts_of`), read as an event is.

Kernel tests check that both ways give the same view as pyroute2's full
decoding of the same links, addresses and routes.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.iproute.parsers import default_routes
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg, state_by_code
from pyroute2.netlink.rtnl.rtmsg import rtmsg

# (name, ifindex, mac, kind, flags, operstate, xdp_prog_id): discovery's _Link, in order.
LinkFacts = tuple[str, int, str, str, int, str, int]

_NLMSGHDR = struct.Struct("=IHHI")  # length, type, flags, sequence number (then the pid)
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
#                                       type, flags
_FULL_HEADER = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_HEADER = 16  # struct nlmsghdr
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SCOPE_LINK = 253  # and host (254), nowhere (255): addresses the view never keeps

# rtnetlink attribute types (linux/if_link.h)
IFLA_ADDRESS, IFLA_IFNAME, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_XDP = 1, 3, 16, 18, 43
IFLA_INFO_KIND = 1
IFLA_XDP_PROG_ID = 4


def _attributes(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, first byte, end) of each attribute in data[start:end]; stops at one
    whose length could not be an attribute's."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            return
        yield kind & _NLA_TYPE_MASK, start + 4, min(start + length, end)
        start += (length + 3) & ~3


def _text(data: bytes, start: int, end: int) -> str:
    return data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")


def _nested(data: bytes, start: int, end: int, want: int) -> tuple[int, int] | None:
    for kind, first, last in _attributes(data, start, end):
        if kind == want:
            return first, last
    return None


def link_facts(data: bytes, offset: int, length: int) -> LinkFacts:
    """The facts the view keeps from one RTM_NEWLINK message at ``data[offset:]``,
    as pyroute2 would decode them (MAC in lower-case hex, operstate by name)."""
    end = offset + length
    _family, _type, ifindex, flags, _change = _IFINFOMSG.unpack_from(data, offset + _HEADER)
    name = mac = operstate = kind = ""
    xdp_prog_id = 0
    for attr, first, last in _attributes(data, offset + _HEADER + _IFINFOMSG.size, end):
        if attr == IFLA_IFNAME:
            name = _text(data, first, last)
        elif attr == IFLA_ADDRESS:
            mac = ":".join(f"{b:02x}" for b in data[first:last])
        elif attr == IFLA_OPERSTATE and last > first:
            operstate = state_by_code.get(data[first], "")
        elif attr == IFLA_LINKINFO:
            found = _nested(data, first, last, IFLA_INFO_KIND)
            kind = _text(data, *found) if found else ""
        elif attr == IFLA_XDP:
            found = _nested(data, first, last, IFLA_XDP_PROG_ID)
            if found and found[1] - found[0] >= 4:
                xdp_prog_id = _U32.unpack_from(data, found[0])[0]
    return name, ifindex, mac, kind, flags, operstate, xdp_prog_id


Parser = Callable[[bytes, int, int], Any]


def _parser(ipr: Any, expected: int, read: Callable[[bytes, int, int], Any]) -> Parser:
    """A request parser: ``read`` for messages of type ``expected`` (None drops the
    message), pyroute2's standard parser for the rest (the dump's end, errors)."""
    standard = ipr.marshal.parse_one_message

    def parse(data: bytes, offset: int, length: int) -> Any:
        _length, kind, flags, seq = _NLMSGHDR.unpack_from(data, offset)
        if kind != expected:
            return standard(kind, flags, seq, data, offset, length)
        return read(data, offset, length)

    return parse


def _link_message(data: bytes, offset: int, length: int) -> nlmsg:
    msg = LinkEvent(data, offset=offset)  # a dump's link, read as an event's is
    msg.decode()
    return msg


def _kept_address(ipr: Any) -> Callable[[bytes, int, int], Any]:
    """Addresses of link or host scope are dropped unparsed (with IPv6, every link has
    one); the others are parsed by pyroute2, as an event would be."""
    standard = ipr.marshal.parse_one_message

    def read(data: bytes, offset: int, length: int) -> Any:
        _family, _plen, _flags, scope, _index = _IFADDRMSG.unpack_from(data, offset + _HEADER)
        if scope >= SCOPE_LINK:
            return None
        _length, kind, flags, seq = _NLMSGHDR.unpack_from(data, offset)
        return standard(kind, flags, seq, data, offset, length)

    return read


async def _dump(ipr: Any, msg: nlmsg, msg_type: int, parser: Parser) -> AsyncIterator[Any]:
    request = NetlinkRequest(ipr, msg, msg_type=msg_type,
                             msg_flags=NLM_F_DUMP | NLM_F_REQUEST, parser=parser)
    await request.send()
    async for reply in request.response():
        yield reply


async def links(ipr: Any) -> AsyncIterator[LinkFacts]:
    """The facts of every link of ``ipr``'s netns (an ``AsyncIPRoute``)."""
    async for msg in _dump(ipr, ifinfmsg(), RTM_GETLINK,
                           _parser(ipr, RTM_NEWLINK, _link_message)):
        yield msg["facts"]


async def kept_addresses(ipr: Any, family: int = 0) -> AsyncIterator[Any]:
    """pyroute2's messages for the addresses of ``family`` (0: all) whose scope is
    below link scope, the only ones the view keeps."""
    request = ifaddrmsg()
    request["family"] = family
    async for msg in _dump(ipr, request, RTM_GETADDR,
                           _parser(ipr, RTM_NEWADDR, _kept_address(ipr))):
        yield msg


async def default_routes_of(ipr: Any, family: int) -> AsyncIterator[Any]:
    """pyroute2's messages for the default routes of ``family``, every table: the
    others (with IPv6, a link-local route per link) are dropped unparsed by
    pyroute2's own ``default_routes`` parser."""
    request = rtmsg()
    request["family"] = family
    async for msg in _dump(ipr, request, RTM_GETROUTE,
                           _parser(ipr, RTM_NEWROUTE, default_routes)):
        yield msg


def facts_of(name: str) -> LinkFacts | None:
    """The facts of the link called ``name`` in the calling thread's netns (from a
    worker thread: pyroute2's synchronous API), from one RTM_GETLINK read as an
    event is; None when there is no such link."""
    with IPRoute() as ipr:
        return lookup(ipr, name)


def lookup(ipr: IPRoute, name: str) -> LinkFacts | None:
    """:func:`facts_of` over ``ipr`` (which then reads every RTM_NEWLINK so: for a
    socket that goes on to change the link, whose replies are acknowledgements)."""
    ipr.marshal.msg_map[RTM_NEWLINK] = LinkEvent
    try:
        facts: LinkFacts = ipr.link("get", ifname=name)[0]["facts"]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return facts


# -- events ----------------------------------------------------------------------------


def _header(msg: nlmsg) -> None:
    length, kind, flags, seq, pid = _FULL_HEADER.unpack_from(msg.data, msg.offset)
    msg["header"] = {"length": length, "type": kind, "flags": flags, "sequence_number": seq,
                     "pid": pid, "error": None}
    msg.length = length


class LinkEvent(nlmsg):  # type: ignore[misc]
    """RTM_NEWLINK and RTM_DELLINK events: the header, ``index`` and ``facts``."""

    def decode(self) -> None:
        _header(self)
        facts = link_facts(self.data, self.offset, self.length)
        self["index"] = facts[1]
        self["facts"] = facts


class AddrEvent(ifaddrmsg):  # type: ignore[misc]
    """An address event: of link or host scope (the view keeps none), only ``scope``;
    any other, decoded by pyroute2 in full."""

    def decode(self) -> None:
        family, _plen, _flags, scope, index = _IFADDRMSG.unpack_from(self.data,
                                                                     self.offset + _HEADER)
        if scope < SCOPE_LINK:
            super().decode()
            return
        _header(self)
        self["family"], self["scope"], self["index"] = family, scope, index


class RouteEvent(rtmsg):  # type: ignore[misc]
    """A route event: not a default route (the view keeps no other), only ``dst_len``;
    a default route, decoded by pyroute2 in full."""

    def decode(self) -> None:
        family, dst_len, *_rest = _RTMSG.unpack_from(self.data, self.offset + _HEADER)
        if dst_len == 0:
            super().decode()
            return
        _header(self)
        self["family"], self["dst_len"] = family, dst_len


def read_events_lean(ipr: Any) -> None:
    """Have ``ipr`` (an IPRoute that only receives events for the view) parse link,
    address and route messages as the view needs them."""
    for kind, cls in ((RTM_NEWLINK, LinkEvent), (RTM_DELLINK, LinkEvent),
                      (RTM_NEWADDR, AddrEvent), (RTM_DELADDR, AddrEvent),
                      (RTM_NEWROUTE, RouteEvent), (RTM_DELROUTE, RouteEvent)):
        ipr.marshal.msg_map[kind] = cls
