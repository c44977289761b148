"""What the docs promise while a server is down, checked with the server really down.

* ``invalidate`` with Redis down raises ``CacheUnavailable`` from the method and the function,
  and the CLI prints an error and no report (docs/consistency.md: "If Redis cannot be reached,
  ``invalidate`` raises ``CacheUnavailable``"); a server SIGKILLed part-way through a 200k-id
  invalidation is an error too, never a report of work done, and the retry after its restart
  completes ("retry until it succeeds").
* While SQL is down, an invalidated row (tombstone) and a row of an old epoch are never served
  ``STALE``, even where their age is within ``stale_if_error`` (docs/consistency.md, "The
  three kinds of row value"); a failed view's leases are released at once.
* A ``SchemaError`` is never answered with stale values (docs/errors.md, "When a server is
  down").

Redis is a private server each test starts and kills; SQL goes down through ``sqloutage``
(a role locked out of PostgreSQL, a SQLite file moved away).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featdata import T0, Clock, insert, make_cache, make_table, make_view
from servers import SqlTarget
from sqloutage import SqlOutage, sql_outage
from wire import hooked_client, is_command

import featcache
from featcache import (
    CacheConfig,
    CacheUnavailable,
    Feature,
    FeatureCache,
    FeatureView,
    OfflineStoreUnavailable,
    SchemaError,
    Status,
)
from featcache.embedded import EmbeddedServer

#: run again on the async client by .ci/run (FEATCACHE_TEST_CLIENT=async, tests/asyncdriven.py)
pytestmark = pytest.mark.client

FEATURES = (Feature("clicks", "int", "1m"),)
WAIT_S = 60.0  # bound on every wait: nothing here runs forever
#: past max_age (1 min), within max_age + stale_if_error (6 min): STALE-able if SQL fails
STALE_AGE_S = 120.0
PASSWORD = "s3cr3t-pw-42"


def _rows(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [{"entity_id": e, "event_ts": T0, "updated_at": T0, "clicks": e * 10} for e in ids]


def _view(name: str, table: str, schema: str | None, features: Any = FEATURES) -> FeatureView:
    return make_view(name, table, schema, features, stale_if_error="5m")


def _statuses(result: Any, feature: str = "clicks") -> dict[Any, Status]:
    return {e: result.status(e, feature) for e in result}


# =========================================================================== Redis down


@pytest.fixture
def dead_redis() -> Iterator[EmbeddedServer]:
    """A password-protected private server, started and then SIGKILLed by the test."""
    server = EmbeddedServer(extra_args=("--requirepass", PASSWORD)).start()
    try:
        yield server
    finally:
        server.stop()


def _url(server: EmbeddedServer) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.fixture
def hook_config(sqlite_target: SqlTarget, dead_redis: EmbeddedServer, key_prefix: str,
                tmp_path: Path) -> Path:
    table = make_table(sqlite_target.engine(), None, "hooked", FEATURES)
    insert(sqlite_target.engine(), table, _rows(range(1, 4)))
    path = tmp_path / "featcache.yaml"
    path.write_text(
        f"redis: {{url: '{_url(dead_redis)}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "views:\n  hooked:\n    table: hooked\n    entity: {column: entity_id, type: int}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1m\n"
    )
    return path


@pytest.mark.parametrize("ids", [[1, 2], None], ids=["ids", "whole-view"])
def test_the_invalidate_method_raises_cache_unavailable_with_redis_down(
    hook_config: Path, dead_redis: EmbeddedServer, ids: list[int] | None
) -> None:
    with FeatureCache.from_config(hook_config) as cache:
        assert _statuses(cache.get_features([1, 2], ["clicks"])) == {
            1: Status.FILLED, 2: Status.FILLED}  # connected and working before the kill
        dead_redis.kill()
        with pytest.raises(CacheUnavailable) as caught:
            cache.invalidate("hooked", ids)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("config_as", ["path", "CacheConfig"])
@pytest.mark.parametrize("ids", [[1, 2], None], ids=["ids", "whole-view"])
def test_the_invalidate_function_raises_cache_unavailable_with_redis_down(
    hook_config: Path, dead_redis: EmbeddedServer, ids: list[int] | None, config_as: str
) -> None:
    dead_redis.kill()
    config: Path | CacheConfig = hook_config
    if config_as == "CacheConfig":
        config = featcache.load_config(hook_config)
    with pytest.raises(CacheUnavailable) as caught:
        featcache.invalidate("hooked", ids, config=config)
    assert PASSWORD not in str(caught.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own, as an ETL runs it: its stdout is the report."""
    return subprocess.run([sys.executable, "-m", "featcache.jobs.cli", *args],
                          capture_output=True, text=True, timeout=WAIT_S, check=False)


