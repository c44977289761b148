"""No stale sets under real concurrency (DESIGN section 4), with real servers and processes.

One writer process updates SQL (a ``clicks`` version that only grows) and calls the
invalidation hook after each commit; four reader processes call ``get_features`` in a loop.
Every process is *spawned* and builds its own ``FeatureCache`` from the pickled config. The
checker (``procs_consistency.check``) then verifies, for every read, that no read started after
an invalidation returned got a value older than SQL held when it returned, beyond the declared
L1 bound (0 without an L1, the default; ``l1_max_ttl``, DESIGN's "last bound", with one), and
the test verifies that what Redis holds at the end is SQL's value, a tombstone, a negative
entry, a row of a superseded epoch (a miss), or nothing.

A deliberately BROKEN control runs the same history with readers that also do a naive
cache-aside set (their own SQL read, then ``put_rows`` without a fence): the checker must catch
it, which shows the test can fail.

Run ``pytest -s tests/test_consistency_processes.py`` to see the counts of each run.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featdata import insert, key_layout, make_table, make_view, mget_all, redis_config, with_options
from procs_consistency import (
    Job,
    Report,
    check,
    load,
    run_reader,
    run_writer,
    timestamp_for,
)

from featcache import CacheConfig, Feature, FeatureView, OfflineStoreConfig
from featcache.codec import KIND_ABSENT, KIND_ROW, KIND_TOMBSTONE, RowCodec

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

FEATURES = (Feature("clicks", "int", "1h"),)
VIEW = "cons"
N_ENTITIES = 32  # small, for contention
N_READERS = 4
WRITER_OPS = 3_000  # transactions, each followed by one invalidation
READER_OPS = 4_250  # get_features calls per reader: 3_000 + 4 * 4_250 = 20_000 operations
RUN_BUDGET_S = 150.0  # safety net only: workers stop early past it and report "truncated"


# ------------------------------------------------------------------------------------ harness


def _setup(target: Any) -> tuple[sa.Engine, sa.Table, FeatureView]:
    engine = target.engine()
    if target.name == "sqlite":  # readers must read while the writer commits
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # persistent: every process sees it
    table = make_table(engine, target.schema, VIEW, FEATURES)
    dialect = engine.dialect.name
    insert(engine, table, [
        {"entity_id": e, "event_ts": timestamp_for(0, dialect),
         "updated_at": timestamp_for(0, dialect), "clicks": 0}
        for e in range(1, N_ENTITIES + 1)
    ])
    return engine, table, make_view(VIEW, VIEW, target.schema, FEATURES)


def _run(
    config: CacheConfig,
    target: Any,
    tmp_path: Path,
    *,
    naive: bool = False,
    writer_ops: int = WRITER_OPS,
    reader_ops: int = READER_OPS,
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Spawn the writer and the readers, wait for them, return what each recorded."""
    ctx = mp.get_context("spawn")
    progress = ctx.Array("d", N_READERS + 1, lock=False)
    barrier = ctx.Barrier(N_READERS + 1)
    deadline = time.monotonic() + RUN_BUDGET_S
    entities = tuple(range(1, N_ENTITIES + 1))

    def job(role: str, ops: int, seed: int) -> Job:
        return Job(config=config, view=VIEW, table=VIEW, schema=target.schema,
                   sql_url=target.url, entities=entities, ops=ops, seed=seed,
                   out=str(tmp_path / f"{role}.msgpack"), deadline=deadline, naive=naive)

    procs = [ctx.Process(target=run_writer, name="writer",
                         args=(job("writer", writer_ops, 1), progress, barrier, N_READERS))]
    procs += [
        ctx.Process(target=run_reader, name=f"reader{i}",
                    args=(job(f"reader{i}", reader_ops, 100 + i), progress, barrier, i))
        for i in range(1, N_READERS + 1)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=max(1.0, deadline + 60 - time.monotonic()))
    finally:
        hung = [proc for proc in procs if proc.is_alive()]
        for proc in hung:  # only the processes this test started, by handle
            proc.kill()
            proc.join(10)
    elapsed = time.monotonic() - started
    assert not hung, f"worker processes hung: {[p.name for p in hung]}"
    payloads, failures = [], []
    for proc in procs:
        path = tmp_path / f"{proc.name}.msgpack"
        if not path.exists():
            failures.append(f"{proc.name} exited with {proc.exitcode} and wrote no results")
            continue
        payload = load(path)
        if "error" in payload:
            failures.append(f"{proc.name} failed ({payload['ready_after']}):\n{payload['error']}")
        elif proc.exitcode != 0:
            failures.append(f"{proc.name} exited with {proc.exitcode}")
        payloads.append(payload)
    assert not failures, "\n".join(failures)
    return payloads[0], payloads[1:], elapsed


