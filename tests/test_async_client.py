"""``AsyncFeatureCache`` on real servers: what only an asyncio client can get wrong.

The read path's own tests run on it too (``FEATCACHE_TEST_CLIENT=async``, tests/asyncdriven.py:
.ci/run runs the tests marked ``topology`` and ``client`` so). Here: coroutines sharing one SQL
read, with each other and with threads; an event loop that keeps running while a fill waits on
SQL; cancellation; the same answers as the synchronous client; the cluster and Sentinel modes.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from featdata import (
    STATS_FEATURES,
    SqlCounter,
    insert,
    make_table,
    make_view,
    redis_config,
    stats_row,
    with_options,
)

from featcache import AsyncFeatureCache, CacheConfig, FeatureCache, InvalidRequest, Status
from featcache.config_sections import OfflineStoreConfig, RedisConfig
from featcache.embedded_cluster import EmbeddedCluster
from featcache.embedded_sentinel import EmbeddedSentinel

NAMES = ["ctr", "clicks", "country", "vip", "last_seen", "emb"]


def on_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on a fresh event loop (its fixtures as for any test)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run
VIEW = "stats"
WAIT_S = 30.0


@pytest.fixture
def config(sqlite_target: Any, redis_url: str, key_prefix: str) -> CacheConfig:
    table = make_table(sqlite_target.engine(), None, "user_stats", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i, clicks=i) for i in range(1, 101)])
    view = make_view(VIEW, "user_stats", None)
    return with_options(CacheConfig(
        views=(view,), redis=redis_config(redis_url, key_prefix),
        offline_store=OfflineStoreConfig(url=sqlite_target.url),
    ), xfetch_beta=0)


@pytest.fixture
def sync_cache(config: CacheConfig) -> Iterator[FeatureCache]:
    with FeatureCache(config) as cache:
        yield cache


def parked_sql(engine: sa.Engine) -> tuple[threading.Event, threading.Event]:
    """(reached, resume): the first feature query signals ``reached`` and waits for
    ``resume``; any later one goes through."""
    reached, resume = threading.Event(), threading.Event()

    def park(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "fc_latest" in statement and not reached.is_set():
            reached.set()
            assert resume.wait(WAIT_S), "never resumed"

    sa.event.listen(engine, "before_cursor_execute", park)
    return reached, resume


@on_a_loop
async def test_the_same_answers_as_the_synchronous_client(
    config: CacheConfig, sync_cache: FeatureCache
) -> None:
    ids = [1, 2, 3, 500, 2]  # hits, a fill, an absent id, a duplicate
    sync_cache.get_features([1, 2], NAMES)  # 1 and 2 cached; 3 not yet
    async with AsyncFeatureCache(config) as cache:
        first = await cache.get_features(ids, NAMES)
        assert [first.status(i, "clicks") for i in (1, 2, 3, 500)] == [
            Status.HIT_REDIS, Status.HIT_REDIS, Status.FILLED, Status.ABSENT]
        again = await cache.get_features(ids, NAMES)
        expected = sync_cache.get_features(ids, NAMES)
    for entity in (1, 2, 3, 500):
        assert dict(again[entity]) == dict(expected[entity])
        assert again.status(entity, "clicks") is expected.status(entity, "clicks")
    assert again.statuses() == expected.statuses()
    assert again.status(3, "clicks") is Status.HIT_REDIS
    assert again.status(500, "clicks") is Status.ABSENT  # remembered: a negative hit


@on_a_loop
async def test_concurrent_coroutines_missing_one_row_share_one_sql_read(
    config: CacheConfig,
) -> None:
    async with AsyncFeatureCache(config) as cache:
        await cache.get_features([1], NAMES)  # connect and reflect before counting
        counter = SqlCounter(cache.sync.engine)
        reached, resume = parked_sql(cache.sync.engine)
        calls = [asyncio.ensure_future(cache.get_features([42], NAMES)) for _ in range(50)]
        assert await asyncio.to_thread(reached.wait, WAIT_S), "no coroutine reached SQL"
        await asyncio.sleep(0.05)  # the others reach the single flight meanwhile
        resume.set()
        results = await asyncio.gather(*calls)
    assert counter.count == 1
    assert all(dict(r[42]) == dict(results[0][42]) for r in results)
    assert results[0][42]["clicks"] == 42
    statuses = {r.status(42, "clicks") for r in results}
    assert statuses <= {Status.FILLED, Status.HIT_REDIS}, statuses


@on_a_loop
async def test_coroutines_and_threads_share_one_sql_read(config: CacheConfig) -> None:
    async with AsyncFeatureCache(config) as cache:
        await cache.get_features([1], NAMES)
        counter = SqlCounter(cache.sync.engine)
        reached, resume = parked_sql(cache.sync.engine)
        threaded: list[Any] = []
        threads = [threading.Thread(target=lambda: threaded.append(
            cache.sync.get_features([7], NAMES)), daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert await asyncio.to_thread(reached.wait, WAIT_S)
        coros = [asyncio.ensure_future(cache.get_features([7], NAMES)) for _ in range(8)]
        await asyncio.sleep(0.05)
        resume.set()
        awaited = await asyncio.gather(*coros)
        for thread in threads:
            await asyncio.to_thread(thread.join, WAIT_S)
    assert counter.count == 1
    assert len(threaded) == 8
    assert {r[7]["clicks"] for r in [*threaded, *awaited]} == {7}


@on_a_loop
async def test_the_event_loop_runs_while_a_fill_waits_on_sql(config: CacheConfig) -> None:
    """The fill's SQL read is held until the loop has run another coroutine five times: a
    client that blocked the loop during the fill would never get there (and time out)."""
    async with AsyncFeatureCache(config) as cache:
        await cache.get_features([1], NAMES)
        reached, resume = parked_sql(cache.sync.engine)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            await asyncio.to_thread(reached.wait, WAIT_S)
            while ticks < 5:
                ticks += 1
                await asyncio.sleep(0.001)
            resume.set()

        result, _ = await asyncio.wait_for(
            asyncio.gather(cache.get_features([9], NAMES), ticker()), WAIT_S)
    assert ticks == 5
    assert result.status(9, "clicks") is Status.FILLED


@on_a_loop
async def test_a_cancelled_call_leaves_the_client_working(config: CacheConfig) -> None:
    """A call cancelled while its fill waits on SQL (a request timeout, say): the fill runs
    to its end in the pool and lands; the next call hits, on a connection that works."""
    async with AsyncFeatureCache(config) as cache:
        await cache.get_features([1], NAMES)
        reached, resume = parked_sql(cache.sync.engine)
        call = asyncio.ensure_future(cache.get_features([11], NAMES))
        assert await asyncio.to_thread(reached.wait, WAIT_S)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        resume.set()
        for _ in range(200):
            result = await cache.get_features([11, 1], NAMES)
            if result.status(11, "clicks") is Status.HIT_REDIS:
                break
            await asyncio.sleep(0.01)
        assert result.status(11, "clicks") is Status.HIT_REDIS
        assert result[11]["clicks"] == 11
        # many calls cancelled mid-read: no connection goes back to the pool with a reply
        # unread (the next call would read the previous one's values)
        cancelled = 0
        for steps in range(40):
            pending = asyncio.ensure_future(cache.get_features([1, 11], NAMES))
            for _ in range(steps % 4):  # cancelled at different points of its read
                await asyncio.sleep(0)
            pending.cancel()
            try:
                await pending
            except asyncio.CancelledError:
                cancelled += 1
            got = await cache.get_features([11], NAMES)
            assert got[11]["clicks"] == 11
        assert cancelled > 0


async def joined(cache: AsyncFeatureCache, n: int) -> None:
    """Return once ``n`` rows were asked while another caller's read of them ran (the read
    path's single flight counts them as they join; the stats, as their calls end)."""
    flights = cache.sync._read._flights
    for _ in range(int(WAIT_S / 0.005)):
        if flights.joined >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{flights.joined} coroutines joined the read, not {n}")


