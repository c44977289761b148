"""The connections the stores keep between round trips (``featcache.redis_store.lanes``), for
the synchronous stores and the asyncio reader: never shared by two threads, coroutines or
processes, never reused with a reply nobody read, reopened when the server closed them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from featdata import STATS_FEATURES, insert, make_cache, make_table, make_view, stats_row

from featcache import AsyncFeatureCache, CacheUnavailable, Status
from featcache.config_sections import RedisConfig
from featcache.embedded import EmbeddedServer
from featcache.redis_store import StandaloneStore, open_store
from featcache.redis_store.aio import AsyncReader

KEYS = 2_000


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        admin = redis.Redis.from_url(server.url)
        admin.mset({f"lane:{i}": f"value-{i}" for i in range(KEYS)})
        admin.close()
        yield server


def _store(server: EmbeddedServer, **options: Any) -> StandaloneStore:
    store = open_store(RedisConfig(url=server.url, **options))
    assert isinstance(store, StandaloneStore)
    return store


def _check_reads(store: StandaloneStore, seed: int, rounds: int) -> None:
    """Reads of random keys, each answer compared with the values of exactly its keys."""
    rng = random.Random(seed)
    for _ in range(rounds):
        picked = rng.sample(range(KEYS), rng.randrange(1, 40))
        values = store.read([f"lane:{i}" for i in picked])
        assert values == [f"value-{i}".encode() for i in picked]


def test_threads_never_share_a_connection(server: EmbeddedServer) -> None:
    """Eight threads reading at once each get the replies of their own commands (two threads
    on one socket would read each other's)."""
    store = _store(server)
    failures: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            _check_reads(store, seed, 300)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert failures == []


def test_stores_on_one_client_share_its_idle_connections(server: EmbeddedServer) -> None:
    """Two stores on one client (a cluster node's store and its ASKING store, caches built on
    one application client) read one after the other on one connection, as two users of the
    pool would, and a store dropped leaves its connection to the next one."""
    client = redis.Redis.from_url(server.url)
    admin = redis.Redis.from_url(server.url)
    try:
        def connected() -> int:
            return int(admin.info("clients")["connected_clients"])

        before = connected()
        first, second = StandaloneStore(client), StandaloneStore(client)
        for _ in range(5):
            assert first.read(["lane:1"]) == [b"value-1"]
            assert second.read(["lane:2"]) == [b"value-2"]
        del first, second
        assert StandaloneStore(client).read(["lane:3"]) == [b"value-3"]
        assert connected() == before + 1
    finally:
        client.close()
        admin.close()


def test_a_quarter_of_the_pool_at_most_stays_idle_with_the_stores(
    server: EmbeddedServer,
) -> None:
    """Four reads at once on a pool of four connections, then the pool's other users (a
    command on the client itself) still get three: the stores keep one idle, not all four."""
    client = redis.Redis.from_url(server.url, max_connections=4)
    admin = redis.Redis.from_url(server.url)
    store = StandaloneStore(client)
    try:
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")  # the four reads overlap
        threads = [threading.Thread(target=store.read, args=([f"lane:{i}"],))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pool = client.connection_pool
        held = [pool.get_connection() for _ in range(3)]  # MaxConnectionsError if hoarded
        for conn in held:
            pool.release(conn)
        assert store.read(["lane:5"]) == [b"value-5"]
    finally:
        admin.close()
        client.close()


def test_a_read_that_timed_out_leaves_no_reply_for_the_next_call(
    server: EmbeddedServer,
) -> None:
    """The server answers a read after the client gave up on it: that late reply is on a
    connection that was closed, not read as the answer of the call after it, which is sent
    while the first is still unanswered."""
    store = _store(server, socket_timeout=0.5)
    assert store.read(["lane:1"]) == [b"value-1"]  # a connection held between calls
    admin = redis.Redis.from_url(server.url)
    try:
        admin.execute_command("CLIENT", "PAUSE", 800, "ALL")
        with pytest.raises(CacheUnavailable):
            store.read(["lane:2"])  # gives up at 0.5 s; answered at 0.8 s
        assert store.read(["lane:3"]) == [b"value-3"]  # waits out the pause
        for _ in range(20):
            assert store.read(["lane:4"]) == [b"value-4"]
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        store.close()


def test_a_connection_the_server_closed_is_reopened_without_an_error(
    server: EmbeddedServer, sqlite_target: Any
) -> None:
    """A connection killed while idle (a restart, ``CLIENT KILL``, the server's ``timeout``)
    is reopened by the next call: a hit, not a Redis error answered from SQL."""
    table = make_table(sqlite_target.engine(), None, "conn", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(1, clicks=3)])
    with make_cache([make_view("conn", "conn", None)], server.url, str(sqlite_target.url),
                    "fct-lanes") as fc:
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        admin = redis.Redis.from_url(server.url)
        try:
            assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            admin.close()
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS
        assert fc.stats()["conn"]["redis_errors"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_reads_on_connections_of_its_own(server: EmbeddedServer) -> None:
    """A child forked while the parent holds idle connections opens its own: parent and
    child reading at once each get their own replies."""
    store = _store(server)
    _check_reads(store, 0, 5)  # the parent now holds a connection
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if every read was its own
        code = 1
        try:
            _check_reads(store, 1, 300)
            code = 0
        finally:
            os._exit(code)
    _check_reads(store, 2, 300)
    _, status = os.waitpid(pid, 0)
    store.close()
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------------------------ the asyncio reader


def _reader(server: EmbeddedServer) -> AsyncReader:
    # Fifty coroutines queue for the pool's connections, and a read's deadline counts the
    # wait: 5 s, not the default 0.5, so a loaded machine cannot fail a test of who reads
    # which reply (timeouts are test_faults.py's subject).
    return AsyncReader(RedisConfig(url=server.url, socket_timeout=5.0))


@contextlib.asynccontextmanager
async def _paused_reader(server: EmbeddedServer, pause_ms: int, **options: Any
                         ) -> AsyncIterator[AsyncReader]:
    """A reader holding a connection, then every client of the server paused for
    ``pause_ms`` (``CLIENT PAUSE``)."""
    reader = AsyncReader(RedisConfig(url=server.url, **options))
    admin = redis.Redis.from_url(server.url)
    try:
        assert await reader.read(["lane:1"]) == [b"value-1"]  # a connection kept
        admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
        yield reader
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        await reader.aclose()


def test_coroutines_never_share_a_connection(server: EmbeddedServer) -> None:
    """Fifty coroutines reading at once each get the replies of their own commands."""

    async def main() -> None:
        reader = _reader(server)

        async def reads(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(40):
                picked = rng.sample(range(KEYS), rng.randrange(1, 40))
                values = await reader.read([f"lane:{i}" for i in picked])
                assert values == [f"value-{i}".encode() for i in picked]

        try:
            await asyncio.gather(*(reads(seed) for seed in range(50)))
        finally:
            await reader.aclose()

    asyncio.run(main())


def test_a_cancelled_async_read_leaves_no_reply_for_the_next(server: EmbeddedServer) -> None:
    """A read cancelled while the server holds it (``wait_for`` gave up): its late reply is
    on a closed connection, not read as the answer of the read sent right after it."""

    async def main() -> None:
        async with _paused_reader(server, 500) as reader:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(["lane:2"]), 0.2)
            assert await reader.read(["lane:3"]) == [b"value-3"]  # waits out the pause
            for _ in range(20):
                assert await reader.read(["lane:4"]) == [b"value-4"]

    asyncio.run(main())


def test_an_async_read_past_the_socket_timeout_is_redis_unavailable(
    server: EmbeddedServer,
) -> None:
    """The asyncio reader's deadline (``redis.socket_timeout``) bounds the whole read: past it
    the read is ``CacheUnavailable`` saying so, and the read after it gets its own answer."""

    async def main() -> None:
        async with _paused_reader(server, 800, socket_timeout=0.3) as reader:
            with pytest.raises(CacheUnavailable, match=r"no answer within 0\.3 s"):
                await reader.read(["lane:2"])
            with pytest.raises(CacheUnavailable):  # the pause still holds it past 0.3 s
                await reader.read(["lane:2"])
            await asyncio.sleep(0.4)
            assert await reader.read(["lane:3"]) == [b"value-3"]

    asyncio.run(main())


def test_the_async_client_reopens_a_connection_the_server_closed(
    server: EmbeddedServer, sqlite_target: Any
) -> None:
    """The asyncio reader does not poll an idle connection before using it: a read that finds
    it closed by the server is sent again on a new one, a hit and not a Redis error."""
    table = make_table(sqlite_target.engine(), None, "conn", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(1, clicks=3)])
    config = make_cache([make_view("conn", "conn", None)], server.url,
                        str(sqlite_target.url), "fct-alanes")
    config.close()

    async def main() -> None:
        async with AsyncFeatureCache(config.config) as fc:
            first = await fc.get_features([1], ["clicks"])
            assert first.status(1, "clicks") is Status.FILLED
            admin = redis.Redis.from_url(server.url)
            try:
                assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME",
                                             "yes")
            finally:
                admin.close()
            again = await fc.get_features([1], ["clicks"])
            assert again.status(1, "clicks") is Status.HIT_REDIS
            assert fc.sync.stats()["conn"]["redis_errors"] == 0

    asyncio.run(main())