def _final_state(
    redis_client: redis.Redis, key_prefix: str, view: FeatureView, engine: sa.Engine,
    table: sa.Table,
) -> tuple[Counter[str], list[tuple[int, Any, int]]]:
    """What Redis holds for each entity, against SQL: kinds, and rows that differ from SQL."""
    with engine.connect() as conn:
        sql = {int(e): int(c) for e, c in conn.execute(sa.select(table.c.entity_id,
                                                                 table.c.clicks))}
    layout = key_layout(key_prefix)
    codec = RowCodec(view)
    epoch_raw = redis_client.get(layout.epoch_key(view.name))
    epoch = int(epoch_raw) if epoch_raw else 0
    entities = sorted(sql)
    raws = mget_all(redis_client, layout.row_keys(view.name, entities))
    kinds: Counter[str] = Counter()
    mismatches = []
    for entity, raw in zip(entities, raws, strict=True):
        if raw is None:
            kinds["absent"] += 1
            continue
        assert isinstance(raw, bytes)
        row = codec.decode(raw)
        assert row is not None, f"entity {entity}: Redis holds undecodable bytes {raw!r}"
        if row.kind == KIND_TOMBSTONE:
            kinds["tombstone"] += 1
        elif row.kind == KIND_ABSENT:
            kinds["negative"] += 1
        elif row.kind == KIND_ROW and row.epoch != epoch:
            kinds["row of a superseded epoch (a miss)"] += 1
        else:
            kinds["row"] += 1
            if row.values[0] != sql[entity]:
                mismatches.append((entity, row.values[0], sql[entity]))
    return kinds, mismatches


def _describe(name: str, writer: dict[str, Any], readers: list[dict[str, Any]], report: Report,
              kinds: Counter[str], mismatches: list[Any], elapsed: float) -> str:
    stats: Counter[str] = Counter()
    for reader in readers:
        stats.update(reader.get("stats", {}).get(VIEW, {}))
    ops = writer["ops"] + sum(r["ops"] for r in readers)
    naive = sum(r["naive_sets"] for r in readers)
    lines = [
        f"[{name}] {ops} operations in {elapsed:.1f} s: writer {writer['ops']} transactions "
        f"({len(writer['updates'])} updates, {writer['whole_view']} whole-view invalidations), "
        f"readers {[r['ops'] for r in readers]} get_features calls"
        + (" (TRUNCATED by the run budget)" if writer["truncated"]
           or any(r["truncated"] for r in readers) else ""),
        f"[{name}] check: {report.summary()}",
        f"[{name}] reader caches: filled {stats['filled']}, Redis hits {stats['hit_redis']}, "
        f"L1 hits {stats['hit_l1']}, fills written {stats['rows_written']}, fills fenced off "
        f"{stats['fills_fenced']}, fills abandoned {stats['fills_abandoned']}, lease waits "
        f"{stats['lease_waits']} ({stats['lease_timeouts']} timed out), single-flight joined "
        f"{stats['singleflight_joined']}, early refreshes {stats['early_refreshes']}",
        f"[{name}] final Redis: {dict(kinds)}; rows differing from SQL: {mismatches[:10]}",
    ]
    if naive:
        lines.append(f"[{name}] naive unfenced sets: {naive} rows, "
                     f"{sum(r['naive_written'] for r in readers)} written")
    for v in report.violations:
        lines.append(f"[{name}] violation: {v}")
    return "\n".join(lines)


def declared_l1_bound(config: CacheConfig) -> float:
    """How long after an invalidation returns a read may still see the older value: 0 without
    an in-process cache; with one, its entries' maximum TTL (DESIGN section 4, "the last
    bound"; the invalidation stream normally drops them within milliseconds)."""
    return 0.0 if config.l1.policy is None else config.l1.max_ttl


def _history(target: Any, redis_url: str, key_prefix: str, **options: Any) -> dict[str, Any]:
    engine, table, view = _setup(target)
    config = with_options(CacheConfig(
        views=(view,), redis=redis_config(redis_url, key_prefix),
        offline_store=OfflineStoreConfig(url=target.url, connect_timeout=10.0),
    ), **options)
    return {"engine": engine, "table": table, "view": view, "config": config}


@pytest.fixture
def history(sql_target: Any, redis_url: str, key_prefix: str) -> dict[str, Any]:
    return _history(sql_target, redis_url, key_prefix)


def _run_and_check(
    name: str, history: dict[str, Any], target: Any, redis_client: redis.Redis,
    key_prefix: str, tmp_path: Path, *, naive: bool = False,
) -> tuple[Report, list[Any], str]:
    config = history["config"]
    writer, readers, elapsed = _run(config, target, tmp_path, naive=naive)
    report = check(writer, readers, declared_l1_bound(config))
    kinds, mismatches = _final_state(redis_client, key_prefix, history["view"],
                                     history["engine"], history["table"])
    text = _describe(name, writer, readers, report, kinds, mismatches, elapsed)
    print(f"\n{text}")
    assert report.impossible == 0, text
    return report, mismatches, text


