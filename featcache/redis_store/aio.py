"""The asyncio side of the Redis store: the one read every ``get_features`` call makes, awaited
on the event loop (``redis.asyncio``, replies parsed by hiredis).

Only the read: it is the whole of an all-hit call's I/O, the one a serving coroutine waits on
every time. Everything else a call may do (fills, leases, fenced writes, epochs) waits on SQL
first and runs in the async client's thread pool through the synchronous store
(``featcache.async_client`` says why). Like ``StandaloneStore.read``, a read is one MGET (or
several past ``read_chunk`` keys) packed by hiredis and sent on a connection the reader keeps
between reads (``featcache.redis_store.lanes``): one network round trip, no redis-py
per-argument pass, no pool checkout. A read cancelled or failed midway closes its connection,
so a socket with unread replies is never used again.

A cluster's read is not here: redis.asyncio's cluster client fails a whole batch when one node
fails, and the synchronous cluster reader answers the other nodes' rows and keeps a breaker
per node, so the async client runs that one in its pool (docs/async.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.asyncio.sentinel
from redis import exceptions as redis_exc

from featcache.config_sections import RedisConfig
from featcache.errors import CacheUnavailable
from featcache.redis_store.base import pack
from featcache.redis_store.errors import ERRORS, translate
from featcache.redis_store.lanes import AsyncLanes
from featcache.redis_store.standalone import check_url, describe, sentinel_setup

__all__ = ["AsyncReader"]


class AsyncReader:
    """Reads rows for the async client from one server (``standalone``) or the primary the
    sentinels name (``sentinel``), with the URL's TLS, ACL and database and the section's
    timeouts and pool size (or through an application's own ``client``). Nothing is
    connected until the first read."""

    def __init__(self, config: RedisConfig, client: redis.asyncio.Redis | None = None) -> None:
        if config.mode == "cluster":
            raise ValueError("AsyncReader serves standalone and sentinel modes")
        check_url(config)
        self.url = describe(config)
        self._chunk = config.read_chunk
        self._timeout = config.socket_timeout
        self.client: redis.asyncio.Redis
        if client is not None:  # the application's own
            self.client = client
            self._lanes = AsyncLanes.of(client.connection_pool)
            return
        # The read's deadline is this reader's (``_round_trip``), not each socket operation's:
        # redis.asyncio times a send by ``asyncio.wait_for``, a task of its own on Python
        # 3.11, and a reply by a timer of its own (docs/async.md).
        timeouts: dict[str, Any] = {"socket_timeout": None,
                                    "socket_connect_timeout": config.connect_timeout}
        if config.mode == "sentinel":
            where = sentinel_setup(config)
            sentinel = redis.asyncio.sentinel.Sentinel(
                where.sentinels, sentinel_kwargs={**timeouts,
                                                  "socket_timeout": config.socket_timeout},
                **timeouts)
            self.client = sentinel.master_for(
                config.master_name, max_connections=config.max_connections,
                health_check_interval=30, ssl=where.ssl, **where.options, **timeouts)
        else:
            self.client = redis.asyncio.Redis.from_url(
                config.url, max_connections=config.max_connections,
                health_check_interval=30, **timeouts)
        self._lanes = AsyncLanes.of(self.client.connection_pool)

    async def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in key order, None where absent; one network round trip. Raises
        ``CacheUnavailable`` (or a ``CacheConfigError`` for an ACL or auth refusal)."""
        step = self._chunk
        if len(keys) <= step:
            packed: bytes = pack(("MGET", *keys))
            parts = 1
        else:
            chunks = [pack(("MGET", *keys[i : i + step])) for i in range(0, len(keys), step)]
            packed, parts = b"".join(chunks), len(chunks)
        replies = await self._round_trip(packed, parts)
        for part in replies:
            if isinstance(part, Exception):  # an error reply (ACL, OOM...): no values at all
                raise translate(part, self.url) from part
        if parts == 1:
            values: list[bytes | None] = replies[0]
            return values
        out: list[bytes | None] = []
        for part in replies:
            out.extend(part)
        return out

    async def _round_trip(self, packed: bytes, replies: int) -> list[Any]:
        """The read within ``redis.socket_timeout``: connecting, sending, every reply."""
        lanes = self._lanes
        try:
            async with asyncio.timeout(self._timeout):
                conn, idle = await lanes.take()
                try:
                    return await self._exchange(conn, packed, replies)
                except redis_exc.ConnectionError:
                    if not idle:
                        raise
                # the server closed it while idle (a restart, CLIENT KILL, its timeout): a
                # read of values is sent again, once, on a connection the pool checks
                return await self._exchange(await lanes.fresh(), packed, replies)
        except TimeoutError:
            raise CacheUnavailable(f"Redis {self.url}: no answer within {self._timeout:g} s "
                                   "(redis.socket_timeout)") from None
        except ERRORS as exc:
            raise translate(exc, self.url) from exc

    async def _exchange(self, conn: Any, packed: bytes, replies: int) -> list[Any]:
        """The commands sent and every reply read on ``conn``, which then goes back to the
        idle ones (or, if anything failed, is closed and handed back to the pool)."""
        lanes = self._lanes
        try:
            await conn.send_packed_command(packed, check_health=True)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await conn.read_response())
                except redis_exc.ResponseError as exc:
                    out.append(exc)
        except BaseException:  # a failure or a cancellation: replies may be unread
            await lanes.discard(conn)
            raise
        await lanes.give_back(conn)
        return out

    async def ping(self) -> None:
        """One PING (the server's readiness, for ``/readyz``)."""
        try:
            async with asyncio.timeout(self._timeout):
                await self.client.ping()
        except TimeoutError:
            raise CacheUnavailable(f"Redis {self.url}: no answer within {self._timeout:g} s "
                                   "(redis.socket_timeout)") from None
        except ERRORS as exc:
            raise translate(exc, self.url) from exc

    async def aclose(self) -> None:
        await self.client.aclose()
