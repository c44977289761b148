"""Materialize a Spark DataFrame: ``featcache.spark.materialize(df, view, config)``.

Every partition runs the fenced writer (``write_batches``) through ``mapInArrow`` on its
Python worker, with that process's ``Parts`` (one Redis pool per worker, kept across tasks
while Spark reuses the worker), and returns its counts; the driver sums them. A task that
fails is retried by Spark as any task is: its batches are written again, which the writer
makes harmless (rows already there are rewritten with the same values or fenced off; an older
row never replaces a newer one). An invalidation during the load keeps its rows out (a
tombstone, or the view's epoch read on the driver before the job: ``write_batches``). A job
that fails for good raises Spark's error from ``materialize``. Works with Spark Connect where
featcache is installed on the server's Python workers (the function is shipped by reference
to this module). Needs ``featcache[spark]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from featcache.config import CacheConfig
from featcache.engines import (
    COUNTS,
    columns_of,
    config_of,
    counts_row,
    driver_epoch,
    summed,
    worker_parts,
)
from featcache.materialize import WriteReport, write_batches

if TYPE_CHECKING:
    import pyspark.sql

__all__ = ["materialize"]

_SCHEMA = ", ".join(f"{name} long" for name in COUNTS)


class _Partition:
    """The function every partition runs: picklable, holding the config and the view."""

    def __init__(self, config: CacheConfig, view: str, epoch: bytes) -> None:
        self.config = config
        self.view = view
        self.epoch = epoch

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        report = write_batches(worker_parts(self.config), self.view, batches,
                               since_epoch=self.epoch)
        yield pa.RecordBatch.from_pydict(counts_row(report))


def materialize(df: pyspark.sql.DataFrame, view: str, config: CacheConfig | str
                ) -> WriteReport:
    """Write ``df``'s rows of ``view`` into Redis, every partition in parallel; the summed
    report. Batches are as Spark sends them (``spark.sql.execution.arrow.maxRecordsPerBatch``,
    10,000 rows by default)."""
    cache_config = config_of(config)
    view_def = cache_config.view(view)
    started = time.perf_counter()
    epoch = driver_epoch(cache_config, view_def.name)
    rows = df.select(*columns_of(view_def)).mapInArrow(
        _Partition(cache_config, view_def.name, epoch), _SCHEMA).collect()
    return summed(view_def.name, (row.asDict() for row in rows), time.perf_counter() - started)
