"""In-process counters per view and event, read by ``FeatureCache.stats()`` and Prometheus.

Counting is a dict increment under one lock per call (not per row), so it costs the serving
path nothing measurable; Prometheus reads the same numbers at scrape time through a custom
collector instead of paying prometheus-client's per-increment locking on the hot path.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["EVENTS", "CacheStats"]

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


class CacheStats:
    """Thread-safe counters keyed by (view, event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, view: str, counts: Mapping[str, int]) -> None:
        with self._lock:
            for event, n in counts.items():
                if n:
                    self._counts[(view, event)] += n

    def add_one(self, view: str, event: str, n: int) -> None:
        """``add`` of one event: the L1-hit path's, without a dict to build and walk."""
        with self._lock:
            self._counts[(view, event)] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{view: {event: count}}`` with every known event present."""
        with self._lock:
            items = list(self._counts.items())
        out: dict[str, dict[str, Any]] = {}
        for (view, event), n in items:
            out.setdefault(view, {e: 0 for e in EVENTS})[event] = n
        return out

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        with self._lock:
            items = list(self._counts.items())
        for (view, event), n in items:
            yield view, event, n
