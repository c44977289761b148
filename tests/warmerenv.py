"""Builders of the warmer tests (``test_warmer``, ``test_changes_query``, ``test_metrics``): a
config with the views ``cv`` (with ``updated_at``) and ``plain`` (without) on any SQL target,
and the dialect-aware updates and waits they share."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from featdata import STATS_FEATURES, insert, make_table, redis_yaml, stats_row
from servers import SqlTarget

from featcache import FeatureCache

HOUR = dt.timedelta(hours=1)
#: a warmer section that runs every job of view cv several times a second; its first poll
#: reads the whole history (the rows are stamped T0, long before now)
FAST_WARMER = ("warmer:\n  schedule: {interval: 300ms}\n  views: [cv]\n"
               "  follow_changes: {interval: 300ms, rewrite: all, start: all}\n")
CLI = [sys.executable, "-m", "featcache.jobs.cli"]


def write_config(path: Path, redis_url: str, key_prefix: str, offline_url: str,
                 warmer: str = "", schema: str | None = None) -> Path:
    in_schema = f"    schema: {schema}\n" if schema else ""
    path.write_text(
        redis_yaml(redis_url, key_prefix) +
        f"offline_store: {{url: '{offline_url}'}}\n"
        "views:\n"
        f"  cv:\n    table: cv\n{in_schema}    entity: {{column: entity_id, type: int}}\n"
        "    event_timestamp: event_ts\n    updated_at: updated_at\n"
        "    features:\n      clicks: int, 1h\n      country: str, 1h\n"
        f"  plain:\n    table: plain\n{in_schema}    entity: {{column: entity_id, type: int}}\n"
        "    event_timestamp: event_ts\n    features:\n      ctr: float, 10m\n"
        + warmer
    )
    return path


@contextlib.contextmanager
def cv_env(target: SqlTarget, redis_url: str, key_prefix: str,
           tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Views ``cv`` (with updated_at; entities 1-5 at T0) and ``plain`` (without) on
    ``target``, and a cache on them."""
    engine = target.engine()
    table = make_table(engine, target.schema, "cv", STATS_FEATURES)
    plain = make_table(engine, target.schema, "plain", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(1, 6)])
    path = write_config(tmp_path / "featcache.yaml", redis_url, key_prefix, target.url,
                        schema=target.schema)
    with FeatureCache.from_config(path) as cache:
        yield {"engine": engine, "table": table, "plain": plain, "cache": cache, "path": path,
               "url": target.url, "target": target}


def utc_for(engine: sa.Engine, when: dt.datetime) -> dt.datetime:
    """``when`` as the dialect's test tables hold it: SQLite text and MySQL DATETIME have no
    offset (UTC wall time, as featcache reads naive values); PostgreSQL timestamptz keeps it."""
    if engine.dialect.name == "postgresql":
        return when
    return when.astimezone(dt.UTC).replace(tzinfo=None)


def update(engine: sa.Engine, table: sa.Table, entity: int, when: dt.datetime,
           **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == entity)
                     .values(updated_at=utc_for(engine, when), **values))


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@contextlib.contextmanager
def warmer_process(config: Path, *options: str) -> Iterator[subprocess.Popen[str]]:
    """``featcache warmer`` on ``config``, killed at the end of the block if still running, so
    a failed assertion never leaves it behind."""
    proc = subprocess.Popen([*CLI, "--log-level", "info", "warmer", "--config", str(config),
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_warmer(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the running warmer and wait for it; returns its stderr."""
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    return err