@pytest.mark.parametrize("selection", [["--ids", "1,2"], ["--all"]], ids=["ids", "all"])
def test_the_invalidate_cli_reports_an_error_and_no_result_with_redis_down(
    hook_config: Path, dead_redis: EmbeddedServer, selection: list[str]
) -> None:
    """Exit status not 0, nothing on stdout (an ETL keeps that JSON line as its record of
    the invalidation), and the error line names Redis without its password."""
    dead_redis.kill()
    done = _cli("invalidate", "--config", str(hook_config), "--view", "hooked", *selection)
    assert done.returncode != 0
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("featcache: error:") and "Redis" in last, done.stderr
    assert PASSWORD not in done.stderr


def test_the_invalidate_cli_prints_its_report_while_redis_is_up(hook_config: Path) -> None:
    """Control for the test above: the same command with the server up prints the report."""
    done = _cli("invalidate", "--config", str(hook_config), "--view", "hooked", "--ids", "1,2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entities"] == 2


LARGE = 200_000
CHUNK = 1_000  # ids per atomic script call and stream entry (featcache.invalidation)


def test_a_server_killed_part_way_through_a_large_invalidation_is_never_reported_done(
    sqlite_target: SqlTarget, key_prefix: str
) -> None:
    """200k ids are 200 atomic chunks in one pipelined round trip. The server is SIGKILLed
    from another thread once it has applied the first chunks (its stream has grown, seen on
    a connection of the test's own) and before it applied the last: the call raises
    ``CacheUnavailable``, and the retry after the server's restart invalidates everything."""
    make_table(sqlite_target.engine(), None, "big", FEATURES)
    view = _view("big", "big", None)
    server = EmbeddedServer().start()
    restarted: EmbeddedServer | None = None
    watcher = redis.Redis.from_url(server.url, socket_timeout=WAIT_S)
    try:
        with make_cache([view], server.url, sqlite_target.url, key_prefix) as cache:
            stream = cache.layout.stream_key()
            cache.invalidate("big", [0])  # the script is loaded: the large call runs at once
            before = int(watcher.xlen(stream))
            killed_at: list[int] = []

            def kill_once_the_first_chunks_landed() -> None:
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    entries = int(watcher.xlen(stream))
                    if entries > before:
                        server.kill()
                        killed_at.append(entries - before)
                        return

            killer = threading.Thread(target=kill_once_the_first_chunks_landed, daemon=True)
            killer.start()
            with pytest.raises(CacheUnavailable) as caught:
                report = cache.invalidate("big", range(LARGE))
                pytest.fail(f"reported done: {report.entities} entities, "
                            f"{len(report.stream_ids)} entries; killed after {killed_at}")
            killer.join(WAIT_S)
            assert killed_at, "the server was never killed"
            # killed part-way: some chunks applied, not all
            assert 0 < killed_at[0] < LARGE // CHUNK, killed_at
            assert isinstance(caught.value.__cause__, redis.ConnectionError)

            # "retry until it succeeds": the same cache, once the server is back
            restarted = EmbeddedServer(port=server.port).start()
            report = cache.invalidate("big", range(LARGE))
            assert (report.entities, len(report.stream_ids)) == (LARGE, LARGE // CHUNK)
        client = redis.Redis.from_url(restarted.url)
        try:
            first, last = f"{key_prefix}:big:0", f"{key_prefix}:big:{LARGE - 1}"
            assert client.exists(first, last) == 2
            assert client.xlen(stream) == LARGE // CHUNK
        finally:
            client.close()
    finally:
        watcher.close()
        if restarted is not None:
            restarted.stop()
        server.stop()


# =========================================================================== SQL down


@pytest.fixture
def outage(sql_target: SqlTarget) -> Iterator[SqlOutage]:
    with sql_outage(sql_target) as outage:
        yield outage


def _two_views(target: SqlTarget) -> tuple[FeatureView, FeatureView]:
    engine = target.engine()
    for table in ("by_ids", "whole"):
        insert(engine, make_table(engine, target.schema, table, FEATURES), _rows([1, 2, 3]))
    return _view("by_ids", "by_ids", target.schema), _view("whole", "whole", target.schema)


@pytest.mark.parametrize("on_sql_error", ["raise", "mark"])
@pytest.mark.parametrize("sql_target", ["sqlite", "postgresql"], indirect=True)
def test_invalidated_and_old_epoch_rows_are_never_served_stale_while_sql_is_down(
    sql_target: SqlTarget, outage: SqlOutage, redis_url: str, key_prefix: str,
    on_sql_error: str,
) -> None:
    """Rows 2 minutes old (STALE-able): row 1 of ``by_ids`` invalidated by id (a tombstone),
    every row of ``whole`` by a whole-view invalidation (an old epoch). With SQL down, row 2
    of ``by_ids`` is STALE (the control: stale serving works), and the invalidated rows are
    UNAVAILABLE (``mark``) or make the call raise (``raise``): never STALE."""
    clock = Clock()
    by_ids, whole = _two_views(sql_target)
    with make_cache([by_ids, whole], redis_url, outage.url, key_prefix, clock,
                    on_sql_error=on_sql_error) as cache:
        first = cache.get_features([1, 2, 3], ["by_ids:clicks", "whole:clicks"])
        assert set(first.status_counts()) == {Status.FILLED}
        clock.advance(STALE_AGE_S)
        cache.invalidate("by_ids", [1])
        cache.invalidate("whole")
        outage.down(cache)
        assert outage.is_down()

        control = cache.get_features([2], ["by_ids:clicks"])
        assert (control.status(2, "by_ids:clicks"), control[2]["by_ids:clicks"]) == (
            Status.STALE, 20)
        if on_sql_error == "raise":
            with pytest.raises(OfflineStoreUnavailable):
                cache.get_features([1], ["by_ids:clicks"])
            with pytest.raises(OfflineStoreUnavailable):
                cache.get_features([1, 2, 3], ["whole:clicks"])
        else:
            tombstoned = cache.get_features([1, 2], ["by_ids:clicks"])
            assert _statuses(tombstoned, "by_ids:clicks") == {
                1: Status.UNAVAILABLE, 2: Status.STALE}
            assert tombstoned[1]["by_ids:clicks"] is None
            old_epoch = cache.get_features([1, 2, 3], ["whole:clicks"])
            assert _statuses(old_epoch, "whole:clicks") == {
                e: Status.UNAVAILABLE for e in (1, 2, 3)}
        stats = cache.stats()
        assert stats["by_ids"]["stale_served"] == (1 if on_sql_error == "raise" else 2)
        assert stats["whole"]["stale_served"] == 0

        outage.up()
        again = cache.get_features([1, 2, 3], ["by_ids:clicks", "whole:clicks"])
        assert set(again.status_counts()) == {Status.FILLED}


class _LeaseWatch:
    """Notes, through wire hooks on the cache's real client, every lease round trip's reply
    (``featcache.leases``: a list of flags, 1 for a lease won, then the server's TIME) and
    whether the lease key existed in Redis right after it."""

    def __init__(self, client: redis.Redis, lease_key: str) -> None:
        self.won: list[bool] = []
        self._client = client
        self._key = lease_key

    def after_reply(self, packed: Sequence[bytes], reply: Any) -> None:
        if packed and is_command(packed[0], "EVALSHA") and isinstance(reply, list):
            self.won.append(reply[0] == 1 and self._client.exists(self._key) == 1)


@pytest.mark.parametrize("on_sql_error", ["raise", "mark"])
@pytest.mark.parametrize("sql_target", ["sqlite", "postgresql"], indirect=True)
def test_a_failed_views_leases_are_released_at_once(
    sql_target: SqlTarget, outage: SqlOutage, redis_url: str, key_prefix: str,
    redis_client: redis.Redis, on_sql_error: str,
) -> None:
    """docs/consistency.md: "a failed view's leases are released (by the call's write round
    trip, or at once when the call raises)". With ``lease_ttl`` 60 s, a lease left behind
    would make every other reader of the row wait ``lease_wait`` for a fill that never
    comes."""
    by_ids, _ = _two_views(sql_target)
    lease_key = f"{key_prefix}:~by_ids:lease:3"
    client, hooks = hooked_client(redis_url)
    watch = _LeaseWatch(redis_client, lease_key)
    try:
        with make_cache([by_ids], redis_url, outage.url, key_prefix, redis_client=client,
                        lease_ttl=60.0, lease_wait=0.5, on_sql_error=on_sql_error) as cache:
            assert cache.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
            outage.down(cache)
            hooks.after_reply = watch.after_reply
            if on_sql_error == "raise":
                with pytest.raises(OfflineStoreUnavailable):
                    cache.get_features([3], ["clicks"])
            else:
                result = cache.get_features([3], ["clicks"])
                assert result.status(3, "clicks") is Status.UNAVAILABLE
            hooks.after_reply = None
            assert watch.won == [True], "the call never held the row's lease"
            assert redis_client.exists(lease_key) == 0, (
                f"lease left for {redis_client.pttl(lease_key)} ms")
            # the next reader finds no lease to wait on
            outage.up()
            assert cache.get_features([3], ["clicks"]).status(3, "clicks") is Status.FILLED
            stats = cache.stats()["by_ids"]
            assert (stats["lease_waits"], stats["lease_timeouts"]) == (0, 0)
    finally:
        client.close()


# =========================================================================== SchemaError


def _after_feature_query(engine: sa.Engine, action: Any) -> Any:
    """Run ``action`` after each feature query featcache sends; returns the remover."""

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "fc_latest" in statement:
            action()

    sa.event.listen(engine, "after_cursor_execute", hook)
    return lambda: sa.event.remove(engine, "after_cursor_execute", hook)


@pytest.mark.parametrize("on_sql_error", ["raise", "mark"])
def test_a_sql_value_not_of_its_declared_type_raises_schema_error_not_stale(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, redis_client: redis.Redis,
    on_sql_error: str,
) -> None:
    """Row 1 is cached and 2 minutes old (STALE-able); SQL now holds text in its int column
    (SQLite stores what it is given). The call raises ``SchemaError``: the value was read and
    does not fit, which is a configuration problem, not an outage, so it is not covered by
    ``stale_if_error``; the cached row stays as it was and the lease the call held for the row
    is gone when the call returns."""
    clock = Clock()
    engine = sqlite_target.engine()
    table = make_table(engine, None, "typed", FEATURES)
    insert(engine, table, _rows([1]))
    view = _view("typed", "typed", None)
    key, lease_key = f"{key_prefix}:typed:1", f"{key_prefix}:~typed:lease:1"
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    lease_ttl=60.0, on_sql_error=on_sql_error) as cache:
        assert cache.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        cached = redis_client.get(key)
        clock.advance(STALE_AGE_S)
        with engine.begin() as conn:
            conn.execute(table.update().values(clicks="x"))
        leases_during_read: list[int] = []
        remove = _after_feature_query(
            cache.engine, lambda: leases_during_read.append(redis_client.exists(lease_key)))
        try:
            with pytest.raises(SchemaError) as caught:
                result = cache.get_features([1], ["clicks"])
                pytest.fail(f"answered {result.status(1, 'clicks')}: {result[1]}")
        finally:
            remove()
        assert caught.value.path == "views.typed.features.clicks.type"
        assert leases_during_read == [1], "the SQL read ran without the row's lease"
        assert redis_client.exists(lease_key) == 0, "the lease outlived the failed call"
        assert redis_client.get(key) == cached
        assert cache.stats()["typed"]["stale_served"] == 0


