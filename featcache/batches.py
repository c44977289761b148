"""Arrow record batches of a view's rows, as the engine-agnostic writer takes them: checked,
converted to the declared types a column at a time, one row per id (the newest).

A batch holds the view's SQL column names, as ``put_rows`` takes them: the entity column, the
event timestamp column and every feature's column (others are ignored). A column whose Arrow
type already holds the feature's type exactly (``featcache.arrow_columns.holds_exactly``) is
kept as it is; a timestamp column becomes microseconds in one Arrow cast; anything else goes
through the feature's converter, so a batch converts exactly as ``put_rows`` would convert the
same rows. Arrow keeps null apart from NaN: a null float is missing, a NaN float is NaN. A value
that does not convert is an ``InvalidRequest`` naming its row, id and column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import pyarrow as pa

from featcache.arrow_columns import arrow_micros, holds_exactly
from featcache.config import FeatureView
from featcache.convert import ConversionError, convert_column, converter, timestamp_to_us
from featcache.errors import InvalidEntityId, InvalidRequest
from featcache.offline import RowColumns
from featcache.request import EntityId, check_id

__all__ = ["BatchRows", "batch_rows"]


class BatchRows(NamedTuple):
    """One batch's rows, ready for ``Parts.prepare_columns``: ``rows`` (one per id, the one
    with the latest event time of the batch), ``received`` (rows in the batch) and ``older``
    (rows dropped for a later row of the same id in the same batch)."""

    rows: RowColumns
    received: int
    older: int


def batch_rows(view: FeatureView, batch: pa.RecordBatch | pa.Table, max_id_length: int
               ) -> BatchRows:
    """``batch`` checked and converted (see the module docstring)."""
    names = set(batch.schema.names)
    wanted = [view.entity_column, view.event_timestamp_column,
              *(f.column for f in view.features)]
    lacking = [c for c in wanted if c not in names]
    if lacking:
        raise InvalidRequest(
            f"a batch of view {view.name!r} lacks the column(s) {', '.join(lacking)} "
            f"(columns: {', '.join(wanted)})")
    received = batch.num_rows
    if not received:
        return BatchRows(RowColumns([], [], [[] for _ in view.features]), 0, 0)
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    raw_ids = table.column(view.entity_column).to_pylist()
    ids = _ids(view, raw_ids, max_id_length)
    event_column = table.column(view.event_timestamp_column)
    events = arrow_micros(event_column)
    if events is None:
        events = _convert(view, ids, view.event_timestamp_column,
                          event_column.to_pylist(), timestamp_to_us)
    columns: list[Sequence[Any]] = []
    for feature in view.features:
        column = table.column(feature.column)
        values = column.to_pylist()
        if not holds_exactly(feature.type, column.type):
            try:
                values = list(convert_column(feature.type, values))
            except ConversionError:
                values = _convert(view, ids, feature.column, values, converter(feature.type))
        columns.append(values)
    if len(set(ids)) == len(ids):
        return BatchRows(RowColumns(ids, events, columns), received, 0)
    return _newest(ids, events, columns, received)


def _ids(view: FeatureView, raw: list[Any], max_id_length: int) -> list[EntityId]:
    out = []
    for i, value in enumerate(raw):
        try:
            out.append(check_id(value, view.entity_type, max_id_length))
        except InvalidEntityId as exc:
            raise InvalidEntityId(f"view {view.name!r}, row {i}: {exc}") from None
    return out


def _convert(view: FeatureView, ids: Sequence[EntityId], column: str, values: list[Any],
             convert: Any) -> list[Any]:
    """``convert`` over ``values`` row by row, for the error that names the row."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(convert(value))
        except ConversionError as exc:
            raise InvalidRequest(f"view {view.name!r}, row {i} (id {ids[i]!r}), column "
                                 f"{column!r}: {exc}") from None
    return out


def _newest(ids: list[EntityId], events: Sequence[int | None],
            columns: list[Sequence[Any]], received: int) -> BatchRows:
    """One row per id: the one with the latest event time (the last of equal ones)."""
    best: dict[EntityId, int] = {}
    for i, entity in enumerate(ids):
        j = best.get(entity)
        if j is None or (events[i] or -(2**63)) >= (events[j] or -(2**63)):
            best[entity] = i
    keep = sorted(best.values())
    rows = RowColumns([ids[i] for i in keep], [events[i] for i in keep],
                      [[column[i] for i in keep] for column in columns])
    return BatchRows(rows, received, received - len(keep))
