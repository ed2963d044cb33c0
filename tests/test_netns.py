"""Running code inside another network namespace without moving the caller."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import pytest

from cni_server import xsk
from cni_server.netdev import NetdevMissing, ifindex_of, link_info
from cni_server.netns import Netns, NetnsError, thread_netns_inode
from cni_server.receiver import XskReceiver
from tests.kernel import NsFixture, compile_test_program, run

pytestmark = pytest.mark.kernel


def test_run_executes_inside_the_target_and_leaves_the_caller_where_it_was(
        netns: NsFixture) -> None:
    netns.veth()
    home = thread_netns_inode()
    with Netns.open(netns.path) as target:
        assert target.inode != home
        assert target.run(thread_netns_inode) == target.inode
        assert target.run(lambda: link_info("va").name) == "va"
        with pytest.raises(NetdevMissing):
            link_info("va")  # not here, in the caller's namespace
    assert thread_netns_inode() == home


def test_ifindex_of_finds_names_and_altnames_and_says_none_for_a_missing_one(
        netns: NsFixture) -> None:
    netns.veth()
    run("ip", "-n", netns.name, "link", "property", "add", "dev", "va", "altname", "shortalt")
    with Netns.open(netns.path) as target:
        index = target.run(lambda: link_info("va").ifindex)
        assert target.run(lambda: ifindex_of("va")) == index
        assert target.run(lambda: ifindex_of("shortalt")) == index
        assert target.run(lambda: ifindex_of("nosuch0")) is None
    assert ifindex_of("va") is None  # not in the caller's namespace
    for bad in ("", "a-name-past-15-bytes"):
        with pytest.raises(ValueError):
            ifindex_of(bad)


def test_ifindex_of_raises_when_it_cannot_ask_rather_than_saying_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of fds is no evidence that a name is free (if_nametoindex would say it is)."""
    import errno
    import socket

    def no_fds(*_args: object, **_kw: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_fds)
    with pytest.raises(OSError):
        ifindex_of("lo")


def test_exceptions_inside_the_namespace_reach_the_caller(netns: NsFixture) -> None:
    with Netns.open(netns.path) as target, pytest.raises(NetdevMissing):
        target.run(lambda: link_info("nosuch0"))


def test_socket_created_through_run_belongs_to_the_target_namespace(netns: NsFixture) -> None:
    """What /xsk_socket relies on: the AF_XDP socket is made where the netdev is."""
    netns.veth()
    with Netns.open(netns.path) as target, target.run(xsk.create_socket) as sock:
        ifindex = target.run(lambda: link_info("va").ifindex)
        with XskReceiver(sock, frames=64, ring_size=64) as rx:
            rx.bind(ifindex, 0)  # resolves ifindex in the socket's (target's) namespace


def test_run_async_works_from_the_event_loop(netns: NsFixture) -> None:
    with Netns.open(netns.path) as target:
        assert asyncio.run(target.run_async(thread_netns_inode)) == target.inode


def test_opening_a_missing_namespace_says_which() -> None:
    with pytest.raises(NetnsError, match="/run/netns/does-not-exist"):
        Netns.open(Path("/run/netns/does-not-exist"))


def test_work_in_a_namespace_runs_on_one_long_lived_thread_not_a_thread_per_call(
        netns: NsFixture) -> None:
    import threading

    with Netns.open(netns.path) as target:
        idents = {target.run(threading.get_ident) for _ in range(200)}
        threads_during = threading.active_count()
        more = {target.run(threading.get_ident) for _ in range(200)}
        assert threading.active_count() == threads_during
    assert len(idents | more) == 1  # one worker served all 400 calls
    assert threading.get_ident() not in idents


