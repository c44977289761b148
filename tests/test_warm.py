"""The warmer's write side on real servers: bulk reads, materialize, warm_once, the leader
lease and the `materialize` / `warm --once` commands."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featdata import STATS_FEATURES, T0, Clock, insert, make_cache, make_table, make_view, stats_row

from featcache import Feature, FeatureCache, InvalidRequest, Status, UnknownView
from featcache.keys import KeyLayout
from featcache.leader import ViewLeader
from featcache.materialize import materialize, warm_once
from featcache.offline import RowColumns, SqlRow
from featcache.offline.bulk import (
    IdRunReader,
    iter_entity_ids,
    iter_latest_by_id,
    iter_latest_rows,
    latest_of_id_run,
    reads_id_runs,
)
from featcache.redis_store import StandaloneStore

ENTITIES = 1000
VERSIONS = 5  # 5,000 rows: each entity has 5 versions, the latest (v=4) wins
HOUR = dt.timedelta(hours=1)


def _history() -> list[dict[str, Any]]:
    rows = []
    for v in range(VERSIONS):
        for i in range(1, ENTITIES + 1):
            ts = T0 + v * HOUR
            rows.append(stats_row(i, ts, clicks=i * 10 + v, ctr=i + v / 10, country=f"c{v}"))
    return rows


def _env(target: Any, redis_url: str, key_prefix: str, **options: Any) -> dict[str, Any]:
    engine = target.engine()
    if target.name == "sqlite":  # an ETL commits while the warmer's cursor is open
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    table = make_table(engine, target.schema, "wv", STATS_FEATURES)
    insert(engine, table, _history())
    view = make_view("wv", "wv", target.schema)
    clock = Clock()
    cache = make_cache([view], redis_url, target.url, key_prefix, clock=clock, **options)
    return {"engine": engine, "table": table, "view": view, "cache": cache, "clock": clock,
            "url": target.url}


@pytest.fixture
def env(sqlite_target: Any, redis_url: str, key_prefix: str) -> Iterator[dict[str, Any]]:
    e = _env(sqlite_target, redis_url, key_prefix, popularity_sample_rate=1.0)
    with e["cache"]:
        yield e


def _cached(redis_client: redis.Redis, key_prefix: str, ids: list[int]) -> list[bool]:
    layout = KeyLayout(key_prefix)
    return [bool(redis_client.exists(layout.row_key("wv", i))) for i in ids]


# ----------------------------------------------------------------------------- bulk reads


def test_iter_latest_rows_all_is_chunked_and_latest(env: dict[str, Any]) -> None:
    chunks = list(iter_latest_rows(env["cache"].offline, "wv", chunk_rows=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    rows = {r["entity_id"]: r for c in chunks for r in c}
    assert len(rows) == ENTITIES
    r7 = rows[7]
    assert r7["clicks"] == 74 and r7["ctr"] == 7.4 and r7["country"] == "c4"
    assert r7["event_ts"] == T0 + 4 * HOUR and r7["last_seen"] == T0 + 4 * HOUR
    assert r7["emb"] == [0.5, -1.25] and r7["vip"] is False
    ids = [i for c in iter_entity_ids(env["cache"].offline, "wv", chunk_rows=400) for i in c]
    assert sorted(ids) == list(range(1, ENTITIES + 1))


# ----------------------------------------------------------------------------- materialize


def test_id_runs_read_through_adbc_give_the_same_rows_as_sqlalchemy(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """``IdRunReader`` reads through ADBC on SQLite and PostgreSQL (Arrow columns, the GIL
    released during the query) and through SQLAlchemy elsewhere; either way the rows are
    exactly ``latest_of_id_run``'s, for every type, NULLs, NaN, unicode, 2**62 and aware
    timestamps with microseconds included. After an ADBC failure the run goes on through
    SQLAlchemy with the same rows."""
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "runs", STATS_FEATURES)
    ts = T0 + dt.timedelta(microseconds=123_457)
    # only PostgreSQL keeps a NaN (SQLite stores NULL, MySQL refuses it)
    nan = float("nan") if sql_target.name == "postgresql" else -1.25
    insert(engine, table, [
        stats_row(1, ts, ctr=0.5, clicks=2**62, country="Zürich 東京", vip=True,
                  emb=[1.5, -2.25, 1e-300]),
        stats_row(2, T0, ctr=None, clicks=None, country=None, vip=None, last_seen=None,
                  emb=None),
        stats_row(3, T0 - dt.timedelta(days=400), ctr=nan, clicks=-7, country="",
                  vip=False, emb=[]),
        stats_row(3, T0 - dt.timedelta(days=800), clicks=999),  # older: not the latest
        stats_row(5, ts),
    ])
    view = make_view("runs", "runs", sql_target.schema)
    with make_cache([view], redis_url, sql_target.url, key_prefix) as cache:
        ids = [i for c in iter_entity_ids(cache.offline, "runs", ordered=True) for i in c]
        assert ids == [1, 2, 3, 5]
        expected = latest_of_id_run(cache.offline, "runs", ids)
        with IdRunReader(cache.offline, "runs") as reader:
            adbc = sql_target.name in ("sqlite", "postgresql")
            assert reader.via == ("adbc" if adbc else "sqlalchemy")
            got = reader.read(ids)
            assert _same(got, expected)
            assert got[1].values[1] == 2**62 and got[1].values[2] == "Zürich 東京"
            assert got[1].event_us == expected[1].event_us and got[1].event_us % 10**6 == 123_457
            assert repr(got[3].values[0]) == repr(nan) and got[3].values[1] == -7
            assert got[2].values == (None,) * len(STATS_FEATURES)
            assert reader.read([1, 5]) == {1: got[1], 5: got[5]}  # 2 and 3: not asked for
            columns = reader.read_columns(ids)  # the materializer's shape: the same rows
            if adbc:
                assert isinstance(columns, RowColumns) and list(columns.ids) == ids
                assert _same(_as_rows(columns), expected)
                only = reader.read_columns([1, 5])  # rows of the run not asked for: left out
                assert isinstance(only, RowColumns)
                assert _same(_as_rows(only), {1: got[1], 5: got[5]})
            else:  # read through SQLAlchemy: a dict, as read() gives it
                assert _same(columns, expected)  # type: ignore[arg-type]
            if adbc:  # the connection underneath fails: the rest of the run uses SQLAlchemy
                arrow = reader._arrow
                assert arrow is not None
                arrow._connection.close()
                again = reader.read(ids)
                assert reader.via == "sqlalchemy" and _same(again, expected)


def test_id_runs_picked_in_arrow_follow_the_databases_order_exactly(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """Where ``ArrowRangeReader`` picks the latest row per entity itself (SQLite and
    PostgreSQL), it picks the row the database's window query picks: event time NULLs last,
    the later event time, then the later ``updated_at``, its NULLs last on every dialect (a
    correction with a date wins over an undated row, PostgreSQL's ``DESC`` default of NULLs
    first overridden). A run with more history than the bound goes
    to the database, for that run and every later one, with the same rows."""
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "order", STATS_FEATURES)
    t1, t2 = T0, T0 + dt.timedelta(minutes=5)
    u1, u2 = T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=2)
    rows = [
        # 10: the later event wins over an earlier one and over a NULL event updated later
        stats_row(10, t1, updated_at=u1, clicks=1001),
        stats_row(10, t2, updated_at=t2, clicks=1002),
        stats_row(10, None, updated_at=u2, clicks=1003),
        # 11: same event time, the later updated_at wins
        stats_row(11, t1, updated_at=u1, clicks=1101),
        stats_row(11, t1, updated_at=u2, clicks=1102),
        # 12: same event time, updated_at NULL against a value: the dated row, everywhere
        stats_row(12, t1, updated_at=None, clicks=1201),
        stats_row(12, t1, updated_at=u1, clicks=1202),
        # 13: only NULL event times: the later updated_at wins
        stats_row(13, None, updated_at=u1, clicks=1301),
        stats_row(13, None, updated_at=u2, clicks=1302),
        stats_row(14, t2, clicks=1401),
    ]
    insert(engine, table, rows)
    view = make_view("order", "order", sql_target.schema)
    ids = [10, 11, 12, 13, 14]
    with make_cache([view], redis_url, sql_target.url, key_prefix) as cache:
        expected = latest_of_id_run(cache.offline, "order", ids)
        assert {e: r.values[1] for e, r in expected.items()} == {
            10: 1002, 11: 1102, 12: 1202, 13: 1302, 14: 1401}
        with IdRunReader(cache.offline, "order") as reader:
            arrow = reader._arrow
            here = sql_target.name in ("sqlite", "postgresql")
            assert (arrow is not None and arrow.picks_latest) == here
            got = reader.read(ids)
            assert _same(got, expected)
            if here:
                assert arrow is not None and arrow.picks_latest  # picked here, not by SQL
                arrow.HISTORY_BOUND = 1  # 10 rows for 5 ids: past the bound
                again = reader.read(ids)
                assert not arrow.picks_latest and reader.via == "adbc"
                assert _same(again, expected)
                assert _same(reader.read(ids), expected)  # the database's pick from now on


@pytest.mark.parametrize("sql_target", ["sqlite", "postgresql"], indirect=True)  # ADBC's two
def test_a_declared_collation_leaves_the_pick_to_the_database(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """A collation on the table (SQLite: anywhere in its DDL; PostgreSQL: on the entity, event
    time or updated_at column) can merge distinct ids into one partition or order text
    otherwise than Arrow does, so such a view's runs go through the window query; the rows
    are the database's own either way."""
    engine = sql_target.engine()
    collation = "NOCASE" if sql_target.name == "sqlite" else '"C"'
    qualified = f"{sql_target.schema}.coll" if sql_target.schema else "coll"
    with engine.begin() as conn:
        conn.execute(sa.text(
            f"CREATE TABLE {qualified} (entity_id VARCHAR(40) COLLATE {collation}, "
            "event_ts TIMESTAMP, updated_at TIMESTAMP, clicks BIGINT)"))
        conn.execute(sa.text(f"INSERT INTO {qualified} VALUES ('a', :t, :t, 1), "
                             "('b', :t, :t, 2)"), {"t": T0.replace(tzinfo=None)})
    view = make_view("coll", "coll", sql_target.schema, (Feature("clicks", "int", "1h"),),
                     entity_type="str")
    with make_cache([view], redis_url, sql_target.url, key_prefix) as cache, \
            IdRunReader(cache.offline, "coll") as reader:
        assert reader._arrow is not None and not reader._arrow.picks_latest
        got = reader.read(["a", "b"])
        assert {e: r.values for e, r in got.items()} == {"a": (1,), "b": (2,)}
        assert _same(got, latest_of_id_run(cache.offline, "coll", ["a", "b"]))


