"""The write path: ``put_rows`` and ``fence``, the one way rows get into Redis from outside
the read path (the warmer, backfills, the ETL).

Rows are converted and checked completely before any I/O; they are written through the same
conditional script as fills (``featcache.redis_store``): without a fence, an older row (by event
timestamp) never replaces a newer one; with a fence taken before the writer read SQL, a row is
written only where nothing changed since (no stale set, DESIGN section 4).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from operator import itemgetter
from typing import Any

from featcache.codec import NO_EVENT, RowCodec
from featcache.config import FeatureView, InvalidationConfig, LimitsConfig
from featcache.convert import ConversionError, converter, timestamp_to_us
from featcache.errors import InvalidEntityId, InvalidRequest
from featcache.keys import KeyLayout
from featcache.offline import RowColumns, SqlRow
from featcache.redis_store import (
    IfAbsent,
    RedisStore,
    TimedRead,
    WriteBatch,
    WriteItem,
    fenced_write,
    row_write,
)
from featcache.request import EntityId, check_id, normalize_ids
from featcache.stats import CacheStats
from featcache.types import FeatureType

__all__ = ["Fence", "PendingFence", "PendingWrite", "PutReport", "RowWriter"]

_EVENT, _VALUES = itemgetter(0), itemgetter(1)  # of an ``SqlRow``


@dataclass(frozen=True, slots=True)
class PutReport:
    """What ``put_rows`` did: rows written; rows skipped because Redis held a newer one; rows
    not written because their key changed since the fence (an invalidation or a newer fill)."""

    written: int
    skipped_older: int
    fenced_off: int = 0


@dataclass(frozen=True, slots=True)
class Fence:
    """What Redis held for some rows of one view before a writer read them from SQL."""

    view: str
    epoch_raw: bytes
    seen: dict[EntityId, bytes | None]
    taken_at: float = 0.0  # time.monotonic() when it was taken: fences expire (fence_ttl / 2)
    #: the cache's clock (ms) when it was taken, before the SQL read it fences: rows written
    #: under it are stamped loaded then, never later than the read began (as fills are)
    loaded_ms: int | None = None
    #: the server's clock (microseconds) past which its writes land nowhere: its MGET's time
    #: plus fence_ttl / 2, checked by the write scripts themselves (0: no server-side check)
    deadline_us: int = 0
    #: the row keys of ``seen``'s ids, in its order: a write of exactly those rows (the bulk
    #: path's usual chunk) uses them instead of building every key again
    keys: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """Rows of one view encoded for Redis (``RowWriter.prepare_latest``), not yet sent.

    ``send()`` writes them in one round trip and reports as ``put_latest`` does. The fence's
    age is checked then, when the rows are written, not when they were encoded.
    """

    writer: RowWriter
    view: str
    rows: int
    batch: WriteBatch | None  # None: no rows
    fence: Fence | None

    def send(self) -> PutReport:
        return self.writer._send(self)


class PendingFence:
    """A fence prepared (``RowWriter.start_fence``): ``send()`` sends its read, ``result()``
    (once, sending it first if need be) waits for it and returns the ``Fence``. Its age and
    its rows' loaded time count from ``send()``, the earlier side of the server's read."""

    __slots__ = ("_sent", "_writer", "epoch_key", "ids", "keys", "loaded_ms", "read",
                 "taken_at", "view")

    def __init__(self, writer: RowWriter, view: str, ids: list[EntityId], keys: list[str],
                 epoch_key: str, read: TimedRead) -> None:
        self._writer = writer
        self.view, self.ids, self.keys, self.epoch_key, self.read = (
            view, ids, keys, epoch_key, read)
        self._sent = False
        self.taken_at = 0.0
        self.loaded_ms = 0

    def send(self) -> None:
        if not self._sent:
            self.taken_at = time.monotonic()
            self.loaded_ms = int(self._writer._clock() * 1000)
            self.read.send()
            self._sent = True

    def result(self) -> Fence:
        self.send()
        return self._writer._fence_of(self)


class RowWriter:
    """``put_rows`` and ``fence`` for every view of one cache."""

    def __init__(
        self,
        invalidation: InvalidationConfig,
        limits: LimitsConfig,
        layout: KeyLayout,
        codecs: Mapping[str, RowCodec],
        redis_store: RedisStore,
        stats: CacheStats,
        clock: Callable[[], float],
        view_of: Callable[[str | FeatureView], FeatureView],
    ) -> None:
        # fenced writes land only within the fill window; ids are checked against the limits
        self._fill_window = invalidation.fill_window
        self._max_id_length = limits.max_id_length
        self._layout = layout
        self._codecs = codecs
        self._redis = redis_store
        self._stats = stats
        self._clock = clock
        self._view = view_of

    def put_rows(
        self, view: str | FeatureView, rows: Any, *, fence: Fence | None = None
    ) -> PutReport:
        """Write rows of one view into Redis: the one write path of the warmer and the hook.

        ``rows``: a list of dicts, one dict, a pandas DataFrame or a pyarrow Table, with the
        view's SQL column names (entity column, event timestamp column, every feature column;
        other columns are ignored). A row older (by event timestamp) than the row already in
        Redis is skipped, never written over it; of several rows for one id, the latest is
        written. In a DataFrame, NaN (or NaT) in the column of a non-float feature means
        missing, as pandas stores it there; in a float column NaN stays NaN (pandas cannot tell
        the two apart): pass None through dicts or Arrow for a missing float.

        Rows you computed yourself are current by definition and replace tombstones. Rows you
        *read from SQL* must be fenced: ``f = cache.fence(view, ids)`` before the read, then
        ``put_rows(view, rows, fence=f)``; a row whose key changed since the fence (an
        invalidation, a newer fill) is not written and counts in ``fenced_off``.
        """
        view_def = self._view(view)
        if fence is not None and fence.view != view_def.name:
            raise InvalidRequest(f"the fence is for view {fence.view!r}, not {view_def.name!r}")
        is_frame = type(rows).__name__ == "DataFrame"
        columns = _columns(rows)
        if not columns or not next(iter(columns.values())):
            return PutReport(0, 0)
        if is_frame:  # pandas' missing str/int/bool/embedding is a NaN in an object or float column
            for f in view_def.features:
                if f.type is not FeatureType.FLOAT and f.column in columns:
                    columns[f.column] = list(map(_nan_to_none, columns[f.column]))
        wanted = [view_def.entity_column, view_def.event_timestamp_column,
                  *(f.column for f in view_def.features)]
        lacking = [c for c in wanted if c not in columns]
        if lacking:
            raise InvalidRequest(
                f"put_rows({view_def.name!r}): rows lack the column(s) {', '.join(lacking)}; "
                f"a row must be complete (columns: {', '.join(wanted)})"
            )
        entity_col = columns[view_def.entity_column]
        feature_cols = [columns[f.column] for f in view_def.features]
        converters = [converter(f.type) for f in view_def.features]
        events = columns[view_def.event_timestamp_column]
        ids: list[EntityId] = []
        events_us: list[int | None] = []
        value_rows: list[list[Any]] = []
        for i, raw_id in enumerate(entity_col):  # all rows are checked before any I/O
            try:
                eid = check_id(raw_id, view_def.entity_type, self._max_id_length)
            except InvalidEntityId as exc:
                raise InvalidEntityId(f"put_rows({view_def.name!r}), row {i}: {exc}") from None
            if fence is not None and eid not in fence.seen:
                raise InvalidRequest(
                    f"put_rows({view_def.name!r}), row {i}: id {eid!r} is not in the fence; "
                    "take the fence over every id you write, before reading SQL"
                )
            column = view_def.event_timestamp_column
            try:
                event_us = timestamp_to_us(events[i])
                values = []
                for feature, conv, col in zip(
                    view_def.features, converters, feature_cols, strict=True
                ):
                    column = feature.column
                    values.append(conv(col[i]))
            except ConversionError as exc:
                raise InvalidRequest(
                    f"put_rows({view_def.name!r}), row {i} (id {eid!r}), column {column!r}: {exc}"
                ) from None
            ids.append(eid)
            events_us.append(event_us)
            value_rows.append(values)
        dropped = 0
        if len(set(ids)) < len(ids):
            ids, events_us, value_rows = _newest_per_id(ids, events_us, value_rows)
            dropped = len(entity_col) - len(ids)
        report = self._prepare(
            view_def, ids, fence, self._row_encoder(view_def, events_us, value_rows)
        ).send()
        if not dropped:
            return report
        self._stats.add(view_def.name, {"rows_skipped_older": dropped})
        return replace(report, skipped_older=report.skipped_older + dropped)

    def put_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PutReport:
        """Write rows exactly as the offline store returned them (already converted to the
        declared types): the bulk path, which would otherwise convert every value twice."""
        return self.prepare_latest(view, rows, fence=fence).send()

    def prepare_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PendingWrite:
        """``put_latest`` up to the write: the rows checked, encoded and keyed, nothing sent
        yet (see ``FeatureCache.prepare_latest``)."""
        view_def = self._view(view)
        _require_fenced("put_latest", view_def, rows, fence)
        found = rows.values()
        events_us, values = list(map(_EVENT, found)), list(map(_VALUES, found))
        return self._prepare(
            view_def, list(rows), fence, self._row_encoder(view_def, events_us, values)
        )

    def prepare_columns(
        self, view: str | FeatureView, rows: RowColumns, *, fence: Fence | None
    ) -> PendingWrite:
        """``prepare_latest`` of rows as columns (``IdRunReader.read_columns``): encoded from
        the columns, with no tuple per row (docs/benchmarks.md)."""
        view_def = self._view(view)
        if len(rows.columns) != len(view_def.features):
            raise InvalidRequest(
                f"prepare_columns({view_def.name!r}): {len(rows.columns)} columns for "
                f"{len(view_def.features)} features"
            )
        _require_fenced("prepare_columns", view_def, rows.ids, fence)
        codec = self._codecs[view_def.name]
        return self._prepare(
            view_def, rows.ids, fence,
            lambda loaded_ms, epoch: codec.encode_columns(
                rows.events_us, rows.columns, loaded_ms, epoch),
        )

    def _row_encoder(
        self,
        view_def: FeatureView,
        events_us: Sequence[int | None],
        values: Sequence[Sequence[Any]],
    ) -> Callable[[int, int], list[bytes]]:
        """``_prepare``'s ``encode`` for rows given as a sequence of feature values each."""
        codec = self._codecs[view_def.name]
        return lambda loaded_ms, epoch: codec.encode_many(events_us, values, loaded_ms, epoch)

    def _prepare(
        self,
        view_def: FeatureView,
        ids: Sequence[EntityId],
        fence: Fence | None,
        encode: Callable[[int, int], list[bytes]],
    ) -> PendingWrite:
        """The write of ``ids``' rows, already converted and checked: ``encode(loaded_ms,
        epoch)`` gives their values in ``ids``' order, once the stamps are known; keys and
        write items are built without a Python step per row (the bulk path writes 10k rows a
        chunk)."""
        if not ids:
            return PendingWrite(self, view_def.name, 0, None, fence)
        # under a fence the rows are as old as the SQL read that began after it
        now_ms = (fence.loaded_ms if fence is not None and fence.loaded_ms is not None
                  else int(self._clock() * 1000))
        epoch_key = self._layout.epoch_key(view_def.name)
        if fence is not None:
            epoch_raw = fence.epoch_raw
        else:  # rows are stamped with the current epoch; a whole-view invalidation after
            # this read makes them misses, which is the safe direction
            (epoch_raw,) = self._redis.ensure_epochs([epoch_key])
        encoded = encode(now_ms, int(epoch_raw))
        if fence is not None and len(fence.keys) == len(ids) and list(fence.seen) == ids:
            keys = fence.keys
        else:
            keys = self._layout.row_keys(view_def.name, ids)
        ttl_ms = int(view_def.ttl * 1000)
        writes: list[WriteItem] = []
        if_absent: IfAbsent | None = None
        if fence is None:
            writes = list(map(row_write, keys, encoded, repeat(ttl_ms)))
        else:
            seen = list(map(fence.seen.__getitem__, ids))
            if seen.count(None) == len(seen):  # a cold cache: every row goes in with SET NX
                if_absent = IfAbsent(keys, encoded, ttl_ms)
            else:
                writes = list(map(fenced_write, keys, encoded, repeat(ttl_ms), seen))
        batch = WriteBatch(epoch_key, None if fence is None else fence.epoch_raw, writes,
                           if_absent=if_absent,
                           deadline_us=fence.deadline_us if fence is not None else 0,
                           rows_epoch=epoch_raw)
        return PendingWrite(self, view_def.name, len(ids), batch, fence)

    def _send(self, pending: PendingWrite) -> PutReport:
        view, rows, fence = pending.view, pending.rows, pending.fence
        if pending.batch is None:
            return PutReport(0, 0)
        if fence is not None and time.monotonic() - fence.taken_at > self._fill_window:
            # a tombstone laid after the fence may have expired by now, and with it the
            # proof that the rows are stale: write nothing, as the read path does
            self._stats.add(view, {"fills_abandoned": rows})
            return PutReport(0, 0, rows)
        written = self._redis.write([pending.batch])
        skipped = rows - written
        report = PutReport(written, 0 if fence else skipped, skipped if fence else 0)
        self._stats.add(view, {"rows_written": report.written,
                               "rows_skipped_older": report.skipped_older,
                               "fills_fenced": report.fenced_off})
        return report

    def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """Note what Redis holds for these rows, *before* reading them from SQL.

        A writer that reads SQL and then calls ``put_rows(view, rows, fence=f)`` (the warmer
        does) writes a row only if nothing changed it since the fence: an invalidation in
        between leaves a tombstone, so a value read before it is never written after it.
        """
        return self.start_fence(view, entity_ids).result()

    def start_fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> PendingFence:
        """``fence`` in steps: its read prepared now, sent by ``send()``, the ``Fence`` built
        by ``result()`` (before reading SQL). The bulk writer prepares the next chunk's fence
        while a write is in flight, sends it the moment that write lands and then sends the
        next write, so the server reads the fence and goes straight on to writing."""
        view_def = self._view(view)
        ids = normalize_ids(entity_ids, view_def.entity_type, self._max_id_length)
        epoch_key = self._layout.epoch_key(view_def.name)
        keys = self._layout.row_keys(view_def.name, ids)
        return PendingFence(self, view_def.name, ids, keys, epoch_key,
                            self._redis.timed_read([*keys, epoch_key]))

    def _fence_of(self, pending: PendingFence) -> Fence:
        raw, server_us = pending.read.result()
        epoch_raw = raw[-1]
        if epoch_raw is None:  # never stamp rows with an epoch a lost key reads as again
            (epoch_raw,) = self._redis.ensure_epochs([pending.epoch_key])
        return Fence(pending.view, epoch_raw, dict(zip(pending.ids, raw[:-1], strict=True)),
                     pending.taken_at, pending.loaded_ms,
                     server_us + int(self._fill_window * 1_000_000), pending.keys)



