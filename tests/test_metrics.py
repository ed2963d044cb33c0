"""The handout server's plain-number counters and histogram, as Prometheus reads them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cni_server.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counts_are_exported_per_label_set() -> None:
    m = Metrics()
    for _ in range(3):
        m.replies.inc("/connect", "/host_ok", "ok")
    m.replies.inc("/xsk_map_fd", "/fd_nak", "netdev not in allocation")
    m.handshakes.inc("granted")
    got = samples(m)
    assert got[("afxdp_replies_total", (("reason", "ok"), ("reply", "/host_ok"),
                                        ("request", "/connect")))] == 3
    assert got[("afxdp_replies_total", (("reason", "netdev not in allocation"),
                                        ("reply", "/fd_nak"), ("request", "/xsk_map_fd")))] == 1
    assert got[("afxdp_handshakes_total", (("result", "granted"),))] == 1
    assert m.handshakes.get("granted") == 1 and m.handshakes.get("refused") == 0
    assert ("afxdp_fds_handed_out_total", (("kind", "xsk_map"),)) not in got


def test_durations_use_inclusive_upper_bounds_and_keep_the_sum() -> None:
    m = Metrics()
    for seconds in (0.0005, 0.0007, 0.001, 3.0, 99.0):
        m.handshake_seconds.observe(seconds)
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("afxdp_handshake_duration_seconds_bucket", (("le", le),))]

    assert bucket("0.0005") == 1  # le is "less than or equal"
    assert bucket("0.001") == 3
    assert bucket("1.0") == 3 and bucket("5.0") == 4 and bucket("+Inf") == 5
    assert got[("afxdp_handshake_duration_seconds_count", ())] == 5
    assert abs(got[("afxdp_handshake_duration_seconds_sum", ())] - 102.0022) < 1e-9
    assert m.handshake_seconds.count == 5


def test_the_text_is_what_prometheus_clients_own_writer_writes_byte_for_byte() -> None:
    """render() stands in for generate_latest (whose module pulls in an HTTP stack
    the daemon does not use): every metric of the daemon, label values that need
    escaping, and the metric types the daemon does not use yet."""
    from prometheus_client import Enum, Info, Summary, generate_latest
    from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily

    from cni_server.metrics import render

    m = Metrics()
    m.replies.inc("/connect", "/host_ok", "ok")
    m.replies.inc("/xsk_map_fd", "/fd_nak", 'odd "reason" \\ with\nnewline')
    m.handshakes.inc("granted")
    m.fds.inc("xsk_map")
    m.dropped.inc("idle")
    for seconds in (0.0004, 0.003, 2.0):
        m.handshake_seconds.observe(seconds)
    m.connections.set(3)
    m.allocations.set(2)
    m.devices.labels("pool1", "healthy").set(1000)
    m.program_ops.labels("attach", "ok").inc()
    m.cni_ops.labels("ADD", "ok").inc(2)
    m.track(m.connections, lambda: 7.5)
    Info("afxdp_build", "Build facts\\ with a backslash", registry=m.registry).info(
        {"version": "1.2"})
    Enum("afxdp_mode", "Mode", states=["a", "b"], registry=m.registry).state("b")
    Summary("afxdp_sizes", "Sizes", registry=m.registry).observe(4)

    class Odd:
        def collect(self):  # type: ignore[no-untyped-def]
            yield UnknownMetricFamily("afxdp_unknown", "Unknown", value=1)
            g = GaugeMetricFamily("afxdp_stamped", "Stamped", labels=["x"])
            g.add_metric(["y"], float("inf"), timestamp=1234.5)
            yield g

    m.registry.register(Odd())
    ours = render(m.registry)
    assert ours == generate_latest(m.registry)
    assert b'reason="odd \\"reason\\" \\\\ with\\nnewline"' in ours