@on_a_loop
async def test_coroutines_waiting_on_a_shared_fill_hold_no_pool_thread(
    config: CacheConfig,
) -> None:
    """With two threads, 30 coroutines wait for one row's held SQL read on the event loop,
    and another row's fill gets the free thread meanwhile (were each waiter holding a thread,
    that fill would queue until the held read ended)."""
    async with AsyncFeatureCache(config, fill_threads=2) as cache:
        await cache.get_features([1], NAMES)
        counter = SqlCounter(cache.sync.engine)
        reached, resume = parked_sql(cache.sync.engine)
        calls = [asyncio.ensure_future(cache.get_features([42], NAMES)) for _ in range(30)]
        assert await asyncio.to_thread(reached.wait, WAIT_S), "no coroutine reached SQL"
        await joined(cache, 29)
        other = await asyncio.wait_for(cache.get_features([43], NAMES), 10.0)
        assert other.status(43, "clicks") is Status.FILLED and other[43]["clicks"] == 43
        assert not any(call.done() for call in calls)  # all still waiting on the held read
        resume.set()
        results = await asyncio.gather(*calls)
    assert counter.count == 2  # row 42 once, row 43 once
    assert {r.status(42, "clicks") for r in results} == {Status.FILLED}
    assert {r[42]["clicks"] for r in results} == {42}


