"""The asyncio client behind the synchronous client's face, so that the tests written against
``FeatureCache`` run on ``AsyncFeatureCache`` too.

With ``FEATCACHE_TEST_CLIENT=async`` (``.ci/run`` runs the tests marked ``topology`` so),
``featdata.make_cache`` returns an ``AsyncDriven``: its ``get_features``, ``put_rows``,
``fence`` and ``invalidate`` are the async client's, awaited on one event loop that runs in a
thread of its own; test threads that call it at once become coroutines running at once on that
loop, which is what a serving process's concurrent requests are. Everything else (stats, the
stores, the L1, the config) is the synchronous client the async one holds and shares.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

import redis
import redis.asyncio

from featcache.async_client import AsyncFeatureCache, AsyncModelCache
from featcache.config import CacheConfig
from featcache.result import FeatureResult

__all__ = ["ENV_CLIENT", "AsyncDriven", "AsyncDrivenModel", "EventLoopThread",
           "async_client_wanted"]

ENV_CLIENT: Final = "FEATCACHE_TEST_CLIENT"

T = TypeVar("T")


def async_client_wanted() -> bool:
    value = os.environ.get(ENV_CLIENT, "sync")
    if value not in ("sync", "async"):
        raise ValueError(f"{ENV_CLIENT} must be sync or async, got {value!r}")
    return value == "async"


class EventLoopThread:
    """An event loop running in a daemon thread; ``run`` awaits a coroutine on it from any
    other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="featcache-test-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _async_twin(client: redis.Redis) -> redis.asyncio.Redis:
    """An asyncio client to the server ``client`` talks to; when ``client`` counts its
    round trips (``featdata.counting_client``), the twin adds its own to the same count."""
    pool = client.connection_pool
    counter = pool.connection_class

    class Counting(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if hasattr(counter, "sends"):
                counter.sends += 1
            await super().send_packed_command(command, check_health)

    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if k in ("host", "port", "db", "username", "password", "socket_timeout",
                       "socket_connect_timeout")}
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(
        connection_class=Counting, **kwargs))


class AsyncDriven:
    """``AsyncFeatureCache`` with ``FeatureCache``'s synchronous methods."""

    def __init__(self, config: CacheConfig, **kwargs: Any) -> None:
        client = kwargs.get("redis_client")
        if client is not None:
            kwargs["async_redis_client"] = _async_twin(client)
        self.async_cache = AsyncFeatureCache(config, **kwargs)
        self._loop = EventLoopThread()

    def get_features(self, entity_ids: Iterable[Any], feature_names: Sequence[str]
                     ) -> FeatureResult:
        return self._loop.run(self.async_cache.get_features(entity_ids, feature_names))

    def put_rows(self, view: Any, rows: Any, *, fence: Any = None) -> Any:
        return self._loop.run(self.async_cache.put_rows(view, rows, fence=fence))

    def fence(self, view: Any, entity_ids: Iterable[Any]) -> Any:
        return self._loop.run(self.async_cache.fence(view, entity_ids))

    def invalidate(self, view: Any, entity_ids: Iterable[Any] | None = None) -> Any:
        return self._loop.run(self.async_cache.invalidate(view, entity_ids))

    def model(self, name: str, version: str, **policy: Any) -> AsyncDrivenModel:
        return AsyncDrivenModel(self.async_cache.model(name, version, **policy), self._loop)

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._loop.run(self.async_cache.aclose())
        self._loop.stop()

    def __enter__(self) -> AsyncDriven:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.async_cache.sync, name)


class AsyncDrivenModel:
    """``AsyncModelCache`` with ``ModelCache``'s synchronous methods."""

    def __init__(self, model: AsyncModelCache, loop: EventLoopThread) -> None:
        self.async_model = model
        self._loop = loop

    def get_or_compute(self, inputs: Any, compute: Any) -> Any:
        return self._loop.run(self.async_model.get_or_compute(inputs, compute))

    def invalidate(self, inputs: Any = None) -> Any:
        return self._loop.run(self.async_model.invalidate(inputs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.async_model.sync, name)
