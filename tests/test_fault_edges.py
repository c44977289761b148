"""Failure injection on private servers: Redis killed in the middle of a change poll (the
error it raises is a featcache error, not redis-py's), stalled while a fill is in flight, and
full (``maxmemory`` under ``noeviction``) when a fill is written."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.changes import follow_changes
from featdata import T0, insert, make_cache, make_table, make_view
from wire import hooked_client, is_command

from featcache import CacheUnavailable, Feature, Status
from featcache.embedded import EmbeddedServer
from featcache.leader import ViewLeader
from featcache.redis_store import CONDITIONAL_SET, SET_IF_ABSENT

FEATURES = (Feature("clicks", "int", "1m"),)
NAMES = ["clicks"]


def _rows(ids: Any, ts: dt.datetime = T0, mult: int = 10) -> list[dict[str, Any]]:
    return [{"entity_id": e, "event_ts": ts, "updated_at": ts, "clicks": e * mult} for e in ids]


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer().start()  # private: tests kill it
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def sql(tmp_path: Path) -> tuple[str, sa.Engine, sa.Table]:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    engine = sa.create_engine(url)
    table = make_table(engine, None, "rfeat", FEATURES)
    insert(engine, table, _rows(range(1, 6)))
    return url, engine, table


def _view() -> Any:
    return make_view("rfeat", "rfeat", None, FEATURES)


# ------------------------------------------------------------------ follow_changes


def test_follow_changes_redis_dies_before_watermark_save_raises_featcache_error(
    server: EmbeddedServer, sql: tuple[str, sa.Engine, sa.Table]
) -> None:
    """docs/errors.md: every exception featcache raises is a FeatcacheError. The watermark
    is read and written with the raw redis client (jobs/changes.py load/save_watermark), and a
    Redis failure at that moment leaked redis.exceptions.ConnectionError."""
    url, _, _ = sql
    client, hooks = hooked_client(server.url)
    fc = make_cache([_view()], server.url, url, "rv", redis_client=client,
                    redis_socket_timeout=0.25, redis_connect_timeout=0.25)
    try:
        leader = ViewLeader(fc.store, fc.layout, "rfeat", 30.0)  # as the Warmer passes its own
        wm_key = fc.layout.watermark_key("rfeat")

        def before_send(packed: Any) -> None:
            if packed and is_command(packed[0], "SET") and wm_key.encode() in packed[0]:
                server.kill()

        hooks.before_send = before_send
        with pytest.raises(CacheUnavailable):
            follow_changes(fc, "rfeat", leader=leader, rewrite="all")
    finally:
        hooks.before_send = None
        fc.close()
        client.close()


# ------------------------------------------------------------------ a stalled Redis


def test_a_fill_that_a_stalled_redis_runs_past_its_deadline_lands_nowhere(
    server: EmbeddedServer, sql: tuple[str, sa.Engine, sa.Table]
) -> None:
    """A fill sent well within fence_ttl / 2 but run by the server after it (the server was
    stalled with the command in its socket: SIGSTOP here, a VM pause or a fork in life) must
    write nothing, since a tombstone it raced with may have expired meanwhile. The scripts
    check the deadline on the server's clock (set from the leases' TIME); before, the row
    landed (found in review, 2026-11-27)."""
    url, _, _ = sql
    client, hooks = hooked_client(server.url)
    fc = make_cache([_view()], server.url, url, "st", redis_client=client, fence_ttl=2.0,
                    redis_socket_timeout=5)
    key = fc.layout.row_key("rfeat", 1)
    stalled: list[float] = []

    def stall(packed: Any) -> None:
        fill_scripts = (SET_IF_ABSENT.sha.encode(), CONDITIONAL_SET.sha.encode())
        if not stalled and any(sha in p and key.encode() in p
                               for p in packed for sha in fill_scripts):
            stalled.append(time.monotonic())
            os.kill(server.pid, signal.SIGSTOP)  # the fill is about to go out, in time
            threading.Timer(1.5, os.kill, (server.pid, signal.SIGCONT)).start()  # > 1 s

    try:
        hooks.before_send = stall
        result = fc.get_features([1], NAMES)
        hooks.before_send = None
        assert result.status(1, "clicks") is Status.FILLED and stalled
        assert client.get(key) is None, "a fill ran past its deadline and landed"
        counts = {k: v for k, v in fc.stats()["rfeat"].items() if v}
        assert counts.get("fills_fenced") == 1 and "fills_abandoned" not in counts, counts
    finally:
        hooks.before_send = None
        os.kill(server.pid, signal.SIGCONT)
        fc.close()
        client.close()


# ------------------------------------------------------------------ a full Redis


def test_a_fill_refused_by_a_full_redis_is_counted_and_lands_nowhere(
    server: EmbeddedServer, sql: tuple[str, sa.Engine, sa.Table]
) -> None:
    """A server at ``maxmemory`` under ``noeviction`` refuses the fill's ``SET ... NX GET``
    with OOM: the write script passes that error on (only WRONGTYPE, a key of another
    type, gives way to the row), so the rows are answered from SQL, the failed write is
    counted as a fill error, and nothing of it is in Redis."""
    url, _, _ = sql
    client = redis.Redis.from_url(server.url)
    fc = make_cache([_view()], server.url, url, "oom")
    try:
        assert fc.get_features([1], NAMES).status(1, "clicks") is Status.FILLED  # epoch made
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
        result = fc.get_features([2, 3], NAMES)
        assert [result.status(e, "clicks") for e in (2, 3)] == [Status.FILLED] * 2
        assert [result[e]["clicks"] for e in (2, 3)] == [20, 30]
        client.config_set("maxmemory", "0")
        assert client.mget([fc.layout.row_key("rfeat", e) for e in (2, 3)]) == [None, None]
        assert fc.stats()["rfeat"]["fill_errors"] == 1
        assert fc.get_features([2], NAMES).status(2, "clicks") is Status.FILLED  # now lands
        assert client.get(fc.layout.row_key("rfeat", 2)) is not None
    finally:
        fc.close()
        client.close()
