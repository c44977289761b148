"""In-process counters per view (or model version) and event, and calls per tier with their
latencies, read by ``FeatureCache.stats()``, ``model_stats()``, Prometheus and the publisher
of cluster-wide stats.

Counting is a dict increment under one lock per call (not per row), so it costs the serving
path nothing measurable; Prometheus reads the same numbers at scrape time through a custom
collector instead of paying prometheus-client's per-increment locking on the hot path. A
call's latency is counted in a bucket of a log-scale histogram (``latency_bucket``: four
buckets per power of two of nanoseconds), so any number of processes' histograms add up to
the histogram of all their calls, which percentiles cannot do.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["EVENTS", "MODEL_EVENTS", "MODEL_TIERS", "TIERS", "CacheStats", "bucket_bounds",
           "latency_bucket"]

EVENTS = (
    "hit_l1",  # answered by the in-process L1 cache
    "hit_redis",
    "filled",
    "absent",
    "stale_served",
    "negative_hit",  # ABSENT answered from a negative entry, without SQL
    "decode_errors",  # a Redis value that did not decode: treated as a miss
    "redis_errors",  # a Redis round trip failed: treated as misses
    "fill_errors",  # writing fills back failed: answered anyway
    "sql_queries",
    "sql_rows",
    "sql_errors",
    "rows_written",
    "rows_skipped_older",  # put_rows rows not written because Redis held a newer row
    "fills_fenced",  # fills not written: the key changed since it was read (invalidation...)
    "fills_abandoned",  # fills not written: the call took longer than the fence deadline
    "early_refreshes",  # fresh rows refreshed early by XFetch
    "singleflight_joined",  # rows this call got from another thread's SQL read
    "lease_waits",  # rows another process was filling: waited for them
    "lease_timeouts",  # ... and read SQL after lease_wait because they did not arrive
    "lease_takeovers",  # ... and read SQL at once: the holder's fill would not land
    "sql_rejected",  # rows refused by the SQL concurrency limit
    "unavailable",  # rows marked UNAVAILABLE (on_sql_error: mark)
)


#: the counters of a prediction cache (``ModelCache.stats``), per model version key space
MODEL_EVENTS = ("hits_l1", "hits_redis", "computed", "compute_calls", "refreshed", "written",
                "writes_fenced", "writes_late", "lease_waits", "lease_timeouts",
                "decode_errors", "redis_errors")

#: where a ``get_or_compute`` call's outputs came from, its slowest source: every one from
#: the L1, every one from the L1 or Redis, or some computed (by this call, or one it waited
#: for)
MODEL_TIERS = ("l1", "redis", "compute")

#: where a call's rows came from, its slowest source: every row from the L1, every row from
#: the L1 or Redis, or some from SQL (or from another reader's SQL read: a fill waited for)
TIERS = ("l1", "redis", "sql")


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency of ``ns`` nanoseconds: ``4 * bits + quarter``, where
    ``bits`` is the bit length of ``ns`` and ``quarter`` its next two bits (each bucket about
    19% wide; below 8 ns the value itself)."""
    bits = ns.bit_length()
    return (bits << 2) | ((ns >> (bits - 3)) & 3) if bits > 3 else ns


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """The latencies (nanoseconds, ``low <= ns < high``) ``latency_bucket`` puts in it."""
    bits, quarter = bucket >> 2, bucket & 3
    if bits <= 3:
        return bucket, bucket + 1
    step = 1 << (bits - 3)
    low = (1 << (bits - 1)) + quarter * step
    return low, low + step


class CacheStats:
    """Thread-safe counters keyed by (view, event), and calls and their latency histogram
    keyed by (view, tier). ``events``: the names ``snapshot`` and ``of`` report (every one,
    zero when not counted): the feature views' ``EVENTS``, or a prediction cache's
    (``featcache.models.MODEL_EVENTS``, keyed by model version key space)."""

    def __init__(self, events: tuple[str, ...] = EVENTS) -> None:
        self.events = events
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._calls: Counter[tuple[str, str, int]] = Counter()  # view, tier, latency bucket

    def add(self, view: str, counts: Mapping[str, int]) -> None:
        with self._lock:
            for event, n in counts.items():
                if n:
                    self._counts[(view, event)] += n

    def add_one(self, view: str, event: str, n: int) -> None:
        """``add`` of one event, without a dict to build and walk."""
        with self._lock:
            self._counts[(view, event)] += n

    def call(self, view: str, event: str, n: int, tier: str, ns: int) -> None:
        """A call answered by one event (``n`` rows, all hits of one tier) in ``ns``
        nanoseconds: ``add_one`` and the call, under one lock."""
        bucket = latency_bucket(ns)
        with self._lock:
            self._counts[(view, event)] += n
            self._calls[(view, tier, bucket)] += 1

    def add_call(self, view: str, counts: Mapping[str, int], tier: str, ns: int) -> None:
        """``add``, and a call of ``tier`` that took ``ns`` nanoseconds."""
        bucket = latency_bucket(ns)
        with self._lock:
            for event, n in counts.items():
                if n:
                    self._counts[(view, event)] += n
            self._calls[(view, tier, bucket)] += 1

    def calls(self) -> dict[tuple[str, str, int], int]:
        """Calls so far by (view, tier, latency bucket)."""
        with self._lock:
            return dict(self._calls)

    def totals(self) -> dict[str, int]:
        """Every count so far, flat: ``<view>|e|<event>`` and ``<view>|c|<tier>|<bucket>``
        (a view name holds no ``|``), which sum across processes field by field."""
        with self._lock:
            counts = list(self._counts.items())
            calls = list(self._calls.items())
        out = {f"{view}|e|{event}": n for (view, event), n in counts}
        out.update((f"{view}|c|{tier}|{bucket}", n) for (view, tier, bucket), n in calls)
        return out

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{view: {event: count}}`` with every one of ``events`` present."""
        with self._lock:
            items = list(self._counts.items())
        out: dict[str, dict[str, Any]] = {}
        for (view, event), n in items:
            out.setdefault(view, dict.fromkeys(self.events, 0))[event] = n
        return out

    def of(self, view: str) -> dict[str, int]:
        """``snapshot()[view]``, zeros when nothing was counted for it."""
        with self._lock:
            return {event: self._counts.get((view, event), 0) for event in self.events}

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        with self._lock:
            items = list(self._counts.items())
        for (view, event), n in items:
            yield view, event, n
