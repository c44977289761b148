"""The parts every featcache process is built from, each from the configuration alone.

``Parts`` holds what a process that writes to the cache needs: the Redis store, the key layout,
the SQL store, the fenced writer, the invalidator and the popularity counts. ``FeatureCache``
(the serving facade, ``featcache.client``) adds the read path, the L1 and its stream tail on
top. The warmer and ``materialize`` use ``Parts`` as they are, so they build no read path, no
L1 and no stream tail they would not use; the ETL hook needs less still, a Redis store and the
key layout (``featcache.invalidation.invalidate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from featcache.codec import RowCodec
from featcache.config import CacheConfig, FeatureView
from featcache.errors import CacheConfigError, CacheUnavailable, UnknownView
from featcache.invalidation import InvalidationReport, Invalidator
from featcache.keys import KeyLayout
from featcache.offline import OfflineStore, RowColumns, SqlRow
from featcache.popularity import PopularityCounter
from featcache.redis_store import RedisStore, open_store
from featcache.request import EntityId
from featcache.stats import CacheStats
from featcache.writes import Fence, PendingFence, PendingWrite, PutReport, RowWriter

if TYPE_CHECKING:
    import redis
    import sqlalchemy as sa

__all__ = ["Clock", "Parts"]

log = logging.getLogger("featcache")

Clock = Callable[[], float]


class Parts:
    """The Redis and SQL stores and what writes through them, built from ``config``.

    ``clock`` returns seconds since the epoch (``time.time`` by default; tests inject their
    own). ``redis_client`` and ``engine`` let an application share its pools; by default they
    are built from the config's URLs and closed by ``close()``. A wrong Redis password, ACL
    or database fails here (``CacheConfigError``); an unreachable Redis does not.
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
        self.clock = clock
        self.layout = KeyLayout.for_mode(config.redis.key_prefix, config.redis.mode)
        self.codecs = {view.name: RowCodec(view) for view in config.views}
        self._views = {view.name: view for view in config.views}
        self._owns_store = redis_client is None
        self.store: RedisStore = open_store(config.redis, redis_client, config.degradation)
        self.offline = OfflineStore(config.offline_store, config.views, engine,
                                    source=config.source)
        self.stats_counters = CacheStats()
        self.invalidator = Invalidator(self.store, self.layout, config.invalidation,
                                       config.limits)
        # The counts in Redis are every serving process's: this process reads them (top_k,
        # the warmer) whether or not it counts its own reads (popularity.sample_rate > 0).
        self.popularity_counts = PopularityCounter(self.store, self.layout, config.popularity,
                                                   clock=clock)
        self.writer = RowWriter(
            config.invalidation, config.limits, self.layout, self.codecs, self.store,
            self.stats_counters, clock, self.view,
        )
        try:
            self._probe_redis()
        except BaseException:
            self.close()
            raise

    def _probe_redis(self) -> None:
        """Read one key this process will read: a wrong password, ACL user, key permission or
        database number fails here, as ``CacheConfigError``, instead of sending every call to
        SQL for the process's whole life. An outage is not a configuration error: the process
        starts, and degrades (and logs the outage) as it would mid-life."""
        try:
            self.store.read([self.layout.epoch_key(self.config.views[0].name)])
        except CacheConfigError:
            raise
        except CacheUnavailable as exc:  # the first call that meets it logs the outage
            log.debug("Redis unavailable at start: %s", exc)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the pools (flushing read counts sampled so far)."""
        self.popularity_counts.close()
        if self._owns_store:
            self.store.close()
        self.offline.close()

    def __enter__(self) -> Parts:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def redis(self) -> redis.Redis:
        """The redis-py client behind the store, for applications that inspect Redis."""
        client: redis.Redis = self.store.client
        return client

    @property
    def engine(self) -> sa.Engine:
        return self.offline.engine

    def view(self, view: str | FeatureView) -> FeatureView:
        """The declared view of this name (``UnknownView`` otherwise)."""
        view_def = self._views.get(view if isinstance(view, str) else view.name)
        if view_def is None:
            raise UnknownView(str(view), list(self._views))
        return view_def

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per view: hits, fills, absent, stale served, decode and backend errors."""
        return self.stats_counters.snapshot()

    # ------------------------------------------------------------------ invalidation

    def invalidate(
        self, view: str | FeatureView, entity_ids: Iterable[Any] | None = None
    ) -> InvalidationReport:
        """Tell every server that these rows (or, without ids, the whole view) changed in SQL.

        Call it after the ETL's transaction commits. No read that starts after it returns gets
        a value read from SQL before it (DESIGN section 4); in-process L1 caches drop the rows
        through the invalidation stream.
        """
        return self.invalidator.invalidate(self.view(view), entity_ids)

    def top_k(self, view: str | FeatureView, k: int) -> list[tuple[EntityId, float]]:
        """The ``k`` most read entities of a view across every serving process, decayed by
        ``popularity.half_life``. They are read from Redis whether or not this process counts
        its own reads (a warmer configured with ``popularity.sample_rate: 0`` still sees what
        the serving processes counted)."""
        view_def = self.view(view)
        return self.popularity_counts.top_k(view_def.name, k, view_def.entity_type)

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
        return self.writer.put_rows(view, rows, fence=fence)

    def put_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PutReport:
        """``put_rows`` for rows as ``OfflineStore.fetch_latest`` and the bulk reads return
        them (already converted): the warmer's bulk path, converting nothing twice."""
        return self.writer.put_latest(view, rows, fence=fence)

    def prepare_latest(
        self, view: str | FeatureView, rows: Mapping[EntityId, SqlRow], *, fence: Fence | None
    ) -> PendingWrite:
        """``put_latest`` in two steps: the rows are checked and encoded now, and written by
        the returned ``PendingWrite.send()``. A bulk writer encodes the next chunk (holding
        the GIL) while another thread waits on the previous chunk's round trip."""
        return self.writer.prepare_latest(view, rows, fence=fence)

    def prepare_columns(
        self, view: str | FeatureView, rows: RowColumns, *, fence: Fence | None
    ) -> PendingWrite:
        """``prepare_latest`` of rows as columns (``IdRunReader.read_columns``): the
        materializer's path, encoding from the columns with no tuple per row."""
        return self.writer.prepare_columns(view, rows, fence=fence)

    def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """Note what Redis holds for these rows *before* reading them from SQL."""
        return self.writer.fence(view, entity_ids)

    def start_fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> PendingFence:
        """``fence`` in steps (``RowWriter.start_fence``): prepared now, sent by ``send()``,
        built by ``result()``."""
        return self.writer.start_fence(view, entity_ids)
