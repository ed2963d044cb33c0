"""Running code inside another network namespace without moving the caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cni_server import xsk
from cni_server.netdev import NetdevMissing, link_info
from cni_server.netns import Netns, NetnsError, thread_netns_inode
from cni_server.receiver import XskReceiver
from tests.kernel import NsFixture

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
