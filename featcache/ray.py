"""Materialize a Ray Dataset: ``featcache.ray.materialize(dataset, view, config)``.

The dataset's rows (the view's SQL column names, as ``put_rows`` takes them) go through
``map_batches`` with a callable class: each actor builds its ``Parts`` once (one Redis pool
per actor) and writes every block it is given with ``write_batches``, the fenced writer, then
returns that block's counts; the driver sums them. An invalidation during the load keeps its
rows out (a tombstone, or the view's epoch read on the driver: ``write_batches``). A failure in
any actor is raised by
``materialize`` (Ray's own error, with the worker's exception inside it). Needs
``featcache[ray]``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pyarrow as pa

from featcache.config import CacheConfig
from featcache.engines import (
    columns_of,
    config_of,
    counts_row,
    driver_epoch,
    summed,
    worker_parts,
)
from featcache.materialize import WriteReport, write_batches

if TYPE_CHECKING:
    import ray.data

__all__ = ["materialize"]


class _Writer:
    """One per actor: the view's rows written block by block on this process's ``Parts``."""

    def __init__(self, config: CacheConfig, view: str, epoch: bytes) -> None:
        self._parts = worker_parts(config)
        self._view = view
        self._epoch = epoch

    def __call__(self, block: pa.Table) -> pa.Table:
        report = write_batches(self._parts, self._view, [block], since_epoch=self._epoch)
        return pa.table(counts_row(report))


def materialize(
    dataset: ray.data.Dataset,
    view: str,
    config: CacheConfig | str,
    *,
    actors: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 10_000,
) -> WriteReport:
    """Write ``dataset``'s rows of ``view`` into Redis, ``batch_size`` rows a write, by a
    pool of ``actors`` actors of ``num_cpus`` CPUs each; the summed report. An actor that
    holds a whole CPU for each core leaves none to the tasks that read the dataset (Ray then
    waits forever): half a CPU each by default, as a writer spends much of its time waiting
    on Redis."""
    import ray.data  # noqa: PLC0415 - the optional dependency, loaded when used

    cache_config = config_of(config)
    view_def = cache_config.view(view)
    started = time.perf_counter()
    written = dataset.select_columns(columns_of(view_def)).map_batches(
        _Writer, fn_constructor_args=(cache_config, view_def.name,
                                      driver_epoch(cache_config, view_def.name)),
        batch_format="pyarrow",
        batch_size=batch_size, zero_copy_batch=True, num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors))
    return summed(view_def.name, written.iter_rows(), time.perf_counter() - started)
