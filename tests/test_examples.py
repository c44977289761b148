"""The examples run as their docstrings say: ``examples/fastapi_scoring.py`` under uvicorn (a
real server process on a free port), asked by a real HTTP client, on real Redis and SQL;
``examples/config_in_python.py`` as a script (CI's ``mypy --strict`` checks its types)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from featdata import STATS_FEATURES, insert, make_table, redis_yaml, stats_row
from servers import SqlTarget

from featcache.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


def config_yaml(redis_url: str, key_prefix: str, sql_url: str) -> str:
    features = "\n".join(f"      {f.name}: {{type: '{f.type.value}', max_age: 1h}}"
                         for f in STATS_FEATURES)
    return (redis_yaml(redis_url, key_prefix)
            + f"offline_store: {{url: '{sql_url}'}}\n"
            + "stats: {publish_interval: 0}\n"
            + "views:\n  stats:\n    table: user_stats\n"
            + "    entity: {column: entity_id, type: int}\n    event_timestamp: event_ts\n"
            + "    features:\n" + features + "\n")


@pytest.fixture
def scoring_server(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
                   tmp_path: Path) -> Iterator[str]:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "user_stats", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i * 10) for i in range(1, 21)])
    config = tmp_path / "featcache.yaml"
    config.write_text(config_yaml(redis_url, key_prefix, sqlite_target.url))
    port = free_port()
    env = {**os.environ, "FEATCACHE_CONFIG": str(config),
           "SCORE_FEATURES": "stats:clicks,stats:ctr", "SCORE_MODEL_VERSION": "t1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_scoring:app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/docs", timeout=1.0)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the example did not start: {proc.stdout}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        # uvicorn shuts down cleanly on SIGTERM, then re-raises it: killed by it, no traceback
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Traceback" not in out, out


def test_the_fastapi_example_scores_from_features_and_caches_the_scores(
        scoring_server: str) -> None:
    first = httpx.post(f"{scoring_server}/score", json={"user_ids": [1, 2, 3, 99]}).json()
    assert first["statuses"] == ["COMPUTED"] * 4
    assert first["feature_statuses"] == {"FILLED": 6, "ABSENT": 2}
    again = httpx.post(f"{scoring_server}/score", json={"user_ids": [3, 1, 99, 4]}).json()
    assert again["scores"][:3] == [first["scores"][2], first["scores"][0], first["scores"][3]]
    assert again["statuses"] == ["HIT_REDIS", "HIT_REDIS", "HIT_REDIS", "COMPUTED"]
    bad = httpx.post(f"{scoring_server}/score", json={"user_ids": [2**70]})
    assert bad.status_code == 400 and "64-bit" in bad.text


def test_the_python_config_example_takes_durations_as_text_and_holds_seconds() -> None:
    """examples/config_in_python.py builds docs/configuration.md's configuration, durations
    given as text ("2d", "500ms"), and prints them as float seconds."""
    env = {**os.environ, "FEATCACHE_REDIS_URL": "redis://127.0.0.1:6399/0",
           "FEATCACHE_OFFLINE_URL": "sqlite:///unused.db"}
    done = subprocess.run([sys.executable, "examples/config_in_python.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "view user: ttl 172800 s, negative_ttl 30 s, stale_if_error 600 s (173430 s in all)",
        "  ctr_7d: max_age 600 s",
        "  clicks_1h: max_age 3600 s",
        "  country: max_age 86400 s",
        "redis.socket_timeout 0.5 s, l1.max_ttl 5 s",
    ]
