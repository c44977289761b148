"""The read path of DESIGN section 2 on real servers: statuses, freshness, round trips."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featdata import (
    STATS_FEATURES,
    T0,
    Clock,
    SqlCounter,
    counting_client,
    insert,
    make_cache,
    make_table,
    make_view,
    row_key,
    stats_row,
)

from featcache import (
    Feature,
    FeatureCache,
    FeatureView,
    OfflineStoreError,
    OfflineStoreUnavailable,
    Status,
)
from featcache.codec import RowCodec
from featcache.materialize import materialize

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology


@pytest.fixture
def stats_table(sql_target: Any) -> sa.Table:
    table = make_table(sql_target.engine(), sql_target.schema, "user_stats", STATS_FEATURES)
    insert(sql_target.engine(), table, [stats_row(i, clicks=i) for i in range(1, 6)])
    return table


@pytest.fixture
def cache(sql_target: Any, stats_table: sa.Table, redis_url: str, key_prefix: str,
          ) -> Iterator[tuple[FeatureCache, Clock]]:
    clock = Clock()
    view = make_view("stats", "user_stats", sql_target.schema)
    # freshness boundaries are exact here: no XFetch draws near expiry (tested on its own)
    with make_cache([view], redis_url, sql_target.url, key_prefix, clock, xfetch_beta=0) as fc:
        yield fc, clock


NAMES = ["ctr", "clicks", "country", "vip", "last_seen", "emb"]


def test_first_read_fills_then_hits_redis(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    first = fc.get_features([1, 2], NAMES)
    assert {first.status(e, n) for e in (1, 2) for n in NAMES} == {Status.FILLED}
    assert first[2]["clicks"] == 2
    second = fc.get_features([1, 2], NAMES)
    assert {second.status(e, n) for e in (1, 2) for n in NAMES} == {Status.HIT_REDIS}
    assert dict(second) == dict(first)
    assert second.event_timestamp(1, "ctr") == T0


def test_absent_entity_is_absent_with_none_values(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    result = fc.get_features([1, 999], NAMES)
    assert result.status(999, "ctr") is Status.ABSENT
    assert result[999] == dict.fromkeys(NAMES)
    assert result.event_timestamp(999, "ctr") is None
    assert result.status(1, "ctr") is Status.FILLED


def test_result_is_a_mapping_in_callers_order(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    result = fc.get_features([3, 1, 999, 3, 2], ["clicks", "stats:ctr"])
    assert list(result) == [3, 1, 999, 2]
    assert list(result[3]) == ["clicks", "stats:ctr"]
    assert len(result) == 4 and 999 in result and 4 not in result
    frame = result.to_pandas(with_status=True)
    assert list(frame.index) == [3, 1, 999, 2]
    assert frame.loc[999, "clicks.status"] == "ABSENT"
    table = result.to_arrow()
    assert table.column("clicks").to_pylist() == [3, 1, None, 2]


def test_stale_feature_refetches_whole_row(cache: tuple[FeatureCache, Clock],
                                           sql_target: Any, stats_table: sa.Table) -> None:
    fc, clock = cache
    fc.get_features([1], NAMES)  # fills; ctr has max_age 10 min, the others 1 h
    with sql_target.engine().begin() as conn:
        conn.execute(stats_table.update().where(stats_table.c.entity_id == 1)
                     .values(ctr=0.5, clicks=70))
    clock.advance(20 * 60)  # ctr is now stale, clicks still fresh
    only_fresh = fc.get_features([1], ["clicks", "country"])
    assert only_fresh.status(1, "clicks") is Status.HIT_REDIS
    assert only_fresh[1]["clicks"] == 1  # still the cached (fresh by its max_age) value
    mixed = fc.get_features([1], ["ctr", "clicks"])
    # one row: stale for ctr, fresh for clicks -> refetched whole, both FILLED and both new
    assert mixed.status(1, "ctr") is Status.FILLED
    assert mixed.status(1, "clicks") is Status.FILLED
    assert mixed[1] == {"ctr": 0.5, "clicks": 70}
    assert fc.get_features([1], ["clicks"])[1]["clicks"] == 70


def test_value_exactly_at_max_age_is_fresh_one_ms_later_is_not(
    cache: tuple[FeatureCache, Clock]
) -> None:
    fc, clock = cache
    fc.get_features([1], ["ctr"])
    clock.advance(600)
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.HIT_REDIS
    clock.advance(0.001)
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.FILLED


def test_latest_row_per_entity_by_event_timestamp(sql_target: Any, redis_url: str,
                                                  key_prefix: str) -> None:
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "history", STATS_FEATURES)
    insert(engine, table, [
        stats_row(1, T0 + dt.timedelta(days=2), clicks=3),
        stats_row(1, T0, clicks=1),
        stats_row(1, T0 + dt.timedelta(days=5), clicks=9),
        stats_row(1, None, clicks=100),  # no event time: never the latest
        stats_row(2, T0, clicks=20),
    ])
    view = make_view("hist", "history", sql_target.schema)
    with make_cache([view], redis_url, sql_target.url, key_prefix) as fc:
        result = fc.get_features([1, 2], ["clicks"])
    assert result[1]["clicks"] == 9
    assert result.event_timestamp(1, "clicks") == T0 + dt.timedelta(days=5)
    assert result[2]["clicks"] == 20


def test_absent_entity_reaches_sql_once_within_negative_ttl(
    cache: tuple[FeatureCache, Clock]
) -> None:
    fc, clock = cache
    counter = SqlCounter(fc.engine)
    try:
        for _ in range(5):
            assert fc.get_features([404], ["ctr"]).status(404, "ctr") is Status.ABSENT
            clock.advance(10)  # negative_ttl is 60 s
        assert counter.count == 1
        clock.advance(30)  # 70 s after the first read: the negative entry expired
        assert fc.get_features([404], ["ctr"]).status(404, "ctr") is Status.ABSENT
        assert counter.count == 2
    finally:
        counter.close()
    assert fc.stats()["stats"]["negative_hit"] == 4


def test_entity_appearing_in_sql_is_found_after_negative_ttl(
    cache: tuple[FeatureCache, Clock], sql_target: Any, stats_table: sa.Table
) -> None:
    fc, clock = cache
    assert fc.get_features([77], ["clicks"]).status(77, "clicks") is Status.ABSENT
    insert(sql_target.engine(), stats_table, [stats_row(77, clicks=77)])
    clock.advance(61)
    result = fc.get_features([77], ["clicks"])
    assert result.status(77, "clicks") is Status.FILLED and result[77]["clicks"] == 77


def _two_views(sql_target: Any) -> list[FeatureView]:
    """Views ``stats`` (ids 1-3) and ``profile`` (ids 1, 2), both with a ``country``."""
    engine = sql_target.engine()
    profile_features = (Feature("age", "int", "1d"), Feature("country", "str", "1d"))
    stats = make_table(engine, sql_target.schema, "stats_v", STATS_FEATURES)
    profile = make_table(engine, sql_target.schema, "profile_v", profile_features)
    insert(engine, stats, [stats_row(i, clicks=i) for i in range(1, 4)])
    insert(engine, profile, [{"entity_id": i, "event_ts": T0, "age": 20 + i, "country": "FR"}
                             for i in (1, 2)])
    return [make_view("stats", "stats_v", sql_target.schema),
            make_view("profile", "profile_v", sql_target.schema, profile_features)]


_TWO_VIEW_FEATURES = ["clicks", "age", "profile:country", "stats:country"]


def test_several_views_in_one_call(sql_target: Any, redis_url: str, key_prefix: str) -> None:
    """Every deployment: one query per view, each view's values and statuses."""
    views = _two_views(sql_target)
    with make_cache(views, redis_url, sql_target.url, key_prefix) as fc:
        counter = SqlCounter(fc.engine)
        fc.get_features([1], ["clicks", "age"])  # reflect both tables outside the count
        counter.reset()
        result = fc.get_features([1, 2, 3], _TWO_VIEW_FEATURES)
        assert counter.count == 2  # one query per view
        assert result[2] == {"clicks": 2, "age": 22, "profile:country": "FR",
                             "stats:country": "DE"}
        assert result.status(3, "age") is Status.ABSENT
        assert result.status(3, "clicks") is Status.FILLED
        assert result.status(1, "age") is Status.HIT_REDIS
        again = fc.get_features([1, 2, 3], _TWO_VIEW_FEATURES)
        assert again.status_counts() == {Status.HIT_REDIS: 10, Status.ABSENT: 2}
        assert again[2] == result[2]
        counter.close()


