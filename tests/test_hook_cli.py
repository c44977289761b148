"""The ETL hook from outside: `featcache invalidate` and `featcache.invalidate(...)`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from featdata import STATS_FEATURES, insert, make_table, stats_row

import featcache
from featcache import FeatureCache, Status, load_config


@pytest.fixture
def config_file(sqlite_target: Any, redis_url: str, key_prefix: str, tmp_path: Path) -> Path:
    table = make_table(sqlite_target.engine(), None, "hooked", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i) for i in range(1, 6)])
    path = tmp_path / "featcache.yaml"
    path.write_text(
        f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "views:\n  hooked:\n    table: hooked\n    entity: {column: entity_id, type: int}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1h\n"
    )
    return path


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featcache.jobs.cli", *args],
        capture_output=True, text=True, input=stdin, timeout=60, check=False,
    )


def _statuses(config_file: Path, ids: list[int]) -> list[Status]:
    with FeatureCache.from_config(config_file) as cache:
        result = cache.get_features(ids, ["clicks"])
        return [result.status(i, "clicks") for i in ids]


def test_cli_invalidates_ids(config_file: Path, redis_client: redis.Redis,
                             key_prefix: str) -> None:
    assert _statuses(config_file, [1, 2, 3]) == [Status.FILLED] * 3
    done = _cli("invalidate", "--config", str(config_file), "--view", "hooked", "--ids", "1,3")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"view": "hooked", "whole_view": False, "entities": 2,
                      "stream_ids": report["stream_ids"]}
    assert _statuses(config_file, [1, 2, 3]) == [Status.FILLED, Status.HIT_REDIS,
                                                  Status.FILLED]


def test_cli_ids_file_stdin_and_all(config_file: Path, tmp_path: Path) -> None:
    _statuses(config_file, [1, 2, 3, 4])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("2\n\n4\n")
    assert _cli("invalidate", "--config", str(config_file), "--view", "hooked",
                "--ids-file", str(ids_file)).returncode == 0
    assert _statuses(config_file, [1, 2]) == [Status.HIT_REDIS, Status.FILLED]
    assert _cli("invalidate", "--config", str(config_file), "--view", "hooked",
                "--ids-file", "-", stdin="1\n").returncode == 0
    assert _statuses(config_file, [1, 3]) == [Status.FILLED, Status.HIT_REDIS]
    done = _cli("invalidate", "--config", str(config_file), "--view", "hooked", "--all")
    assert done.returncode == 0 and json.loads(done.stdout)["whole_view"] is True
    assert _statuses(config_file, [1, 3]) == [Status.FILLED, Status.FILLED]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--view", "nope", "--ids", "1"], 78, "unknown feature view 'nope'"),
        (["--view", "hooked", "--ids", "1,x"], 65, "'x' is not an integer id"),
        (["--view", "hooked", "--ids", ","], 65, "no ids given"),
        (["--view", "hooked", "--ids-file", "/nonexistent/ids"], 65, "cannot read ids file"),
    ],
)
def test_cli_bad_input_exits_with_its_status_and_one_line(
    config_file: Path, args: list[str], status: int, message: str
) -> None:
    done = _cli("invalidate", "--config", str(config_file), *args)
    assert done.returncode == status
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_needs_exactly_one_target(config_file: Path) -> None:
    done = _cli("invalidate", "--config", str(config_file), "--view", "hooked",
                "--ids", "1", "--all")
    assert done.returncode == 2 and "not allowed with" in done.stderr


def test_python_hook_with_path_config_object_and_env(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _statuses(config_file, [1, 2, 3])
    assert featcache.invalidate("hooked", [1], config=config_file).entities == 1
    assert featcache.invalidate("hooked", [2], config=load_config(config_file)).entities == 1
    monkeypatch.setenv("FEATCACHE_CONFIG", str(config_file))
    assert featcache.invalidate("hooked", [3]).entities == 1
    assert _statuses(config_file, [1, 2, 3]) == [Status.FILLED] * 3
    monkeypatch.delenv("FEATCACHE_CONFIG")
    with pytest.raises(featcache.ConfigError, match="FEATCACHE_CONFIG"):
        featcache.invalidate("hooked", [1])
