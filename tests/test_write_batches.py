"""The engine-agnostic writer (``featcache.materialize.write_batches``) and ``featcache
materialize`` for every view and from Parquet files, on real servers.

What a Spark or Ray task needs of it: an older row never replaces a newer one; the same batch
written twice (a retried or speculative task) writes nothing new; an invalidation that lands
between a batch's fence and its write keeps its key; values convert exactly as ``put_rows``
converts them (Arrow's null apart from NaN); a batch that cannot be written says which row.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from featdata import (
    STATS_FEATURES,
    T0,
    insert,
    make_cache,
    make_table,
    make_view,
    mget_all,
    row_key,
    stats_row,
)

from featcache import FeatureCache, InvalidEntityId, InvalidRequest, Status
from featcache.materialize import WriteReport, write_batches

VIEW = "wb"
NAMES = [f.name for f in STATS_FEATURES]
HOUR = dt.timedelta(hours=1)


def arrow_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table of the view's SQL columns, typed as an engine would type them."""
    schema = pa.schema([
        ("entity_id", pa.int64()), ("event_ts", pa.timestamp("us", "UTC")),
        ("ctr", pa.float64()), ("clicks", pa.int64()), ("country", pa.string()),
        ("vip", pa.bool_()), ("last_seen", pa.timestamp("us", "UTC")),
        ("emb", pa.list_(pa.float64())),
    ])
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema)


@pytest.fixture
def cache(sqlite_target: Any, redis_url: str, key_prefix: str) -> Iterator[FeatureCache]:
    make_table(sqlite_target.engine(), None, VIEW, STATS_FEATURES)  # the view's schema
    with make_cache([make_view(VIEW, VIEW, None)], redis_url, sqlite_target.url,
                    key_prefix) as fc:
        yield fc


@pytest.mark.topology
def test_batches_are_written_and_read_back_exactly(cache: FeatureCache) -> None:
    rows = [stats_row(i, T0, clicks=i, ctr=i / 8, country=f"c{i}", vip=i % 2 == 0,
                      emb=[float(i), -0.0]) for i in range(1, 2001)]
    table = arrow_rows(rows)
    report = write_batches(cache, VIEW, table.to_batches(max_chunksize=500))
    assert report == WriteReport(VIEW, batches=4, rows_received=2000, rows_written=2000,
                                 seconds=report.seconds)
    assert report.invalidated == 0
    got = cache.get_features([1, 2, 2000], NAMES)
    assert {got.status(i, "clicks") for i in (1, 2, 2000)} == {Status.HIT_REDIS}
    for i in (1, 2, 2000):
        assert got[i] == {**{k: rows[i - 1][k] for k in NAMES}}
        assert got.event_timestamp(i, "clicks") == T0


@pytest.mark.topology
def test_an_older_row_never_replaces_a_newer_one_and_a_retry_writes_nothing(
    cache: FeatureCache,
) -> None:
    newer = arrow_rows([stats_row(i, T0 + HOUR, clicks=100 + i) for i in range(1, 11)])
    older = arrow_rows([stats_row(i, T0, clicks=i) for i in range(1, 11)])
    assert write_batches(cache, VIEW, [newer]).rows_written == 10
    stale = write_batches(cache, VIEW, [older])
    assert (stale.rows_written, stale.skipped_older) == (0, 10)
    again = write_batches(cache, VIEW, [newer])  # a retried task: the same batch once more
    assert again.rows_received == 10 and again.fenced_off == 0
    got = cache.get_features(list(range(1, 11)), ["clicks"])
    assert [got[i]["clicks"] for i in range(1, 11)] == [100 + i for i in range(1, 11)]


@pytest.mark.topology
def test_the_newest_row_per_id_of_a_batch_is_the_one_written(cache: FeatureCache) -> None:
    table = arrow_rows([stats_row(1, T0 + 2 * HOUR, clicks=3), stats_row(1, T0, clicks=1),
                        stats_row(1, T0 + HOUR, clicks=2), stats_row(2, T0, clicks=9)])
    report = write_batches(cache, VIEW, [table])
    assert (report.rows_received, report.rows_written, report.skipped_older) == (4, 2, 2)
    assert cache.get_features([1], ["clicks"])[1]["clicks"] == 3


