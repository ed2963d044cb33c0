"""Prometheus metrics of the daemon (prometheus-client), one registry per daemon.

Label values are bounded: reasons are cut at their first parenthesis (the
detail goes to the logs), so a client cannot grow the label set.

The text format is written here (:func:`render`), as prometheus-client's
``generate_latest`` writes it (a test compares the two byte for byte): its
exposition module imports http.server, urllib.request, wsgiref and email
(~4 MiB of RSS), and the daemon serves ``/metrics`` itself (``cni_server.health``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client.metrics import Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)


def reason_label(reason: str) -> str:
    return reason.split(" (", 1)[0][:64] or "ok"


class Counts:
    """A labelled counter kept as a plain dict and exported at scrape time.

    For the handout server's per-request counting: ``inc`` is a dict update
    (~0.3 us) where prometheus-client's ``labels(...).inc()`` takes a lock and
    builds the child's key (~1.5 us, six times per handshake).  Updated
    from the event loop's thread only; a scrape copies the dict in one step.
    """

    def __init__(self, name: str, documentation: str, labels: list[str],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.counts: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def inc(self, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + 1

    def get(self, *values: str) -> int:
        return self.counts.get(values, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, n in sorted(list(self.counts.items())):
            family.add_metric(list(values), n)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)


class Durations:
    """An unlabelled histogram kept as plain numbers (see :class:`Counts` for why)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.buckets = name, documentation, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += n
            cumulative.append((bound, float(running)))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative,
                                    sum_value=total)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.handshakes = Counts("afxdp_handshakes", "Connections to handout sockets, by "
                                 "outcome", ["result"], registry=r)
        self.replies = Counts("afxdp_replies", "Protocol replies by request, reply and reason",
                              ["request", "reply", "reason"], registry=r)
        self.fds = Counts("afxdp_fds_handed_out", "File descriptors handed to clients",
                          ["kind"], registry=r)
        self.handshake_seconds = Durations("afxdp_handshake_duration_seconds",
                                           "Connection lifetime, accept to close",
                                           HANDSHAKE_BUCKETS, registry=r)
        self.connections = Gauge("afxdp_connections", "Open handout connections", registry=r)
        self.dropped = Counts("afxdp_connections_dropped", "Handout connections the daemon "
                              "closed to protect itself, by reason", ["reason"], registry=r)
        self.allocations = Gauge("afxdp_allocations", "Live allocations", registry=r)
        self.devices = Gauge("afxdp_devices", "Devices per pool by health", ["pool", "health"],
                             registry=r)
        self.program_ops = Counter("afxdp_program_operations", "XDP program attach/detach",
                                   ["operation", "result"], registry=r)
        self.cni_ops = Counter("afxdp_cni_operations", "CNI requests by command and result",
                               ["command", "result"], registry=r)
        self.log_waiting = Gauge("afxdp_log_bytes_waiting", "Log bytes the stderr pipe has "
                                 "not taken yet: its reader (the container runtime) is "
                                 "behind", registry=r)
        self.netlink_events_lost = Counter("afxdp_netlink_events_lost", "Times the kernel "
                                           "dropped the netlink events the device inventory "
                                           "follows (each followed by a rescan)", registry=r)

    def track(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Read ``gauge`` from ``fn`` at scrape time."""
        gauge.set_function(fn)

    def handout_summary(self) -> dict[str, object]:
        """The handout counts ``afxdp status`` shows, from the same counters /metrics
        exports, so the two agree."""
        replies: dict[str, int] = {}
        for (_verb, text, reason), n in list(self.replies.counts.items()):
            key = text if reason == "ok" else reason
            replies[key] = replies.get(key, 0) + n
        return {
            "handshakes": {outcome: n for (outcome,), n in list(self.handshakes.counts.items())},
            "replies": replies,
            "fds_sent": sum(self.fds.counts.values()),
            "rejected_limit": self.dropped.get("limit"),
            "evicted": self.dropped.get("evicted"),
            "idle_closed": self.dropped.get("idle"),
        }

    def exposition(self) -> bytes:
        return render(self.registry)


# Prometheus' text format has no such types: prometheus-client writes them as these.
_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
               "unknown": "untyped"}
_SUFFIXED = {"counter": "_total", "info": "_info"}
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")  # written after, as gauges
_float_text: Callable[[float], str] = floatToGoString  # (the library's is not annotated)


def render(registry: CollectorRegistry) -> bytes:
    """``registry`` in Prometheus' text format 0.0.4, as ``generate_latest`` writes it."""
    out: list[str] = []
    for metric in registry.collect():
        name = escape_metric_name(metric.name + _SUFFIXED.get(metric.type, ""))
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        kind = _TEXT_TYPES.get(metric.type, metric.type)
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        later: dict[str, list[str]] = {}
        for sample in metric.samples:
            suffix = next((x for x in _OPENMETRICS_ONLY if sample.name == metric.name + x), "")
            (later.setdefault(suffix, []) if suffix else out).append(_sample_line(sample))
        for suffix, lines in sorted(later.items()):
            name = escape_metric_name(metric.name + suffix)
            out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def _sample_line(sample: Sample) -> str:
    labels = ",".join(f'{escape_label_name(k)}="{_label_value(v)}"'
                      for k, v in sorted(sample.labels.items()))
    stamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    return (f"{escape_metric_name(sample.name)}{{{labels}}}" if labels
            else escape_metric_name(sample.name)) + f" {_float_text(sample.value)}{stamp}\n"


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
