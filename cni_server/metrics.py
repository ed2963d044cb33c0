"""Prometheus metrics of the daemon (prometheus-client), one registry per daemon.

Label values are bounded: reasons are cut at their first parenthesis (the
detail goes to the logs), so a client cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)


def reason_label(reason: str) -> str:
    return reason.split(" (", 1)[0][:64] or "ok"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.handshakes = Counter("afxdp_handshakes", "Connections to handout sockets, by "
                                  "outcome", ["result"], registry=r)
        self.replies = Counter("afxdp_replies", "Protocol replies by request, reply and reason",
                               ["request", "reply", "reason"], registry=r)
        self.fds = Counter("afxdp_fds_handed_out", "File descriptors handed to clients",
                           ["kind"], registry=r)
        self.handshake_seconds = Histogram("afxdp_handshake_duration_seconds",
                                           "Connection lifetime, accept to close",
                                           buckets=HANDSHAKE_BUCKETS, registry=r)
        self.connections = Gauge("afxdp_connections", "Open handout connections", registry=r)
        self.dropped = Counter("afxdp_connections_dropped", "Handout connections the daemon "
                               "closed to protect itself, by reason", ["reason"], registry=r)
        self.allocations = Gauge("afxdp_allocations", "Live allocations", registry=r)
        self.devices = Gauge("afxdp_devices", "Devices per pool by health", ["pool", "health"],
                             registry=r)
        self.program_ops = Counter("afxdp_program_operations", "XDP program attach/detach",
                                   ["operation", "result"], registry=r)
        self.cni_ops = Counter("afxdp_cni_operations", "CNI requests by command and result",
                               ["command", "result"], registry=r)

    def track(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Read ``gauge`` from ``fn`` at scrape time."""
        gauge.set_function(fn)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