@pytest.mark.topology
def test_an_invalidation_between_fence_and_write_keeps_its_key(
    cache: FeatureCache, redis_url: str, sqlite_target: Any, key_prefix: str,
) -> None:
    """An ETL's invalidation lands between a batch's fence and its write (the writer's own
    steps, with the invalidation between them): the batch's row is fenced off. A batch that
    reaches the writer while the tombstone is there is not written either (``invalidated``):
    its input may predate the change."""
    write_batches(cache, VIEW, [arrow_rows([stats_row(i, T0) for i in range(1, 11)])])
    fence = cache.fence(VIEW, [5])
    with make_cache([make_view(VIEW, VIEW, None)], redis_url, sqlite_target.url,
                    key_prefix) as etl:
        etl.invalidate(VIEW, [5])
    from featcache.batches import batch_rows  # noqa: PLC0415

    found = batch_rows(cache.config.view(VIEW), arrow_rows([stats_row(5, T0 + HOUR)]), 512)
    put = cache.prepare_columns(VIEW, found.rows, fence=fence).send()
    assert (put.written, put.fenced_off) == (0, 1)
    report = write_batches(cache, VIEW, [arrow_rows([stats_row(5, T0 + HOUR, clicks=55)])])
    assert (report.rows_written, report.invalidated) == (0, 1)
    assert cache.get_features([5], ["clicks"]).status(5, "clicks") is not Status.HIT_REDIS


@pytest.mark.topology
def test_invalidations_during_a_load_keep_their_rows_out(
    cache: FeatureCache, redis_url: str, sqlite_target: Any, key_prefix: str,
) -> None:
    """A load's batches arrive one after the other; an ETL invalidates some ids, then the
    whole view, between them: no later batch writes an invalidated row."""
    from featcache.materialize import load_epoch  # noqa: PLC0415

    epoch = load_epoch(cache.store, cache.layout, VIEW)  # where a load starts (its driver)
    etl = make_cache([make_view(VIEW, VIEW, None)], redis_url, sqlite_target.url, key_prefix)

    def batches() -> Any:
        yield arrow_rows([stats_row(i, T0) for i in range(1, 11)])
        etl.invalidate(VIEW, [15, 16])
        yield arrow_rows([stats_row(i, T0) for i in range(11, 21)])
        etl.invalidate(VIEW)  # the whole view
        yield arrow_rows([stats_row(i, T0) for i in range(21, 31)])

    try:
        report = write_batches(cache, VIEW, batches(), since_epoch=epoch)
    finally:
        etl.close()
    # batch 2 (less 15, 16) is written, or fenced off when the whole-view invalidation
    # overtakes its write (the writer sends it while the third batch is being made)
    assert report.invalidated == 12
    assert report.rows_written + report.fenced_off == 18 and report.rows_written >= 10
    got = cache.get_features(list(range(1, 31)), ["clicks"])
    # the whole view went after the second batch: nothing of the load is served from Redis
    assert Status.HIT_REDIS not in set(got.status_counts())


@pytest.mark.topology
def test_concurrent_writers_of_the_same_rows_write_each_row_once_in_the_end(
    cache: FeatureCache,
) -> None:
    """Two speculative copies of one task: whatever the interleaving, every row ends as the
    batch has it, and no row is counted written by both unless both found it unchanged."""
    import threading  # noqa: PLC0415

    table = arrow_rows([stats_row(i, T0, clicks=i) for i in range(1, 3001)])
    reports: list[WriteReport] = []
    copies = [threading.Thread(target=lambda: reports.append(
        write_batches(cache, VIEW, table.to_batches(max_chunksize=300)))) for _ in range(2)]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join(60)
    assert len(reports) == 2
    total = reports[0] + reports[1]
    assert total.rows_received == 6000
    assert total.rows_written + total.fenced_off == 6000
    got = cache.get_features(list(range(1, 3001)), ["clicks"])
    assert [got[i]["clicks"] for i in range(1, 3001)] == list(range(1, 3001))


@pytest.mark.topology
def test_null_and_nan_floats_stay_apart(cache: FeatureCache) -> None:
    table = arrow_rows([stats_row(1, T0, ctr=None), stats_row(2, T0, ctr=math.nan)])
    write_batches(cache, VIEW, [table])
    got = cache.get_features([1, 2], ["ctr"])
    assert got[1]["ctr"] is None and math.isnan(got[2]["ctr"])


@pytest.mark.topology
def test_columns_of_other_types_convert_as_put_rows_converts_them(cache: FeatureCache) -> None:
    # narrower ints, a float column of ints, naive timestamps (read as UTC), event times as
    # ISO 8601 text
    table = pa.table({
        "entity_id": pa.array([1, 2], pa.int32()),
        "event_ts": pa.array(["2026-01-01T00:00:00", "2026-01-01T01:00:00+00:00"]),
        "ctr": pa.array([1, 2], pa.int64()), "clicks": pa.array([7, 8], pa.int8()),
        "country": pa.array(["DE", "FR"]), "vip": pa.array([True, False]),
        "last_seen": pa.array([dt.datetime(2026, 1, 1)] * 2, pa.timestamp("us")),
        "emb": pa.array([[1.0], [2.0]]), "ignored": pa.array([0, 0]),
    })
    assert write_batches(cache, VIEW, [table]).rows_written == 2
    got = cache.get_features([1, 2], NAMES)
    assert got[1]["ctr"] == 1.0 and isinstance(got[1]["ctr"], float)
    assert got[2]["clicks"] == 8
    assert got[1]["last_seen"] == T0
    assert got.event_timestamp(2, "ctr") == T0 + HOUR


