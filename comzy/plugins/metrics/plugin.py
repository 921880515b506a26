"""Prometheus metrics (text format, via prometheus-client) at ``/metrics`` on the admin listener.

Per-request numbers are counted in ``after_response`` in plain integers (no lock, no I/O: a
prometheus-client ``inc`` and ``observe`` took about 2 µs a request), read as counter and histogram
families when Prometheus scrapes; registrations from the ``on_connect`` and
``on_registration_refused`` events; gauges of live state (tunnels and
their ``streams_open``/``websockets_open``) are read when Prometheus scrapes, so they cost nothing
between scrapes. Each plugin instance has its own registry, so several servers in one process
(tests) never mix their numbers.

In a cluster, ``/metrics`` on any node gathers every node's samples over ``server.bus`` (topic
``metrics.samples``) and labels each with ``node``: one scrape shows the whole cluster. Nodes that
do not answer within ``GATHER_TIMEOUT`` are left out of that scrape, and
``comzy_cluster_nodes_missing`` says how many; ``/metrics?scope=node`` answers with this node's
samples alone (no gather), for a Prometheus that scrapes every node itself.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from comzy import AdminRoute, Exchange, __version__, hookimpl

if TYPE_CHECKING:
    from comzy import ServerContext

#: Request durations (seconds): from a fast local app (~1 ms) to a long download or SSE stream.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
#: The codes the core refuses registrations with (docs/plugin_hooks.md, on_registration_refused):
#: shown at 0 from the start, so a rate over them works before the first refusal.
REFUSAL_CODES = ("protocol", "version", "rejected", "throttled", "internal")
#: The bus topic on which every node answers with its own samples (a cluster's ``/metrics``).
SAMPLES_TOPIC = "metrics.samples"
#: How long a cluster scrape waits for the nodes (Prometheus's default scrape timeout is 10 s).
GATHER_TIMEOUT = 2.0
#: Whether ``*_created`` samples are left out, as prometheus-client leaves them out of its own metrics.
NO_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() in ("true", "1", "t")


class _RequestCounts(Collector):
    """Requests by status class, bytes and durations: plain numbers that ``after_response`` adds
    to, yielded as the families prometheus-client's ``Counter`` and ``Histogram`` would be
    (``comzy_requests_total{status_class}``, ``comzy_bytes_in_total``, ``comzy_bytes_out_total``,
    ``comzy_request_duration_seconds``, each with its ``_created``) when Prometheus scrapes."""

    def __init__(self) -> None:
        self.created = time.time()
        #: Requests by ``status // 100``; index 0 counts every other status ("other").
        self.by_class = [0] * 6
        self.bytes_in = 0
        self.bytes_out = 0
        #: Requests per duration bucket (``DURATION_BUCKETS``' index, +Inf last), not cumulative.
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def add(self, status: int, bytes_in: int, bytes_out: int, duration: float) -> None:
        """Count one finished request."""
        kind = status // 100
        self.by_class[kind if 0 < kind < 6 else 0] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1  # a bucket holds what is <= its bound
        self.duration_sum += duration

    def collect(self) -> Iterator[Metric]:
        created = None if NO_CREATED else self.created
        requests = CounterMetricFamily("comzy_requests", "Proxied requests (and WebSockets) by status class.",
                                       labels=["status_class"])
        for index, name in enumerate(STATUS_CLASSES, start=1):
            requests.add_metric([name], self.by_class[index], created=created)
        requests.add_metric(["other"], self.by_class[0], created=created)
        yield requests
        yield CounterMetricFamily("comzy_bytes_in", "Bytes of request bodies from visitors.", self.bytes_in,
                                  created=created)
        yield CounterMetricFamily("comzy_bytes_out", "Bytes of response bodies to visitors.", self.bytes_out,
                                  created=created)
        cumulative, total = [], 0
        for bound, count in zip([*DURATION_BUCKETS, float("inf")], self.buckets, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        duration = HistogramMetricFamily("comzy_request_duration_seconds", "From the request's arrival to the "
                                         "end of its response.", buckets=cumulative, sum_value=self.duration_sum)
        if created is not None:
            duration.add_sample("comzy_request_duration_seconds_created", {}, created)
        yield duration


class _LiveState(Collector):
    """What is read at scrape time from the server itself."""

    def __init__(self, server: ServerContext) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        tunnels = self.server.tunnels()
        yield GaugeMetricFamily("comzy_tunnels_active", "Tunnels connected to this server now.", len(tunnels))
        yield GaugeMetricFamily("comzy_streams_open", "Visitor requests and WebSockets in flight now.",
                                sum(t.streams_open for t in tunnels))
        yield GaugeMetricFamily("comzy_websocket_streams_open", "Visitor WebSockets open now.",
                                sum(t.websockets_open for t in tunnels))
        info = GaugeMetricFamily("comzy_build_info", "Always 1; the labels say which Comzy this is.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info


async def cluster_scrape(server: ServerContext) -> bytes:
    """Every node's samples, each labelled with its ``node``, in one text exposition."""
    answers = await server.bus.gather(SAMPLES_TOPIC, None, timeout=GATHER_TIMEOUT)
    families: dict[str, Metric] = {}
    for node, text in sorted(answers.items()):
        for family in text_string_to_metric_families(bytes(text).decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(sample._replace(labels={**sample.labels, "node": node})
                                  for sample in family.samples)
    missing = GaugeMetricFamily("comzy_cluster_nodes_missing", "Live nodes whose samples this scrape lacks "
                                "(no answer within the gather timeout).",
                                len(set(server.bus.nodes()) - answers.keys()))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), missing]))
    return generate_latest(registry)


