"""``FeatureCache``: the facade users hold. It validates calls and wires the parts together.

Data flows one way: the caller -> (L1) -> Redis -> SQL (``featcache.readpath``), fills flow
back into Redis; writers go through ``featcache.writes``; invalidations through
``featcache.invalidation``. The stores (``redis_store``, ``offline``) only move bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import Any

import redis
import sqlalchemy as sa

from featcache.codec import RowCodec
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.errors import (
    CacheConfigError,
    CacheUnavailable,
    InvalidRequest,
    UnknownView,
)
from featcache.invalidation import InvalidationReport, Invalidator
from featcache.keys import KeyLayout
from featcache.l1 import L1Cache
from featcache.offline import OfflineStore, RowColumns, SqlRow
from featcache.popularity import PopularityCounter
from featcache.readpath import L1_RECORD_WIDTH, L1Entry, ReadPath
from featcache.redis_store import (
    RedisStore,
    connect,
)
from featcache.request import EntityId, Planner, distinct_ids, id_sequence, normalize_ids
from featcache.result import FeatureResult
from featcache.stats import CacheStats
from featcache.subscriber import InvalidationSubscriber
from featcache.writes import Fence, PendingWrite, PutReport, RowWriter

__all__ = ["FeatureCache", "Fence", "PendingWrite", "PutReport"]

log = logging.getLogger("featcache")

_STREAM_BLOCK_MS = 500  # how long one XREAD waits: bounds how long close() takes

Clock = Callable[[], float]


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
        self._layout = KeyLayout(config.redis.key_prefix)
        self._codecs = {view.name: RowCodec(view) for view in config.views}
        self._views = {view.name: view for view in config.views}
        self._planner = Planner(config, self._codecs)
        self._owns_redis = redis_client is None
        client = redis_client or connect(config.redis)
        self._redis = RedisStore(client, config.redis.read_chunk)
        self._offline = OfflineStore(config.offline_store, config.views, engine,
                                     source=config.source)
        self._stats = CacheStats()
        self._invalidator = Invalidator(
            self._redis, self._layout, config.invalidation, config.limits
        )
        self._l1: L1Cache[L1Entry] | None = None
        if config.l1.policy is not None:
            # L1 measures its bounds on a monotonic clock; an injected clock (tests) drives both
            self._l1 = L1Cache(
                config.l1,
                clock=time.monotonic if clock is time.time else clock,
                record_width=L1_RECORD_WIDTH,
            )
        # The counts in Redis are every serving process's: this process reads them (top_k,
        # the warmer) whether or not it counts its own reads (popularity.sample_rate > 0).
        self._counts = PopularityCounter(self._redis, self._layout, config.popularity,
                                         clock=clock)
        self._popularity = self._counts if config.popularity.sample_rate > 0 else None
        self._read = ReadPath(
            config, self._layout, self._redis, self._offline, self._stats, clock, self._l1,
            self._popularity,
        )
        self._writer = RowWriter(
            config.invalidation, config.limits, self._layout, self._codecs, self._redis,
            self._stats, clock, self._view,
        )
        self._subscriber: InvalidationSubscriber | None = None
        self._probe_redis()
        if self._l1 is not None:
            l1 = self._l1
            self._subscriber = InvalidationSubscriber(
                self._subscriber_client,
                self._layout.stream_key(),
                on_ids=l1.invalidate,
                on_view=l1.invalidate_view,
                on_reset=lambda reason: l1.clear(),
                block_ms=_STREAM_BLOCK_MS,
                name=f"featcache-l1-{config.redis.key_prefix}",
            )
            try:
                self._subscriber.start()
            except BaseException:
                # without the tail, L1 could serve invalidated rows; quietly running without
                # the L1 configured would hide that for the process's whole life: the caller
                # (or its supervisor) retries, as docs/consistency.md says
                self._subscriber = None
                self.close()
                raise

    def _probe_redis(self) -> None:
        """Read one key the cache will read: a wrong password, ACL user, key permission or
        database number fails here, as ``CacheConfigError``, instead of sending every call to
        SQL for the process's whole life. An outage is not a configuration error: the cache
        starts, and degrades (and logs the outage) as it would mid-life."""
        try:
            self._redis.read([self._layout.view_key(self.config.views[0].name, "epoch")])
        except CacheConfigError:
            self.close()
            raise
        except CacheUnavailable as exc:  # the first call that meets it logs the outage
            log.debug("Redis unavailable at start: %s", exc)

    def _subscriber_client(self) -> redis.Redis:
        """A connection of its own for the stream tail (XREAD BLOCK holds it), built like the
        cache's own, with a socket timeout longer than one block."""
        pool = self._redis.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = _STREAM_BLOCK_MS / 1000 + 5.0
        kwargs.setdefault("socket_connect_timeout", self.config.redis.connect_timeout)
        return redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        )

    @classmethod
    def from_config(cls, path: str | PathLike[str], **kwargs: Any) -> FeatureCache:
        """Load a YAML config (``FEATCACHE_...`` environment overrides apply)."""
        return cls(load_config(path), **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the invalidation tail (within about a second) and release the pools."""
        if self._subscriber is not None:
            self._subscriber.stop()
        if self._popularity is not None:
            self._popularity.close()  # flushes what was sampled
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

    @property
    def offline(self) -> OfflineStore:
        """The SQL store the cache reads from, with its engine and reflected tables: what the
        bulk reads (``featcache.offline.bulk``) and the change poll take."""
        return self._offline

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
        view_def = self._view(view)
        report = self._invalidator.invalidate(view_def, entity_ids)
        if self._l1 is not None:  # this process need not wait for its own stream entry
            if report.whole_view:
                self._l1.invalidate_view(view_def.name)
            else:
                self._l1.invalidate(view_def.name, report.ids)
        return report

    @property
    def l1(self) -> L1Cache[L1Entry] | None:
        """The in-process cache (``l1.policy`` in the config), or None."""
        return self._l1

    @property
    def popularity(self) -> PopularityCounter | None:
        """Read counting for the warmer (``popularity.sample_rate`` > 0), or None."""
        return self._popularity

    def top_k(self, view: str | FeatureView, k: int) -> list[tuple[EntityId, float]]:
        """The ``k`` most read entities of a view across every serving process, decayed by
        ``popularity.half_life``. They are read from Redis whether or not this process counts
        its own reads (a warmer configured with ``popularity.sample_rate: 0`` still sees what
        the serving processes counted)."""
        view_def = self._view(view)
        return self._counts.top_k(view_def.name, k, view_def.entity_type)

    def subscriber_stats(self) -> dict[str, Any]:
        """The invalidation tail's counters (applied, resets, lag), or {} without an L1."""
        return self._subscriber.stats() if self._subscriber is not None else {}

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
        given = id_sequence(entity_ids)
        if self._read.l1 is not None:
            distinct = distinct_ids(given, plan.entity_type)
            if distinct is not None:  # limits checked only if L1 does not answer them all
                return self._read.read(plan, distinct, checked=False)
        ids = normalize_ids(given, plan.entity_type, self.config.limits.max_id_length)
        if not ids:
            return FeatureResult(ids, plan, [{} for _ in plan.views])
        return self._read.read(plan, ids)

    # ------------------------------------------------------------------ write path

    def put_rows(
        self, view: str | FeatureView, rows: Any, *, fence: Fence | None = None
    ) -> PutReport:
        """Write rows of one view into Redis: the one write path of the warmer and the hook.

        ``rows``: a list of dicts, one dict, a pandas DataFrame or a pyarrow Table, with the
        view's SQL column names (entity column, event timestamp column, every feature column;
        other columns are ignored). An older row (by event timestamp) never replaces a newer
        one. Rows you *read from SQL* must be fenced: ``f = cache.fence(view, ids)`` before the
        read, then ``put_rows(view, rows, fence=f)`` (see ``featcache.writes``).
        """
        return self._writer.put_rows(view, rows, fence=fence)

    def put_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PutReport:
        """``put_rows`` for rows as ``OfflineStore.fetch_latest`` / ``offline.bulk`` return
        them (already converted): the warmer's bulk path, converting nothing twice."""
        return self._writer.put_latest(view, rows, fence=fence)

    def prepare_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PendingWrite:
        """``put_latest`` in two steps: the rows are checked and encoded now, and written by
        the returned ``PendingWrite.send()``. A bulk writer encodes the next chunk (holding
        the GIL) while another thread waits on the previous chunk's round trip."""
        return self._writer.prepare_latest(view, rows, fence=fence)

    def prepare_columns(
        self, view: str | FeatureView, rows: RowColumns, *, fence: Fence | None
    ) -> PendingWrite:
        """``prepare_latest`` of rows as columns (``offline.bulk.IdRunReader.read_columns``):
        the materializer's path, encoding from the columns with no tuple per row."""
        return self._writer.prepare_columns(view, rows, fence=fence)

    def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """Note what Redis holds for these rows *before* reading them from SQL."""
        return self._writer.fence(view, entity_ids)

