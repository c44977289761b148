"""An analysis of one trace: the curves at chosen sizes, the sizes that reach hit-rate targets,
the freshness ceiling, and the JSON and text that ``featcache analyze`` writes.

The LRU curve (exact, or SHARDS from a sample) is evaluated on a geometric grid of sizes from
the smallest it resolves to the trace's distinct ids (beyond that every size is the same);
the sizes for the targets come from the whole curve, not from the grid. The policies are
simulated at fewer sizes (each is a full pass over the trace): doubling up to the distinct
ids, plus the configured L1 size and Redis ``maxmemory`` in rows when given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featcache.analysis.ceiling import freshness_ceiling
from featcache.analysis.mattson import HitRateCurve, lru_curve
from featcache.analysis.policies import DEFAULT_MAX_ACCESSES, policy_curves
from featcache.analysis.trace import Trace
from featcache.config_sections import L1_POLICIES
from featcache.errors import InvalidRequest

__all__ = ["TARGETS", "Analysis", "Curve", "analyze", "format_bytes", "size_grid",
           "summary_lines"]

TARGETS = (0.9, 0.95, 0.99)
LRU_POINTS = 80  # points of the LRU curve in the JSON and the picture
POLICY_SIZES = 9  # doubling sizes, the largest the distinct ids: 1/256 of them and up


@dataclass(frozen=True)
class Curve:
    """One line of the picture: a policy's hit rate at each size (entries)."""

    policy: str
    exact: bool
    #: "stack distances", "SHARDS", "SHARDS-adj" (the LRU curve); "simulation", "miniature
    #: simulation" and "miniature simulation, adjusted" (a policy's)
    method: str
    sizes: tuple[int, ...]
    hit_rates: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "exact": self.exact,
            "method": self.method,
            "points": [{"size": s, "hit_rate": round(h, 6)}
                       for s, h in zip(self.sizes, self.hit_rates, strict=True)],
        }