def _require_fenced(
    caller: str, view_def: FeatureView, ids: Collection[EntityId], fence: Fence | None
) -> None:
    """Rows read from SQL under a fence are written only if the fence noted every one."""
    if fence is not None and not all(map(fence.seen.__contains__, ids)):
        lacking = [eid for eid in ids if eid not in fence.seen]
        raise InvalidRequest(
            f"{caller}({view_def.name!r}): ids {lacking[:5]!r} are not in the fence"
        )


def _newest_per_id(
    ids: list[EntityId], events_us: list[int | None], values: list[list[Any]]
) -> tuple[list[EntityId], list[int | None], list[list[Any]]]:
    """One row per id: the one with the latest event time, the last given among equals (what
    the unfenced write script would leave; under a fence the first row written would change
    the key and fence the newer one off, or SET NX keep the first)."""
    best: dict[EntityId, int] = {}
    for i, (eid, event) in enumerate(zip(ids, events_us, strict=True)):
        j = best.get(eid)
        if j is None or _event_order(event) >= _event_order(events_us[j]):
            best[eid] = i
    keep = sorted(best.values())
    return [ids[i] for i in keep], [events_us[i] for i in keep], [values[i] for i in keep]


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _event_order(event_us: int | None) -> int:
    return NO_EVENT if event_us is None else event_us  # as the write script compares them


