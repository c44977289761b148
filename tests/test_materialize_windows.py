"""``materialize`` over an event-time window and ``materialize-incremental``, on every SQL
dialect: a window loads exactly the rows inside it; incremental runs each load the window from
where the last complete run ended, so every row is loaded once; a run that dies leaves the
watermark where it was and the next run loads its window again."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from featdata import STATS_FEATURES, T0, insert, make_cache, make_table, make_view, stats_row

from featcache import FeatureCache, InvalidRequest, Status
from featcache.materialize import materialize, materialize_incremental
from featcache.offline import EventWindow

HOUR = dt.timedelta(hours=1)
ENTITIES = 40
VIEW = "wnd"


def _versions() -> list[dict[str, Any]]:
    """Entities 1-40, a row at T0, T0+1h, T0+2h and T0+3h each (clicks = 10 * id + hour);
    entity 41 only at T0+5h."""
    rows = [stats_row(i, T0 + h * HOUR, clicks=10 * i + h)
            for h in range(4) for i in range(1, ENTITIES + 1)]
    rows.append(stats_row(41, T0 + 5 * HOUR, clicks=415))
    return rows


@pytest.fixture
def cache(sql_target: Any, redis_url: str, key_prefix: str) -> Iterator[FeatureCache]:
    table = make_table(sql_target.engine(), sql_target.schema, VIEW, STATS_FEATURES)
    insert(sql_target.engine(), table, _versions())
    view = make_view(VIEW, VIEW, sql_target.schema)
    with make_cache([view], redis_url, sql_target.url, key_prefix) as fc:
        yield fc


def _clicks(cache: FeatureCache, ids: list[int]) -> dict[int, Any]:
    got = cache.get_features(ids, ["clicks"])
    return {i: got[i]["clicks"] if got.status(i, "clicks") is Status.HIT_REDIS else None
            for i in ids}


def _cached(redis_client: redis.Redis, key_prefix: str, ids: list[int]) -> list[bool]:
    return [bool(redis_client.exists(f"{key_prefix}:{VIEW}:{i}")) for i in ids]


def test_a_window_loads_the_latest_row_inside_it(
    cache: FeatureCache, redis_client: redis.Redis, key_prefix: str,
) -> None:
    report = materialize(cache, VIEW, all=True, window=EventWindow(T0 + HOUR, T0 + 3 * HOUR))
    assert (report.entities, report.rows_written) == (ENTITIES, ENTITIES)
    assert report.absent_ids == ()
    assert _cached(redis_client, key_prefix, [1, ENTITIES, 41]) == [True, True, False]
    assert _clicks(cache, [1, 7]) == {1: 12, 7: 72}  # the T0+2h rows: 3h is outside
    # an earlier window never writes over the newer rows it finds
    older = materialize(cache, VIEW, all=True, window=EventWindow(None, T0 + HOUR))
    assert older.rows_written == 0 and older.fenced_off == ENTITIES
    assert _clicks(cache, [1]) == {1: 12}


def test_a_window_with_ids_and_bad_windows(cache: FeatureCache) -> None:
    report = materialize(cache, VIEW, ids=[1, 2, 41], window=EventWindow(T0 + 3 * HOUR, None))
    assert report.rows_written == 3
    assert _clicks(cache, [1, 41]) == {1: 13, 41: 415}
    with pytest.raises(InvalidRequest, match="not before its end"):
        materialize(cache, VIEW, all=True, window=EventWindow(T0, T0))
    with pytest.raises(InvalidRequest, match="not since"):
        materialize(cache, VIEW, since=T0, window=EventWindow(T0, None))


def test_incremental_runs_load_each_window_once_and_resume_after_a_failed_run(
    cache: FeatureCache,
) -> None:
    first = materialize_incremental(cache, VIEW, end=T0 + 90 * dt.timedelta(minutes=1))
    assert first.start is None and first.advanced
    assert first.materialized.rows_read == ENTITIES  # the T0+1h rows
    assert _clicks(cache, [3]) == {3: 31}

    # the next run dies after its first chunk: the watermark stays, the window is loaded again
    def dies(report: Any) -> None:
        raise RuntimeError("the cron job was killed")

    with pytest.raises(RuntimeError, match="killed"):
        materialize_incremental(cache, VIEW, end=T0 + 6 * HOUR, chunk_rows=10, progress=dies)
    second = materialize_incremental(cache, VIEW, end=T0 + 6 * HOUR)
    assert second.start == first.end and second.advanced
    assert second.materialized.rows_read == ENTITIES + 1  # the T0+3h rows and entity 41
    assert _clicks(cache, [3, 41]) == {3: 33, 41: 415}
    nothing = materialize_incremental(cache, VIEW, end=T0 + 6 * HOUR)
    assert nothing.start == second.end and not nothing.advanced
    assert nothing.materialized.rows_read == 0


# ----------------------------------------------------------------------------- commands


@pytest.fixture
def config_file(sqlite_target: Any, redis_url: str, key_prefix: str, tmp_path: Path) -> Path:
    table = make_table(sqlite_target.engine(), None, VIEW, STATS_FEATURES)
    insert(sqlite_target.engine(), table, _versions())
    path = tmp_path / "featcache.yaml"
    path.write_text(
        f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        f"views:\n  {VIEW}:\n    table: {VIEW}\n    entity: {{column: entity_id, type: int}}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1h\n")
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "featcache.jobs.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_commands(config_file: Path) -> None:
    done = cli("materialize", "--config", str(config_file), "--view", VIEW,
               "--start", "2026-01-01T01:00:00Z", "--end", "2026-01-01T02:00:00Z")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows_written"] == ENTITIES
    runs = []
    for end in ("2026-01-01T02:30:00Z", "2026-01-01T06:00:00Z"):
        done = cli("materialize-incremental", "--config", str(config_file), "--end", end)
        assert done.returncode == 0, done.stderr
        (report,) = json.loads(done.stdout)["views"]
        runs.append(report)
    assert [r["start"] for r in runs] == [None, "2026-01-01T02:30:00+00:00"]
    assert [r["advanced"] for r in runs] == [True, True]
    assert runs[1]["rows_read"] == ENTITIES + 1
    with FeatureCache.from_config(config_file) as cache:
        assert _clicks(cache, [5, 41]) == {5: 53, 41: 415}


@pytest.mark.parametrize(("args", "message"), [
    (["materialize", "--view", VIEW, "--since", "2026-01-01", "--end", "2026-01-02"],
     "not with --since"),
    (["materialize-incremental"], "the following arguments are required: --end"),
])
def test_command_errors(config_file: Path, args: list[str], message: str) -> None:
    done = cli(args[0], "--config", str(config_file), *args[1:])
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
