"""Invalidation and fenced fills (DESIGN section 4): no stale set, ever, on real servers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import redis
import sqlalchemy as sa
from featdata import (
    STATS_FEATURES,
    T0,
    Clock,
    counting_client,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
    redis_config,
    row_key,
    stats_row,
)

from featcache import FeatureCache, InvalidEntityId, InvalidRequest, Status, UnknownView
from featcache.codec import TOMBSTONE_HEAD
from featcache.config_sections import InvalidationConfig, LimitsConfig
from featcache.invalidation import Invalidator
from featcache.redis_store import open_store

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology


@pytest.fixture
def env(sql_target: Any, redis_url: str, key_prefix: str) -> Iterator[dict[str, Any]]:
    engine = sql_target.engine()
    if sql_target.name == "sqlite":  # a writer must commit while a reader's cursor is open
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    table = make_table(engine, sql_target.schema, "inv", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=0) for i in range(1, 4)])
    view = make_view("inv", "inv", sql_target.schema)
    with make_cache([view], redis_url, sql_target.url, key_prefix) as reader, \
            make_cache([view], redis_url, sql_target.url, key_prefix) as writer:
        yield {"engine": engine, "table": table, "reader": reader, "writer": writer}


def _set_clicks(engine: sa.Engine, table: sa.Table, entity: int, clicks: int) -> None:
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == entity).values(clicks=clicks))


def _after_sql_read(cache: FeatureCache, action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action`` once, right after the cache's next feature query has read SQL: the
    moment of the race, between a reader's SQL read and its fill."""
    fired = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "fc_latest" in statement and not fired:
            fired.append(True)
            action()

    sa.event.listen(cache.engine, "after_cursor_execute", hook)
    return lambda: sa.event.remove(cache.engine, "after_cursor_execute", hook)


@pytest.mark.parametrize("cached_before", ["nothing", "stale row"])
def test_fill_read_before_an_invalidation_is_never_written(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str, cached_before: str
) -> None:
    reader, writer, engine, table = env["reader"], env["writer"], env["engine"], env["table"]
    if cached_before == "stale row":
        reader.get_features([1], ["clicks"])
        writer.invalidate("inv", [1])  # so the next read misses (a tombstone)

    def etl_commits_v1_and_invalidates() -> None:
        _set_clicks(engine, table, 1, 111)
        writer.invalidate("inv", [1])

    remove = _after_sql_read(reader, etl_commits_v1_and_invalidates)
    try:
        old = reader.get_features([1], ["clicks"])
    finally:
        remove()
    assert old[1]["clicks"] == 0  # the reader got v0: it read before the commit
    assert reader.stats()["inv"]["fills_fenced"] == 1
    # Redis holds the tombstone, not v0: the next read goes to SQL and sees v1
    new = reader.get_features([1], ["clicks"])
    assert new.status(1, "clicks") is Status.FILLED and new[1]["clicks"] == 111
    assert reader.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS


def test_whole_view_invalidation_fences_fills_and_misses_old_rows(
    env: dict[str, Any],
) -> None:
    reader, writer, engine, table = env["reader"], env["writer"], env["engine"], env["table"]
    reader.get_features([1, 2], ["clicks"])
    assert reader.get_features([2], ["clicks"]).status(2, "clicks") is Status.HIT_REDIS

    def etl_rewrites_the_table() -> None:
        _set_clicks(engine, table, 3, 333)
        report = writer.invalidate("inv")
        assert report.whole_view and report.entities == 0

    remove = _after_sql_read(reader, etl_rewrites_the_table)
    try:
        assert reader.get_features([3], ["clicks"])[3]["clicks"] == 0
    finally:
        remove()
    _set_clicks(engine, table, 2, 222)
    after = reader.get_features([2, 3], ["clicks"])  # O(1) invalidation: every row is a miss
    assert after.status(2, "clicks") is Status.FILLED and after[2]["clicks"] == 222
    assert after[3]["clicks"] == 333
    assert reader.get_features([2, 3], ["clicks"]).status_counts() == {Status.HIT_REDIS: 2}