@on_a_loop
async def test_coroutines_cancelled_while_waiting_on_a_shared_fill(config: CacheConfig) -> None:
    """Half of the coroutines sharing one held read are cancelled (their requests timed
    out): the rest get the row, the read's fill lands, and nothing is read twice."""
    async with AsyncFeatureCache(config, fill_threads=2) as cache:
        await cache.get_features([1], NAMES)
        counter = SqlCounter(cache.sync.engine)
        reached, resume = parked_sql(cache.sync.engine)
        calls = [asyncio.ensure_future(cache.get_features([44], NAMES)) for _ in range(10)]
        assert await asyncio.to_thread(reached.wait, WAIT_S)
        await joined(cache, 9)
        for call in calls[::2]:
            call.cancel()
        resume.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[::2])
        assert {o[44]["clicks"] for o in outcomes[1::2]} == {44}  # type: ignore[index]
        for _ in range(200):  # the fill lands, whoever led it
            after = await cache.get_features([44], NAMES)
            if after.status(44, "clicks") is Status.HIT_REDIS:
                break
            await asyncio.sleep(0.01)
        assert after.status(44, "clicks") is Status.HIT_REDIS
    assert counter.count == 1


@on_a_loop
async def test_coroutines_waiting_for_another_process_fill_hold_no_pool_thread(
    config: CacheConfig,
) -> None:
    """Another client (as another process would: its own single flight, its own lease
    token) holds the leases of four rows while its SQL read is held; four coroutines of a
    two-thread client wait for its fills, each pausing between polls of Redis on the event
    loop, and a fifth row is filled meanwhile (were each lease wait holding a thread between
    its polls, that fill would queue until the waits ended)."""
    leased = with_options(config, lease_wait=30.0, lease_ttl=30.0)
    rows = [60, 61, 62, 63]
    with FeatureCache(leased) as other:
        other.get_features([1], NAMES)
        reached, resume = parked_sql(other.engine)
        holder = asyncio.ensure_future(asyncio.to_thread(other.get_features, rows, NAMES))
        assert await asyncio.to_thread(reached.wait, WAIT_S), "the holder never reached SQL"
        async with AsyncFeatureCache(leased, fill_threads=2) as cache:
            await cache.get_features([1], NAMES)
            counter = SqlCounter(cache.sync.engine)
            waiting = [asyncio.ensure_future(cache.get_features([r], NAMES)) for r in rows]
            flights = cache.sync._read._flights
            for _ in range(int(WAIT_S / 0.005)):
                if flights.in_flight == len(rows):
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)  # their lease attempts fail and they start polling
            other_row = await asyncio.wait_for(cache.get_features([70], NAMES), 10.0)
            assert other_row.status(70, "clicks") is Status.FILLED
            assert not any(w.done() for w in waiting)  # still waiting for the holder's fills
            resume.set()
            answers = await asyncio.gather(*waiting)
            stats = cache.stats()[VIEW]
        await holder
    assert counter.count == 1  # row 70; rows 60-63 came from the holder's fills
    assert [a.status(r, "clicks") for a, r in zip(answers, rows, strict=True)] == [
        Status.HIT_REDIS] * len(rows)
    assert [a[r]["clicks"] for a, r in zip(answers, rows, strict=True)] == rows
    assert stats["lease_waits"] == len(rows) and stats["lease_timeouts"] == 0


