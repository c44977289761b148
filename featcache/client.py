"""``FeatureCache``: the serving client. It holds the policy; the stores only move bytes.

Data flows one way: the caller -> (L1, a later addition) -> Redis -> SQL, and fills flow back
into Redis. One call costs one Redis read round trip for all views, at most one SQL query per
view per chunk of ids, and one Redis write round trip for everything it filled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from types import TracebackType
from typing import Any

import pyarrow as pa
import redis
import sqlalchemy as sa

from featcache.codec import KIND_ABSENT, KIND_ROW, RowCodec
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.convert import ConversionError, converter, timestamp_to_us
from featcache.errors import (
    CacheUnavailable,
    InvalidEntityId,
    InvalidRequest,
    OfflineStoreError,
    UnknownView,
)
from featcache.freshness import fresh_since
from featcache.invalidation import InvalidationReport, Invalidator
from featcache.keys import KeyLayout
from featcache.offline import OfflineStore
from featcache.redis_store import (
    RedisStore,
    WriteBatch,
    WriteItem,
    connect,
    fenced_write,
    row_write,
)
from featcache.request import EntityId, Planner, ViewPlan, check_id, normalize_ids
from featcache.result import Answer, FeatureResult
from featcache.stats import CacheStats
from featcache.types import Status

__all__ = ["FeatureCache", "Fence", "PutReport"]

log = logging.getLogger("featcache")

Clock = Callable[[], float]


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


class _Fill:
    """What one call will write back for one view, and the fence it was read under."""

    __slots__ = ("epoch", "epoch_raw", "items", "seen", "view")

    def __init__(self, vp: ViewPlan, epoch_raw: bytes | None) -> None:
        self.view = vp.view.name
        self.epoch_raw = epoch_raw or b""
        self.epoch = int(epoch_raw) if epoch_raw else 0
        self.seen: dict[EntityId, bytes] = {}  # what Redis held for each row before SQL
        self.items: list[WriteItem] = []

    def batch(self, layout: KeyLayout) -> WriteBatch:
        return WriteBatch(layout.view_key(self.view, "epoch"), self.epoch_raw, self.items)


class FeatureCache:
    """Batched read-through cache of feature rows: Redis in front of a SQL offline store.

    ``clock`` returns seconds since the epoch (``time.time`` by default); tests inject their own.
    ``redis_client`` and ``engine`` let an application share its pools; by default they are
    built from the config's URLs and closed by ``close()``.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        clock: Clock = time.time,
        redis_client: redis.Redis | None = None,
        engine: sa.Engine | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._layout = KeyLayout(config.key_prefix)
        self._codecs = {view.name: RowCodec(view) for view in config.views}
        self._views = {view.name: view for view in config.views}
        self._planner = Planner(config, self._codecs)
        self._owns_redis = redis_client is None
        client = redis_client or connect(
            config.redis_url,
            socket_timeout=config.redis_socket_timeout,
            connect_timeout=config.redis_connect_timeout,
            max_connections=config.redis_max_connections,
        )
        self._redis = RedisStore(client, config.redis_read_chunk)
        self._offline = OfflineStore(config, engine)
        self._stats = CacheStats()
        self._invalidator = Invalidator(
            self._redis,
            self._layout,
            fence_ttl_ms=int(config.fence_ttl * 1000),
            stream_maxlen=config.stream_maxlen,
            max_id_length=config.max_id_length,
        )
        # A fill is written back only while the tombstone of an invalidation it may have raced
        # with is certainly still in Redis (half its TTL; the other half is margin).
        self._fill_deadline = config.fence_ttl / 2

    @classmethod
    def from_config(cls, path: str | PathLike[str], **kwargs: Any) -> FeatureCache:
        """Load a YAML config (``FEATCACHE_...`` environment overrides apply)."""
        return cls(load_config(path), **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._owns_redis:
            self._redis.close()
        self._offline.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def layout(self) -> KeyLayout:
        return self._layout

    @property
    def redis(self) -> redis.Redis:
        return self._redis.client

    @property
    def engine(self) -> sa.Engine:
        return self._offline.engine

    def _view(self, view: str | FeatureView) -> FeatureView:
        view_def = self._views.get(view if isinstance(view, str) else view.name)
        if view_def is None:
            raise UnknownView(str(view), list(self._views))
        return view_def

    # ------------------------------------------------------------------ invalidation

    def invalidate(
        self, view: str | FeatureView, entity_ids: Iterable[Any] | None = None
    ) -> InvalidationReport:
        """Tell every server that these rows (or, without ids, the whole view) changed in SQL.

        Call it after the ETL's transaction commits. No read that starts after it returns gets
        a value read from SQL before it (DESIGN section 4); in-process L1 caches drop the rows
        through the invalidation stream.
        """
        return self._invalidator.invalidate(self._view(view), entity_ids)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per view: hits, fills, absent, stale served, decode and backend errors."""
        return self._stats.snapshot()

    # ------------------------------------------------------------------ read path

    def get_features(
        self, entity_ids: Iterable[EntityId], feature_names: Sequence[str]
    ) -> FeatureResult:
        """Every requested feature of every entity, each with a status; see DESIGN section 2.

        Raises ``InvalidRequest`` subclasses before any I/O for bad arguments, and
        ``OfflineStoreUnavailable``/``OfflineStoreError`` only when SQL fails for a row that has
        no value within ``stale_if_error`` to serve instead.
        """
        if isinstance(feature_names, str):
            raise InvalidRequest(
                f"feature_names must be a list of names, not the string {feature_names!r}; "
                f"write [{feature_names!r}]"
            )
        try:
            plan = self._planner.plan(tuple(feature_names))
        except TypeError:
            raise InvalidRequest("feature_names must be a list of strings") from None
        ids = normalize_ids(entity_ids, plan.entity_type, self.config.max_id_length)
        if not ids:
            return FeatureResult(ids, plan, [{} for _ in plan.views])
        now_ms = int(self._clock() * 1000)
        started = time.monotonic()
        keys: list[str] = []
        for view_plan in plan.views:
            keys.extend(self._layout.row_keys(view_plan.view.name, ids))
        # the epochs ride in the same MGET: one round trip, and a consistent fence for the fill
        keys.extend(self._layout.view_key(vp.view.name, "epoch") for vp in plan.views)
        try:
            raw: list[bytes | None] = self._redis.read(keys)
        except CacheUnavailable as exc:
            log.warning("Redis read failed, answering from SQL: %s", exc)
            self._stats.add(plan.views[0].view.name, {"redis_errors": 1})
            raw = [None] * len(keys)
        answers: list[dict[EntityId, Answer]] = []
        batches: list[WriteBatch] = []
        n = len(ids)
        epochs = raw[len(plan.views) * n :]
        for v, view_plan in enumerate(plan.views):
            epoch_raw = epochs[v]
            fill = _Fill(view_plan, epoch_raw)
            answers.append(
                self._answer_view(view_plan, ids, raw[v * n : (v + 1) * n], now_ms, fill)
            )
            if fill.items:
                batches.append(fill.batch(self._layout))
        if batches:
            self._write_fills(plan.views[0].view.name, batches, started)
        return FeatureResult(ids, plan, answers)

    def _answer_view(
        self,
        vp: ViewPlan,
        ids: list[EntityId],
        raw: list[bytes | None],
        now_ms: int,
        fill: _Fill,
    ) -> dict[EntityId, Answer]:
        """Classify one view's Redis values; fill what is missing or stale from SQL.

        This loop runs once per row of every batch: it compares integers against cut-offs
        computed once (``featcache.freshness``) and builds plain tuples, nothing more.
        """
        answers: dict[EntityId, Answer] = {}
        missing: list[EntityId] = []
        stale: dict[EntityId, Answer] = {}
        seen = fill.seen
        decode = vp.codec.decode
        width = vp.width
        epoch = fill.epoch
        fresh_after = fresh_since(now_ms, vp.max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        stale_after = fresh_since(now_ms, vp.stale_window_ms)
        hit, absent = Status.HIT_REDIS, Status.ABSENT
        negative_hits = decode_errors = 0
        for eid, blob in zip(ids, raw, strict=True):
            if blob is None:
                missing.append(eid)
                continue
            seen[eid] = blob  # the fill may only replace exactly this
            row = decode(blob)
            if row is None:
                decode_errors += 1
                missing.append(eid)
            elif row[2] != epoch:  # invalidated with its whole view (or a tombstone: epoch 0)
                missing.append(eid)
            elif row[0] == KIND_ROW:
                if len(row[5]) < width:  # written before a requested feature existed
                    missing.append(eid)
                elif row[3] >= fresh_after:
                    answers[eid] = (hit, row[5], row[1])
                    del seen[eid]
                else:
                    missing.append(eid)
                    if row[3] >= stale_after:
                        stale[eid] = (Status.STALE, row[5], row[1])
            elif row[0] == KIND_ABSENT and row[3] >= negative_after:
                answers[eid] = (absent, None, None)
                negative_hits += 1
                del seen[eid]
            else:  # a tombstone left by an invalidation, or an expired negative entry
                missing.append(eid)
        counts = {
            "hit_redis": len(answers) - negative_hits,
            "negative_hit": negative_hits,
            "decode_errors": decode_errors,
        }
        if missing:
            self._fill(vp, missing, stale, now_ms, answers, fill, counts)
            answers = {eid: answers[eid] for eid in ids}  # the caller's order
        self._stats.add(vp.view.name, counts)
        return answers

    def _fill(
        self,
        vp: ViewPlan,
        missing: list[EntityId],
        stale: dict[EntityId, Answer],
        now_ms: int,
        answers: dict[EntityId, Answer],
        fill: _Fill,
        counts: dict[str, int],
    ) -> None:
        view = vp.view
        try:
            found, seconds = self._offline.fetch_latest(view, missing)
        except OfflineStoreError as exc:
            counts["sql_errors"] = 1
            unservable = [eid for eid in missing if eid not in stale]
            if unservable:
                raise
            log.warning("SQL failed for view %s, serving %d stale rows: %s",
                        view.name, len(missing), exc)
            answers.update(stale)
            counts["stale_served"] = len(stale)
            return
        counts["sql_queries"] = -(-len(missing) // self.config.sql_chunk_size)
        counts["sql_rows"] = len(found)
        fill_ms = int(seconds * 1000)
        codec = vp.codec
        head = self._layout.row_prefix(view.name)
        seen = fill.seen
        epoch = fill.epoch
        items = fill.items
        filled = absent = 0
        for eid in missing:
            row = found.get(eid)
            if row is None:
                answers[eid] = (Status.ABSENT, None, None)
                value = codec.encode_absent(now_ms, epoch)
                ttl_ms = vp.negative_ttl_ms
                absent += 1
            else:
                answers[eid] = (Status.FILLED, row.values, row.event_us)
                value = codec.encode(row.values, row.event_us, now_ms, epoch, fill_ms)
                ttl_ms = vp.ttl_ms
                filled += 1
            items.append(fenced_write(f"{head}{eid}", value, ttl_ms, seen.get(eid)))
        counts["filled"] = filled
        counts["absent"] = absent

    def _write_fills(self, view_name: str, batches: list[WriteBatch], started: float) -> None:
        total = sum(len(b.items) for b in batches)
        if time.monotonic() - started > self._fill_deadline:
            # past the deadline a tombstone this read raced with may have expired, and the
            # fence with it: answering is still right, writing back no longer is
            self._stats.add(view_name, {"fills_abandoned": total})
            return
        try:
            written = self._redis.write(batches)
        except CacheUnavailable as exc:
            log.warning("writing %d fills to Redis failed: %s", total, exc)
            self._stats.add(view_name, {"fill_errors": 1})
            return
        self._stats.add(view_name, {"rows_written": written, "fills_fenced": total - written})

    # ------------------------------------------------------------------ write path

    def put_rows(
        self, view: str | FeatureView, rows: Any, *, fence: Fence | None = None
    ) -> PutReport:
        """Write rows of one view into Redis: the one write path of the warmer and the hook.

        ``rows``: a list of dicts, one dict, a pandas DataFrame or a pyarrow Table, with the
        view's SQL column names (entity column, event timestamp column, every feature column;
        other columns are ignored). A row older (by event timestamp) than the row already in
        Redis is skipped, never written over it. In a DataFrame, NaN means missing, as in pandas;
        pass dicts or Arrow to store a NaN float.

        Rows you computed yourself are current by definition and replace tombstones. Rows you
        *read from SQL* must be fenced: ``f = cache.fence(view, ids)`` before the read, then
        ``put_rows(view, rows, fence=f)``; a row whose key changed since the fence (an
        invalidation, a newer fill) is not written and counts in ``fenced_off``.
        """
        view_def = self._view(view)
        if fence is not None and fence.view != view_def.name:
            raise InvalidRequest(f"the fence is for view {fence.view!r}, not {view_def.name!r}")
        columns = _columns(rows)
        if not columns or not next(iter(columns.values())):
            return PutReport(0, 0)
        wanted = [view_def.entity_column, view_def.event_timestamp_column,
                  *(f.column for f in view_def.features)]
        lacking = [c for c in wanted if c not in columns]
        if lacking:
            raise InvalidRequest(
                f"put_rows({view_def.name!r}): rows lack the column(s) {', '.join(lacking)}; "
                f"a row must be complete (columns: {', '.join(wanted)})"
            )
        entity_col = columns[view_def.entity_column]
        head = self._layout.row_prefix(view_def.name)
        feature_cols = [columns[f.column] for f in view_def.features]
        converters = [converter(f.type) for f in view_def.features]
        events = columns[view_def.event_timestamp_column]
        converted: list[tuple[EntityId, int | None, list[Any]]] = []
        for i, raw_id in enumerate(entity_col):  # all rows are checked before any I/O
            try:
                eid = check_id(raw_id, view_def.entity_type, self.config.max_id_length)
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
            converted.append((eid, event_us, values))
        now_ms = int(self._clock() * 1000)
        epoch_key = self._layout.view_key(view_def.name, "epoch")
        if fence is not None:
            epoch_raw = fence.epoch_raw
        else:  # rows are stamped with the current epoch; a whole-view invalidation after
            # this read makes them misses, which is the safe direction
            epoch_raw = self._redis.read([epoch_key])[0] or b""
        epoch = int(epoch_raw) if epoch_raw else 0
        codec = self._codecs[view_def.name]
        ttl_ms = int(view_def.ttl * 1000)
        writes: list[WriteItem] = []
        for eid, event_us, values in converted:
            value = codec.encode(values, event_us, now_ms, epoch)
            key = f"{head}{eid}"
            if fence is None:
                writes.append(row_write(key, value, ttl_ms))
            else:
                writes.append(fenced_write(key, value, ttl_ms, fence.seen[eid]))
        batch = WriteBatch(epoch_key, None if fence is None else fence.epoch_raw, writes)
        written = self._redis.write([batch])
        skipped = len(writes) - written
        report = PutReport(written, 0 if fence else skipped, skipped if fence else 0)
        self._stats.add(view_def.name, {"rows_written": report.written,
                                        "rows_skipped_older": report.skipped_older,
                                        "fills_fenced": report.fenced_off})
        return report

    def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """Note what Redis holds for these rows, *before* reading them from SQL.

        A writer that reads SQL and then calls ``put_rows(view, rows, fence=f)`` (the warmer
        does) writes a row only if nothing changed it since the fence: an invalidation in
        between leaves a tombstone, so a value read before it is never written after it.
        """
        view_def = self._view(view)
        ids = normalize_ids(entity_ids, view_def.entity_type, self.config.max_id_length)
        keys = self._layout.row_keys(view_def.name, ids)
        keys.append(self._layout.view_key(view_def.name, "epoch"))
        raw = self._redis.read(keys)
        return Fence(view_def.name, raw[-1] or b"", dict(zip(ids, raw[:-1], strict=True)))


def _columns(rows: Any) -> dict[str, list[Any]]:
    """Column name -> list of Python values, from dicts, a DataFrame or an Arrow table."""
    if isinstance(rows, pa.Table | pa.RecordBatch):
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