def test_a_rewrite_to_an_earlier_event_time_is_cached_again_after_a_view_invalidation(
    env: dict[str, Any],
) -> None:
    """The ETL replaces a row dated in the future by mistake with the right, earlier one and
    invalidates the whole view. The row in Redis is of the old epoch now (a miss), and it must
    give way to the refill even though its event time is later: otherwise every read of the
    entity would go to SQL until the key's TTL ran out."""
    reader, writer, engine, table = env["reader"], env["writer"], env["engine"], env["table"]
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == 1).values(
            event_ts=T0 + dt.timedelta(days=1), clicks=999))
    assert reader.get_features([1], ["clicks"])[1]["clicks"] == 999
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == 1).values(
            event_ts=T0 - dt.timedelta(hours=1), clicks=5))
    writer.invalidate("inv")
    refilled = reader.get_features([1], ["clicks"])
    assert refilled.status(1, "clicks") is Status.FILLED and refilled[1]["clicks"] == 5
    again = reader.get_features([1], ["clicks"])
    assert again.status(1, "clicks") is Status.HIT_REDIS and again[1]["clicks"] == 5


def test_epoch_never_repeats_even_when_its_key_is_lost(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    reader, writer = env["reader"], env["writer"]
    writer.invalidate("inv")
    epoch_key = key_layout(key_prefix).epoch_key("inv")
    first = int(redis_client.get(epoch_key) or 0)
    reader.get_features([1], ["clicks"])  # a row of epoch `first`
    redis_client.delete(epoch_key)  # as an eviction would
    assert reader.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
    writer.invalidate("inv")
    assert int(redis_client.get(epoch_key) or 0) > first


def test_put_rows_with_a_fence(env: dict[str, Any]) -> None:
    reader, writer = env["reader"], env["writer"]
    fence = writer.fence("inv", [1, 2])
    rows = [stats_row(1, clicks=10), stats_row(2, clicks=20)]
    reader.get_features([2], ["clicks"])  # someone fills 2 after the fence was taken
    report = writer.put_rows("inv", rows, fence=fence)
    assert (report.written, report.fenced_off) == (1, 1)
    assert reader.get_features([1], ["clicks"])[1]["clicks"] == 10
    fence = writer.fence("inv", [1])
    writer.invalidate("inv", [1])
    assert writer.put_rows("inv", [stats_row(1, clicks=99)], fence=fence).written == 0
    with pytest.raises(InvalidRequest, match="not in the fence"):
        writer.put_rows("inv", [stats_row(3)], fence=writer.fence("inv", [1]))



def test_a_fence_on_empty_keys_keeps_out_rows_invalidated_after_it(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    """Rows whose fence saw no key are written with SET NX behind the epoch check
    (``SET_IF_ABSENT``): a tombstone laid after the fence, or a whole-view invalidation,
    keeps them out exactly as the general script does for keys that held something."""
    writer = env["writer"]
    key = row_key(key_prefix, "inv", 3)
    fence = writer.fence("inv", [3])
    assert fence.seen == {3: None}
    writer.invalidate("inv", [3])
    tombstone = redis_client.get(key)
    assert tombstone is not None and tombstone.startswith(TOMBSTONE_HEAD)
    report = writer.put_rows("inv", [stats_row(3, clicks=30)], fence=fence)
    assert (report.written, report.fenced_off) == (0, 1)
    assert redis_client.get(key) == tombstone
    redis_client.delete(key)
    fence = writer.fence("inv", [3])
    writer.invalidate("inv")  # the whole view: its epoch moves
    report = writer.put_rows("inv", [stats_row(3, clicks=30)], fence=fence)
    if key_layout(key_prefix).buckets:
        # on a cluster the epoch key is in another slot than the row, so the script cannot
        # check it: the row is written with the epoch its fence read, and no reader serves it
        assert (report.written, report.fenced_off) == (1, 0)
        assert writer.get_features([3], ["clicks"]).status(3, "clicks") is Status.FILLED
        redis_client.delete(key)
    else:
        assert (report.written, report.fenced_off) == (0, 1)
    assert redis_client.get(key) is None
    fence = writer.fence("inv", [3])  # nothing in between: written
    assert writer.put_rows("inv", [stats_row(3, clicks=30)], fence=fence).written == 1
    assert writer.get_features([3], ["clicks"]).status(3, "clicks") is Status.HIT_REDIS

def test_put_rows_without_fence_replaces_tombstone(env: dict[str, Any]) -> None:
    reader, writer = env["reader"], env["writer"]
    writer.invalidate("inv", [1])
    writer.put_rows("inv", [stats_row(1, T0 + dt.timedelta(hours=1), clicks=5)])
    result = reader.get_features([1], ["clicks"])
    assert result.status(1, "clicks") is Status.HIT_REDIS and result[1]["clicks"] == 5


def test_invalidation_appends_to_the_stream(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    writer = env["writer"]
    report = writer.invalidate("inv", [3, 1, 3])
    assert report.entities == 2 and len(report.stream_ids) == 1
    whole = writer.invalidate("inv")
    entries = redis_client.xrange(key_layout(key_prefix).stream_key())
    assert [e[0].decode() for e in entries] == [*report.stream_ids, *whole.stream_ids]
    fields = entries[0][1]
    assert fields[b"v"] == b"inv" and fields[b"k"] == b"ids"
    assert msgpack.unpackb(fields[b"ids"]) == [3, 1]
    assert entries[1][1][b"k"] == b"all" and int(entries[1][1][b"e"]) > 0


@pytest.mark.one_server
def test_invalidating_100k_ids_is_one_round_trip(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    make_table(sqlite_target.engine(), None, "big_inv", STATS_FEATURES)
    client, calls = counting_client(redis_url)
    client.ping()
    view = make_view("big_inv", "big_inv", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    redis_client=client) as cache:
        calls.sends = 0
        report = cache.invalidate("big_inv", range(100_000))
        assert calls.sends == 1
        assert report.entities == 100_000 and len(report.stream_ids) == 100
    assert redis_client.exists(row_key(key_prefix, "big_inv", 0))
    assert redis_client.exists(row_key(key_prefix, "big_inv", 99999))
    assert redis_client.pttl(row_key(key_prefix, "big_inv", 5)) > 0
    client.close()


def test_invalidate_rejects_bad_input_before_io(env: dict[str, Any]) -> None:
    writer = env["writer"]
    with pytest.raises(UnknownView):
        writer.invalidate("nope", [1])
    with pytest.raises(InvalidEntityId):
        writer.invalidate("inv", [1, None])


def test_fill_past_the_fence_deadline_is_not_written(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "slow", STATS_FEATURES)
    insert(engine, table, [stats_row(1)])
    view = make_view("slow", "slow", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, Clock(),
                    fence_ttl=0.002) as cache:
        remove = _after_sql_read(cache, lambda: time.sleep(0.01))
        try:
            assert cache.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        finally:
            remove()
        assert cache.stats()["slow"]["fills_abandoned"] == 1
        assert cache.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED


def test_a_call_after_an_invalidation_never_joins_an_older_sql_read(
    env: dict[str, Any],
) -> None:
    """Single-flight shares a SQL read only among calls that saw the same Redis state."""
    reader, writer, engine, table = env["reader"], env["writer"], env["engine"], env["table"]
    later: dict[str, Any] = {}

    def invalidate_then_read_again() -> None:
        _set_clicks(engine, table, 2, 222)
        writer.invalidate("inv", [2])
        thread = threading.Thread(
            target=lambda: later.update(result=reader.get_features([2], ["clicks"]))
        )
        thread.start()
        thread.join(timeout=30)

    remove = _after_sql_read(reader, invalidate_then_read_again)
    try:
        first = reader.get_features([2], ["clicks"])
    finally:
        remove()
    assert first[2]["clicks"] == 0  # started before the invalidation
    assert later["result"][2]["clicks"] == 222  # started after it: its own SQL read


def test_a_lost_epoch_key_does_not_bring_invalidated_rows_back(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    reader, writer = env["reader"], env["writer"]
    reader.get_features([1], ["clicks"])  # a row stamped with the view's first epoch
    writer.invalidate("inv")
    redis_client.delete(key_layout(key_prefix).epoch_key("inv"))  # as an eviction would
    assert reader.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED


def test_a_fence_expires(sqlite_target: Any, redis_url: str, key_prefix: str) -> None:
    make_table(sqlite_target.engine(), None, "fexp", STATS_FEATURES)
    view = make_view("fexp", "fexp", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, fence_ttl=0.02) as cache:
        fence = cache.fence("fexp", [1])
        time.sleep(0.05)  # longer than fence_ttl / 2: a tombstone may have come and gone
        report = cache.put_rows("fexp", [stats_row(1)], fence=fence)
        assert (report.written, report.fenced_off) == (0, 1)


def test_a_fenced_write_never_replaces_a_newer_row(env: dict[str, Any]) -> None:
    writer = env["writer"]
    newer = T0 + dt.timedelta(days=1)
    writer.put_rows("inv", [stats_row(1, newer, clicks=2)])
    fence = writer.fence("inv", [1])
    report = writer.put_rows("inv", [stats_row(1, T0, clicks=1)], fence=fence)
    assert report.written == 0
    assert writer.get_features([1], ["clicks"])[1]["clicks"] == 2


@pytest.mark.parametrize("seen", ["empty", "row"])
def test_a_fenced_write_past_its_server_deadline_lands_nowhere(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str, seen: str
) -> None:
    """The write scripts judge the fence's deadline on the server's clock: a write held in a
    stalled server's socket past it (its tombstone may have expired by then) writes nothing,
    even where the key still holds what the fence saw. A fence taken 1 s of server time
    before its deadline ran out is what such a write carries; shown with both scripts (a key
    the fence saw empty: SET_IF_ABSENT; a key holding a row: CONDITIONAL_SET)."""
    writer = env["writer"]
    key = row_key(key_prefix, "inv", 3)
    if seen == "row":
        writer.put_rows("inv", [stats_row(3, clicks=1)])
    before = redis_client.get(key)
    fence = writer.fence("inv", [3])
    assert fence.deadline_us > 0
    seconds, micros = redis_client.time()
    expired = dataclasses.replace(fence, deadline_us=seconds * 1_000_000 + micros - 1_000_000)
    report = writer.put_rows("inv", [stats_row(3, clicks=30)], fence=expired)
    assert (report.written, report.fenced_off) == (0, 1)
    assert redis_client.get(key) == before
    report = writer.put_rows("inv", [stats_row(3, clicks=30)], fence=fence)  # in time
    assert report.written == 1


def test_two_invalidations_of_the_same_ids_publish_different_entries(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """Entries differ in content even for the same ids (``t``, the server time), so a
    subscriber can tell a recreated stream whose new entry repeats an old id and its ids."""
    layout = key_layout(key_prefix)
    store = open_store(redis_config(redis_url, key_prefix))  # the run's deployment
    try:
        invalidator = Invalidator(store, layout, InvalidationConfig(), LimitsConfig())
        view = make_view("v", "t", None)
        first = invalidator.invalidate(view, [1]).stream_ids[0]
        second = invalidator.invalidate(view, [1]).stream_ids[0]
        entries = dict(redis_client.xrange(layout.stream_key()))
        assert entries[first.encode()] != entries[second.encode()]
        assert {b"v", b"k", b"ids", b"t"} == set(entries[first.encode()])
    finally:
        store.close()
