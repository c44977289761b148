"""LRU hit rate at every cache size from one pass over a trace (Mattson's stack distances).

An access's *stack distance* is the number of distinct other ids read since the previous access
of its id. An LRU cache of ``S`` entries holds exactly the ``S`` most recently read ids, so the
access hits iff its distance is below ``S`` (Mattson et al., 1970), and one histogram of the
distances gives the hit rate at every size at once; a first access misses at every size.

The distances are computed in O(N log N) for N accesses, with numpy passes rather than a loop
per access. For a reuse at time ``i`` of the id last read at ``p``, the distinct ids read in
between are the ``i - p - 1`` accesses in between less those that are not the last read of
their id before ``i``, and each of those is the start of a reuse interval nested in ``(p, i)``.
So the distance is ``i - p - 1`` minus the number of earlier reuses whose previous access is
later than ``p``: per element of the sequence of previous-access times, the count of earlier
elements that are larger. That count is taken bit by bit, from the most significant, as in a
wavelet matrix: the elements are kept stably partitioned by the bits above the current one,
so each group of equal high bits is a contiguous run in time order, and within a run an element
whose bit is 0 is outranked by every earlier element whose bit is 1 (one cumulative sum per
level). ``log2 N`` levels of a few linear passes each: 10M accesses in seconds, where a Fenwick
tree driven by a Python loop would take minutes.

SHARDS (Waldspurger et al., FAST'15) gives the curve from a spatially sampled trace (see
``featcache.analysis.sampling``): the distances measured on the sample, scaled by ``1/R``, are
those of the whole trace, and the histogram is normalised by the sampled accesses (fixed-rate
SHARDS). With the whole trace's access count known, ``lru_curve(..., adjusted=True)`` is
SHARDS-adj: the difference between the accesses expected in the sample (``R * N``) and those in
it is added to the smallest distance, which corrects most of the error a hot id in or out of
the sample causes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from featcache.analysis.trace import Trace

__all__ = ["HitRateCurve", "lru_curve", "reference_lru_hits", "stack_distances"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


def stack_distances(codes: npt.NDArray[np.integer[Any]]) -> tuple[Ints, Ints]:
    """For each reuse in access order (an access whose id was read before): its position in
    the trace and its stack distance. First accesses are not listed (they always miss)."""
    codes = np.asarray(codes)
    n = len(codes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(codes, kind="stable")  # each id's accesses together, in time order
    same = codes[order[1:]] == codes[order[:-1]]
    previous = np.full(n, -1, np.int64)
    previous[order[1:][same]] = order[:-1][same]
    reuses = np.flatnonzero(previous >= 0)
    before = previous[reuses]
    distances = (reuses - before - 1) - _earlier_larger(before, n)
    return reuses, distances


def _earlier_larger(values: Ints, bound: int) -> Ints:
    """Per element, how many earlier elements are larger; ``values`` distinct in [0, bound).

    Bit by bit from the most significant (see the module doc); arrays stay in the current
    partition order and are unpermuted once at the end.
    """
    m = len(values)
    if m == 0:
        return np.empty(0, np.int64)
    # int32 where it fits: half the memory traffic of every pass
    small: type[np.signedinteger[Any]] = np.int32 if bound < 2**31 else np.int64
    vals: npt.NDArray[np.signedinteger[Any]] = values.astype(small)
    where = np.arange(m, dtype=small)  # each element's original index, permuted along
    counts = np.zeros(m, np.int64)  # in the current order
    positions: npt.NDArray[np.signedinteger[Any]] = np.arange(m, dtype=small)
    for bit in reversed(range(max(1, int(bound - 1).bit_length()))):
        high = vals >> (bit + 1)
        run_start = np.empty(m, dtype=bool)
        run_start[0] = True
        np.not_equal(high[1:], high[:-1], out=run_start[1:])
        ones = ((vals >> bit) & 1).astype(bool)
        ones_before: npt.NDArray[np.signedinteger[Any]] = np.cumsum(ones, dtype=small)
        ones_before -= ones  # exclusive: the ones strictly before each position
        first = np.maximum.accumulate(np.where(run_start, positions, 0))
        outranked = ones_before - ones_before[first]  # earlier ones of the same run
        counts += np.where(ones, 0, outranked)
        # stable partition by this bit: zeros first, then ones
        order = np.concatenate((np.flatnonzero(~ones), np.flatnonzero(ones)))
        vals, where, counts = vals[order], where[order], counts[order]
    result = np.empty(m, np.int64)
    result[where] = counts
    return result


@dataclass(frozen=True, eq=False)
class HitRateCurve:
    """The hit rate of an LRU cache at every size.

    ``hits[s - 1]`` is the number of hits (or their estimate) of a cache of ``s`` entries;
    past the array's end the count stays at its last value. ``accesses`` is what hits are
    divided by. ``min_size``: the smallest size the curve resolves (1, or ``ceil(1/R)`` from
    a sample at rate ``R``: a sampled distance of 0 is ``1/R`` entries).
    """

    hits: Floats
    accesses: float
    exact: bool
    min_size: int
    distinct: float  # distinct ids (estimated from a sample: distinct in it / R)

    def hit_rates(self, sizes: npt.ArrayLike) -> Floats:
        """The hit rate at each size (0 for sizes below 1)."""
        s = np.asarray(sizes, dtype=np.int64)
        index = np.clip(s, 1, len(self.hits)) - 1
        return np.where(s >= 1, self.hits[index] / self.accesses, 0.0)

    def hit_rate(self, size: int) -> float:
        return float(self.hit_rates([size])[0])

    @property
    def max_hit_rate(self) -> float:
        """The hit rate of a cache that holds every id (only first accesses miss)."""
        return float(self.hits[-1] / self.accesses)

    def size_for(self, hit_rate: float) -> int | None:
        """The smallest size whose hit rate is at least ``hit_rate``; None if none is."""
        needed = hit_rate * self.accesses * (1 - 1e-12)  # a rounding error must not miss it
        index = int(np.searchsorted(self.hits, needed, side="left"))
        return None if index >= len(self.hits) else index + 1


def lru_curve(trace: Trace, *, adjusted: bool = False) -> HitRateCurve:
    """The LRU hit rate curve of ``trace``: exact for a full trace, SHARDS for a sample
    (``adjusted``: SHARDS-adj, which needs ``trace.full_accesses``)."""
    rate = trace.sampling_rate
    _, distances = stack_distances(trace.codes)
    accesses = float(len(trace))
    if trace.is_full:
        hits = np.cumsum(np.bincount(distances, minlength=trace.distinct), dtype=np.float64)
        return HitRateCurve(hits, accesses, True, 1, float(trace.distinct))
    # a sampled distance d stands for (d + 1) / R entries of the whole: a hit at that size
    # and above. The relative nudge keeps (d + 1) / R from rounding up past an integer.
    sizes = np.ceil((distances + 1) / rate * (1 - 1e-12)).astype(np.int64)
    estimated_distinct = trace.distinct / rate
    length = max(math.ceil(estimated_distinct), int(sizes.max(initial=0)), 1)
    hits = np.cumsum(np.bincount(sizes, minlength=length + 1)[1:], dtype=np.float64)
    if adjusted:
        if trace.full_accesses is None:
            raise ValueError("SHARDS-adj needs the whole trace's access count (full_accesses)")
        expected = rate * trace.full_accesses
        hits = np.maximum(hits + (expected - accesses), 0.0)
        accesses = expected
    return HitRateCurve(hits, accesses, False, math.ceil(1 / rate * (1 - 1e-12)),
                        estimated_distinct)


def reference_lru_hits(ids: Iterable[object], size: int) -> int:
    """Hits of a plain ``OrderedDict`` LRU of ``size`` entries along ``ids``: the brute-force
    simulation the exact curve is checked against (tests, ``bench analyze``)."""
    cache: OrderedDict[object, None] = OrderedDict()
    hits = 0
    for entity in ids:
        if entity in cache:
            hits += 1
            cache.move_to_end(entity)
        else:
            cache[entity] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits
