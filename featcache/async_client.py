"""``AsyncFeatureCache``: the serving facade for asyncio code (FastAPI, Ray Serve, KServe...).

One read path, two drivers. ``featcache.readpath.ReadPath`` holds every decision of a call
(the L1 step, the keys, freshness, statuses, fences, what to fill) and splits a call at its
one Redis read: ``begin`` (L1, the keys), the read, ``settle`` (the all-hit answer) and, when
any row needs more, ``finish`` (single flight, leases, SQL, the fenced fill write). The
synchronous client runs the four in a row; this one awaits the read on the event loop
(``featcache.redis_store.aio``: redis.asyncio and hiredis) and answers an all-hit call there,
and drives ``finish``'s steps (``featcache.async_steps``): their work in a bounded thread pool,
where it does exactly what it does for the synchronous client, and their waits for another
caller's SQL read on the loop, holding no thread. The guarantees are the same code, not a copy.

Why the fills go to threads and not to SQLAlchemy's asyncio engines: a call that finishes
waits on SQL (milliseconds), beside which the hop to a thread costs tens of microseconds
(``python -m bench serve``, docs/async.md); the single flight that makes concurrent misses of
one row one SQL read is the synchronous client's, so coroutines share it with each other and
with threads of the same process; and every SQL driver featcache supports keeps working,
ADBC included, with one pool of connections per process.

Everything else (``put_rows``, ``invalidate``, the write side) runs the ``FeatureCache``
this client holds (``.sync``) in the same pool. The L1, its invalidation tail, the stats
publisher and the popularity counts are that client's, shared by both drivers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from featcache.async_steps import run_steps
from featcache.client import FeatureCache
from featcache.config import CacheConfig, FeatureView, load_config
from featcache.errors import CacheUnavailable, InvalidRequest
from featcache.invalidation import InvalidationReport
from featcache.models import Compute, ModelCache, ModelCall, ModelResult
from featcache.parts import Clock
from featcache.readpath import Call
from featcache.redis_store.aio import AsyncReader
from featcache.request import EntityId
from featcache.result import FeatureResult
from featcache.writes import Fence, PutReport

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import sqlalchemy as sa

__all__ = ["AsyncFeatureCache", "AsyncModelCache"]

T = TypeVar("T")


class AsyncFeatureCache:
    """``await cache.get_features(ids, features)``: the same results, statuses and guarantees
    as ``FeatureCache`` on the same config, without blocking the event loop.

    ``fill_threads``: the pool that runs fills and writes (default twice
    ``degradation.sql_concurrency``, at least 8: a call waiting on another process's lease
    holds a thread but no SQL slot). ``clock``, ``redis_client`` and ``engine``: as for
    ``FeatureCache``, whose pools they are; ``async_redis_client``: the event loop's reads'
    own (built from the config by default; not on a cluster). Building
    it connects nothing but the synchronous client's one probe of Redis (a wrong password
    fails here); use ``async with`` or ``aclose()``.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        clock: Clock = time.time,
        fill_threads: int | None = None,
        redis_client: redis.Redis | None = None,
        engine: sa.Engine | None = None,
        async_redis_client: redis.asyncio.Redis | None = None,
    ) -> None:
        threads = fill_threads if fill_threads is not None else max(
            8, 2 * config.degradation.sql_concurrency)
        if threads < 1:
            raise InvalidRequest(f"fill_threads must be at least 1, got {threads}")
        self.sync = FeatureCache(config, clock=clock, redis_client=redis_client, engine=engine)
        self.config = config
        self._read = self.sync.read_path
        try:
            # a cluster's read is the synchronous cluster reader's, run in the pool
            self._reader = (AsyncReader(config.redis, async_redis_client)
                            if config.redis.mode != "cluster" else None)
        except BaseException:
            self.sync.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="featcache-async")
        self._closed = False

    @classmethod
    def from_config(cls, path: str, **kwargs: Any) -> AsyncFeatureCache:
        """Load a YAML config (``FEATCACHE_...`` environment overrides apply)."""
        return cls(load_config(path), **kwargs)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool, with this task's context variables (a request id a
        log filter reads, say)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # ------------------------------------------------------------------ read path

    async def get_features(
        self, entity_ids: Iterable[EntityId], feature_names: Sequence[str]
    ) -> FeatureResult:
        """Every requested feature of every entity, each with a status (``FeatureCache``'s
        ``get_features``: the same validation, errors and answers)."""
        prepared = self.sync.prepare(entity_ids, feature_names)
        if isinstance(prepared, FeatureResult):
            return prepared
        plan, ids, checked = prepared
        rp = self._read
        call = rp.begin(plan, ids, checked)
        if not isinstance(call, Call):
            return call  # every row from L1
        if self._reader is None:
            raw, redis_ok = await self._in_pool(rp.read_redis, call)
        elif not call.reads_redis:
            raw, redis_ok = rp.nothing_read(call)
        elif not rp.breaker.allow():
            raw, redis_ok = rp.redis_failed(
                call, CacheUnavailable("Redis circuit open: read skipped"), count=False)
        else:
            try:
                raw = await self._reader.read(call.keys)
            except CacheUnavailable as exc:
                raw, redis_ok = rp.redis_failed(call, exc)
            else:
                rp.redis_succeeded()
                redis_ok = True
        done = rp.settle(call, raw, redis_ok)
        if done is not None:
            return done
        return await run_steps(rp.finish_steps(call, raw, redis_ok), self._pool)

    async def read_keys(self, keys: list[str]) -> list[bytes | None]:
        """One read of these keys: awaited on the event loop, or on a cluster the synchronous
        cluster reader's, in the pool (the prediction cache's read)."""
        if self._reader is None:
            return await self._in_pool(self.sync.store.read, keys)
        return await self._reader.read(keys)

    def model(self, name: str, version: str, **policy: Any) -> AsyncModelCache:
        """``FeatureCache.model`` for asyncio code: ``await ...get_or_compute(inputs,
        compute)``, with ``compute`` a plain function (run in the pool) or a coroutine
        function (awaited on this loop)."""
        return AsyncModelCache(self.sync.model(name, version, **policy), self)

    # ------------------------------------------------------------------ writes

    async def put_rows(
        self,
        view: str | FeatureView,
        rows: Mapping[EntityId, Any] | Iterable[Mapping[str, Any]] | Any,
        *,
        fence: Fence | None = None,
    ) -> PutReport:
        """``FeatureCache.put_rows``, in the pool."""
        return await self._in_pool(functools.partial(self.sync.put_rows, view, rows,
                                                     fence=fence))

    async def fence(self, view: str | FeatureView, entity_ids: Iterable[Any]) -> Fence:
        """``FeatureCache.fence``, in the pool: take it before reading the rows to write."""
        return await self._in_pool(self.sync.fence, view, entity_ids)

    async def invalidate(
        self, view: str | FeatureView, entity_ids: Iterable[Any] | None = None
    ) -> InvalidationReport:
        """``FeatureCache.invalidate``, in the pool: tombstones (or the view's epoch when
        ``entity_ids`` is None) and the stream entry every L1 follows."""
        return await self._in_pool(self.sync.invalidate, view, entity_ids)

    # ------------------------------------------------------------------ observing

    def stats(self) -> dict[str, dict[str, int]]:
        """This process's counters per view (``FeatureCache.stats``)."""
        return self.sync.stats()

    def model_stats(self) -> dict[tuple[str, str], dict[str, int]]:
        """This process's prediction cache counters (``FeatureCache.model_stats``)."""
        return self.sync.model_stats()

    async def ping(self) -> None:
        """Redis answers (raises ``CacheUnavailable`` if not): for readiness checks."""
        if self._reader is not None:
            await self._reader.ping()
        else:  # a cluster: a read of one key, through the cluster reader and its breakers
            key = self.sync.layout.epoch_key(self.config.views[0].name)
            await self._in_pool(self.sync.store.read, [key])

    async def ping_sql(self) -> None:
        """The offline store answers a ``SELECT 1`` (raises ``OfflineStoreUnavailable`` if
        not): for readiness checks."""
        await self._in_pool(self.sync.offline.ping)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Finish the fills under way, then close both clients (the synchronous one publishes
        its last stats and stops the L1's tail)."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._pool.shutdown, wait=True))
        if self._reader is not None:
            await self._reader.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.sync.close)

    async def __aenter__(self) -> AsyncFeatureCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncModelCache:
    """A ``ModelCache`` driven from asyncio: the same steps and guarantees, its one Redis read
    awaited on the event loop, what follows a miss (single flight, leases, compute, the
    fenced write) in the client's pool, where a coroutine ``compute`` is awaited back on the
    loop while its pool thread waits; a wait for another caller's compute is awaited on the
    loop, holding no thread."""

    def __init__(self, sync: ModelCache, client: AsyncFeatureCache) -> None:
        self.sync = sync
        self._client = client

    async def get_or_compute(self, inputs: Any, compute: Compute | Callable[[list[Any]], Any]
                             ) -> ModelResult:
        """``ModelCache.get_or_compute``, awaited."""
        m = self.sync
        if not callable(compute):
            raise InvalidRequest(f"compute must be callable, got {type(compute).__name__}")
        call = m.begin(inputs)
        if not isinstance(call, ModelCall):
            return call  # every output from L1
        raw, redis_ok = await self._read(call)
        done = m.settle(call, raw, redis_ok)
        if done is not None:
            return done
        run = _in_thread(compute, asyncio.get_running_loop())
        return await run_steps(m.finish_steps(call, redis_ok, run), self._client._pool)

    async def _read(self, call: ModelCall) -> tuple[list[bytes | None], bool]:
        m = self.sync
        if not m.breaker.allow():
            return m.redis_failed(call, CacheUnavailable("Redis circuit open: read skipped"),
                                  count=False)
        try:
            raw = await self._client.read_keys(call.keys)
        except CacheUnavailable as exc:
            return m.redis_failed(call, exc)
        m.redis_succeeded()
        return raw, True

    async def invalidate(self, inputs: Any = None) -> InvalidationReport:
        """``ModelCache.invalidate``, in the pool."""
        return await self._client._in_pool(self.sync.invalidate, inputs)

    def stats(self) -> dict[str, int]:
        return self.sync.stats()


def _in_thread(compute: Callable[[list[Any]], Any], loop: asyncio.AbstractEventLoop
               ) -> Compute:
    """``compute`` as the pool thread calls it: an awaitable it returns is awaited on the
    event loop, the thread waiting for it."""

    def run(inputs: list[Any]) -> Any:
        result = compute(inputs)
        if inspect.isawaitable(result):
            return asyncio.run_coroutine_threadsafe(_awaited(result), loop).result()
        return result

    return run


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