@dataclass(frozen=True)
class Analysis:
    """What ``analyze`` found. ``curves[0]`` is the LRU curve the targets are read from."""

    view: str
    accesses: int
    sampling_rate: float
    distinct_ids: int  # in the trace as given
    estimated_distinct: int  # of the whole trace (distinct_ids / sampling_rate)
    curves: tuple[Curve, ...]
    lru: HitRateCurve = field(repr=False)
    sizes_for: dict[str, int | None]
    freshness_ceiling: float | None = None
    max_age: float | None = None
    bytes_per_row: float | None = None
    l1_size: int | None = None
    maxmemory: int | None = None

    @property
    def maxmemory_rows(self) -> int | None:
        """Redis ``maxmemory`` in rows of ``bytes_per_row``, when both are known."""
        if self.maxmemory is None or not self.bytes_per_row:
            return None
        return int(self.maxmemory // self.bytes_per_row)

    def to_json(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "accesses": self.accesses,
            "sampling_rate": self.sampling_rate,
            "curves": [curve.to_json() for curve in self.curves],
            "sizes_for": self.sizes_for,
            "distinct_ids": self.distinct_ids,
            "estimated_distinct_ids": self.estimated_distinct,
            "max_hit_rate": round(self.lru.max_hit_rate, 6),
            "freshness_ceiling": (None if self.freshness_ceiling is None
                                  else round(self.freshness_ceiling, 6)),
            "max_age_seconds": self.max_age,
            "bytes_per_row": self.bytes_per_row,
            "l1_size": self.l1_size,
            "maxmemory_bytes": self.maxmemory,
            "maxmemory_rows": self.maxmemory_rows,
        }


def size_grid(low: int, high: int, points: int) -> list[int]:
    """About ``points`` distinct integer sizes from ``low`` to ``high``, evenly spaced on a log
    scale, both ends included."""
    low = max(1, low)
    if high <= low:
        return [low]
    grid = np.unique(np.rint(np.geomspace(low, high, points)).astype(np.int64))
    return [int(s) for s in grid]


def analyze(
    trace: Trace,
    *,
    max_age: float | None = None,
    l1_size: int | None = None,
    maxmemory: int | None = None,
    bytes_per_row: float | None = None,
    policies: Sequence[str] = L1_POLICIES,
    max_simulated: int = DEFAULT_MAX_ACCESSES,
    adjusted: bool = True,
) -> Analysis:
    """Every figure ``featcache analyze`` reports on ``trace``. ``adjusted``: SHARDS-adj for a
    sample whose whole trace's access count is known (fixed-rate SHARDS otherwise)."""
    if maxmemory is not None and not bytes_per_row:
        raise InvalidRequest("maxmemory is in bytes: converting it to rows needs the bytes "
                             "per row")
    if bytes_per_row is not None and not bytes_per_row > 0:
        raise InvalidRequest(f"bytes per row must be greater than 0, got {bytes_per_row!r}")
    unknown = [p for p in policies if p not in L1_POLICIES]
    if unknown:
        raise InvalidRequest(f"unknown L1 policy {unknown[0]!r}; expected some of "
                             f"{', '.join(L1_POLICIES)}")
    ceiling = None if max_age is None else freshness_ceiling(trace, max_age)
    use_adjusted = adjusted and not trace.is_full and trace.full_accesses is not None
    lru = lru_curve(trace, adjusted=use_adjusted)
    largest = max(1, math.ceil(lru.distinct))
    sizes = size_grid(lru.min_size, largest, LRU_POINTS)
    method = "stack distances" if lru.exact else ("SHARDS-adj" if use_adjusted else "SHARDS")
    curves = [Curve("lru", lru.exact, method, tuple(sizes),
                    tuple(float(h) for h in lru.hit_rates(sizes)))]
    analysis_sizes = size_grid(max(1, largest // 2 ** (POLICY_SIZES - 1)), largest,
                               POLICY_SIZES)
    markers = [s for s in (l1_size, _rows(maxmemory, bytes_per_row)) if s is not None]
    for found in policy_curves(trace, [*analysis_sizes, *markers], policies,
                               max_accesses=max_simulated):
        method = "simulation" if found.exact else (
            "miniature simulation, adjusted" if found.adjusted else "miniature simulation")
        curves.append(Curve(found.policy, found.exact, method, found.sizes, found.hit_rates))
    sizes_for = {
        f"{target:g}": (None if ceiling is not None and target > ceiling
                        else lru.size_for(target))
        for target in TARGETS
    }
    return Analysis(
        view=trace.view,
        accesses=len(trace),
        sampling_rate=trace.sampling_rate,
        distinct_ids=trace.distinct,
        estimated_distinct=largest,
        curves=tuple(curves),
        lru=lru,
        sizes_for=sizes_for,
        freshness_ceiling=ceiling,
        max_age=max_age,
        bytes_per_row=bytes_per_row,
        l1_size=l1_size,
        maxmemory=maxmemory,
    )


def _rows(maxmemory: int | None, bytes_per_row: float | None) -> int | None:
    if maxmemory is None or not bytes_per_row:
        return None
    return max(1, int(maxmemory // bytes_per_row))


def format_bytes(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ``23.4 MiB``, ``1.2 GiB`` (powers of 1024, as Redis' ``mb``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _entries(size: int, bytes_per_row: float | None) -> str:
    text = f"{size:,} entries"
    if bytes_per_row:
        text += f" ({format_bytes(size * bytes_per_row)} at {bytes_per_row:g} B/row)"
    return text


def summary_lines(analysis: Analysis) -> list[str]:
    """What ``featcache analyze`` prints: the trace, the best LRU can do, the sizes for each
    target, the ceiling, and the hit rates at the configured sizes."""
    a = analysis
    lru = a.lru
    scope = ("the whole trace" if a.sampling_rate == 1.0
             else f"a sample at rate {a.sampling_rate:g}: about {a.estimated_distinct:,} "
                  f"distinct ids in the whole")
    lines = [
        f"view {a.view}: {a.accesses:,} accesses of {a.distinct_ids:,} distinct ids ({scope})",
        f"LRU ({a.curves[0].method}): at most {lru.max_hit_rate:.1%} hits, with every id "
        f"cached (a first access always misses)",
    ]
    if a.freshness_ceiling is not None and a.max_age is not None:
        lines.append(
            f"freshness ceiling (max_age {a.max_age:g} s): {a.freshness_ceiling:.1%} hits at "
            f"any size (a row read more than max_age after its load is a miss)"
        )
    for target in TARGETS:
        size = a.sizes_for[f"{target:g}"]
        if size is not None:
            lines.append(f"{target:.0%} hits: {_entries(size, a.bytes_per_row)}")
        elif a.freshness_ceiling is not None and target > a.freshness_ceiling:
            lines.append(f"{target:.0%} hits: not reachable under max_age "
                         f"(ceiling {a.freshness_ceiling:.1%})")
        else:
            lines.append(f"{target:.0%} hits: not reachable (at most {lru.max_hit_rate:.1%})")
    marked = [("L1 size", a.l1_size), ("Redis maxmemory", a.maxmemory_rows)]
    for label, size in marked:
        if size is None:
            continue
        simulated = [f"{curve.policy} {curve.hit_rates[curve.sizes.index(size)]:.1%}"
                     for curve in a.curves[1:] if size in curve.sizes]
        line = f"{label}: {_entries(size, a.bytes_per_row)}: LRU curve {lru.hit_rate(size):.1%}"
        if simulated:
            line += f"; L1 policies simulated: {', '.join(simulated)}"
        lines.append(line)
    return lines