def test_text_arrow_cannot_order_leaves_the_run_and_later_ones_to_the_database(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """SQLite event times with 7 fractional digits: Python reads them, Arrow's parser does
    not, so Arrow cannot order them as SQLite does; the run is the window query's, and so is
    every later run (not fetched twice each), with the database's rows."""
    engine = sqlite_target.engine()
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE frac (entity_id BIGINT, event_ts TEXT, "
                             "updated_at TEXT, clicks BIGINT)"))
        conn.execute(sa.text(
            "INSERT INTO frac VALUES (1, '2026-11-26 12:00:00.1234567', NULL, 10), "
            "(1, '2026-11-26 13:00:00.1234567', NULL, 11), "
            "(2, '2026-11-26 12:00:00.7654321', NULL, 20)"))
    view = make_view("frac", "frac", None, (Feature("clicks", "int", "1h"),))
    with make_cache([view], redis_url, sqlite_target.url, key_prefix) as cache, \
            IdRunReader(cache.offline, "frac") as reader:
        assert reader._arrow is not None and reader._arrow.picks_latest
        got = reader.read([1, 2])
        assert not reader._arrow.picks_latest and reader.via == "adbc"
        assert {e: r.values for e, r in got.items()} == {1: (11,), 2: (20,)}
        assert _same(got, latest_of_id_run(cache.offline, "frac", [1, 2]))
        assert _same(reader.read([1, 2]), got)