def test_an_idle_worker_ends_and_a_new_one_starts_on_demand(
        netns: NsFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from cni_server import netns as netns_mod

    monkeypatch.setattr(netns_mod, "IDLE_EXIT", 0.05)
    with Netns.open(netns.path) as target:
        first = target.run(threading.get_ident)
        deadline = time.monotonic() + 10
        while target.inode in netns_mod._workers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert target.inode not in netns_mod._workers  # ended, its netns fd closed
        assert target.run(thread_netns_inode) == target.inode  # a fresh worker serves
        assert target.inode in netns_mod._workers
        assert first != threading.get_ident()


def test_run_async_does_not_block_the_loop_and_returns_the_value(netns: NsFixture) -> None:
    async def main(target: Netns) -> list[int]:
        return list(await asyncio.gather(*(target.run_async(thread_netns_inode)
                                           for _ in range(50))))

    with Netns.open(netns.path) as target:
        assert asyncio.run(main(target)) == [target.inode] * 50


def test_the_start_up_dump_reads_ipv6_addresses_and_default_routes_only_when_there_are_some(
        netns: NsFixture) -> None:
    """With IPv6 on, every link has link-local addresses and routes the view does not
    keep; the dump skips them when procfs shows nothing it would keep, and still
    finds a configured address and a default route when there are."""
    from plugin.discovery import NodeView, _ipv6_worth_dumping

    run("ip", "netns", "exec", netns.name, "sysctl", "-q", "-w",
        "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
    netns.veth("va", "vb")
    ifindex = int(run("ip", "-n", netns.name, "-o", "link", "show", "va").stdout.split(":")[0])
    with netns.entered():
        for _ in range(100):  # the link-local address comes when the link is up
            if run("ip", "-6", "addr", "show", "dev", "va", "scope", "link").stdout:
                break
            time.sleep(0.05)
        assert _ipv6_worth_dumping() == (False, False)
        plain = NodeView.dump()
        run("ip", "-6", "addr", "add", "fd00:99::5/64", "dev", "va", "nodad")
        run("ip", "-6", "route", "add", "default", "via", "fd00:99::1", "dev", "va")
        assert _ipv6_worth_dumping() == (True, True)
        full = NodeView.dump()
    assert plain.addrs.get(ifindex, set()) == set() and plain.defaults == set()
    assert (10, "fd00:99::5", 64) in full.addrs[ifindex]
    assert any(d[:2] == (10, ifindex) for d in full.defaults)


def _view_as_pyroute2_decodes_it() -> tuple[dict[int, object], dict[int, set[object]],
                                             set[object]]:
    """Links, kept addresses and main-table defaults of the calling thread's netns,
    each message decoded by pyroute2 in full, as events are."""
    from pyroute2 import IPRoute

    from plugin.discovery import _addr_key, _default_key, _link

    with IPRoute() as ipr:
        links: dict[int, object] = {}
        for msg in ipr.get_links():
            link = _link(msg)
            links[link.ifindex] = link
        addrs: dict[int, set[object]] = {}
        for msg in ipr.get_addr():
            key = _addr_key(msg)
            if key is not None:
                addrs.setdefault(int(msg["index"]), set()).add(key)
        defaults: set[object] = {
            dkey for family in (2, 10) for msg in ipr.get_routes(family=family)
            if (dkey := _default_key(msg)) is not None}
    return links, addrs, defaults


def test_the_start_up_dump_reads_the_same_facts_pyroute2_decodes(
        netns: NsFixture, tmp_path: Path) -> None:
    """The start-up dump reads only the attributes the view keeps, from the bytes; on
    links of every kind it sees (down, up, with an XDP program, a bridge, a veth
    with a MAC given, addresses and default routes of both families, a default route of
    another table) it must find what pyroute2's full decoding finds."""
    from plugin.discovery import NodeView

    run("ip", "netns", "exec", netns.name, "sysctl", "-q", "-w",
        "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
    netns.veth("va", "vb")
    run("ip", "-n", netns.name, "link", "set", "vb", "down")
    obj = compile_test_program("foreign_pass", tmp_path / "f.o")
    run("ip", "-n", netns.name, "link", "set", "va", "xdpgeneric", "obj", str(obj), "sec", "xdp")
    for cmd in (("link", "add", "br9", "type", "bridge"),
                ("link", "add", "dm9", "address", "02:AB:00:00:00:09", "type", "veth",
                 "peer", "dn9"),
                ("link", "set", "dm9", "up"), ("link", "set", "dn9", "up"),
                ("addr", "add", "192.0.2.9/24", "dev", "dm9"),
                ("-6", "addr", "add", "fd00:9::9/64", "dev", "dm9", "nodad"),
                ("route", "add", "default", "via", "192.0.2.1", "dev", "dm9", "metric", "7"),
                ("-6", "route", "add", "default", "via", "fd00:9::1", "dev", "dm9"),
                ("route", "add", "default", "via", "192.0.2.2", "dev", "dm9", "table", "9")):
        run("ip", "-n", netns.name, *cmd)
    with netns.entered():
        view = NodeView.dump()
        links, addrs, defaults = _view_as_pyroute2_decodes_it()
    assert view.links == links
    by_name = {link.name: link for link in view.links.values()}
    assert by_name["va"].xdp_prog_id == netns.xdp_prog_id("va") != 0
    assert (by_name["vb"].kind, by_name["br9"].kind, by_name["dm9"].mac) == (
        "veth", "bridge", "02:ab:00:00:00:09")
    assert by_name["vb"].operstate == "DOWN" and by_name["lo"].operstate == "UNKNOWN"
    assert view.addrs == addrs and view.defaults == defaults
    dm9 = by_name["dm9"].ifindex
    assert view.addrs[dm9] == {(2, "192.0.2.9", 24), (10, "fd00:9::9", 64)}
    assert {(2, dm9, 7), (10, dm9, 1024)} == view.defaults


def test_events_read_lean_keep_the_view_pyroute2s_full_decoding_keeps(
        netns: NsFixture, tmp_path: Path) -> None:
    """The inventory's event socket reads link events for the view's facts only, and
    addresses and routes the view never keeps unparsed; applied to the same start,
    its events and pyroute2's fully decoded ones must give the same view, which must
    be a fresh dump's."""
    from pyroute2 import IPRoute

    from cni_server.rtread import AddrEvent, LinkEvent, RouteEvent, read_events_lean
    from plugin.discovery import NodeView
    from plugin.linkwatch import GROUPS

    run("ip", "netns", "exec", netns.name, "sysctl", "-q", "-w",
        "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
        "net.ipv6.conf.default.accept_dad=0")
    netns.veth("va", "vb")
    obj = compile_test_program("foreign_pass", tmp_path / "f.o")
    with netns.entered():
        lean, full = IPRoute(), IPRoute()
        try:
            read_events_lean(lean)
            for ipr in (lean, full):
                ipr.bind(groups=GROUPS)
            views = {"lean": NodeView.dump(), "full": NodeView.dump()}
            for cmd in (("link", "add", "c0", "type", "veth", "peer", "c1"),
                        ("link", "set", "c0", "address", "02:00:00:00:0c:00"),
                        ("link", "set", "c0", "up"), ("link", "set", "c1", "up"),
                        ("link", "set", "va", "xdpgeneric", "obj", str(obj), "sec", "xdp"),
                        ("addr", "add", "192.0.2.7/24", "dev", "c0"),
                        ("-6", "addr", "add", "fd00:7::7/64", "dev", "c0"),
                        ("route", "add", "198.51.100.0/24", "via", "192.0.2.1", "dev", "c0"),
                        ("route", "add", "default", "via", "192.0.2.1", "dev", "c0"),
                        ("-6", "route", "add", "default", "via", "fd00:7::1", "dev", "c0"),
                        ("route", "del", "default", "via", "192.0.2.1", "dev", "c0"),
                        ("link", "set", "vb", "down"),
                        ("addr", "del", "192.0.2.7/24", "dev", "c0"),
                        ("link", "add", "d0", "type", "veth", "peer", "d1"),
                        ("link", "del", "d0"),
                        ("link", "add", "end0", "type", "veth", "peer", "end1")):  # the last
                # -n: ip's own mount namespace, so its BPF loader's bpffs
                # directories are not made in the host's
                run("ip", "-n", netns.name, *cmd)
            kinds: set[type] = set()
            for name, ipr in (("lean", lean), ("full", full)):
                last = False
                while not last:
                    for msg in ipr.get():
                        kinds.add(type(msg))
                        views[name].apply(msg)
                        last = {"end0", "end1"} <= {link.name for link in
                                                    views[name].links.values()}
            fresh = NodeView.dump()
        finally:
            lean.close()
            full.close()
    assert {LinkEvent, AddrEvent, RouteEvent} <= kinds  # the lean ones did come

    def seen(view: NodeView) -> tuple[object, ...]:
        return view.links, {k: v for k, v in view.addrs.items() if v}, view.defaults

    assert seen(views["lean"]) == seen(views["full"]) == seen(fresh)
    c0 = next(link.ifindex for link in fresh.links.values() if link.name == "c0")
    assert fresh.addrs[c0] == {(10, "fd00:7::7", 64)} and fresh.defaults == {(10, c0, 1024)}


def test_the_event_watch_goes_on_after_the_kernel_dropped_events(
        netns: NsFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst larger than the socket's buffer makes the kernel drop events and say so
    (ENOBUFS): the watch reports it once and goes on receiving.  (Here the burst
    comes while the watch does not read yet, so it overflows on any machine.)"""
    import threading

    from cni_server.rtread import LinkEvent
    from plugin import linkwatch

    monkeypatch.setattr(linkwatch, "RCVBUF", 4096)
    gate = threading.Event()
    receive = linkwatch.LinkWatch._receive

    def after_the_gate(watch: linkwatch.LinkWatch) -> None:
        gate.wait(10)
        receive(watch)

    monkeypatch.setattr(linkwatch.LinkWatch, "_receive", after_the_gate)

    async def body() -> tuple[int, bool]:
        losses = 0
        lost = asyncio.Event()
        marked = asyncio.Event()

        def on_lost() -> None:
            nonlocal losses
            losses += 1
            lost.set()

        def on_message(msg: object) -> None:
            if isinstance(msg, LinkEvent) and msg["facts"][0] == "mark0":
                marked.set()

        watch = linkwatch.LinkWatch(asyncio.get_running_loop(), on_message, on_lost)
        assert await watch.start()
        try:
            batch = "".join(f"link add f{i} type veth peer name g{i}\n" for i in range(100))
            await asyncio.to_thread(subprocess.run, ["ip", "-n", netns.name, "-batch", "-"],
                                    input=batch, text=True, check=True)
            gate.set()
            # The loss is reported once the new subscription is in place: what
            # happens from then on must arrive (what happened before is the
            # caller's rescan's to find).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), 10)
            await asyncio.to_thread(run, "ip", "-n", netns.name, "link", "add", "mark0",
                                    "type", "veth", "peer", "mark1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(marked.wait(), 10)
        finally:
            watch.stop()
        return losses, marked.is_set()

    with netns.entered():
        losses, still_receiving = asyncio.run(body())
    assert losses == 1
    assert still_receiving
