"""Edges of invalidation, the stream tail and the L1: ids given as one string, a cache with an
L1 built while Redis is down, ids files that are not plain UTF-8, the L1 age of a row another
thread read; each test but the stress test failed before its fix (the 2026-11-27 review)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs import cli
from featcache.jobs.hook import run_invalidate
from featdata import (
    STATS_FEATURES,
    Clock,
    insert,
    make_cache,
    make_table,
    make_view,
    stats_row,
    until,
)

from featcache import CacheUnavailable, Feature, FeatureCache, InvalidRequest, Status
from featcache.subscriber import parse_id


def _wal(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def _applied(cache: FeatureCache, stream_id: str) -> bool:
    return parse_id(cache.subscriber_stats()["last_id"]) >= parse_id(stream_id)


def test_stress_no_old_value_after_the_tail_applied_the_entry(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    _wal(engine)
    table = make_table(engine, None, "st", STATS_FEATURES)
    insert(engine, table, [stats_row(1, clicks=0)])
    view = make_view("st", "st", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, l1_policy="tinylfu",
                    l1_max_ttl=60.0, xfetch_beta=0) as serving, \
            make_cache([view], redis_url, sqlite_target.url, key_prefix) as etl:
        floor = [0]  # the value committed and applied by the tail
        bad: list[tuple[int, int]] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                low = floor[0]
                got = serving.get_features([1], ["clicks"])[1]["clicks"]
                if got < low:
                    bad.append((low, got))

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for k in range(1, 150):
                with engine.begin() as conn:
                    conn.execute(table.update().where(table.c.entity_id == 1)
                                 .values(clicks=k))
                report = etl.invalidate("st", [1] if k % 2 else None)
                until(lambda r=report: _applied(serving, r.stream_ids[-1]), "the tail")
                floor[0] = k
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not bad, bad[:5]


# --------------------------------------------------------------------------------------------
# invalidate(view, <a single str or bytes>)
# --------------------------------------------------------------------------------------------


def test_invalidating_one_str_id_passed_as_a_bare_string_is_refused_and_fences_nothing(
    sqlite_target: Any, redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    """A bare string for entity_ids is refused as get_features refuses it ("wrap it"); it was
    iterated, fencing one key per character and leaving the real id cached as fresh."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "skus", STATS_FEATURES, entity_type="str")
    insert(engine, table, [stats_row("abc", clicks=1)])
    view = make_view("skus", "skus", None, entity_type="str")
    with make_cache([view], redis_url, sqlite_target.url, key_prefix) as cache:
        assert cache.get_features(["abc"], ["clicks"]).status("abc", "clicks") is Status.FILLED
        with engine.begin() as conn:
            conn.execute(table.update().values(clicks=2))
        with pytest.raises(InvalidRequest, match=r"write \['abc'\]"):
            cache.invalidate("skus", "abc")
        # refused before any I/O: no character fenced, the row still cached as it was
        assert redis_client.exists(*(f"{key_prefix}:skus:{c}" for c in "abc")) == 0
        assert not redis_client.exists(cache.layout.stream_key())
        assert cache.get_features(["abc"], ["clicks"]).status("abc", "clicks") \
            is Status.HIT_REDIS
        # the call the message asks for invalidates the id
        assert cache.invalidate("skus", ["abc"]).ids == ("abc",)
        after = cache.get_features(["abc"], ["clicks"])
        assert (after.status("abc", "clicks"), after["abc"]["clicks"]) == (Status.FILLED, 2)


