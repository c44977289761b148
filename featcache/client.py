"""``FeatureCache``: the facade users hold. It validates calls and wires the parts together.

Data flows one way: the caller -> (L1) -> Redis -> SQL (``featcache.readpath``), fills flow
back into Redis; writers go through ``featcache.writes``; invalidations through
``featcache.invalidation``. The stores (``redis_store``, ``offline``) only move bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from types import TracebackType
from typing import Any

import redis
import sqlalchemy as sa

from featcache.codec import RowCodec
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.errors import (
    InvalidRequest,
    UnknownView,
)
from featcache.invalidation import InvalidationReport, Invalidator
from featcache.keys import KeyLayout
from featcache.offline import OfflineStore
from featcache.readpath import ReadPath
from featcache.redis_store import (
    RedisStore,
    connect,
)
from featcache.request import EntityId, Planner, normalize_ids
from featcache.result import FeatureResult
from featcache.stats import CacheStats
from featcache.writes import Fence, PutReport, RowWriter

__all__ = ["FeatureCache", "Fence", "PutReport"]

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
        self._read = ReadPath(
            config, self._layout, self._redis, self._offline, self._stats, clock
        )
        self._writer = RowWriter(
            config, self._layout, self._codecs, self._redis, self._stats, clock, self._view
        )

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

    def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """Note what Redis holds for these rows *before* reading them from SQL."""
        return self._writer.fence(view, entity_ids)