def _columns(rows: Any) -> dict[str, list[Any]]:
    """Column name -> list of Python values, from dicts, a DataFrame or an Arrow table."""
    pa = sys.modules.get("pyarrow")  # an Arrow table can only come from a loaded pyarrow
    if pa is not None and isinstance(rows, pa.Table | pa.RecordBatch):
        return {name: rows.column(name).to_pylist() for name in rows.column_names}
    if type(rows).__name__ == "DataFrame" and hasattr(rows, "columns"):
        return {str(name): rows[name].tolist() for name in rows.columns}
    if isinstance(rows, Mapping):
        rows = [rows]
    if not isinstance(rows, Iterable) or isinstance(rows, str | bytes):
        raise InvalidRequest(
            f"rows must be dicts, a DataFrame or an Arrow table, got {type(rows).__name__}"
        )
    rows = list(rows)
    if not rows:
        return {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidRequest(f"row {i} is {type(row).__name__}, expected a dict")
    names = list(rows[0])
    for i, row in enumerate(rows):
        if len(row) != len(names) or any(name not in row for name in names):
            lacking = sorted(set(names) - set(row)) or sorted(set(row) - set(names))
            raise InvalidRequest(
                f"row {i} does not have the same keys as row 0 (differs in "
                f"{', '.join(map(str, lacking))}); a missing value is None, never an absent key"
            )
    return {name: [row[name] for row in rows] for name in names}