@pytest.mark.one_server
def test_several_views_in_one_call_take_three_round_trips(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    views = _two_views(sql_target)
    client, calls = counting_client(_plain(redis_url))
    client.ping()
    with make_cache(views, redis_url, sql_target.url, key_prefix, redis_client=client) as fc:
        fc.get_features([1], ["clicks", "age"])
        calls.sends = 0
        fc.get_features([1, 2, 3], _TWO_VIEW_FEATURES)
        assert calls.sends == 3  # one read round trip; on misses, one lease and one fill
    client.close()


def _plain(url: str) -> str:
    return url


@pytest.mark.one_server
def test_1000_ids_one_redis_round_trip_one_sql_query(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "big", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in range(1000)])
    client, calls = counting_client(redis_url)
    client.ping()
    view = make_view("big", "big", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    redis_client=client) as fc:
        fc.get_features([5000], ["clicks"])  # the view's first call creates its epoch key
        counter = SqlCounter(fc.engine)
        calls.sends = 0
        ids = list(range(1000))
        cold = fc.get_features(ids, ["clicks", "ctr"])
        assert calls.sends == 3  # the read; on misses, the leases, then the fill
        assert counter.count == 1
        assert cold.status_counts() == {Status.FILLED: 2000}
        calls.sends = 0
        warm = fc.get_features(ids, ["clicks", "ctr"])
        assert calls.sends == 1
        assert counter.count == 1
        assert warm.status_counts() == {Status.HIT_REDIS: 2000}
        assert [warm[i]["clicks"] for i in ids] == ids
        counter.close()
    client.close()