@on_a_loop
async def test_bad_input_raises_before_any_io(config: CacheConfig) -> None:
    async with AsyncFeatureCache(config) as cache:
        with pytest.raises(InvalidRequest, match="not the string"):
            await cache.get_features([1], "clicks")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            await cache.get_features([1], ["no_such_feature"])
        with pytest.raises(InvalidRequest):
            await cache.get_features(["x"], NAMES)
        assert len(await cache.get_features([], NAMES)) == 0


@on_a_loop
async def test_writes_and_invalidation(config: CacheConfig) -> None:
    async with AsyncFeatureCache(config) as cache:
        assert (await cache.get_features([5], NAMES))[5]["clicks"] == 5
        fence = await cache.fence(VIEW, [5])
        report = await cache.put_rows(VIEW, [stats_row(5, clicks=55)], fence=fence)
        assert report.written == 1
        assert (await cache.get_features([5], NAMES))[5]["clicks"] == 55
        await cache.invalidate(VIEW, [5])
        refilled = await cache.get_features([5], NAMES)
        assert refilled.status(5, "clicks") is Status.FILLED
        assert refilled[5]["clicks"] == 5  # from SQL again
        await cache.ping()


@on_a_loop
async def test_with_l1_an_invalidation_reaches_the_async_clients_l1(
    config: CacheConfig, sync_cache: FeatureCache
) -> None:
    l1 = with_options(config, l1_policy="lru", l1_max_entries=1000, l1_max_ttl=60.0)
    async with AsyncFeatureCache(l1) as cache:
        await cache.get_features([3], NAMES)
        assert (await cache.get_features([3], NAMES)).status(3, "clicks") is Status.HIT_L1
        sync_cache.invalidate(VIEW, [3])  # another process's invalidation, through the stream
        for _ in range(500):
            result = await cache.get_features([3], NAMES)
            if result.status(3, "clicks") is not Status.HIT_L1:
                break
            await asyncio.sleep(0.01)
        assert result.status(3, "clicks") is Status.FILLED


@on_a_loop
async def test_aclose_twice_and_fill_threads_checked(config: CacheConfig) -> None:
    cache = AsyncFeatureCache(config)
    await cache.aclose()
    await cache.aclose()
    with pytest.raises(InvalidRequest, match="fill_threads"):
        AsyncFeatureCache(config, fill_threads=0)


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
@on_a_loop
async def test_cluster_and_sentinel_modes(
    mode: str, sqlite_target: Any, request: pytest.FixtureRequest
) -> None:
    table = make_table(sqlite_target.engine(), None, "user_stats", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i, clicks=i) for i in range(1, 201)])
    if mode == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        prefix: str = request.getfixturevalue("cluster_key_prefix")
        redis = RedisConfig(url=f"redis://{cluster.seeds[0]}/0", key_prefix=prefix,
                            mode="cluster")
    else:
        sentinel: EmbeddedSentinel = request.getfixturevalue("redis_sentinel")
        prefix = request.getfixturevalue("sentinel_key_prefix")
        redis = RedisConfig(mode="sentinel", master_name=sentinel.master_name,
                            sentinels=tuple(f"{h}:{p}" for h, p in sentinel.sentinels),
                            key_prefix=prefix)
    config = CacheConfig(views=(make_view(VIEW, "user_stats", None),), redis=redis,
                         offline_store=OfflineStoreConfig(url=sqlite_target.url))
    ids = list(range(1, 201))
    async with AsyncFeatureCache(config) as cache:
        first = await cache.get_features(ids, NAMES)
        assert {first.status(i, "clicks") for i in ids} == {Status.FILLED}
        second = await cache.get_features(ids, NAMES)
        assert {second.status(i, "clicks") for i in ids} == {Status.HIT_REDIS}
        assert [second[i]["clicks"] for i in ids] == ids
        await cache.ping()