def _as_rows(columns: RowColumns) -> dict[Any, SqlRow]:
    return {entity: SqlRow(event, tuple(values)) for entity, event, *values in zip(
        columns.ids, columns.events_us, *columns.columns, strict=True)}


def _same(a: dict[Any, Any], b: dict[Any, Any]) -> bool:
    """Equal rows, NaN equal to NaN (a float('nan') is never == itself)."""
    def key(row: Any) -> Any:
        return repr(row)
    return a.keys() == b.keys() and all(key(a[k]) == key(b[k]) for k in a)




def test_ordered_id_runs_are_read_by_range_on_every_dialect(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """``iter_entity_ids(ordered=True)`` lists ascending ids; ``latest_of_id_run`` reads a run
    by its ends and keeps only the ids it was given: an id inside the range that is not in
    the run (inserted after the listing, so nobody fenced it) is left out."""
    e = _env(sql_target, redis_url, key_prefix)
    with e["cache"] as cache:
        assert reads_id_runs(cache.offline, "wv")
        listed = iter_entity_ids(cache.offline, "wv", chunk_rows=300, ordered=True)
        ids = [i for c in listed for i in c]
        assert ids == list(range(1, ENTITIES + 1))
        rows = latest_of_id_run(cache.offline, "wv", [5, 6, 9])
        assert sorted(rows) == [5, 6, 9]
        by_in = {k: v for part in iter_latest_by_id(cache.offline, "wv", [5, 6, 9])
                 for k, v in part.items()}
        assert rows[9].values[1] == 94 and rows == by_in  # the IN path's latest rows
        assert latest_of_id_run(cache.offline, "wv", []) == {}




def test_ids_listed_through_adbc_go_on_through_sqlalchemy_after_a_failure(
    sqlite_target: Any, redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ordered id listing goes through ADBC; where ADBC stops part-way (SQLite: it types
    a column by its first 1024 rows, and a REAL id comes later), SQLAlchemy lists the rest,
    from after the last id already handed out: every id exactly as SQLAlchemy alone lists
    them, none lost, none twice."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "mixed", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(1, 1501)])
    with engine.begin() as conn:  # INTEGER affinity keeps a non-integral number REAL
        conn.execute(table.insert().values(stats_row(1400.5)))
        listed = [row[0] for row in conn.exec_driver_sql(
            "SELECT DISTINCT entity_id FROM mixed ORDER BY entity_id")]
    assert any(isinstance(x, float) for x in listed)
    view = make_view("mixed", "mixed", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix) as cache, \
            caplog.at_level(logging.WARNING, logger="featcache.bulk"):
        chunks = list(iter_entity_ids(cache.offline, "mixed", chunk_rows=500, ordered=True))
    assert "ADBC listing of view mixed failed after id 1000" in caplog.text
    assert [i for c in chunks for i in c] == [int(x) for x in listed]
    assert all(type(i) is int for c in chunks for i in c)


def test_materialize_all_writes_exactly_the_latest_rows(
    sql_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    e = _env(sql_target, redis_url, key_prefix)
    with e["cache"] as cache:
        seen: list[int] = []
        report = materialize(cache, "wv", all=True, chunk_rows=300,
                             progress=lambda r: seen.append(r.entities))
        assert (report.rows_read, report.rows_written, report.fenced_off) == (1000, 1000, 0)
        assert report.chunks == 4 and report.complete and seen == [300, 600, 900, 1000]
        ids = list(range(1, ENTITIES + 1))
        result = cache.get_features(ids, ["clicks", "country", "emb", "last_seen"])
        assert {result.status(i, "clicks") for i in ids} == {Status.HIT_REDIS}
        assert all(result[i]["clicks"] == i * 10 + 4 for i in ids)
        assert result[500]["country"] == "c4" and result[500]["emb"] == [0.5, -1.25]
        assert result[500]["last_seen"] == T0 + 4 * HOUR
        assert cache.stats()["wv"]["rows_written"] == 1000


def test_materialize_ids(env: dict[str, Any], redis_client: redis.Redis,
                         key_prefix: str) -> None:
    report = materialize(env["cache"], "wv", ids=[3, 1, 3, 99_999], chunk_rows=2)
    assert (report.entities, report.rows_read, report.rows_written) == (3, 2, 2)
    assert _cached(redis_client, key_prefix, [1, 2, 3, 99_999]) == [True, False, True, False]
    result = env["cache"].get_features([3], ["clicks"])
    assert result.status(3, "clicks") is Status.HIT_REDIS and result[3]["clicks"] == 34


def test_materialize_since_reads_the_latest_row_of_changed_entities(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    # entity 5 gets a backfilled *old* event, updated late; entity 6 a new latest row
    late = T0 + 10 * HOUR
    insert(env["engine"], env["table"], [
        stats_row(5, T0 - HOUR, clicks=-1, updated_at=late),
        stats_row(6, T0 + 6 * HOUR, clicks=666, updated_at=late),
    ])
    report = materialize(env["cache"], "wv", since=late - dt.timedelta(minutes=1))
    assert (report.entities, report.rows_written) == (2, 2)
    assert _cached(redis_client, key_prefix, [4, 5, 6]) == [False, True, True]
    result = env["cache"].get_features([5, 6], ["clicks"])
    assert result.status(5, "clicks") is Status.HIT_REDIS
    assert result[5]["clicks"] == 54  # the latest event, not the backfilled one
    assert result[6]["clicks"] == 666


def test_materialize_since_needs_updated_at(env: dict[str, Any]) -> None:
    view = dataclasses.replace(env["view"], updated_at_column=None)
    with make_cache([view], env["cache"].config.redis.url, env["url"],
                    env["cache"].config.redis.key_prefix) as cache, \
            pytest.raises(InvalidRequest, match="no updated_at column"):
        materialize(cache, "wv", since=T0)


def test_materialize_bad_arguments_fail_clearly(env: dict[str, Any]) -> None:
    with pytest.raises(UnknownView, match="unknown feature view 'nope'"):
        materialize(env["cache"], "nope", all=True)
    with pytest.raises(UnknownView, match="nope"):
        warm_once(env["cache"], "nope", k=3, horizon_s=0)
    with pytest.raises(InvalidRequest, match="exactly one"):
        materialize(env["cache"], "wv", all=True, ids=[1])
    with pytest.raises(InvalidRequest, match="exactly one"):
        materialize(env["cache"], "wv")


@pytest.mark.parametrize("whole_view", [False, True], ids=["ids", "all"])
def test_an_invalidation_between_fence_and_put_is_respected(
    env: dict[str, Any], redis_url: str, key_prefix: str, whole_view: bool
) -> None:
    """An ETL commits and invalidates an entity after materialize read it from SQL and
    before the write: the old row is not written. ``ids``: the moment is right after the
    feature query (a SQLAlchemy event). ``all``: chunk 2 (ids 301-600) is read by id range,
    through ADBC on SQLite, which SQLAlchemy events do not see; chunk 1's progress report
    comes after chunk 2's read and before chunk 2's write is handed to the writer."""
    cache: FeatureCache = env["cache"]
    table, engine = env["table"], env["engine"]
    victim = 301 if whole_view else 1
    fired: list[bool] = []

    def etl_commits_and_invalidates(*_: Any) -> None:
        if fired:
            return
        fired.append(True)
        with engine.begin() as c:
            c.execute(table.update().where(table.c.entity_id == victim).values(clicks=111))
        with make_cache([env["view"]], redis_url, env["url"], key_prefix) as writer:
            writer.invalidate("wv", [victim])

    def after_feature_query(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        if "fc_latest" in statement:
            etl_commits_and_invalidates()

    if whole_view:
        report = materialize(cache, "wv", all=True, chunk_rows=300,
                             progress=etl_commits_and_invalidates)
    else:
        sa.event.listen(cache.engine, "after_cursor_execute", after_feature_query)
        try:
            report = materialize(cache, "wv", ids=[1, 2])
        finally:
            sa.event.remove(cache.engine, "after_cursor_execute", after_feature_query)
    written = ENTITIES - 1 if whole_view else 1
    assert fired and (report.rows_written, report.fenced_off) == (written, 1)
    result = cache.get_features([victim, 2], ["clicks"])
    assert result.status(victim, "clicks") is Status.FILLED and result[victim]["clicks"] == 111
    assert result.status(2, "clicks") is Status.HIT_REDIS


# ----------------------------------------------------------------------------- warm_once


def _reads(cache: FeatureCache, counts: dict[int, int]) -> None:
    popularity = cache.popularity
    assert popularity is not None
    for entity, n in counts.items():
        for _ in range(n):
            popularity.record("wv", [entity])
    popularity.flush()


def test_warm_once_warms_exactly_the_missing_top_k(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    cache, clock = env["cache"], env["clock"]
    _reads(cache, {1: 5, 2: 4, 3: 3, 4: 1})
    materialize(cache, "wv", ids=[2])  # fresh already
    report = warm_once(cache, "wv", k=3, horizon_s=0)
    assert report.leader and (report.candidates, report.missing, report.expiring) == (3, 2, 0)
    assert report.materialized is not None and report.materialized.rows_written == 2
    assert _cached(redis_client, key_prefix, [1, 2, 3, 4]) == [True, True, True, False]
    assert warm_once(cache, "wv", k=3, horizon_s=0).as_dict()["rows_written"] == 0
    # the shortest max_age is ctr's 10 minutes: 9m30s later, a 60 s horizon catches all three
    clock.advance(570)
    again = warm_once(cache, "wv", k=3, horizon_s=60)
    assert (again.missing, again.expiring, again.as_dict()["rows_written"]) == (0, 3, 3)
    assert warm_once(cache, "wv", k=3, horizon_s=60).as_dict()["rows_written"] == 0


def test_warm_once_does_nothing_without_the_lease(env: dict[str, Any], redis_client: redis.Redis,
                                                  key_prefix: str) -> None:
    cache = env["cache"]
    _reads(cache, {1: 2})
    with ViewLeader(StandaloneStore(redis_client), KeyLayout(key_prefix), "wv", ttl_s=30) as other:
        assert other.held
        report = warm_once(cache, "wv", k=3, horizon_s=0)
    assert report == type(report)("wv", leader=False)
    assert _cached(redis_client, key_prefix, [1]) == [False]


def test_three_warmers_at_once_write_each_row_once(
    env: dict[str, Any], redis_url: str, key_prefix: str
) -> None:
    _reads(env["cache"], {i: 10 + i for i in range(1, 51)})
    caches = [make_cache([env["view"]], redis_url, env["url"], key_prefix, clock=env["clock"],
                         popularity_sample_rate=1.0) for _ in range(3)]
    start = threading.Barrier(3)
    reports: list[Any] = []

    def run(cache: FeatureCache) -> None:
        start.wait()
        reports.append(warm_once(cache, "wv", k=50, horizon_s=0, chunk_rows=10))

    threads = [threading.Thread(target=run, args=(c,)) for c in caches]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(reports) == 3 and any(r.leader for r in reports)
        assert sum(r.as_dict()["rows_written"] for r in reports) == 50
        assert sum(c.stats().get("wv", {}).get("rows_written", 0) for c in caches) == 50
    finally:
        for c in caches:
            c.close()


# ----------------------------------------------------------------------------- leader


def test_leader_lease(redis_client: redis.Redis, key_prefix: str) -> None:
    layout = KeyLayout(key_prefix)
    store = StandaloneStore(redis_client)
    a = ViewLeader(store, layout, "wv", ttl_s=30, owner="a")
    b = ViewLeader(StandaloneStore(redis_client), layout, "wv", ttl_s=30, owner="b")
    assert a.acquire() and not b.acquire()
    assert a.acquire() and a.renew() and not b.renew()  # re-entrant for its owner
    b.release()  # not b's: a keeps it
    assert not b.acquire()
    a.release()
    assert b.acquire() and not a.acquire()
    b.release()
    other_view = ViewLeader(store, layout, "other", ttl_s=30, owner="b")
    with a, other_view:
        assert a.held and other_view.held  # one leader per view, not per process
    assert not a.held and redis_client.get(a.key) is None


def test_an_expired_lease_is_taken_over(redis_client: redis.Redis, key_prefix: str) -> None:
    layout = KeyLayout(key_prefix)
    a = ViewLeader(StandaloneStore(redis_client), layout, "wv", ttl_s=0.1, owner="a")
    b = ViewLeader(StandaloneStore(redis_client), layout, "wv", ttl_s=30, owner="b")
    assert a.acquire()
    time.sleep(0.25)  # a stalled: it did not renew in time
    assert b.acquire()
    assert not a.renew() and not a.held
    a.release()  # must not delete b's lease
    assert redis_client.get(b.key) == b"b" and b.renew()
    b.release()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def config_file(env: dict[str, Any], redis_url: str, key_prefix: str, tmp_path: Path) -> Path:
    path = tmp_path / "featcache.yaml"
    path.write_text(
        f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{env['url']}'}}\n"
        "popularity: {sample_rate: 1.0}\n"
        "views:\n  wv:\n    table: wv\n    entity: {column: entity_id, type: int}\n"
        "    event_timestamp: event_ts\n    updated_at: updated_at\n"
        "    features:\n      clicks: int, 1h\n"
    )
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featcache.jobs.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_cli_materialize(config_file: Path, tmp_path: Path, redis_client: redis.Redis,
                         key_prefix: str) -> None:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("1\n2\n\n")
    done = _cli("materialize", "--config", str(config_file), "--view", "wv",
                "--ids-file", str(ids_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    report = json.loads(done.stdout)
    assert (report["view"], report["rows_written"], report["entities"]) == ("wv", 2, 2)
    done = _cli("materialize", "--config", str(config_file), "--view", "wv",
                "--since", "2026-01-01T03:30:00Z")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entities"] == ENTITIES  # v=4 rows are at 04:00
    done = _cli("materialize", "--config", str(config_file), "--view", "wv", "--all",
                "--chunk-rows", "400")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chunks"] == 3
    assert all(_cached(redis_client, key_prefix, [1, 500, 1000]))


def test_cli_warm_once(config_file: Path, redis_client: redis.Redis, key_prefix: str) -> None:
    with FeatureCache.from_config(config_file) as cache:
        _reads(cache, {7: 3, 8: 2})
    done = _cli("warm", "--once", "--config", str(config_file), "--k", "5")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["views"]
    assert report["leader"] and report["candidates"] == 2 and report["rows_written"] == 2
    assert _cached(redis_client, key_prefix, [7, 8, 9]) == [True, True, False]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["materialize", "--view", "nope", "--all"], 78, "unknown feature view 'nope'"),
        (["materialize", "--view", "wv", "--ids-file", "/nonexistent"], 65,
         "cannot read ids file"),
        (["materialize", "--view", "wv", "--since", "yesterday"], 2, "expected an ISO 8601 time"),
        (["materialize", "--ids-file", "ids.txt"], 2, "--ids-file needs --view"),
        (["materialize", "--from-parquet", "*.parquet"], 2, "--from-parquet needs --view"),
        (["materialize", "--view", "wv", "--all", "--since", "2026-01-01"], 2,
         "not allowed with argument"),
        (["warm", "--once", "--view", "nope"], 78, "unknown feature view 'nope'"),
        (["warm", "--once", "--k", "0"], 2, "must be at least 1"),
    ],
)
def test_cli_errors_are_one_line(config_file: Path, args: list[str], status: int,
                                 message: str) -> None:
    done = _cli(args[0], "--config", str(config_file), *args[1:])
    assert done.returncode == status
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_prepare_columns_writes_what_prepare_latest_writes(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """The materializer's columnar write answers exactly what the row-wise one does, is
    fenced the same way, and refuses ids outside its fence or columns that do not fit."""
    engine = sqlite_target.engine()
    make_table(engine, None, "pc", STATS_FEATURES)
    view = make_view("pc", "pc", None)
    event = int((T0 - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1_000_000)
    rows = {
        1: SqlRow(event, (0.5, 2**62, "Zürich", True, T0, [1.5, -2.0])),
        2: SqlRow(None, (None,) * len(STATS_FEATURES)),
        3: SqlRow(event + 1, (float("nan"), -7, "", False, None, [])),
    }
    names = [f.name for f in STATS_FEATURES]
    clock = Clock()
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock) as by_rows, \
            make_cache([view], redis_url, sqlite_target.url, key_prefix + "c", clock) as by_cols:
        fence = by_rows.fence("pc", [1, 2, 3, 4])
        assert by_rows.prepare_latest("pc", rows, fence=fence).send().written == 3
        fence = by_cols.fence("pc", [1, 2, 3, 4])
        columns = RowColumns.of(rows, len(STATS_FEATURES))
        assert by_cols.prepare_columns("pc", columns, fence=fence).send().written == 3
        a, b = by_rows.get_features([1, 2, 3], names), by_cols.get_features([1, 2, 3], names)
        assert repr(a.to_arrow(with_status=True).to_pylist()) == repr(
            b.to_arrow(with_status=True).to_pylist())
        assert b.status_counts() == {Status.HIT_REDIS: 3 * len(names)}
        by_cols.invalidate("pc", [1])  # before the fence: its tombstone gives way
        fence = by_cols.fence("pc", [1, 2])
        by_cols.invalidate("pc", [2])  # after it: row 2 was read too early, not written
        two = RowColumns.of({1: rows[1], 2: rows[2]}, len(STATS_FEATURES))
        assert by_cols.prepare_columns("pc", two, fence=fence).send().written == 1
        with pytest.raises(InvalidRequest, match=r"ids \[3\] are not in the fence"):
            by_cols.prepare_columns("pc", RowColumns.of({3: rows[3]}, len(STATS_FEATURES)),
                                    fence=fence)
        with pytest.raises(InvalidRequest, match="5 columns for 6 features"):
            by_cols.prepare_columns("pc", RowColumns([1], [event], columns.columns[:5]),
                                    fence=fence)