@pytest.mark.topology
@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda t: t.drop_columns(["clicks"]), InvalidRequest, "lacks the column(s) clicks"),
    (lambda t: t.set_column(3, "clicks", pa.array(["x"])), InvalidRequest,
     "row 0 (id 1), column 'clicks'"),
    (lambda t: t.set_column(0, "entity_id", pa.array(["a"])), InvalidEntityId, "row 0"),
    (lambda t: t.set_column(0, "entity_id", pa.array([None], pa.int64())), InvalidEntityId,
     "row 0"),
])
def test_a_bad_batch_names_its_row_and_writes_nothing(
    cache: FeatureCache, change: Any, error: type[Exception], message: str,
    redis_client: redis.Redis, key_prefix: str,
) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_batches(cache, VIEW, [change(arrow_rows([stats_row(1, T0)]))])
    assert not mget_all(redis_client, [row_key(key_prefix, VIEW, 1)])[0]


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def two_views(sqlite_target: Any, redis_url: str, key_prefix: str, tmp_path: Path) -> Path:
    engine = sqlite_target.engine()
    for name in ("va", "vb"):
        table = make_table(engine, None, name, STATS_FEATURES)
        insert(engine, table, [stats_row(i, T0, clicks=i) for i in range(1, 51)])
    features = "\n".join(f"      {f.name}: {{type: '{f.type.value}', max_age: 1h}}"
                         for f in STATS_FEATURES)
    views = "".join(
        f"  {name}:\n    table: {name}\n    entity: {{column: entity_id, type: int}}\n"
        f"    event_timestamp: event_ts\n    features:\n{features}\n" for name in ("va", "vb"))
    path = tmp_path / "featcache.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
                    f"offline_store: {{url: '{sqlite_target.url}'}}\nviews:\n{views}")
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "featcache.jobs.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_materialize_without_a_view_does_every_view(
    two_views: Path, redis_client: redis.Redis, key_prefix: str,
) -> None:
    done = cli("materialize", "--config", str(two_views))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    reports = json.loads(done.stdout)["views"]
    assert [(r["view"], r["rows_written"]) for r in reports] == [("va", 50), ("vb", 50)]
    assert redis_client.exists(f"{key_prefix}:va:50", f"{key_prefix}:vb:1") == 2


def test_materialize_from_parquet_files(
    two_views: Path, tmp_path: Path, redis_client: redis.Redis, key_prefix: str,
) -> None:
    rows = [stats_row(i, T0 + HOUR, clicks=1000 + i) for i in range(1, 301)]
    table = arrow_rows(rows)
    for part in range(3):
        pq.write_table(table.slice(part * 100, 100), tmp_path / f"part-{part}.parquet")
    (tmp_path / "notes.txt").write_text("not parquet, not matched")
    done = cli("materialize", "--config", str(two_views), "--view", "vb",
               "--from-parquet", str(tmp_path / "part-*.parquet"), "--chunk-rows", "40")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["view"], report["rows_received"], report["rows_written"]) == ("vb", 300, 300)
    assert report["batches"] == 9  # 100 rows a file, 40 a batch: 3 batches a file
    assert len(report["files"]) == 3
    with FeatureCache.from_config(two_views) as cache:
        got = cache.get_features([1, 300], ["vb:clicks"])
        assert [got[1]["vb:clicks"], got[300]["vb:clicks"]] == [1001, 1300]


@pytest.mark.parametrize(("pattern", "status", "message"), [
    ("nothing-*.parquet", 65, "matches no file"),
    ("bad.parquet", 65, "--from-parquet"),
    ("short.parquet", 65, "lacks the column(s) clicks"),
])
def test_materialize_from_parquet_errors(
    two_views: Path, tmp_path: Path, pattern: str, status: int, message: str,
) -> None:
    (tmp_path / "bad.parquet").write_text("not parquet")
    pq.write_table(arrow_rows([stats_row(1, T0)]).drop_columns(["clicks"]),
                   tmp_path / "short.parquet")
    done = cli("materialize", "--config", str(two_views), "--view", "va",
               "--from-parquet", str(tmp_path / pattern))
    assert done.returncode == status, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
