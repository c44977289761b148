"""What ``featcache stats`` reports, computed from summed counts (``StatsWindow``): hit rates
per tier of values and of calls, call latency percentiles, the SQL work saved. Pure.

A value's tier is where its answer came from: ``l1``, ``redis`` (hits and remembered
``ABSENT``), ``sql`` (filled, or found absent, by this call or one it waited for) or
``degraded`` (stale served, or unavailable, while SQL failed). A call's tier is its slowest
value's (``featcache.stats.TIERS``). "Without a cache" every value would be read from SQL and
every call would send one query per view (more past ``offline_store.chunk_size`` ids), which
is what the saved fractions compare with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from featcache.stats import EVENTS, TIERS, bucket_bounds

__all__ = ["percentile_ms", "summarize"]

#: the events counted per value, by tier
VALUE_TIERS = {
    "l1": ("hit_l1",),
    "redis": ("hit_redis", "negative_hit"),
    "sql": ("filled", "absent"),
    "degraded": ("stale_served", "unavailable"),
}


def percentile_ms(histogram: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a latency histogram (bucket -> calls), in milliseconds, as
    the middle of the bucket it falls in (buckets are about 19% wide); None without calls."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            low, high = bucket_bounds(bucket)
            return (low + high) / 2 / 1e6
    low, high = bucket_bounds(max(histogram))
    return (low + high) / 2 / 1e6


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def summarize(totals: dict[str, int], views: Iterable[str] | None = None) -> dict[str, Any]:
    """``{view: figures}`` from ``CacheStats.totals``-shaped counts (one process's or many
    summed); ``views`` keeps only those."""
    events: dict[str, dict[str, int]] = {}
    calls: dict[str, dict[str, dict[int, int]]] = {}
    for field, n in totals.items():
        view, kind, rest = field.split("|", 2)
        if kind == "e":
            events.setdefault(view, {})[rest] = n
        elif kind == "c":
            tier, text = rest.split("|")
            histogram = calls.setdefault(view, {}).setdefault(tier, {})
            histogram[int(text)] = histogram.get(int(text), 0) + n
    wanted = set(views) if views is not None else None
    out: dict[str, Any] = {}
    for view in sorted(events.keys() | calls.keys()):
        if wanted is not None and view not in wanted:
            continue
        counts = {event: events.get(view, {}).get(event, 0) for event in EVENTS}
        values = {tier: sum(counts[e] for e in names) for tier, names in VALUE_TIERS.items()}
        n_values = sum(values.values())
        histograms = calls.get(view, {})
        per_tier = {tier: sum(histograms.get(tier, {}).values()) for tier in TIERS}
        n_calls = sum(per_tier.values())
        hit_histogram: dict[int, int] = {}
        for tier in ("l1", "redis"):
            for bucket, n in histograms.get(tier, {}).items():
                hit_histogram[bucket] = hit_histogram.get(bucket, 0) + n
        sql_histogram = histograms.get("sql", {})
        out[view] = {
            "values": {**values, "total": n_values},
            "value_hit_rate": {
                "l1": _ratio(values["l1"], n_values),
                "redis": _ratio(values["redis"], n_values),
                "cache": _ratio(values["l1"] + values["redis"], n_values),
            },
            "calls": {**per_tier, "total": n_calls},
            "call_hit_rate": {
                "l1": _ratio(per_tier["l1"], n_calls),
                "redis": _ratio(per_tier["redis"], n_calls),
                "cache": _ratio(per_tier["l1"] + per_tier["redis"], n_calls),
            },
            "latency_ms": {
                "hit": {"calls": sum(hit_histogram.values()),
                        "p50": percentile_ms(hit_histogram, 0.5),
                        "p99": percentile_ms(hit_histogram, 0.99)},
                "sql": {"calls": sum(sql_histogram.values()),
                        "p50": percentile_ms(sql_histogram, 0.5),
                        "p99": percentile_ms(sql_histogram, 0.99)},
            },
            "sql": {
                "queries": counts["sql_queries"],
                "rows": counts["sql_rows"],
                "errors": counts["sql_errors"],
                "rejected": counts["sql_rejected"],
                "values_saved": _ratio(n_values - values["sql"], n_values),
                "queries_saved": (None if not n_calls
                                  else max(0.0, 1 - counts["sql_queries"] / n_calls)),
            },
            "events": counts,
        }
    return out
