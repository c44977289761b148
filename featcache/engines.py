"""What the engine integrations share: the columns a load sends to the writer, the counts a
worker returns, and one set of ``Parts`` per worker process.

A Spark Python worker or a Ray actor writes many partitions; building ``Parts`` (a Redis pool,
an SQL engine that stays unconnected, the config checked) once per process and per config,
and keeping it for the process's life, is what "one Redis client per worker" means here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from featcache.config import CacheConfig, FeatureView, load_config
from featcache.keys import KeyLayout
from featcache.materialize import WRITE_COUNTS, WriteReport, load_epoch
from featcache.parts import Parts
from featcache.redis_store import open_store

__all__ = ["COUNTS", "columns_of", "config_of", "counts_row", "driver_epoch", "summed",
           "worker_parts"]

#: the counts a worker returns per partition, as ``WriteReport`` names them
COUNTS = WRITE_COUNTS

_PARTS: dict[CacheConfig, Parts] = {}
_LOCK = threading.Lock()


def config_of(config: CacheConfig | str) -> CacheConfig:
    """A config, or the path of a YAML file (read on the driver: workers get the object)."""
    return load_config(config) if isinstance(config, str) else config


def columns_of(view: FeatureView) -> list[str]:
    """The columns the writer reads: the entity, the event time, every feature's."""
    return [view.entity_column, view.event_timestamp_column, *(f.column for f in view.features)]


def worker_parts(config: CacheConfig) -> Parts:
    """This process's ``Parts`` for ``config``, built on first use and kept."""
    with _LOCK:
        parts = _PARTS.get(config)
        if parts is None:
            parts = _PARTS[config] = Parts(config)
        return parts


def driver_epoch(config: CacheConfig, view: str) -> bytes:
    """The view's epoch where the load starts (``load_epoch``), read by the driver: a Redis
    store and the key layout are all it takes."""
    store = open_store(config.redis, degradation=config.degradation)
    try:
        return load_epoch(store, KeyLayout.for_mode(config.redis.key_prefix, config.redis.mode),
                          view)
    finally:
        store.close()


def counts_row(report: WriteReport) -> dict[str, list[int]]:
    """One partition's counts, as the one-row column mapping a worker returns."""
    return {name: [getattr(report, name)] for name in COUNTS}


def summed(view: str, rows: Iterable[Mapping[str, Any]], seconds: float) -> WriteReport:
    """The load's report: every partition's counts added up."""
    totals = dict.fromkeys(COUNTS, 0)
    for row in rows:
        for name in COUNTS:
            totals[name] += int(row[name])
    return WriteReport(view, seconds=seconds, **totals)
