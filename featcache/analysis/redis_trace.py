"""The sampled trace of a view kept in Redis: what ``featcache analyze --config C --view V``
analyses.

Serving processes with ``stats.trace_rate`` above 0 record the reads of the ids
``featcache.analysis.sampling.sampled`` keeps, with their times and the rate, into Redis
(``featcache.access_trace``); ``read_redis_trace`` reads them back as a ``Trace``
(``sampling_rate`` set, and ``full_accesses``: the recorder counts every read it covered, so
the adjusted SHARDS estimate applies). Everything after it (curves, picture, JSON) is shared
with ``--trace FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.access_trace import read_trace
from featcache.analysis.trace import Trace
from featcache.config import CacheConfig
from featcache.errors import InvalidRequest
from featcache.keys import KeyLayout
from featcache.redis_store import open_store

__all__ = ["RedisTrace", "read_redis_trace"]


@dataclass(frozen=True)
class RedisTrace:
    """A view's sampled trace from Redis, and the Redis memory of one of its rows if known."""

    trace: Trace
    bytes_per_row: float | None = None


def read_redis_trace(config: CacheConfig, view: str) -> RedisTrace:
    """The sampled trace of ``view`` recorded in the Redis of ``config``.

    Raises ``UnknownView`` for a view the config does not declare, ``InvalidRequest`` when
    no trace of it is recorded, ``CacheUnavailable`` when Redis cannot be read.
    """
    name = config.view(view).name
    store = open_store(config.redis, degradation=config.degradation)
    try:
        recorded = read_trace(store, KeyLayout.for_mode(config.redis.key_prefix,
                                                        config.redis.mode), name)
    finally:
        store.close()
    if recorded is None or not recorded.ids:
        raise InvalidRequest(
            f"view {name!r}: no sampled trace is recorded in Redis (set stats.trace_rate "
            f"above 0 in the serving processes' config, e.g. 0.01, and let them serve), or "
            f"analyse a trace file: featcache analyze --trace FILE --view {name}")
    trace = Trace.of(name, np.asarray(recorded.ids), recorded.times, recorded.rate,
                     max(recorded.reads, len(recorded.ids)))
    return RedisTrace(trace)
