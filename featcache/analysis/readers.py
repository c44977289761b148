"""Reading a trace from a user's file: CSV or Parquet, one access per row.

Columns: ``view`` (the feature view read), ``entity_id`` (ints or strings) and optionally
``ts`` (the time of the access in seconds, any epoch; a Parquet or CSV timestamp column is
converted to seconds since 1970). Other columns are ignored. Rows are taken in file order, or
with ``ts``, in ``ts`` order (ties in file order), so logs merged from several processes need
no sorting first. Every problem with the file is an ``InvalidRequest`` naming it: a file that
is missing or unreadable, a missing column, a view with no rows, an empty or null value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featcache.analysis.trace import Trace
from featcache.errors import InvalidRequest

__all__ = ["REQUIRED_COLUMNS", "read_trace"]

REQUIRED_COLUMNS = ("view", "entity_id")
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


def read_trace(path: str | Path, view: str, sampling_rate: float = 1.0,
               full_accesses: int | None = None) -> Trace:
    """The accesses of ``view`` in the file, as a ``Trace`` taken at ``sampling_rate`` (of a
    whole trace of ``full_accesses`` accesses, when known)."""
    path = Path(path)
    table = _read_table(path)
    names = set(table.column_names)
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise InvalidRequest(
            f"trace file {path}: no column {' or '.join(repr(m) for m in missing)} (a trace "
            f"has columns view, entity_id and optionally ts; found: "
            f"{', '.join(table.column_names) or 'none'})"
        )
    views = table.column("view").cast(pa.string())
    mine = table.filter(pc.equal(views, pa.scalar(view, pa.string())))
    if mine.num_rows == 0:
        found = sorted(v for v in pc.unique(views).to_pylist() if v is not None)
        shown = ", ".join(repr(v) for v in found[:10]) + (", ..." if len(found) > 10 else "")
        raise InvalidRequest(
            f"trace file {path}: no accesses of view {view!r}"
            + (f" (views in the file: {shown})" if found else " (the file has no rows)")
        )
    ids = _ids(mine.column("entity_id"), path)
    timestamps = _seconds(mine.column("ts"), path) if "ts" in names else None
    if timestamps is not None:
        order = np.argsort(timestamps, kind="stable")
        ids, timestamps = ids[order], timestamps[order]
    return Trace(view, ids, timestamps, sampling_rate, full_accesses)


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise InvalidRequest(f"trace file {path}: no such file")
    try:
        if _is_parquet(path):
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidRequest(f"trace file {path}: cannot read it: {exc}") from None


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return True
    with path.open("rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def _ids(column: pa.ChunkedArray[Any], path: Path) -> np.ndarray[Any, Any]:
    _no_nulls(column, "entity_id", path)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_integer(kind):
        return column.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    raise InvalidRequest(
        f"trace file {path}: entity_id must hold integers or strings, got {kind}"
    )


def _seconds(column: pa.ChunkedArray[Any], path: Path) -> np.ndarray[Any, np.dtype[np.float64]]:
    _no_nulls(column, "ts", path)
    kind = column.type
    if pa.types.is_timestamp(kind):
        micros = column.cast(pa.timestamp("us", tz=kind.tz)).cast(pa.int64())
        return micros.to_numpy().astype(np.float64) / 1e6
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        seconds = column.to_numpy().astype(np.float64, copy=False)
        if not np.isfinite(seconds).all():
            raise InvalidRequest(f"trace file {path}: ts has a NaN or infinite value")
        return seconds
    raise InvalidRequest(
        f"trace file {path}: ts must be seconds (a number) or a timestamp, got {kind}"
    )


def _no_nulls(column: pa.ChunkedArray[Any], name: str, path: Path) -> None:
    if column.null_count:
        raise InvalidRequest(
            f"trace file {path}: {column.null_count:,} rows of the view have no {name}"
        )
