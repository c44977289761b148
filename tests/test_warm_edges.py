"""Edges of the warmer side (follow_changes, materialize, id listings, popularity, the
warmer's config, the ids file), on real servers; each test failed before its fix (the
2026-11-27 review)."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.changes import follow_changes, load_watermark
from featcache.jobs.warm import run_materialize
from featdata import STATS_FEATURES, T0, insert, make_cache, make_table, make_view, stats_row
from servers import SqlTarget
from warmerenv import HOUR, cv_env

from featcache import FeatureCache, InvalidRequest, SchemaError
from featcache.config import FeatureView, config_from_dict
from featcache.keys import KeyLayout
from featcache.materialize import materialize
from featcache.offline.bulk import iter_entity_ids, iter_latest_by_id


@pytest.fixture
def env(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
        tmp_path: Path) -> Iterator[dict[str, Any]]:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as built:
        yield built


def _sql(engine: sa.Engine, text: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(text), params)


# ----------------------------------------------------------------------------- follow_changes


def test_sqlite_second_precision_rows_at_the_watermark_timestamp_are_not_lost(
    env: dict[str, Any]
) -> None:
    """SQLite DATETIME text written without fractional seconds (CURRENT_TIMESTAMP,
    datetime('now'), Python's sqlite3 adapter for a whole-second datetime) is a valid value
    featcache reads; a row committed later with the watermark's exact timestamp must still be
    found by the next poll (changes.py: '>=, not >')."""
    cache: FeatureCache = env["cache"]
    engine = env["engine"]
    _sql(engine, "UPDATE cv SET updated_at = '2026-01-01 01:00:00', clicks = 100 "
                 "WHERE entity_id IN (1, 2)")
    first = follow_changes(cache, "cv", rewrite="all", start="all")
    assert first.changed == 5
    mark = load_watermark(cache, "cv")
    assert mark is not None and mark.when == T0 + HOUR and mark.ids == {1, 2}
    # another ETL transaction commits entity 3 with the same (whole-second) updated_at
    _sql(engine, "UPDATE cv SET updated_at = '2026-01-01 01:00:00', clicks = 333 "
                 "WHERE entity_id = 3")
    report = follow_changes(cache, "cv", rewrite="all")
    assert report.changed == 1, "entity 3, changed at the watermark's timestamp, was skipped"
    result = cache.get_features([3], ["clicks"])
    assert result[3]["clicks"] == 333


def test_sqlite_materialize_since_includes_rows_at_exactly_since(env: dict[str, Any]) -> None:
    """``materialize --since T``: 'entities with a row updated at or after T'."""
    cache: FeatureCache = env["cache"]
    _sql(env["engine"], "UPDATE cv SET updated_at = '2026-01-01 05:00:00' WHERE entity_id = 4")
    report = materialize(cache, "cv", since=T0 + 5 * HOUR)
    assert report.entities == 1, "the row updated exactly at --since was not materialized"


def test_a_fill_read_before_the_change_does_not_outlive_the_poll(
    env: dict[str, Any]
) -> None:
    """A serving process misses entity 2, reads SQL (old value), the ETL commits a change with
    a bumped updated_at, the warmer polls (entity 2 not cached: left 'for the next read'),
    then the reader's fenced fill lands. The watermark has moved past the change, so nothing
    will ever revisit it: the old value is served from Redis until its max_age."""
    cache: FeatureCache = env["cache"]
    follow_changes(cache, "cv", start="all")  # past the initial rows
    view = cache.config.view("cv")
    # the reader: fence (its MGET) and SQL read, before the ETL commit
    fence = cache.fence(view, [2])
    (old_rows,) = list(iter_latest_by_id(cache.offline, view, [2]))
    assert old_rows[2].values[0] == 7  # clicks
    # the ETL commits a new value with a bumped updated_at
    _sql(env["engine"], "UPDATE cv SET clicks = 999, updated_at = :t WHERE entity_id = 2",
         t=(T0 + 2 * HOUR).replace(tzinfo=None))
    report = follow_changes(cache, "cv")
    assert report.changed == 1
    # the reader's fill arrives now (well within fence_ttl / 2)
    cache.prepare_latest(view, old_rows, fence=fence).send()
    follow_changes(cache, "cv")
    result = cache.get_features([2], ["clicks"])
    assert result[2]["clicks"] == 999, (
        f"stale value {result[2]['clicks']} ({result.status(2, 'clicks')}) served after the "
        "change was polled and the watermark moved past it")


# ----------------------------------------------------------------------------- id listings


def _null_id_env(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
                 entity_type: str, ids: list[Any]) -> tuple[sa.Engine, FeatureCache]:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "nv", STATS_FEATURES, entity_type=entity_type)
    insert(engine, table, [stats_row(i, T0, clicks=n) for n, i in enumerate(ids)])
    view = make_view("nv", "nv", None, entity_type=entity_type)
    return engine, make_cache([view], redis_url, sqlite_target.url, key_prefix)


def test_materialize_all_with_a_null_entity_id_row_int_view(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str
) -> None:
    """A row whose entity id is NULL (a half-loaded ETL row) has no entity to cache; the rest
    of the view must still be materialized (follow_changes already skips NULL ids)."""
    _engine, cache = _null_id_env(sqlite_target, redis_url, key_prefix, "int",
                                  [1, 2, None, 3])
    with cache:
        report = materialize(cache, "nv", all=True)
        assert report.rows_written == 3


def test_materialize_all_with_a_null_entity_id_row_str_view(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """A NULL id is not listed. With string ids it was listed as the id 'None' and, as the
    first id of the run (NULL sorts first), became the lower bound of the range read: 'Alice'
    < 'None' was silently left out."""
    _engine, cache = _null_id_env(sqlite_target, redis_url, key_prefix, "str",
                                  ["Alice", "bob", None])
    with cache:
        listed = [i for c in iter_entity_ids(cache.offline, "nv", ordered=True) for i in c]
        report = materialize(cache, "nv", all=True)
        layout = KeyLayout(key_prefix)
        cached = {e: bool(redis_client.exists(layout.row_key("nv", e)))
                  for e in ("Alice", "bob", "None")}
        assert cached == {"Alice": True, "bob": True, "None": False}, (cached, listed, report)


# ----------------------------------------------------------------------------- popularity


def test_materialize_all_with_text_in_an_int_id_column_is_a_schema_error(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str
) -> None:
    """SQLite lets any text into an INTEGER column: the listing says which value and view."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "nv", STATS_FEATURES)
    insert(engine, table, [stats_row(i, T0) for i in (1, 2)])
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO nv (entity_id, event_ts, updated_at, clicks) "
                             "VALUES ('abc', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)"))
    with make_cache([make_view("nv", "nv", None)], redis_url, sqlite_target.url,
                    key_prefix) as cache, pytest.raises(SchemaError, match=r"'abc'.*nv|nv.*'abc'"):
        materialize(cache, "nv", all=True)


