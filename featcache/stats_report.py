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

from featcache.keys import is_model_space, model_of_space
from featcache.stats import EVENTS, MODEL_EVENTS, MODEL_TIERS, TIERS, bucket_bounds

__all__ = ["percentile_ms", "summarize", "summarize_models"]

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


def _hit_rates(per_tier: dict[str, int], total: int) -> dict[str, float | None]:
    """The shares of ``total`` answered by the L1, by Redis, and by either (the cache)."""
    return {"l1": _ratio(per_tier["l1"], total), "redis": _ratio(per_tier["redis"], total),
            "cache": _ratio(per_tier["l1"] + per_tier["redis"], total)}


def _parsed(totals: dict[str, int]) -> tuple[dict[str, dict[str, int]],
                                             dict[str, dict[str, dict[int, int]]]]:
    """``CacheStats.totals`` fields as events per name and latency histograms per name and
    tier."""
    events: dict[str, dict[str, int]] = {}
    calls: dict[str, dict[str, dict[int, int]]] = {}
    for field, n in totals.items():
        name, kind, rest = field.split("|", 2)
        if kind == "e":
            events.setdefault(name, {})[rest] = n
        elif kind == "c":
            tier, text = rest.split("|")
            histogram = calls.setdefault(name, {}).setdefault(tier, {})
            histogram[int(text)] = histogram.get(int(text), 0) + n
    return events, calls


def _latency(histogram: dict[int, int]) -> dict[str, Any]:
    return {"calls": sum(histogram.values()), "p50": percentile_ms(histogram, 0.5),
            "p99": percentile_ms(histogram, 0.99)}


def _merged(histograms: Iterable[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for histogram in histograms:
        for bucket, n in histogram.items():
            out[bucket] = out.get(bucket, 0) + n
    return out


def summarize(totals: dict[str, int], views: Iterable[str] | None = None) -> dict[str, Any]:
    """``{view: figures}`` from ``CacheStats.totals``-shaped counts (one process's or many
    summed); ``views`` keeps only those. Prediction caches' counts are ``summarize_models``'."""
    events, calls = _parsed(totals)
    wanted = set(views) if views is not None else None
    out: dict[str, Any] = {}
    for view in sorted(events.keys() | calls.keys()):
        if is_model_space(view) or (wanted is not None and view not in wanted):
            continue
        counts = {event: events.get(view, {}).get(event, 0) for event in EVENTS}
        values = {tier: sum(counts[e] for e in names) for tier, names in VALUE_TIERS.items()}
        n_values = sum(values.values())
        histograms = calls.get(view, {})
        per_tier = {tier: sum(histograms.get(tier, {}).values()) for tier in TIERS}
        n_calls = sum(per_tier.values())
        hit_histogram = _merged(histograms.get(tier, {}) for tier in ("l1", "redis"))
        out[view] = {
            "values": {**values, "total": n_values},
            "value_hit_rate": _hit_rates(values, n_values),
            "calls": {**per_tier, "total": n_calls},
            "call_hit_rate": _hit_rates(per_tier, n_calls),
            "latency_ms": {"hit": _latency(hit_histogram),
                           "sql": _latency(histograms.get("sql", {}))},
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


def summarize_models(totals: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``{model: {version: figures}}`` of the prediction caches in ``CacheStats.totals``-shaped
    counts: outputs and calls per tier (``l1``, ``redis``, ``compute``), the share answered
    without the model, latency of all-hit calls and of calls that computed, and the
    ``MODEL_EVENTS`` counts. "Without a cache" every output would be computed and every call
    would call the model once, which the saved fractions compare with."""
    events, calls = _parsed(totals)
    out: dict[str, dict[str, Any]] = {}
    for space in sorted(events.keys() | calls.keys()):
        if not is_model_space(space):
            continue
        counts = {event: events.get(space, {}).get(event, 0) for event in MODEL_EVENTS}
        outputs = {"l1": counts["hits_l1"], "redis": counts["hits_redis"],
                   "compute": counts["computed"]}
        n_outputs = sum(outputs.values())
        histograms = calls.get(space, {})
        per_tier = {tier: sum(histograms.get(tier, {}).values()) for tier in MODEL_TIERS}
        n_calls = sum(per_tier.values())
        model, version = model_of_space(space)
        out.setdefault(model, {})[version] = {
            "outputs": {**outputs, "total": n_outputs},
            "output_hit_rate": _hit_rates(outputs, n_outputs),
            "calls": {**per_tier, "total": n_calls},
            "latency_ms": {
                "hit": _latency(_merged(histograms.get(t, {}) for t in ("l1", "redis"))),
                "compute": _latency(histograms.get("compute", {})),
            },
            "inference_saved": {
                "outputs": _ratio(n_outputs - outputs["compute"], n_outputs),
                "model_calls": (None if not n_calls
                                else max(0.0, 1 - counts["compute_calls"] / n_calls)),
            },
            "events": counts,
        }
    return out