class _Families(Collector):
    """Metric families gathered from the nodes, as one collector for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Metrics:
    """Counts requests, bytes and durations; serves ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Requests, bytes and durations (counted per request in plain numbers).
        self.counts = _RequestCounts()
        self.registry.register(self.counts)
        self.registrations = Counter("comzy_registrations", "Agent registrations, by result and, for "
                                     "refusals, by reason.", ["result", "reason"], registry=self.registry)
        self._accepted = self.registrations.labels("accepted", "")
        # Labelled by plugin, never by alias: the enabled plugins are few, aliases are unbounded.
        self.refused = Counter("comzy_requests_refused", "Visitor requests a plugin refused before they reached "
                               "the agent (basic_auth's 401, rate_limit's 429...), by plugin and status.",
                               ["plugin", "status"], registry=self.registry)
        for code in REFUSAL_CODES:
            self.registrations.labels("refused", code)

    @hookimpl
    def on_startup(self, server: ServerContext) -> None:
        """Register the scrape-time collector for this server; answer other nodes' scrapes."""
        self.registry.register(_LiveState(server))
        server.bus.answer(SAMPLES_TOPIC, lambda _request: generate_latest(self.registry))

    @hookimpl
    def on_connect(self) -> None:
        """Count an accepted registration (each tunnel session connects once)."""
        self._accepted.inc()

    @hookimpl
    def on_registration_refused(self, code: str) -> None:
        """Count a refused registration by its code."""
        self.registrations.labels("refused", code).inc()

    @hookimpl
    def on_request_refused(self, plugin: str, status: int) -> None:
        """Count a visitor refused by a plugin's ``before_forward``."""
        self.refused.labels(plugin, str(status)).inc()

    @hookimpl
    def after_response(self, exchange: Exchange) -> None:
        """Count one finished request."""
        self.counts.add(exchange.status, exchange.bytes_in, exchange.bytes_out, exchange.duration)

    @hookimpl
    def admin_routes(self, server: ServerContext) -> list[AdminRoute]:
        """``/metrics`` in the Prometheus text format."""
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            if not server.node or b"scope=node" in scope.get("query_string", b""):
                body = generate_latest(self.registry)  # role all: this process is the whole service
            else:
                body = await cluster_scrape(server)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return [AdminRoute("/metrics", app)]