@pytest.mark.one_server
def test_batches_past_the_chunk_size_still_one_round_trip(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "chunky", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(2500)])
    client, calls = counting_client(redis_url)
    client.ping()
    view = make_view("chunky", "chunky", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, redis_client=client,
                    redis_read_chunk=1000, sql_chunk_size=1000) as fc:
        fc.get_features([9999], ["ctr"])  # the view's first call creates its epoch key
        counter = SqlCounter(fc.engine)
        calls.sends = 0
        result = fc.get_features(range(2500), ["ctr"])
        assert calls.sends == 3
        assert counter.count == 3  # one query per chunk of 1000 ids
        assert len(result) == 2500
        calls.sends = 0
        assert fc.get_features(range(2500), ["ctr"]).status_counts() == {
            Status.HIT_REDIS: 2500}
        assert calls.sends == 1
        counter.close()
    client.close()


def test_stale_served_when_sql_fails_within_stale_if_error(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "fragile", STATS_FEATURES)
    insert(engine, table, [stats_row(1), stats_row(2)])
    clock = Clock()
    view = make_view("fragile", "fragile", None, stale_if_error="5m")
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock) as fc:
        fc.get_features([1], NAMES)
        with engine.begin() as conn:  # a real SQL failure: the table is gone
            conn.exec_driver_sql("DROP TABLE fragile")
        clock.advance(11 * 60)  # ctr (10 min) is stale; still within 10 min + 5 min
        result = fc.get_features([1], ["ctr", "clicks"])
        assert result.status(1, "ctr") is Status.STALE
        assert result.status(1, "clicks") is Status.STALE  # the whole row was due
        assert result[1]["clicks"] == 7
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS
        assert fc.stats()["fragile"]["stale_served"] == 1
        clock.advance(5 * 60)  # 16 min: past the stale window for ctr
        with pytest.raises(OfflineStoreError):
            fc.get_features([1], ["ctr"])
        with pytest.raises(OfflineStoreError):  # never cached: nothing to serve
            fc.get_features([2], ["ctr"])


def test_sql_unreachable_raises_offline_store_unavailable(
    redis_url: str, key_prefix: str, tmp_path: Any
) -> None:
    view = make_view("gone", "gone", None)
    url = f"sqlite:///{tmp_path}/missing-dir/none.db"
    with make_cache([view], redis_url, url, key_prefix) as fc, \
            pytest.raises(OfflineStoreUnavailable):
        fc.get_features([1], ["ctr"])


def test_redis_down_answers_from_sql(sqlite_target: Any, key_prefix: str) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "nored", STATS_FEATURES)
    insert(engine, table, [stats_row(1, clicks=5)])
    view = make_view("nored", "nored", None)
    # a real closed port: nothing listens on port 1 of loopback
    with make_cache([view], "redis://127.0.0.1:1/0", sqlite_target.url, key_prefix,
                    redis_connect_timeout=0.2, redis_socket_timeout=0.2) as fc:
        result = fc.get_features([1, 2], ["clicks"])
        assert result[1]["clicks"] == 5
        assert result.status(1, "clicks") is Status.FILLED
        assert result.status(2, "clicks") is Status.ABSENT
        stats = fc.stats()["nored"]
        # after a failed read no lease or fill is even tried: the call goes to SQL alone
        assert stats["redis_errors"] == 1 and stats["fill_errors"] == 0