def _popularity_view(sqlite_target: SqlTarget) -> FeatureView:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "pv", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(1, 4)])
    return make_view("pv", "pv", None)


def test_top_k_zero_returns_no_entities(sqlite_target: SqlTarget, redis_url: str,
                                       key_prefix: str) -> None:
    view = _popularity_view(sqlite_target)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    popularity_sample_rate=1.0) as cache:
        cache.get_features([1, 2, 3], ["clicks"])
        assert cache.popularity is not None and cache.popularity.flush() > 0
        assert len(cache.top_k("pv", 1)) == 1
        assert cache.top_k("pv", 0) == [], "k=0 returned every entity (ZREVRANGE 0 -1)"
        with pytest.raises(InvalidRequest, match="k must be an integer >= 0"):
            cache.top_k("pv", -1)


def test_top_k_reads_the_serving_processes_counts_in_a_process_that_counts_nothing(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str
) -> None:
    """A warmer configured with popularity.sample_rate 0 (it serves no reads itself) warmed
    nothing: its top_k answered [] whatever the serving processes had counted in Redis."""
    view = _popularity_view(sqlite_target)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    popularity_sample_rate=1.0) as serving:
        serving.get_features([1, 2], ["clicks"])
        serving.get_features([2], ["clicks"])
        assert serving.popularity is not None and serving.popularity.flush() > 0
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    popularity_sample_rate=0.0) as warmer:
        assert warmer.popularity is None  # counts nothing itself
        assert [e for e, _ in warmer.top_k("pv", 5)] == [2, 1]


# ----------------------------------------------------------------------------- config


