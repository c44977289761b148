"""The freshness ceiling: the hit rate of a cache that never evicts, under a ``max_age``.

featcache serves a cached row only while ``now - loaded_at <= max_age`` (README, statuses);
a row read again later than that is re-read from SQL, whatever the cache's size. With no
eviction, an id's misses are its first access and then each access more than ``max_age``
after the last miss (the last load). That is also the fewest misses any cache can have:
every hit lies within ``max_age`` of a load, so a cache's loads cover each id's access times
with windows of ``max_age``, and starting each window at the first access it must cover
(what the unbounded cache does) uses the fewest windows. So at every size, the hit rate under
``max_age`` is at most this ceiling, and at most the capacity curve's (no ``max_age``).
"""

from __future__ import annotations

import numpy as np

from featcache.analysis.trace import Trace
from featcache.errors import InvalidRequest

__all__ = ["freshness_ceiling"]


def freshness_ceiling(trace: Trace, max_age: float) -> float:
    """The hit rate of an unbounded cache along ``trace`` when a row older than ``max_age``
    seconds (since it was loaded) is a miss. Needs the trace's timestamps.

    Vectorized per id: each access's next possible miss (the first later access of its id
    beyond ``max_age``) by one search, then the chains of misses from each id's first access
    followed a link at a time for all ids at once (as many rounds as the most misses of one
    id).
    """
    if trace.timestamps is None:
        raise InvalidRequest(f"view {trace.view!r}: the freshness ceiling needs the time of "
                             f"each access (a ts column)")
    if not max_age >= 0:
        raise InvalidRequest(f"max_age must be a number of seconds >= 0, got {max_age!r}")
    codes, ts = trace.codes, trace.timestamps
    n = len(codes)
    order = np.argsort(codes, kind="stable")  # by id; within an id, in time order
    group = codes[order]
    times = ts[order]
    # Compare times and deadlines as ranks in one sorted list of both, so that the search
    # below runs on integers (id, rank) and an access exactly max_age after the load, which
    # is fresh, compares exactly as ``t > load + max_age`` does.
    deadlines = times + max_age
    _, ranks = np.unique(np.concatenate((times, deadlines)), return_inverse=True)
    ranks = ranks.reshape(-1).astype(np.int64)
    span = int(ranks.max()) + 1
    keys = group * span + ranks[:n]
    limits = group * span + ranks[n:]
    following = np.searchsorted(keys, limits, side="right")  # first access past the deadline
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], n]  # one past each id's last access
    end_of = np.repeat(ends, ends - starts)
    misses = len(starts)
    current = starts
    while len(current):
        nxt = following[current]
        current = nxt[nxt < end_of[current]]
        misses += len(current)
    return (n - misses) / n
