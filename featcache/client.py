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

from featcache.codec import RowCodec
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
from featcache.keys import KeyLayout
from featcache.offline import OfflineStore
from featcache.redis_store import (
    RedisStore,
    WriteItem,
    absent_write,
    connect,
    repair_write,
    row_write,
)
from featcache.request import EntityId, Planner, ViewPlan, check_id, normalize_ids
from featcache.result import Answer, FeatureResult
from featcache.stats import CacheStats
from featcache.types import Status

__all__ = ["FeatureCache", "PutReport"]

log = logging.getLogger("featcache")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class PutReport:
    """What ``put_rows`` did: rows written, and rows skipped because Redis held a newer one."""

    written: int
    skipped_older: int


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
        keys: list[str] = []
        for view_plan in plan.views:
            keys.extend(self._layout.row_keys(view_plan.view.name, ids))
        try:
            raw: list[bytes | None] = self._redis.read(keys)
        except CacheUnavailable as exc:
            log.warning("Redis read failed, answering from SQL: %s", exc)
            self._stats.add(plan.views[0].view.name, {"redis_errors": 1})
            raw = [None] * len(keys)
        answers: list[dict[EntityId, Answer]] = []
        writes: list[WriteItem] = []
        n = len(ids)
        for v, view_plan in enumerate(plan.views):
            answers.append(
                self._answer_view(view_plan, ids, raw[v * n : (v + 1) * n], now_ms, writes)
            )
        if writes:
            self._write_fills(plan.views[0].view.name, writes)
        return FeatureResult(ids, plan, answers)

    def _answer_view(
        self,
        vp: ViewPlan,
        ids: list[EntityId],
        raw: list[bytes | None],
        now_ms: int,
        writes: list[WriteItem],
    ) -> dict[EntityId, Answer]:
        """Classify one view's Redis values; fill what is missing or stale from SQL.

        This loop runs once per row of every batch: it compares integers against cut-offs
        computed once (``featcache.freshness``) and builds plain tuples, nothing more.
        """
        answers: dict[EntityId, Answer] = {}
        missing: list[EntityId] = []
        stale: dict[EntityId, Answer] = {}
        undecodable: dict[EntityId, bytes] = {}
        decode = vp.codec.decode
        width = vp.width
        fresh_after = fresh_since(now_ms, vp.max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        stale_after = fresh_since(now_ms, vp.stale_window_ms)
        hit, absent = Status.HIT_REDIS, Status.ABSENT
        negative_hits = decode_errors = 0
        for eid, blob in zip(ids, raw, strict=True):
            if blob is None:
                missing.append(eid)
                continue
            row = decode(blob)
            if row is None:
                decode_errors += 1
                missing.append(eid)
                undecodable[eid] = blob
            elif row[0]:  # a negative entry: SQL had no such entity
                if row[3] >= negative_after:
                    answers[eid] = (absent, None, None)
                    negative_hits += 1
                else:
                    missing.append(eid)
            elif len(row[5]) < width:  # written before a requested feature existed
                missing.append(eid)
            elif row[3] >= fresh_after:
                answers[eid] = (hit, row[5], row[1])
            else:
                missing.append(eid)
                if row[3] >= stale_after:
                    stale[eid] = (Status.STALE, row[5], row[1])
        counts = {
            "hit_redis": len(answers) - negative_hits,
            "negative_hit": negative_hits,
            "decode_errors": decode_errors,
        }
        if missing:
            self._fill(vp, missing, stale, undecodable, now_ms, answers, writes, counts)
            answers = {eid: answers[eid] for eid in ids}  # the caller's order
        self._stats.add(vp.view.name, counts)
        return answers

    def _fill(
        self,
        vp: ViewPlan,
        missing: list[EntityId],
        stale: dict[EntityId, Answer],
        undecodable: dict[EntityId, bytes],
        now_ms: int,
        answers: dict[EntityId, Answer],
        writes: list[WriteItem],
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
        filled = absent = 0
        for eid in missing:
            row = found.get(eid)
            key = f"{head}{eid}"
            if row is None:
                answers[eid] = (Status.ABSENT, None, None)
                item = absent_write(key, codec.encode_absent(now_ms), vp.negative_ttl_ms)
                absent += 1
            else:
                answers[eid] = (Status.FILLED, row.values, row.event_us)
                value = codec.encode(row.values, row.event_us, now_ms, 0, fill_ms)
                item = row_write(key, value, vp.ttl_ms)
                filled += 1
            garbage = undecodable.get(eid)
            if garbage is not None:  # replace what could not be read, if nobody did meanwhile
                item = repair_write(key, item[2], item[3], garbage)
            writes.append(item)
        counts["filled"] = filled
        counts["absent"] = absent

    def _write_fills(self, view_name: str, writes: list[WriteItem]) -> None:
        try:
            written = self._redis.write(writes)
        except CacheUnavailable as exc:
            log.warning("writing %d fills to Redis failed: %s", len(writes), exc)
            self._stats.add(view_name, {"fill_errors": 1})
            return
        self._stats.add(view_name, {"rows_written": written,
                                    "rows_skipped_older": len(writes) - written})

    # ------------------------------------------------------------------ write path

    def put_rows(self, view: str | FeatureView, rows: Any) -> PutReport:
        """Write rows of one view into Redis: the one write path of the warmer and the hook.

        ``rows``: a list of dicts, one dict, a pandas DataFrame or a pyarrow Table, with the
        view's SQL column names (entity column, event timestamp column, every feature column;
        other columns are ignored). A row older (by event timestamp) than the row already in
        Redis is skipped, never written over it. In a DataFrame, NaN means missing, as in pandas;
        pass dicts or Arrow to store a NaN float.
        """
        view_def = self._views.get(view if isinstance(view, str) else view.name)
        if view_def is None:
            raise UnknownView(str(view), list(self._views))
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
        now_ms = int(self._clock() * 1000)
        codec = self._codecs[view_def.name]
        ttl_ms = int(view_def.ttl * 1000)
        head = self._layout.row_prefix(view_def.name)
        feature_cols = [columns[f.column] for f in view_def.features]
        converters = [converter(f.type) for f in view_def.features]
        events = columns[view_def.event_timestamp_column]
        writes: list[WriteItem] = []
        for i, raw_id in enumerate(entity_col):
            try:
                eid = check_id(raw_id, view_def.entity_type, self.config.max_id_length)
            except InvalidEntityId as exc:
                raise InvalidEntityId(f"put_rows({view_def.name!r}), row {i}: {exc}") from None
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
            writes.append(row_write(f"{head}{eid}", codec.encode(values, event_us, now_ms), ttl_ms))
        written = self._redis.write(writes)
        report = PutReport(written, len(writes) - written)
        self._stats.add(view_def.name, {"rows_written": report.written,
                                        "rows_skipped_older": report.skipped_older})
        return report


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
