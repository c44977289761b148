"""A batch of hits is answered at once (``ReadPath._all_hits``): every row of it must be
answered exactly as one at a time, and one row that is not a plain hit sends the batch through
the per-row judgement. Real Valkey and SQLite; batches of 20 rows (the batch path starts at 8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from featdata import (
    STATS_FEATURES,
    T0,
    Clock,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
    row_key,
    stats_row,
)
from test_bad_inputs import CORRUPTIONS

from featcache import Feature, Status
from featcache.codec import RowCodec

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

IDS = list(range(1, 21))
NAMES = [f.name for f in STATS_FEATURES]
VIEW = "batch"


@pytest.fixture
def sql_url(sqlite_target: Any) -> str:
    table = make_table(sqlite_target.engine(), None, VIEW, STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i, clicks=i, ctr=i / 8) for i in IDS])
    return str(sqlite_target.url)


def _expected(eid: int) -> dict[str, Any]:
    row = stats_row(eid, clicks=eid, ctr=eid / 8)
    return {name: row[name] for name in NAMES}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_one_undecodable_row_in_a_batch_of_hits_is_a_miss(
    sql_url: str, redis_url: str, key_prefix: str, redis_client: redis.Redis,
    corrupt: Callable[[bytes], bytes],
) -> None:
    with make_cache([make_view(VIEW, VIEW, None)], redis_url, sql_url, key_prefix,
                    xfetch_beta=0) as fc:
        fc.get_features(IDS, NAMES)
        key = row_key(key_prefix, VIEW, 7)
        real = redis_client.get(key)
        assert real is not None
        redis_client.set(key, corrupt(real))
        result = fc.get_features(IDS, NAMES)
        assert {e: result.status(e, "clicks") for e in IDS} == {
            e: Status.FILLED if e == 7 else Status.HIT_REDIS for e in IDS}
        assert [dict(result[e]) for e in IDS] == [_expected(e) for e in IDS]
        assert fc.stats()[VIEW]["decode_errors"] == 1
        again = fc.get_features(IDS, NAMES)  # repaired: the whole batch hits again
        assert again.status_counts() == {Status.HIT_REDIS: len(IDS) * len(NAMES)}


def test_one_stale_row_in_a_batch_of_hits_is_read_again(
    sql_url: str, redis_url: str, key_prefix: str,
) -> None:
    clock = Clock()
    view = make_view(VIEW, VIEW, None)
    with make_cache([view], redis_url, sql_url, key_prefix, clock, xfetch_beta=0) as fc:
        fc.get_features([3], NAMES)
        clock.advance(30 * 60)  # row 3 is past ctr's 10 min max_age; the others are loaded now
        fc.get_features([e for e in IDS if e != 3], NAMES)
        result = fc.get_features(IDS, NAMES)
        assert {e: result.status(e, "ctr") for e in IDS} == {
            e: Status.FILLED if e == 3 else Status.HIT_REDIS for e in IDS}
        assert [dict(result[e]) for e in IDS] == [_expected(e) for e in IDS]
        # the same batch for a feature whose max_age (1 h) row 3 still meets: all hits
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.HIT_REDIS: len(IDS)}


def test_a_row_of_an_older_epoch_in_a_batch_of_hits_is_a_miss(
    sql_url: str, redis_url: str, key_prefix: str, redis_client: redis.Redis,
) -> None:
    view = make_view(VIEW, VIEW, None)
    with make_cache([view], redis_url, sql_url, key_prefix, xfetch_beta=0) as fc:
        fc.get_features([5], NAMES)
        row_5 = redis_client.get(row_key(key_prefix, VIEW, 5))
        fc.invalidate(VIEW)  # a new epoch: every row cached so far is a miss
        fc.get_features(IDS, NAMES)
        assert row_5 is not None
        redis_client.set(row_key(key_prefix, VIEW, 5), row_5)  # row 5 of the old epoch, back
        result = fc.get_features(IDS, NAMES)
        assert {e: result.status(e, "clicks") for e in IDS} == {
            e: Status.FILLED if e == 5 else Status.HIT_REDIS for e in IDS}


def test_rows_close_to_expiry_in_a_batch_are_refreshed_early_by_xfetch(
    sql_url: str, redis_url: str, key_prefix: str,
) -> None:
    """With XFetch on, a batch of rows a few seconds from expiry is not answered at once: each
    row draws its early refresh, as it would alone."""
    clock = Clock()
    view = make_view(VIEW, VIEW, None)
    with make_cache([view], redis_url, sql_url, key_prefix, clock, xfetch_beta=1.0) as fc:
        fc.get_features(IDS, NAMES)
        clock.advance(10 * 60 - 1)  # 1 s before ctr's max_age: within 10 deltas of expiry
        result = fc.get_features(IDS, NAMES)
        assert Status.FILLED in result.status_counts()  # some drew their early refresh
        assert fc.stats()[VIEW]["early_refreshes"] >= 1


def test_rows_whose_fill_was_slow_draw_xfetch_further_from_expiry(
    sql_url: str, redis_url: str, key_prefix: str, redis_client: redis.Redis,
) -> None:
    """A row remembers how long its SQL read took (``fill_ms``): one that took 30 min may be
    refreshed early from 300 min before its expiry. Rows 1000 s from expiry (far outside the
    window of the default fill time, 72 s) with that fill time must each draw (about 57% each
    refresh), not be answered at once as plain hits."""
    clock = Clock()
    view = make_view(VIEW, VIEW, None, features=STATS_FEATURES[1:2])  # clicks, max_age 1 h
    codec = RowCodec(view)
    with make_cache([view], redis_url, sql_url, key_prefix, clock, xfetch_beta=1.0) as fc:
        fc.get_features(IDS, ["clicks"])  # creates the epoch and the rows
        epoch = int(redis_client.get(key_layout(key_prefix).epoch_key(VIEW)) or 0)
        now_ms = int(clock.now * 1000)
        loaded_ms = now_ms - 3600_000 + 1000_000  # 1000 s before max_age runs out
        for e in IDS:
            redis_client.set(row_key(key_prefix, VIEW, e),
                             codec.encode([e], None, loaded_ms, epoch, fill_ms=1800_000))
        result = fc.get_features(IDS, ["clicks"])
        assert fc.stats()[VIEW]["early_refreshes"] >= 1, result.status_counts()


@pytest.mark.parametrize("batch", [1, 3])
def test_small_batches_of_hits_are_answered_as_their_fills_were(
    sql_url: str, redis_url: str, key_prefix: str, redis_client: redis.Redis, batch: int
) -> None:
    """A call of a few plain hits is answered straight from the MGET (``_plain_hits``, any
    batch size): the same values and event times as the fill that stored them, and one value
    that is not a row is still a counted miss."""
    ids = IDS[:batch]
    with make_cache([make_view(VIEW, VIEW, None)], redis_url, sql_url, key_prefix,
                    xfetch_beta=0) as fc:
        filled = fc.get_features(ids, NAMES)
        assert filled.status_counts() == {Status.FILLED: batch * len(NAMES)}
        hits = fc.get_features(ids, NAMES)
        assert hits.status_counts() == {Status.HIT_REDIS: batch * len(NAMES)}
        assert [dict(hits[e]) for e in ids] == [dict(filled[e]) for e in ids] == [
            _expected(e) for e in ids]
        assert [hits.event_timestamp(e, "clicks") for e in ids] == [
            filled.event_timestamp(e, "clicks") for e in ids]
        assert fc.stats()[VIEW]["hit_redis"] == batch
        redis_client.set(row_key(key_prefix, VIEW, ids[-1]), b"\x98garbage")
        again = fc.get_features(ids, NAMES)
        assert {e: again.status(e, "clicks") for e in ids} == {
            e: Status.FILLED if e == ids[-1] else Status.HIT_REDIS for e in ids}
        assert fc.stats()[VIEW]["decode_errors"] == 1


def test_an_all_hit_call_of_two_views_reads_as_the_fill_that_stored_it(
    sqlite_target: Any, redis_url: str, key_prefix: str,
) -> None:
    """Every row of every view a plain hit: the result keeps the rows as decoded and builds
    each answer only when asked (``RedisHits``). Every way of reading it (by id, per status,
    column by column, Arrow) must give what the fill that stored the rows gave."""
    engine = sqlite_target.engine()
    age = (Feature("age", "int", "1d"), Feature("country", "str", "1d"))
    insert(engine, make_table(engine, None, "hs", STATS_FEATURES),
           [stats_row(i, clicks=i, ctr=i / 8) for i in IDS])
    insert(engine, make_table(engine, None, "hp", age),
           [{"entity_id": i, "event_ts": T0, "age": 20 + i, "country": "FR"} for i in IDS])
    views = [make_view("hs", "hs", None), make_view("hp", "hp", None, age)]
    names = ["clicks", "age", "hp:country", "hs:country", "emb", "last_seen"]
    ids = IDS[::-1]  # not in the order they were stored
    with make_cache(views, redis_url, sqlite_target.url, key_prefix, xfetch_beta=0) as fc:
        filled = fc.get_features(ids, names)
        hits = fc.get_features(ids, names)
        n = len(ids) * len(names)
        assert filled.status_counts() == {Status.FILLED: n}
        assert hits.status_counts() == {Status.HIT_REDIS: n}
        assert 3 in hits and 999 not in hits
        assert list(hits) == ids and len(hits) == len(ids)
        assert [dict(hits[e]) for e in ids] == [dict(filled[e]) for e in ids]
        assert hits.statuses() == {e: dict.fromkeys(names, Status.HIT_REDIS) for e in ids}
        assert [[hits.event_timestamp(e, f) for f in names] for e in ids] == [
            [filled.event_timestamp(e, f) for f in names] for e in ids]
        for got, want in zip(hits.columns(), filled.columns(), strict=True):
            assert (got.name, got.view, got.type, got.values, got.event_us) == (
                want.name, want.view, want.type, want.values, want.event_us)
            assert got.statuses == [Status.HIT_REDIS] * len(ids)
        table = hits.to_arrow(with_status=True)
        assert table.drop_columns([c for c in table.column_names if c.endswith(".status")]
                                  ) == filled.to_arrow(with_status=True).drop_columns(
            [c for c in table.column_names if c.endswith(".status")])
        assert set(table.column("clicks.status").to_pylist()) == {"HIT_REDIS"}
        assert repr(hits).endswith(f"HIT_REDIS={n}>")


def test_rows_written_before_a_feature_was_appended_answer_column_by_column(
    sql_url: str, redis_url: str, key_prefix: str,
) -> None:
    """A batch of hits whose rows have different widths (half written before ``emb`` was
    added to the view, half after) gives every column its rows' values: the transposition
    that makes the columns stops at the shortest row, which holds every feature asked for."""
    older = make_view(VIEW, VIEW, None, features=STATS_FEATURES[:5])
    names = ["ctr", "clicks", "country"]
    with make_cache([older], redis_url, sql_url, key_prefix, xfetch_beta=0) as fc:
        assert fc.get_features(IDS[:10], names).status_counts() == {Status.FILLED: 30}
    with make_cache([make_view(VIEW, VIEW, None)], redis_url, sql_url, key_prefix,
                    xfetch_beta=0) as fc:
        fc.get_features(IDS[10:], NAMES)
        hits = fc.get_features(IDS, names)
        assert hits.status_counts() == {Status.HIT_REDIS: len(IDS) * len(names)}
        columns = {c.name: c.values for c in hits.columns()}
        assert columns == {name: [_expected(e)[name] for e in IDS] for name in names}
        same = fc.get_features(IDS[10:], names)  # rows of one width
        assert {c.name: c.values for c in same.columns()} == {
            name: [_expected(e)[name] for e in IDS[10:]] for name in names}