def test_row_written_before_a_feature_was_added(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    engine = sqlite_target.engine()
    features = (*STATS_FEATURES, Feature("extra", "int", "1h"))
    table = make_table(engine, None, "grow", features)
    insert(engine, table, [stats_row(1, extra=42)])
    old_view = make_view("grow", "grow", None, STATS_FEATURES)
    with make_cache([old_view], redis_url, sqlite_target.url, key_prefix) as fc:
        fc.get_features([1], NAMES)  # cached under the old schema
    new_view = make_view("grow", "grow", None, features)
    with make_cache([new_view], redis_url, sqlite_target.url, key_prefix) as fc:
        old_only = fc.get_features([1], ["ctr", "clicks"])
        assert old_only.status(1, "ctr") is Status.HIT_REDIS  # the old row serves these
        with_new = fc.get_features([1], ["ctr", "extra"])
        assert with_new.status(1, "extra") is Status.FILLED  # a miss for the new feature
        assert with_new[1]["extra"] == 42
    raw = redis_client.get(row_key(key_prefix, "grow", 1))
    assert raw is not None and RowCodec(new_view).decode(raw) is not None


def test_same_answers_on_every_dialect(sql_target: Any, redis_url: str,
                                       key_prefix: str) -> None:
    """The reference answer is computed from the inserted rows; every dialect must match it."""
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "same", STATS_FEATURES)
    ts = dt.datetime(2025, 6, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = [
        stats_row(1, ts, ctr=0.1 + 0.2, clicks=2**62, country="Zürich 用户", vip=True,
                  last_seen=ts, emb=[1e-300, -0.0, 3.5]),
        stats_row(2, T0, ctr=None, clicks=None, country="", vip=None, last_seen=None, emb=None),
        stats_row(3, T0, ctr=-1.5e300, clicks=-(2**63), country="x" * 255, vip=False,
                  emb=[]),
    ]
    insert(engine, table, rows)
    view = make_view("same", "same", sql_target.schema)
    with make_cache([view], redis_url, sql_target.url, key_prefix) as fc:
        filled = fc.get_features([1, 2, 3, 4], NAMES)
        hit = fc.get_features([1, 2, 3, 4], NAMES)
    expected = {
        1: {"ctr": 0.1 + 0.2, "clicks": 2**62, "country": "Zürich 用户", "vip": True,
            "last_seen": ts.astimezone(dt.UTC), "emb": [1e-300, -0.0, 3.5]},
        2: {"ctr": None, "clicks": None, "country": "", "vip": None, "last_seen": None,
            "emb": None},
        3: {"ctr": -1.5e300, "clicks": -(2**63), "country": "x" * 255, "vip": False,
            "last_seen": T0, "emb": []},
        4: dict.fromkeys(NAMES),
    }
    assert dict(filled) == expected
    assert dict(hit) == expected
    assert hit.event_timestamp(1, "ctr") == ts
    assert {hit.status(e, "ctr") for e in (1, 2, 3)} == {Status.HIT_REDIS}
    assert str(hit[1]["last_seen"].tzinfo) == "UTC"


def test_string_ids_differing_in_case_or_trailing_space_are_separate_entities(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """MySQL/MariaDB's default collations compare 'a', 'A' and 'a ' as equal: the latest-row
    query must still rank each id on its own (get_features) and list each one (materialize),
    or two of three entities come back ABSENT or are never warmed."""
    features = (Feature("clicks", "int", "1h"),)
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "strids", features, entity_type="str")
    ids = ["a", "A", "a ", "b"]
    insert(engine, table, [
        {"entity_id": eid, "event_ts": T0, "updated_at": T0, "clicks": n}
        for n, eid in enumerate(ids)
    ])
    view = make_view("strids", "strids", sql_target.schema, features, entity_type="str")
    with make_cache([view], redis_url, sql_target.url, key_prefix) as fc:
        result = fc.get_features(["A", "a ", "a"], ["clicks"])
        assert {eid: result[eid]["clicks"] for eid in ("a", "A", "a ")} == {
            "a": 0, "A": 1, "a ": 2}
        assert {result.status(e, "clicks") for e in ("a", "A", "a ")} == {Status.FILLED}
    with make_cache([view], redis_url, sql_target.url, f"{key_prefix}m") as fc:
        report = materialize(fc, "strids", all=True, chunk_rows=2)
        assert (report.rows_read, report.rows_written) == (4, 4)
        result = fc.get_features(ids, ["clicks"])
        assert [result[e]["clicks"] for e in ids] == [0, 1, 2, 3]
        assert {result.status(e, "clicks") for e in ids} == {Status.HIT_REDIS}