_BASE = {
    "redis": {"url": "redis://127.0.0.1:1/0"},
    "offline_store": {"url": "sqlite://"},
    "views": {"cv": {"table": "cv", "entity": "entity_id", "event_timestamp": "event_ts",
                     "updated_at": "updated_at", "features": {"clicks": "int, 1h"}}},
}


def test_an_env_override_of_an_integer_warmer_key_is_read_as_an_integer() -> None:
    """docs/configuration.md: FEATCACHE__<SECTION>__<KEY> sets any scalar, integer keys take
    an integer as int() reads it."""
    doc = dict(_BASE, warmer={"k": 10})
    config = config_from_dict(doc, env={"FEATCACHE__WARMER__K": "500",
                                        "FEATCACHE__WARMER__CHUNK_ROWS": "2000"})
    assert (config.warmer.k, config.warmer.chunk_rows) == (500, 2000)


def test_an_env_override_creates_the_warmer_section() -> None:
    """docs/configuration.md: every top-level section but views is created when the file
    does not have it."""
    config = config_from_dict(dict(_BASE), env={"FEATCACHE__WARMER__HORIZON": "5m"})
    assert config.warmer.horizon == 300.0


# ----------------------------------------------------------------------------- CLI


def test_materialize_ids_file_keeps_string_ids_as_written(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path,
    redis_client: redis.Redis
) -> None:
    """String ids are distinct when they differ by surrounding spaces (the read path and
    follow_changes keep 'a' and 'a ' apart); --ids-file ' a' must not materialize 'a'."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "sv", STATS_FEATURES, entity_type="str")
    insert(engine, table, [stats_row("a", clicks=1), stats_row(" a", clicks=2)])
    path = tmp_path / "c.yaml"
    path.write_text(
        f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "views:\n  sv:\n    table: sv\n    entity: {column: entity_id, type: str}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1h\n")
    ids = tmp_path / "ids.txt"
    ids.write_text(" a\n")
    run_materialize(str(path), "sv", ids_file=str(ids), out=io.StringIO())
    layout = KeyLayout(key_prefix)
    assert [bool(redis_client.exists(layout.row_key("sv", e))) for e in (" a", "a")] == [
        True, False]


# ----------------------------------------------------------------------------- SQLite locking


def test_a_poll_does_not_block_etl_commits_between_chunks(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str
) -> None:
    """SQLite in its default rollback-journal mode: follow_changes keeps its change cursor
    open while it rewrites chunk after chunk, so the file's SHARED lock is held for the whole
    poll and an ETL cannot commit until the poll ends (its busy timeout expires first), and
    the ETL's pending lock in turn blocks the poll's own reads. offline/arrow.py avoids exactly
    this ('no read transaction is held between chunks')."""
    n = 4000
    engine = sqlite_target.engine()
    make_table(engine, None, "cv", STATS_FEATURES)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "delete"
        conn.exec_driver_sql(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) "
            "INSERT INTO cv (entity_id, event_ts, updated_at, clicks) SELECT i, "
            "'2026-01-01 00:00:00.000000', "
            "printf('2026-01-01 00:00:%02d.%06d', i / 1000, i % 1000), i FROM n")
    path = engine.url.database
    assert path
    view = make_view("cv", "cv", None)
    outcome: dict[str, Any] = {}
    with make_cache([view], redis_url, sqlite_target.url, key_prefix) as cache:
        mark_key = cache.layout.watermark_key("cv")

        def etl() -> None:  # commits once the poll has saved its first chunk's watermark
            deadline = time.monotonic() + 30
            while not cache.redis.exists(mark_key) and time.monotonic() < deadline:
                time.sleep(0.001)
            conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
            started = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE cv SET clicks = -1 WHERE entity_id = 1")
                conn.execute("COMMIT")
                outcome["etl"] = "committed"
            except sqlite3.OperationalError as exc:
                outcome["etl"] = f"{exc} after {time.perf_counter() - started:.1f}s"
                conn.execute("ROLLBACK")
            finally:
                conn.close()

        thread = threading.Thread(target=etl)
        thread.start()
        try:
            report = follow_changes(cache, "cv", chunk_rows=20, rewrite="all", start="all")
            outcome["poll"] = f"changed={report.changed}"
        except Exception as exc:
            outcome["poll"] = repr(exc)
        thread.join()
    assert outcome == {"etl": "committed", "poll": f"changed={n}"}, outcome
