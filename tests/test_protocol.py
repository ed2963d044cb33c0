"""The handout protocol as a pure state machine: every message, every refusal."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from cni_server import protocol as p
from cni_server.protocol import Device, Grant, Op, Peer, Reply, Request, Session

NETNS = 4026531000
OTHER_NETNS = 4026531999
HOST = "pod-a"


@dataclass
class Alloc:
    """The allocation as plain data (what the server knows)."""

    devs: dict[str, Device] = field(default_factory=lambda: {
        "eth1": Device("eth1", NETNS, 4), "eth2": Device("eth2", NETNS, 4)})
    hosts: frozenset[str] = frozenset({HOST})
    check_peer_netns: bool = True
    allow_unbound_xsk: bool = True
    umem_limit: int = 64 * 2**20

    def host_allowed(self, hostname: str) -> bool:
        return hostname in self.hosts

    def hostnames(self) -> Iterable[str]:
        return self.hosts

    def device(self, name: str) -> Device | None:
        return self.devs.get(name)

    def devices(self) -> Iterable[Device]:
        return self.devs.values()


def peer(netns: int | None = NETNS) -> Peer:
    return Peer(pid=1234, uid=65534, gid=65534, netns=netns,
                netns_error="" if netns else "peer exited")


def session(alloc: Alloc | None = None, netns: int | None = NETNS) -> Session:
    return Session(alloc or Alloc(), peer(netns))


def req(text: str | bytes, nfds: int = 0, **kw: bool) -> Request:
    return Request(text.encode() if isinstance(text, str) else text, nfds, **kw)


def reply(s: Session, text: str | bytes, nfds: int = 0, **kw: bool) -> str:
    out = s.handle(req(text, nfds, **kw))
    assert isinstance(out, Reply), f"expected a reply, got {out}"
    return out.text


def connected(alloc: Alloc | None = None) -> Session:
    s = session(alloc)
    assert reply(s, f"/connect,{HOST}") == "/host_ok"
    return s


# -- the DPDK handshake ------------------------------------------------------------


def test_dpdk_handshake_in_order_grants_the_map() -> None:
    s = session()
    assert reply(s, f"/connect,{HOST}") == "/host_ok"
    assert reply(s, "/version") == "0.1"
    grant = s.handle(req("/xsk_map_fd,eth1"))
    assert isinstance(grant, Grant)
    assert (grant.op, grant.netdev, grant.ok.text, grant.fail.text) == (
        Op.MAP_FD, "eth1", "/fd_ack", "/fd_nak")
    assert s.grant_done(grant, ok=True).text == "/fd_ack"
    fin = s.handle(req("/fin"))
    assert isinstance(fin, Reply) and fin.text == "/fin_ack" and fin.close
    assert s.state is p.State.CLOSED
    assert s.outcome() == "granted"


def test_one_connection_per_queue_two_netdevs_four_queues_all_granted() -> None:
    alloc = Alloc()
    for netdev in ("eth1", "eth2"):
        for _queue in range(4):
            s = session(alloc)
            assert reply(s, f"/connect,{HOST}") == "/host_ok"
            assert reply(s, "/version") == "0.1"
            g = s.handle(req(f"/xsk_map_fd,{netdev}"))
            assert isinstance(g, Grant) and g.netdev == netdev
            s.grant_done(g, True)
            assert reply(s, "/fin") == "/fin_ack"


def test_map_fd_may_be_asked_for_every_netdev_on_one_connection() -> None:
    s = connected()
    for netdev in ("eth1", "eth2", "eth1"):
        g = s.handle(req(f"/xsk_map_fd,{netdev}"))
        assert isinstance(g, Grant)
        s.grant_done(g, True)


def test_failed_grant_answers_its_nak_and_keeps_the_connection() -> None:
    s = connected()
    g = s.handle(req("/xsk_map_fd,eth1"))
    assert isinstance(g, Grant)
    r = s.grant_done(g, ok=False, reason="netdev released")
    assert (r.text, r.close, r.reason) == ("/fd_nak", False, "netdev released")
    assert reply(s, "/version") == "0.1"


# -- /connect -------------------------------------------------------------------------


def test_wrong_hostname_gets_host_nak_and_stays_unconnected() -> None:
    s = session()
    assert reply(s, "/connect,pod-b") == "/host_nak"
    assert s.state is p.State.NEW
    assert reply(s, "/version") == "/nak"
    assert reply(s, "/xsk_map_fd,eth1") == "/nak"
    assert s.outcome() == "refused"


def test_client_may_retry_connect_after_host_nak() -> None:
    s = session()
    assert reply(s, "/connect,pod-b") == "/host_nak"
    assert reply(s, f"/connect,{HOST}") == "/host_ok"


@pytest.mark.parametrize("name", ["", "-pod", "pod-", "a b", "pod/x", "x" * 65, "pod;rm", "é"])
def test_invalid_hostname_is_refused(name: str) -> None:
    s = session(Alloc(hosts=frozenset({name})))
    assert reply(s, f"/connect,{name}") in ("/host_nak", "/nak")
    assert s.state is p.State.NEW


def test_connect_without_comma_is_malformed() -> None:
    assert reply(session(), "/connect") == "/nak"


def test_second_connect_is_refused_but_session_stays_connected() -> None:
    s = connected()
    assert reply(s, f"/connect,{HOST}") == "/nak"
    assert s.state is p.State.CONNECTED


def test_hostname_cut_by_dpdks_64_byte_buffer_matches_by_prefix() -> None:
    long_name = "pod-" + "x" * 58  # 62 chars: "/connect," + name = 71 bytes
    cut = f"/connect,{long_name}"[: p.DPDK_REQUEST_LIMIT]
    assert len(cut) == 63
    s = session(Alloc(hosts=frozenset({long_name})))
    assert reply(s, cut) == "/host_ok"


def test_prefix_match_applies_only_to_requests_cut_at_63_bytes() -> None:
    s = session(Alloc(hosts=frozenset({"pod-abcdef"})))
    assert reply(s, "/connect,pod-abc") == "/host_nak"


def test_peer_in_another_netns_is_refused_at_connect() -> None:
    s = session(netns=OTHER_NETNS)
    out = s.handle(req(f"/connect,{HOST}"))
    assert isinstance(out, Reply)
    assert (out.text, out.reason) == ("/host_nak", "peer in another netns")


def test_peer_with_unknown_netns_is_refused() -> None:
    s = session(netns=None)
    out = s.handle(req(f"/connect,{HOST}"))
    assert isinstance(out, Reply) and out.text == "/host_nak"
    assert "peer netns unknown" in out.reason


def test_netns_check_can_be_disabled_by_the_operator() -> None:
    s = session(Alloc(check_peer_netns=False), netns=None)
    assert reply(s, f"/connect,{HOST}") == "/host_ok"
    g = s.handle(req("/xsk_map_fd,eth1"))
    assert isinstance(g, Grant)


def test_peer_may_connect_when_one_netdev_is_in_its_netns() -> None:
    alloc = Alloc(devs={"eth1": Device("eth1", OTHER_NETNS, 4), "eth2": Device("eth2", NETNS, 4)})
    s = session(alloc)
    assert reply(s, f"/connect,{HOST}") == "/host_ok"
    assert reply(s, "/xsk_map_fd,eth1") == "/fd_nak"  # not where the peer is
    assert isinstance(s.handle(req("/xsk_map_fd,eth2")), Grant)


# -- requests before connect / unknown / malformed ----------------------------------------


@pytest.mark.parametrize("text", ["/version", "/xsk_map_fd,eth1", "/xsk_socket,eth1,0",
                                  "/config_busy_poll,20,64"])
def test_requests_before_connect_get_nak(text: str) -> None:
    s = session()
    out = s.handle(req(text, nfds=1 if "busy" in text else 0))
    assert isinstance(out, Reply) and out.text == "/nak" and out.reason == "before connect"


@pytest.mark.parametrize("text", [
    "/bogus", "connect,pod-a", "/CONNECT,pod-a", "/connect_x,pod-a", " /version", "/version ",
    "/version\n", "/xsk_map_fd", "/xsk_map_fd,", "/xsk_map_fd,eth1,eth2", "/xsk_socket,eth1",
    "/xsk_socket,eth1,-1", "/xsk_socket,eth1,+1", "/xsk_socket,eth1,0x1", "/xsk_socket,,0",
    "/xsk_socket,eth1,99999999999", "/version,1", "/config_busy_poll", "/config_busy_poll,1",
    "/config_busy_poll,a,b", "/config_busy_poll,-1,64", "/fin,now",
])
def test_malformed_or_unknown_requests_get_nak_and_connection_survives(text: str) -> None:
    s = connected()
    assert reply(s, text) == "/nak"
    assert s.state is p.State.CONNECTED
    assert reply(s, "/version") == "0.1"


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"/version\x00", b"/connect,pod-a\x00", b"/ver\x00sion", b"\xff\xfe",
    "/connect,pöd".encode(), b"/version\r", b"\x1b[31m",
])
def test_nul_control_and_non_ascii_bytes_get_nak(data: bytes) -> None:
    s = connected()
    assert reply(s, data) == "/nak"
    assert reply(s, "/version") == "0.1"


def test_truncated_datagram_gets_nak() -> None:
    s = connected()
    assert reply(s, "/version", truncated=True) == "/nak"


def test_truncated_control_data_gets_nak() -> None:
    s = connected()
    assert reply(s, "/version", nfds=8, ctrl_truncated=True) == "/nak"


def test_overlong_request_gets_nak() -> None:
    s = connected()
    assert reply(s, "/xsk_map_fd," + "e" * 300) == "/nak"


@pytest.mark.parametrize("text", ["/version", "/xsk_map_fd,eth1", "/xsk_socket,eth1,0", "/fin",
                                  f"/connect,{HOST}"])
def test_fds_on_requests_that_take_none_get_nak(text: str) -> None:
    s = connected() if text != f"/connect,{HOST}" else session()
    assert reply(s, text, nfds=1) == "/nak"


# -- /xsk_map_fd -------------------------------------------------------------------------


@pytest.mark.parametrize("netdev", ["eth9", "lo", "ETH1", "eth1 ", "../eth1", "a" * 16])
def test_map_fd_for_a_netdev_outside_the_allocation_gets_fd_nak(netdev: str) -> None:
    s = connected()
    out = s.handle(req(f"/xsk_map_fd,{netdev}"))
    assert isinstance(out, Reply) and out.text in ("/fd_nak", "/nak")


def test_map_fd_for_a_vanished_netdev_gets_fd_nak() -> None:
    alloc = Alloc(devs={"eth1": Device("eth1", NETNS, 4), "eth2": Device("eth2", None, 4)})
    s = connected(alloc)
    out = s.handle(req("/xsk_map_fd,eth2"))
    assert isinstance(out, Reply) and (out.text, out.reason) == ("/fd_nak", "netdev gone")


# -- /xsk_socket and /xsk_bind --------------------------------------------------------------


def test_xsk_socket_grants_a_socket_for_an_allowed_queue() -> None:
    s = connected()
    g = s.handle(req("/xsk_socket,eth1,3"))
    assert isinstance(g, Grant)
    assert (g.op, g.netdev, g.queue, g.ok.text, g.fail.text) == (
        Op.XSK_SOCKET, "eth1", 3, "/fd_ack", "/fd_nak")


def test_xsk_socket_beyond_the_queue_count_gets_fd_nak() -> None:
    s = connected()
    out = s.handle(req("/xsk_socket,eth1,4"))
    assert isinstance(out, Reply) and (out.text, out.reason) == ("/fd_nak", "queue out of range")


def test_xsk_socket_is_refused_unless_the_allocation_opted_in_to_unbound_sockets() -> None:
    s = connected(Alloc(allow_unbound_xsk=False))
    out = s.handle(req("/xsk_socket,eth1,0"))
    assert isinstance(out, Reply)
    assert (out.text, out.reason) == ("/fd_nak", "unbound sockets not allowed")


def test_xsk_bound_socket_grants_a_bound_socket_with_its_umem_geometry() -> None:
    s = connected(Alloc(allow_unbound_xsk=False))
    g = s.handle(req("/xsk_bound_socket,eth1,3,4096,2048"))
    assert isinstance(g, Grant)
    assert (g.op, g.netdev, g.queue, g.frames, g.frame_size, g.ok.text, g.fail.text) == (
        Op.XSK_BOUND, "eth1", 3, 4096, 2048, "/fd_ack", "/fd_nak")


@pytest.mark.parametrize(("text", "why"), [
    ("/xsk_bound_socket,eth1,0,4096,1024", "bad umem geometry"),  # frame size
    ("/xsk_bound_socket,eth1,0,3000,2048", "bad umem geometry"),  # not a power of two
    ("/xsk_bound_socket,eth1,0,0,2048", "bad umem geometry"),
    ("/xsk_bound_socket,eth1,0,131072,2048", "bad umem geometry"),  # over MAX_FRAMES
    ("/xsk_bound_socket,eth1,0,65536,4096", "umem over the limit"),  # 256 MiB > 64 MiB
    ("/xsk_bound_socket,eth1,4,64,2048", "queue out of range"),
    ("/xsk_bound_socket,eth7,0,64,2048", "netdev not in allocation"),
])
def test_xsk_bound_socket_refuses_what_it_cannot_or_may_not_make(text: str, why: str) -> None:
    s = connected()
    out = s.handle(req(text))
    assert isinstance(out, Reply) and (out.text, out.reason) == ("/fd_nak", why)


@pytest.mark.parametrize("text", ["/xsk_bound_socket,eth1,0,64", "/xsk_bound_socket,eth1,0,64,x",
                                  "/xsk_bound_socket,,0,64,2048",
                                  "/xsk_bound_socket,eth1,0,64,2048,1"])
def test_a_malformed_xsk_bound_socket_gets_nak(text: str) -> None:
    assert reply(connected(), text) == "/nak"


def test_xsk_bind_with_one_fd_grants_the_bind() -> None:
    s = connected()
    g = s.handle(req("/xsk_bind,eth2,1", nfds=1))
    assert isinstance(g, Grant)
    assert (g.op, g.netdev, g.queue, g.ok.text, g.fail.text) == (
        Op.XSK_BIND, "eth2", 1, "/xsk_bind_ack", "/xsk_bind_nak")


@pytest.mark.parametrize("nfds", [0, 2, 8])
def test_xsk_bind_without_exactly_one_fd_gets_xsk_bind_nak(nfds: int) -> None:
    s = connected()
    assert reply(s, "/xsk_bind,eth1,0", nfds=nfds) == "/xsk_bind_nak"


def test_xsk_bind_on_a_foreign_netdev_or_queue_gets_xsk_bind_nak() -> None:
    s = connected()
    assert reply(s, "/xsk_bind,eth7,0", nfds=1) == "/xsk_bind_nak"
    assert reply(s, "/xsk_bind,eth1,4", nfds=1) == "/xsk_bind_nak"


# -- /config_busy_poll --------------------------------------------------------------------


def test_busy_poll_with_socket_fd_grants_the_setting() -> None:
    s = connected()
    g = s.handle(req("/config_busy_poll,20,64", nfds=1))
    assert isinstance(g, Grant)
    assert (g.op, g.timeout_us, g.budget, g.ok.text, g.fail.text) == (
        Op.BUSY_POLL, 20, 64, "/config_busy_poll_ack", "/config_busy_poll_nak")


@pytest.mark.parametrize("text,nfds", [("/config_busy_poll,20,64", 0),
                                       ("/config_busy_poll,20,64", 2),
                                       ("/config_busy_poll,20,65536", 1),
                                       ("/config_busy_poll,2147483648,64", 1)])
def test_busy_poll_bad_fd_count_or_range_gets_its_nak(text: str, nfds: int) -> None:
    s = connected()
    assert reply(s, text, nfds=nfds) == "/config_busy_poll_nak"


# -- /fin ------------------------------------------------------------------------------------


def test_fin_is_answered_before_connect_too_and_closes() -> None:
    s = session()
    out = s.handle(req("/fin"))
    assert isinstance(out, Reply) and out.text == "/fin_ack" and out.close


def test_nothing_is_answered_after_fin() -> None:
    s = connected()
    reply(s, "/fin")
    out = s.handle(req("/version"))
    assert isinstance(out, Reply) and out.close and out.text == "/nak"


# -- replies fit DPDK's buffer ----------------------------------------------------------------


def test_every_reply_fits_dpdks_128_byte_buffer() -> None:
    texts = [p.HOST_OK, p.HOST_NAK, p.FD_ACK, p.FD_NAK, p.XSK_BIND_ACK, p.XSK_BIND_NAK,
             p.BUSY_POLL_ACK, p.BUSY_POLL_NAK, p.FIN_ACK, p.NAK, p.PROTOCOL_VERSION]
    assert all(len(t.encode()) <= 127 for t in texts)
    with pytest.raises(ValueError):
        Reply("x" * 128)


def test_dpdk_would_detect_host_nak_with_its_strncmp_check() -> None:
    # DPDK fails a step only when strncmp(reply, expected, len(expected)) < 0.
    assert p.HOST_NAK[: len(p.HOST_OK)] < p.HOST_OK


def test_outcome_summarises_the_connection_for_the_log() -> None:
    assert session().outcome() == "empty"
    s = connected()
    reply(s, "/version")
    assert s.outcome() == "ok"
    reply(s, "/bogus")
    assert s.outcome() == "refused"


# -- an owner not known yet (Kubernetes) ----------------------------------------------


def test_a_connect_before_the_owner_is_known_is_deferred_once_then_decided() -> None:
    """The session decides, not the I/O layer: with an owner lookup available and no
    hostname known yet, /connect comes back as Defer (nothing recorded); handed the
    same request again, once the lookup is done, it is answered."""
    alloc = Alloc(hosts=frozenset())
    s = Session(alloc, peer(), owner_lookup=True)
    request = req(f"/connect,{HOST}")
    assert s.handle(request) is p.Defer.OWNER
    assert s.steps == [] and s.state is p.State.NEW
    alloc.hosts = frozenset({HOST})  # the lookup found the pod
    out = s.handle(request)
    assert isinstance(out, Reply) and out.text == "/host_ok"


def test_a_connect_is_deferred_at_most_once_and_only_when_it_helps() -> None:
    nobody = Alloc(hosts=frozenset())
    s = Session(nobody, peer(), owner_lookup=True)
    assert s.handle(req(f"/connect,{HOST}")) is p.Defer.OWNER
    assert reply(s, f"/connect,{HOST}") == "/host_nak"  # still nobody: refused, not parked
    assert reply(Session(nobody, peer()), f"/connect,{HOST}") == "/host_nak"  # no lookup
    known = Session(Alloc(), peer(), owner_lookup=True)
    assert reply(known, f"/connect,{HOST}") == "/host_ok"  # owner known: no wait
    early = Session(nobody, peer(), owner_lookup=True)
    assert reply(early, "/version") == "/nak"  # only /connect waits
    assert reply(early, "/connect") == "/nak"  # a malformed one is refused at once
