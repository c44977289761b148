"""End to end, with real processes: the warmer and ``featcache materialize`` killed mid-run
(SIGKILL, no clean-up) leave only whole, correct rows and the next run catches up (the leader
lease expires and is taken over); an upstream UPDATE reaches ``get_features`` through the
warmer's follow-changes poll, and the serving process's L1 drops the row it held.

Servers: the suite's Redis/Valkey (``redis_url``) and a SQLite file in WAL mode, so the test
process writes while the warmer reads.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.changes import Watermark, load_watermark
from featdata import (
    STATS_FEATURES,
    T0,
    insert,
    key_layout,
    make_table,
    mget_all,
    redis_yaml,
    stats_row,
    with_options,
)

from featcache import FeatureCache, Status, load_config
from featcache.codec import KIND_ROW, KIND_TOMBSTONE, RowCodec
from featcache.config import FeatureView
from featcache.convert import timestamp_to_us
from featcache.keys import KeyLayout

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

UTC = dt.UTC
HOUR = dt.timedelta(hours=1)
VIEW = "big"
ENTITIES = 20_000  # with chunk_rows 100: 200 chunks, a few seconds per full run
CHUNK_ROWS = 100
NAMES = tuple(f.name for f in STATS_FEATURES)

# every wait below is bounded; each test stays well under 60 s
START_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 40.0


# ----------------------------------------------------------------------------- helpers


def _write_config(path: Path, redis_url: str, key_prefix: str, offline_url: str,
                  warmer: str = "") -> Path:
    path.write_text(
        redis_yaml(redis_url, key_prefix) +
        f"offline_store: {{url: '{offline_url}'}}\n"
        "views:\n"
        f"  {VIEW}:\n    table: {VIEW}\n    entity: {{column: entity_id, type: int}}\n"
        "    event_timestamp: event_ts\n    updated_at: updated_at\n"
        "    features:\n"
        "      ctr: float, 1h\n      clicks: int, 1h\n      country: str, 1h\n"
        "      vip: bool, 1h\n      last_seen: timestamp, 1h\n"
        "      emb: {type: 'list[float]', max_age: 1h}\n"
        + warmer
    )
    return path


def _rows(n: int) -> Iterator[dict[str, Any]]:
    """One row per entity, distinct updated_at each; every 10th entity also has an older row
    (so "the latest row" is a real choice, not the only row)."""
    for i in range(1, n + 1):
        ts = T0 + dt.timedelta(seconds=i)
        if i % 10 == 0:
            old = ts - HOUR
            yield stats_row(i, old, updated_at=old, clicks=-1, country="OLD", emb=[-9.0])
        yield stats_row(i, ts, updated_at=ts, ctr=i / 8, clicks=i, country=f"c{i % 97}",
                        vip=i % 3 == 0, emb=[i * 0.5, -1.25])


def _make_db(engine: sa.Engine, n: int) -> sa.Table:
    with engine.connect() as conn:  # WAL: the test writes while the warmer's process reads
        mode = conn.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
    assert str(mode).lower() == "wal"
    table = make_table(engine, None, VIEW, STATS_FEATURES)
    insert(engine, table, _rows(n))
    return table


def _utc(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite holds UTC wall time
    return value


def _sql_latest(engine: sa.Engine, table: sa.Table) -> dict[int, tuple[int, dict[str, Any]]]:
    """SQL's latest row per entity, read independently of featcache: {id: (event_us, values)}."""
    cols = [table.c[name] for name in NAMES]
    query = sa.select(table.c.entity_id, table.c.event_ts, *cols).order_by(
        table.c.entity_id, table.c.event_ts)
    latest: dict[int, tuple[int, dict[str, Any]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            event_us = timestamp_to_us(_utc(row[1]))
            assert event_us is not None
            latest[int(row[0])] = (event_us,
                                   {n: _utc(v) for n, v in zip(NAMES, row[2:], strict=True)})
    return latest


def _check_redis(client: redis.Redis, layout: KeyLayout, view: FeatureView,
                 expected: dict[int, tuple[int, dict[str, Any]]]) -> int:
    """Every row key present decodes to a whole row equal to SQL's latest; returns how many.
    A tombstone (an invalidation: the change poll lays them before it rewrites a chunk) is a
    miss to every reader, not a row: not counted."""
    codec = RowCodec(view)
    names = [f.name for f in view.features]
    ids = sorted(expected)
    present = 0
    bad: list[str] = []
    for start in range(0, len(ids), 5000):
        part = ids[start : start + 5000]
        for eid, raw in zip(part, mget_all(client, layout.row_keys(VIEW, part)), strict=True):
            if raw is None:
                continue
            present += 1
            assert isinstance(raw, bytes)
            row = codec.decode(raw)
            event_us, want = expected[eid]
            if row is not None and row.kind == KIND_TOMBSTONE:
                present -= 1
            elif row is None:
                bad.append(f"{eid}: undecodable {raw[:40]!r}")
            elif row.kind != KIND_ROW or len(row.values) != len(names):
                bad.append(f"{eid}: kind={row.kind:#x} values={len(row.values)}/{len(names)}")
            elif row.event_us != event_us or dict(zip(names, row.values, strict=True)) != want:
                bad.append(f"{eid}: got {row.event_us} {list(row.values)}, "
                           f"SQL latest {event_us} {want}")
    assert not bad, f"{len(bad)} bad rows in Redis, e.g. {bad[:5]}"
    return present


def _count(client: redis.Redis, layout: KeyLayout, ids: list[int]) -> int:
    """How many of ``ids`` hold a row (the kind byte, byte 2 of the value), not a
    tombstone."""
    total = 0
    for start in range(0, len(ids), 5000):
        values = mget_all(client, layout.row_keys(VIEW, ids[start : start + 5000]))
        total += sum(1 for raw in values if isinstance(raw, bytes) and raw[2] == KIND_ROW)
    return total


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featcache.jobs.cli", "--log-level", "info", *args]


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a child with its output in a file (a pipe nobody reads could fill and stall it)."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], log: Path, sig: int = signal.SIGTERM) -> str:
    """Stop a child we started (by its handle), never leaving it behind; returns its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log.read_text(errors="replace")


@pytest.fixture
def big(sqlite_target: Any, redis_url: str, key_prefix: str,
        tmp_path: Path) -> dict[str, Any]:
    engine = sqlite_target.engine()
    table = _make_db(engine, ENTITIES)
    return {"engine": engine, "table": table, "url": sqlite_target.url,
            "expected": _sql_latest(engine, table)}


# ----------------------------------------------------------------------------- 1. SIGKILL


@pytest.mark.parametrize("runner", ["materialize", "warmer"])
def test_a_sigkilled_run_leaves_no_partial_rows_and_the_next_run_catches_up(
    runner: str, big: dict[str, Any], tmp_path: Path, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    warmer_section = (
        "warmer:\n  schedule: {interval: 1h}\n  views: [big]\n  lease_ttl: 2s\n"
        f"  chunk_rows: {CHUNK_ROWS}\n"
        "  follow_changes: {interval: 300ms, rewrite: all, start: all}\n"
    )
    path = _write_config(tmp_path / "c.yaml", redis_url, key_prefix, big["url"],
                         warmer_section if runner == "warmer" else "")
    config = load_config(path)
    view = config.view(VIEW)
    layout = key_layout(key_prefix)
    expected: dict[int, tuple[int, dict[str, Any]]] = big["expected"]
    ids = sorted(expected)
    assert len(ids) == ENTITIES
    lease_key = layout.leader_key(VIEW)
    if runner == "materialize":
        cmd = _cli("materialize", "--config", str(path), "--view", VIEW, "--all",
                   "--chunk-rows", str(CHUNK_ROWS))
    else:
        cmd = _cli("warmer", "--config", str(path))

    # --- first run: SIGKILL once the first chunk has landed
    first_log = tmp_path / "first.log"
    first = _spawn(cmd, first_log)
    try:
        landed = _wait_for(lambda: first.poll() is not None
                           or _count(redis_client, layout, ids) > 0, START_TIMEOUT_S)
        assert first.poll() is None, f"ended before the kill: {_stop(first, first_log)}"
        assert landed, "no row landed in Redis"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        err = _stop(first, first_log, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL, err
    killed_lease_pttl = int(redis_client.pttl(lease_key))
    mark = _watermark(path) if runner == "warmer" else None
    applied = {int(e): int(t) for e, t in redis_client.zrange(
        layout.applied_changes_key(VIEW), 0, -1, withscores=True)}

    present = _check_redis(redis_client, layout, view, expected)
    print(f"\n[{runner}] killed after {present}/{ENTITIES} rows landed; "
          f"lease pttl after kill={killed_lease_pttl} ms; watermark={mark}")
    assert 0 < present < ENTITIES, "the kill did not land mid-run"

    if runner == "warmer":
        # SIGKILL skipped the release: the lease is still there, but only for its TTL (2 s)
        assert 0 < killed_lease_pttl <= 2000, killed_lease_pttl

    # --- second run, to completion
    started = time.monotonic()
    if runner == "materialize":
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert '"complete": true' in done.stdout, done.stdout
    else:
        second_log = tmp_path / "second.log"
        second = _spawn(cmd, second_log)
        try:
            took_over = _wait_for(
                lambda: f":{second.pid}:".encode() in (redis_client.get(lease_key) or b"")
                or second.poll() is not None, RUN_TIMEOUT_S)
            assert second.poll() is None, _stop(second, second_log)
            assert took_over, f"lease never taken over: {redis_client.get(lease_key)!r}"
            took_over_s = time.monotonic() - started
            complete = _wait_for(lambda: _count(redis_client, layout, ids) == ENTITIES
                                 or second.poll() is not None, RUN_TIMEOUT_S)
            assert second.poll() is None, _stop(second, second_log)
            assert complete, f"{_count(redis_client, layout, ids)}/{ENTITIES} rows"
        finally:
            err = _stop(second, second_log)  # SIGTERM: the running poll finishes first
        assert second.returncode == 0, err
        assert "Traceback" not in err, err
        health_key = layout.health_key(VIEW)
        rows_total = int(redis_client.hget(health_key, "changes.rows_total") or -1)
        print(f"[warmer] lease taken over {took_over_s:.2f} s after the restart; "
              f"second warmer rewrote {rows_total} rows")
        if mark is not None:  # it resumed at the watermark instead of starting over
            # (a kill between recording a chunk as applied and saving the watermark leaves
            # that chunk applied behind it: skipped too)
            resumed_after = sum(1 for e, ts in _latest_updated(big).items()
                                if ts <= mark.ts_us or applied.get(e) == ts)
            assert rows_total == ENTITIES - resumed_after, (rows_total, resumed_after)
        assert not redis_client.exists(lease_key)  # released at SIGTERM
    assert _check_redis(redis_client, layout, view, expected) == ENTITIES
    print(f"[{runner}] second run complete: {ENTITIES}/{ENTITIES} rows correct "
          f"({time.monotonic() - started:.2f} s)")

    # the read path agrees: whole rows from Redis, with SQL's latest values
    with FeatureCache(with_options(config, popularity_sample_rate=0.0)) as cache:
        sample = [1, 10, 777, ENTITIES]
        result = cache.get_features(sample, list(NAMES))
        for eid in sample:
            assert {result.status(eid, n) for n in NAMES} == {Status.HIT_REDIS}
            assert {n: result[eid][n] for n in NAMES} == expected[eid][1]


def _watermark(path: Path) -> Watermark | None:
    config = with_options(load_config(path), popularity_sample_rate=0.0)
    with FeatureCache(config) as cache:
        return load_watermark(cache, VIEW)


def _latest_updated(big: dict[str, Any]) -> dict[int, int]:
    """Per entity, its latest updated_at in µs (what follow_changes orders by)."""
    table = big["table"]
    query = sa.select(table.c.entity_id, sa.func.max(table.c.updated_at)).group_by(
        table.c.entity_id)
    with big["engine"].connect() as conn:
        out = {}
        for eid, ts in conn.execute(query):
            value = timestamp_to_us(_utc(ts) if isinstance(ts, dt.datetime)
                                    else dt.datetime.fromisoformat(ts).replace(tzinfo=UTC))
            assert value is not None
            out[int(eid)] = value
        return out


# ----------------------------------------------------------------------------- 2. UPDATE


def test_an_upstream_update_reaches_get_features_and_drops_l1(
    sqlite_target: Any, tmp_path: Path, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    engine = sqlite_target.engine()
    table = _make_db(engine, 50)
    poll_s = 1.0
    path = _write_config(
        tmp_path / "c.yaml", redis_url, key_prefix, sqlite_target.url,
        "warmer:\n  schedule: {interval: 1h}\n  views: [big]\n"
        "  follow_changes: {interval: 1s}\n",
    )
    layout = key_layout(key_prefix)
    health_key = layout.health_key(VIEW)
    log = tmp_path / "warmer.log"
    proc = _spawn(_cli("warmer", "--config", str(path)), log)
    try:
        # the first poll (no watermark yet) has run: later polls only see new changes
        assert _wait_for(lambda: redis_client.hexists(health_key, "changes.last_success")
                         or proc.poll() is not None, START_TIMEOUT_S), "no poll ran"
        assert proc.poll() is None, _stop(proc, log)

        config = with_options(load_config(path), l1_policy="tinylfu", l1_max_ttl=60.0,
                              popularity_sample_rate=0.0)
        with FeatureCache(config) as cache:
            ids = [1, 2, 3, 4, 5]
            first = cache.get_features(ids, ["clicks"])
            assert {first.status(i, "clicks") for i in ids} == {Status.FILLED}
            held = cache.get_features(ids, ["clicks"])
            assert {held.status(i, "clicks") for i in ids} == {Status.HIT_L1}
            assert held[3]["clicks"] == 3
            applied_before = cache.subscriber_stats()["ids_applied"]

            # the ETL: UPDATE one row, bumping updated_at past everything the warmer has seen
            now = dt.datetime.now(UTC)
            bumped = max(now, T0 + dt.timedelta(days=1))
            with engine.begin() as conn:
                conn.execute(table.update().where(table.c.entity_id == 3).values(
                    clicks=4242, updated_at=bumped.replace(tzinfo=None)))
            t0 = time.monotonic()

            seen: list[tuple[float, Status, Any]] = []
            deadline = t0 + 30.0  # a sync bound, not a speed check (l1_max_ttl is 60 s)
            while time.monotonic() < deadline:
                result = cache.get_features([3], ["clicks"])
                seen.append((time.monotonic() - t0, result.status(3, "clicks"),
                             result[3]["clicks"]))
                if result[3]["clicks"] == 4242:
                    break
                time.sleep(0.01)
            delay = seen[-1][0]
            print(f"\nupdate visible after {delay:.3f} s ({len(seen)} reads; "
                  f"within poll interval + 1 s = {poll_s + 1:.0f} s: {delay <= poll_s + 1}); "
                  f"first new read status={seen[-1][1].name}")
            assert seen[-1][2] == 4242, f"update never reached get_features: {seen[-5:]}"
            # until then the old value came from L1 (it was held there, as set up)...
            assert all((s, v) == (Status.HIT_L1, 3) for _, s, v in seen[:-1]), seen[:5]
            # ...and the new one arrived long before l1_max_ttl could have expired the entry:
            # the warmer's invalidation (a tombstone, and the stream entry that dropped the L1
            # entry) came first, then its rewrite: a read in between reads SQL itself
            assert delay < config.l1.max_ttl
            assert seen[-1][1] in (Status.HIT_REDIS, Status.FILLED)
            assert cache.subscriber_stats()["ids_applied"] > applied_before

            # never stale again once applied; the new value is what L1 holds now
            for _ in range(5):
                again = cache.get_features(ids, ["clicks"])
                assert again[3]["clicks"] == 4242
            assert again.status(3, "clicks") is Status.HIT_L1
            # only the changed row was dropped: the others are still served from L1
            assert {again.status(i, "clicks") for i in (1, 2, 4, 5)} == {Status.HIT_L1}
            assert [again[i]["clicks"] for i in (1, 2, 4, 5)] == [1, 2, 4, 5]
    finally:
        err = _stop(proc, log)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
