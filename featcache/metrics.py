"""Prometheus metrics of a ``FeatureCache``, read at scrape time (DESIGN section 9).

The serving path keeps its counters in ``featcache.stats.CacheStats`` (one dict update under
one lock per call); prometheus-client's own ``Counter`` objects would add a lock and a label
lookup per increment on that path. ``CacheCollector`` instead turns the numbers the cache
already keeps into metric families when Prometheus scrapes, so metrics cost nothing between
scrapes and cannot disagree with ``FeatureCache.stats()``.

In a serving process::

    from prometheus_client import REGISTRY, start_http_server
    from featcache.metrics import CacheCollector

    REGISTRY.register(CacheCollector(cache))
    start_http_server(9108, addr="127.0.0.1")

``featcache warmer --metrics-port`` serves the same families for its own cache, plus the
warmer's job health (``jobs/warmer.py``, ``WarmerCollector``). Metric names and labels:
docs/metrics.md.

This module imports nothing from ``featcache.jobs``: data flows from the jobs into featcache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from featcache.client import FeatureCache
from featcache.parts import Parts
from featcache.redis_store import ClusterStore

__all__ = ["CacheCollector", "MetricsServer", "new_registry", "serve_metrics"]

#: L1 ``stats()`` entries that are sizes, not counts since creation
_L1_GAUGES = {"entries": "rows held now", "max_entries": "the configured bound"}


#: the invalidation tail's counters (``InvalidationSubscriber.stats``), as docs/metrics.md
#: lists them
_STREAM_EVENTS = ("entries_applied", "views_applied", "ids_applied", "gaps", "resets",
                  "reconnects", "undecodable", "callback_errors")

class CacheCollector(Collector):
    """``featcache_*`` families from one cache's counters, built at each scrape."""

    def __init__(self, cache: Parts, namespace: str = "featcache") -> None:
        """``cache``: a ``FeatureCache``, or the ``Parts`` of a process that only writes (the
        warmer: no L1, no stream tail, so those families stay empty)."""
        self.cache = cache
        self.ns = namespace

    def describe(self) -> Iterable[Metric]:
        """The families without samples, so a registry can check names without a scrape."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(with_samples=True))

    def _families(self, with_samples: bool = False) -> Iterator[Metric]:
        ns = self.ns
        events = CounterMetricFamily(
            f"{ns}_events", "Read and write path events per view (FeatureCache.stats()): "
            "hits per tier, fills, stale served, SQL queries and errors, fenced fills...",
            labels=["view", "event"])
        if with_samples:
            for view, counts in sorted(self.cache.stats().items()):
                for event, n in counts.items():
                    events.add_metric([view, event], n)
        yield events

        models = CounterMetricFamily(
            f"{ns}_model_events", "Prediction cache events per model version "
            "(FeatureCache.model_stats()): outputs from the L1, from Redis and computed, "
            "model calls, writes and fenced writes, lease waits, errors",
            labels=["model", "version", "event"])
        if with_samples and isinstance(self.cache, FeatureCache):
            for (model, version), counts in sorted(self.cache.model_stats().items()):
                for event, n in counts.items():
                    models.add_metric([model, version, event], n)
        yield models

        l1_events = CounterMetricFamily(
            f"{ns}_l1_events", "In-process L1 cache events (hits, misses, evictions, expired, "
            "invalidated, cleared, refused)", labels=["event"])
        l1_gauges = {
            key: GaugeMetricFamily(f"{ns}_l1_{key}", f"L1 cache: {text}")
            for key, text in _L1_GAUGES.items()
        }
        l1 = self.cache.l1 if isinstance(self.cache, FeatureCache) else None
        if with_samples and l1 is not None:
            for key, value in sorted(l1.stats().items()):
                if key in l1_gauges:
                    l1_gauges[key].add_metric([], value)
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    l1_events.add_metric([key], value)
        yield l1_events
        yield from l1_gauges.values()

        applied = CounterMetricFamily(
            f"{ns}_invalidation_stream_events", "Invalidation stream tail of the L1: entries, "
            "views and ids applied, gaps, resets, reconnects, errors", labels=["event"])
        lag = GaugeMetricFamily(
            f"{ns}_invalidation_stream_lag_seconds",
            "Age of the last invalidation applied to the L1 (0: caught up)")
        connected = GaugeMetricFamily(
            f"{ns}_invalidation_stream_connected",
            "1 while the L1's invalidation tail is connected to Redis")
        tail = (self.cache.subscriber_stats()
                if with_samples and isinstance(self.cache, FeatureCache) else {})
        if tail:
            for key in _STREAM_EVENTS:  # the counters only: lag_ms is an int, not an event
                if type(tail.get(key)) is int:
                    applied.add_metric([key], tail[key])
            if tail.get("lag_ms") is not None:
                lag.add_metric([], tail["lag_ms"] / 1000)
            connected.add_metric([], 1 if tail.get("connected") else 0)
        yield applied
        yield lag
        yield connected

        circuit = GaugeMetricFamily(
            f"{ns}_redis_node_circuit_open",
            "1 while a cluster node's circuit breaker skips it (open or half-open)",
            labels=["node"])
        store = self.cache.store
        if with_samples and isinstance(store, ClusterStore):
            for node, state in store.health.states().items():
                circuit.add_metric([node], 0 if state == "closed" else 1)
        yield circuit


def new_registry(*collectors: Collector, process: bool = True) -> CollectorRegistry:
    """A registry of its own (the global one may already hold another cache's collector),
    with ``collectors`` and, with ``process``, the process, GC and platform collectors."""
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound one (useful after port 0)."""

    server: WSGIServer
    thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int,
                  addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` over HTTP on a daemon thread. Loopback by default: metrics name
    views and tables, which is nobody else's business unless asked for. Raises ``OSError``
    when the address cannot be bound."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr, int(server.server_port))