def test_invalidating_int_ids_passed_as_bytes_is_rejected(
    sqlite_target: Any, redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    """b"12" is refused; it was iterated as the ints 49 and 50, fenced silently."""
    make_table(sqlite_target.engine(), None, "ub", STATS_FEATURES)
    view = make_view("ub", "ub", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix) as cache:
        with pytest.raises(InvalidRequest, match="must be a list of ids, not the bytes"):
            cache.invalidate("ub", b"12")
        assert redis_client.exists(f"{key_prefix}:ub:49", f"{key_prefix}:ub:50") == 0


# --------------------------------------------------------------------------------------------
# FeatureCache with an L1 while Redis is unreachable at construction
# --------------------------------------------------------------------------------------------


def test_an_l1_cache_built_while_redis_is_unreachable_raises_as_documented(
    sqlite_target: Any
) -> None:
    """docs/consistency.md: 'with l1.policy set, FeatureCache(...) raises CacheUnavailable
    when Redis cannot be reached at that moment'. It used to log a warning and run without
    the L1 for the cache's whole life."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    make_table(sqlite_target.engine(), None, "down", STATS_FEATURES)
    view = make_view("down", "down", None)
    with pytest.raises(CacheUnavailable):
        cache = make_cache([view], f"redis://127.0.0.1:{port}/0", sqlite_target.url,
                           "fct-review-down", l1_policy="lru", redis_connect_timeout=0.5)
        try:
            pytest.fail(f"built without raising; l1={cache.l1!r}")
        finally:
            cache.close()


# --------------------------------------------------------------------------------------------
# The CLI hook's ids file
# --------------------------------------------------------------------------------------------


def _str_view_config(tmp_path: Any, sqlite_target: Any, redis_url: str, key_prefix: str) -> Any:
    table = make_table(sqlite_target.engine(), None, "skuh", STATS_FEATURES, entity_type="str")
    insert(sqlite_target.engine(), table, [stats_row("abc", clicks=1), stats_row("xyz")])
    path = tmp_path / "featcache.yaml"
    path.write_text(
        f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "views:\n  skuh:\n    table: skuh\n    entity: {column: entity_id, type: str}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1h\n"
    )
    return path


def test_an_ids_file_with_a_utf8_bom_invalidates_its_first_id(
    tmp_path: Any, sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """Windows tools (Notepad, PowerShell 5 `Out-File -Encoding utf8`) start UTF-8 files with
    a BOM; it is not part of the first id. Read as plain 'utf-8', the first id of a str view
    was '\\ufeffabc': that key was fenced, 'abc' stayed cached, and the CLI reported success."""
    config = _str_view_config(tmp_path, sqlite_target, redis_url, key_prefix)
    with FeatureCache.from_config(config) as cache:
        assert cache.get_features(["abc", "xyz"], ["clicks"]).status("abc", "clicks") \
            is Status.FILLED
    ids_file = tmp_path / "ids.txt"
    ids_file.write_bytes("\ufeffabc\r\nxyz\r\n".encode())
    with open(tmp_path / "out.json", "w") as out:
        report = run_invalidate(str(config), "skuh", None, str(ids_file), False, out=out)
    with FeatureCache.from_config(config) as cache:
        after = cache.get_features(["abc", "xyz"], ["clicks"])
        statuses = [after.status(e, "clicks") for e in ("abc", "xyz")]
    assert statuses == [Status.FILLED, Status.FILLED], (report.ids, statuses)


def test_an_ids_file_that_is_not_utf8_is_one_error_line_and_exit_65(
    tmp_path: Any, sqlite_target: Any, redis_url: str, key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs: any error reading the ids is one 'featcache: error: ...' line and exit status 65.
    A Latin-1 or UTF-16 file is such an error (its UnicodeDecodeError used to escape main()
    as a traceback)."""
    config = _str_view_config(tmp_path, sqlite_target, redis_url, key_prefix)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_bytes("caf\xe9\n".encode("latin-1"))
    try:
        code = cli.main(["invalidate", "--config", str(config), "--view", "skuh",
                         "--ids-file", str(ids_file)])
    except UnicodeDecodeError as exc:
        pytest.fail(f"escaped main(): {exc!r}")
    assert code == 65
    assert "featcache: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A row another thread read from SQL is stored in L1 as if this call had read it
# --------------------------------------------------------------------------------------------


def test_a_joined_sql_read_is_not_made_younger_in_l1(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """Thread A leads the SQL read of row 1 at T0. While it is in SQL, thread B asks for the
    same row at T0 + 1.5 s and joins A's read (single-flight). B's L1 entry must be as old as
    A's SQL read; it was stamped with B's own start, 1.5 s younger, so with max_age 2 s the
    row, 3 s old at T0 + 3 s (Redis, stamped T0 by A's fill, calls it stale), was served as
    HIT_L1 until T0 + 3.5 s.

    (A's own L1 store, which carries the right loaded_at, is kept out of the way by an
    unrelated invalidation in the same view after A's token: only B's entry lands.)"""
    engine = sqlite_target.engine()
    _wal(engine)
    feats = (Feature("clicks", "int", "2s"),)
    table = make_table(engine, None, "jn", feats)
    insert(engine, table, [{"entity_id": 1, "event_ts": None, "updated_at": None,
                            "clicks": 7}])
    view = make_view("jn", "jn", None, features=feats)
    clock = Clock()
    t0 = clock.now
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    l1_policy="lru", l1_max_ttl=5.0, xfetch_beta=0) as cache:
        got: dict[str, Any] = {}
        joiner = threading.Thread(
            target=lambda: got.update(b=cache.get_features([1], ["clicks"])))
        fired: list[bool] = []

        def during_a_sql_read(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "fc_latest" not in statement or fired:
                return
            fired.append(True)
            report = cache.invalidate("jn", [999])  # another entity of the view
            until(lambda: _applied(cache, report.stream_ids[-1]), "the tail")
            clock.advance(1.5)
            joiner.start()
            # B reads Redis (nothing yet) and waits on A's flight
            until(lambda: cache._read._flights.joined == 1, "B to join A's SQL read")

        sa.event.listen(cache.engine, "after_cursor_execute", during_a_sql_read)
        try:
            a = cache.get_features([1], ["clicks"])
        finally:
            sa.event.remove(cache.engine, "after_cursor_execute", during_a_sql_read)
        joiner.join(30)
        assert a.status(1, "clicks") is Status.FILLED
        assert got["b"].status(1, "clicks") is Status.FILLED
        assert cache.stats()["jn"]["singleflight_joined"] == 1
        clock.now = t0 + 3.0  # the value was read from SQL 3 s ago; max_age is 2 s
        late = cache.get_features([1], ["clicks"])
        assert late.status(1, "clicks") is not Status.HIT_L1, "a 3 s old row served as fresh"