@pytest.mark.parametrize("on_sql_error", ["raise", "mark"])
@pytest.mark.parametrize("sql_target", ["sqlite", "postgresql"], indirect=True)
def test_a_missing_column_raises_schema_error_even_with_a_stale_row_cached(
    sql_target: SqlTarget, redis_url: str, key_prefix: str, on_sql_error: str
) -> None:
    """A process deployed with a config naming a column the table lacks (the same features,
    so the rows in Redis decode for it) raises ``SchemaError`` for a row within
    ``stale_if_error``: it is not served ``STALE`` as during an outage."""
    clock = Clock()
    engine = sql_target.engine()
    insert(engine, make_table(engine, sql_target.schema, "cols", FEATURES), _rows([1]))
    good = _view("cols", "cols", sql_target.schema)
    typo = _view("cols", "cols", sql_target.schema,
                 (Feature("clicks", "int", "1m", column="clicks_v2"),))
    with make_cache([good], redis_url, sql_target.url, key_prefix, clock) as before:
        assert before.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
    clock.advance(STALE_AGE_S)
    with make_cache([typo], redis_url, sql_target.url, key_prefix, clock,
                    on_sql_error=on_sql_error) as deployed:
        with pytest.raises(SchemaError) as caught:
            result = deployed.get_features([1], ["clicks"])
            pytest.fail(f"answered {result.status(1, 'clicks')}: {result[1]}")
        assert caught.value.path == "views.cols.features.clicks"