# ------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_no_read_after_an_invalidation_sees_an_older_value(
    history: dict[str, Any], sql_target: Any, redis_client: redis.Redis, key_prefix: str,
    tmp_path: Path,
) -> None:
    report, mismatches, text = _run_and_check(sql_target.name, history, sql_target,
                                              redis_client, key_prefix, tmp_path)
    assert report.stale == 0, text
    assert not mismatches, text
    # every read is a fresh Redis hit or a fill: nothing failed, nothing was served stale
    assert set(report.statuses) <= {"HIT_REDIS", "FILLED"}, text
    # the run exercised the race: most reads had an invalidation of their entity behind them
    assert report.constrained > 1000, text
    assert report.reads >= N_READERS * READER_OPS, text


@pytest.mark.slow
def test_control_naive_unfenced_sets_are_caught(
    sqlite_target: Any, redis_url: str, redis_client: redis.Redis, key_prefix: str,
    tmp_path: Path,
) -> None:
    """BROKEN on purpose: readers set what they read from SQL without a fence. The checker must
    find a stale read or a final mismatch, or the test above proves nothing. One dialect is
    enough to show the checker can fail (it caught 345-883 stale reads on each of the three)."""
    history = _history(sqlite_target, redis_url, key_prefix)
    report, mismatches, text = _run_and_check("sqlite NAIVE", history, sqlite_target,
                                              redis_client, key_prefix, tmp_path, naive=True)
    assert report.stale + len(mismatches) > 0, text


@pytest.mark.slow
def test_with_l1_no_read_is_older_than_the_l1_bound(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """The same history with every reader's in-process L1 on: reads may lag an invalidation
    only until their L1 hears of it (the stream), never beyond the declared bound."""
    history = _history(sqlite_target, redis_url, key_prefix, l1_policy="lru")
    report, mismatches, text = _run_and_check("sqlite L1", history, sqlite_target,
                                              redis_client, key_prefix, tmp_path)
    assert report.stale == 0, text
    assert not mismatches, text
    assert set(report.statuses) <= {"HIT_L1", "HIT_REDIS", "FILLED"}, text
    assert report.statuses["HIT_L1"] > 0, text  # the L1 was in the path
    assert report.constrained > 1000, text


# ------------------------------------------------------------------------------------ checker


def _writer(updates: list[tuple[float, int, int]],
            invalidations: list[tuple[float, dict[int, int]]]) -> dict[str, Any]:
    return {"updates": updates, "invalidations": invalidations}


def _reader(*reads: tuple[float, float, int, int, str]) -> dict[str, Any]:
    return {"role": "r", "reads": list(reads)}


def test_checker_flags_a_read_older_than_a_returned_invalidation() -> None:
    writer = _writer([(1.0, 7, 1), (3.0, 7, 2)], [(2.0, {7: 1}), (4.0, {7: 2, 8: 0})])
    ok = check(writer, [_reader(
        (0.5, 0.6, 7, 0, "FILLED"),  # before any invalidation: unconstrained
        (2.5, 2.6, 7, 1, "HIT_REDIS"),  # bound 1, got 1
        (3.5, 3.6, 7, 1, "HIT_REDIS"),  # SQL held 2 but its invalidation had not returned
        (4.5, 4.6, 7, 2, "FILLED"),
        (4.5, 4.6, 8, 0, "HIT_REDIS"),  # a whole-view invalidation binds every entity
    )])
    assert (ok.reads, ok.constrained, ok.stale, ok.impossible) == (5, 4, 0, 0)
    assert (ok.tight, ok.pre_invalidation) == (4, 1)
    bad = check(writer, [_reader((4.5, 4.6, 7, 1, "HIT_REDIS"), (2.5, 2.6, 7, 0, "HIT_REDIS"))])
    assert bad.stale == 2 and [v["value"] for v in bad.violations] == [1, 0]
    assert bad.violations[0]["bound"] == 2


def test_checker_flags_values_never_written_or_from_the_future() -> None:
    writer = _writer([(3.0, 7, 5)], [(4.0, {7: 5})])
    report = check(writer, [_reader((1.0, 2.0, 7, 5, "FILLED"), (5.0, 6.0, 7, 4, "HIT_REDIS"),
                                    (5.0, 6.0, 7, None, "ABSENT"))])  # type: ignore[arg-type]
    assert report.impossible == 3 and report.stale == 0


def test_checker_allows_lag_only_within_the_l1_bound() -> None:
    writer = _writer([(1.0, 7, 1), (3.0, 7, 2)], [(2.0, {7: 1}), (4.0, {7: 2})])
    reads = _reader((4.05, 4.1, 7, 1, "HIT_L1"), (4.5, 4.6, 7, 0, "HIT_L1"))
    within = check(writer, [reads], l1_bound_s=0.1)
    # 1 was outdated by the invalidation returned at 4.0 (lag 0.05); 0 by the one at 2.0 (2.5)
    assert (within.lagged, within.stale) == (1, 1)
    assert within.max_lag_s == pytest.approx(0.05)
    assert within.violations[0]["outdated_for_s"] == pytest.approx(2.5)
    assert check(writer, [reads], l1_bound_s=3.0).stale == 0
