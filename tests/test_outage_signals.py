"""An outage shows: counted in stats on calls that raise, logged once per change of state.

SQL failing with a cold cache (``on_sql_error: raise``) and the SQL limit refusing reads used to
leave ``sql_errors``/``sql_rejected`` untouched and the log silent; a down Redis logged one
WARNING per call. Real servers: a SQLite file moved away (or locked), an embedded Valkey
SIGKILLed and restarted on its port.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from featdata import (
    STATS_FEATURES,
    SqlCounter,
    insert,
    make_cache,
    make_table,
    make_view,
    stats_row,
)
from test_faults import _Sqlite

from featcache import OfflineStoreError, OfflineStoreUnavailable, Status
from featcache.embedded import EmbeddedServer
from featcache.outage import OutageLog

VIEW = "sig"


@pytest.fixture
def sql_file(tmp_path: Path) -> _Sqlite:
    store = _Sqlite(tmp_path / "signals.db")
    engine = sa.create_engine(store.url, poolclass=sa.NullPool)
    table = make_table(engine, None, VIEW, STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in range(1, 21)])
    engine.dispose()
    return store


def _view() -> Any:
    return make_view(VIEW, VIEW, None)


def _records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith("featcache") and text in r.getMessage()]


def test_a_raising_sql_outage_is_counted_and_logged_once(
    sql_file: _Sqlite, redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="featcache")
    with make_cache([_view()], redis_url, sql_file.url, key_prefix) as fc:
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        sql_file.halt([fc])
        try:
            for i in range(5):
                with pytest.raises(OfflineStoreUnavailable):
                    fc.get_features([100 + i], ["clicks"])
            assert fc.stats()[VIEW]["sql_errors"] == 5  # one per failed call of the view
            down = _records(caplog, logging.WARNING, "offline store")
            assert len(down) == 1, down
            assert "raising for 1 rows" in down[0]
        finally:
            sql_file.resume()
        assert fc.get_features([2], ["clicks"]).status(2, "clicks") is Status.FILLED
        back = _records(caplog, logging.INFO, "available again")
        assert len(back) == 1 and "5 failed calls" in back[0], back


def test_reads_refused_by_the_sql_limit_are_counted_when_the_call_raises(
    sql_file: _Sqlite, redis_url: str, key_prefix: str
) -> None:
    """One SQL slot, held by a read blocked on a locked database file: the next call's rows
    are refused after sql_queue_timeout, and the refusal and the error are counted."""
    path = sql_file.url.removeprefix("sqlite:///")
    with make_cache([_view()], redis_url, sql_file.url, key_prefix, sql_concurrency=1,
                    sql_queue_timeout=0.05) as fc:
        fc.get_features([1], ["clicks"])  # reflects the table before the lock is taken
        queries = SqlCounter(fc.engine)
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        holder_error: list[BaseException] = []

        def holder() -> None:
            try:
                fc.get_features([2], ["clicks"])
            except OfflineStoreError as exc:  # the lock outlived SQLite's busy timeout
                holder_error.append(exc)

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while queries.count == 0:  # the holder is in its query: it has the one slot
                assert time.monotonic() < deadline, "the first read never reached SQL"
                time.sleep(0.005)
            with pytest.raises(OfflineStoreUnavailable, match="sql_concurrency"):
                fc.get_features([3, 4, 5], ["clicks"])
        finally:
            lock.execute("ROLLBACK")
            lock.close()
            thread.join(30)
            queries.close()
        assert not holder_error
        stats = fc.stats()[VIEW]
        assert stats["sql_rejected"] == 3
        assert stats["sql_errors"] == 1


def test_a_redis_outage_under_load_is_logged_once_then_once_back(
    sql_file: _Sqlite, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="featcache")
    server = EmbeddedServer().start()
    restarted: EmbeddedServer | None = None
    try:
        with make_cache([_view()], server.url, sql_file.url, key_prefix,
                        redis_socket_timeout=0.2, redis_connect_timeout=0.2,
                        breaker_open_for=0.2) as fc:
            fc.get_features(range(1, 21), ["clicks"])
            server.kill()
            errors: list[BaseException] = []

            def load(seed: int) -> None:
                try:
                    for i in range(50):
                        ids = [1 + (seed * 7 + i) % 20]
                        assert fc.get_features(ids, ["clicks"]).status(ids[0], "clicks") in (
                            Status.FILLED, Status.HIT_REDIS)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=load, args=(s,)) for s in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            assert fc.stats()[VIEW]["redis_errors"] >= 200  # every call of the load failed...
            down = _records(caplog, logging.WARNING, "Redis")
            assert len(down) == 1, down  # ...and one line said so
            restarted = EmbeddedServer(port=server.port).start()
            deadline = time.monotonic() + 10
            while not _records(caplog, logging.INFO, "available again"):
                assert time.monotonic() < deadline, "Redis never reported back"
                fc.get_features([1], ["clicks"])
                time.sleep(0.05)
            back = _records(caplog, logging.INFO, "available again")
            assert len(back) == 1 and back[0].startswith("Redis redis://127.0.0.1:"), back
    finally:
        if restarted is not None:
            restarted.stop()
        server.stop()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_outage_log_reports_start_summaries_and_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="featcache.test")
    clock = _Clock()
    outage = OutageLog(logging.getLogger("featcache.test"), "Redis r", every=30, clock=clock)
    outage.ok()  # healthy: nothing to say
    for _ in range(100):
        outage.failed("answering from SQL", "refused")
        clock.now += 0.25  # 25 s of failures: the first line only
    assert [r.getMessage() for r in caplog.records] == [
        "Redis r unavailable, answering from SQL: refused"]
    clock.now += 10
    outage.failed("answering from SQL", "timeout")
    assert caplog.records[-1].getMessage() == (
        "Redis r still unavailable after 35 s (100 more failures since the last report), "
        "answering from SQL: timeout")
    outage.failed("answering from SQL", "timeout")  # within 30 s of that line: quiet
    clock.now += 5
    outage.ok()
    outage.ok()
    assert [r.getMessage() for r in caplog.records][2:] == [
        "Redis r available again after 40.0 s (102 failed calls)"]
    assert not outage.down
