"""Races and edge inputs of the read and write paths: threads that share one SQL read (each
still gets what its own call asks for), lease release, duplicate rows, pandas inputs, the
latest-row tie-break; each test failed before its fix (the 2026-11-27 review)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd
import pytest
import redis
import sqlalchemy as sa
from featdata import (
    T0,
    Clock,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
)
from wire import hooked_client, is_command

from featcache import FeatcacheError, Feature, FeatureCache, InvalidRequest, Status
from featcache.singleflight import SingleFlight

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

# one view, two features of very different max_age: calls asking for either share rows
FAST_SLOW = (
    Feature("fast", "float", "5s"),
    Feature("slow", "int", "1h"),
)


def fs_row(entity_id: int, ts: dt.datetime = T0, fast: float = 0.5, slow: int = 7
           ) -> dict[str, Any]:
    return {"entity_id": entity_id, "event_ts": ts, "updated_at": ts, "fast": fast, "slow": slow}


@pytest.fixture
def fs_table(sqlite_target: Any) -> sa.Table:
    table = make_table(sqlite_target.engine(), None, "t", FAST_SLOW)
    insert(sqlite_target.engine(), table, [fs_row(i) for i in range(1, 4)])
    return table


def _run(fn: Any, out: dict[str, Any], name: str) -> threading.Thread:
    def target() -> None:
        try:
            out[name] = fn()
        except BaseException as exc:
            out[name] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _hold_lease(client: redis.Redis, prefix: str, view: str, eid: Any, ms: int = 10_000) -> str:
    key = key_layout(prefix).lease_keys(view, [eid])[0]
    assert client.set(key, "another-process", px=ms, nx=True)
    return key


def _wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.001)


def _flights(fc: FeatureCache) -> SingleFlight[Any, Any]:
    """The cache's single-flight table, read here to see which calls are inside a SQL fetch
    (``in_flight``: keys being fetched) or waiting on another call's (``joined``)."""
    flights: SingleFlight[Any, Any] = fc._read._flights
    return flights


# --------------------------------------------------------------------------- single-flight joins


def _while_another_process_fills(
    fc: FeatureCache, a_names: list[str], b_names: list[str], fill: Callable[[], bool],
    release: Callable[[], object],
) -> dict[str, Any]:
    """Thread A asks for ``a_names`` of row 1 (another process holds its lease, so A leads the
    shared fetch and waits), thread B for ``b_names`` once A's fetch is in flight; once B is
    in a fetch too (its own, or A's joined), that process's fill lands and its lease goes.
    The calls' results (or exceptions) under "a" and "b"."""
    flights = _flights(fc)
    out: dict[str, Any] = {}
    a = _run(lambda: fc.get_features([1], a_names), out, "a")
    _wait_for(lambda: flights.in_flight == 1, what="A's fetch")
    b = _run(lambda: fc.get_features([1], b_names), out, "b")
    _wait_for(lambda: flights.in_flight == 2 or flights.joined == 1, what="B's fetch")
    assert fill()
    release()
    a.join(10)
    b.join(10)
    return out


def test_a_joiner_never_gets_a_row_older_than_its_own_max_age(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """Thread A asks for `slow` (1 h), thread B for `fast` (5 s), same row. A leads the shared
    fetch and waits on another process's lease; that process's fill lands stamped 10 s ago
    (fenced rows are stamped when their fence was taken). B must not get it as fresh; when B
    could join A, A judged the row by its own max_age and B answered HIT_REDIS with a value
    10 s old for a 5 s feature."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=0, lease_wait=3.0) as fc, \
            make_cache([view], redis_url, sqlite_target.url, key_prefix, clock) as other:
        fence = other.fence("t", [1])  # the other process: fence, then a slow SQL read
        clock.advance(10)
        lease = _hold_lease(redis_client, key_prefix, "t", 1)
        out = _while_another_process_fills(
            fc, ["slow"], ["fast"],
            lambda: other.put_rows("t", [fs_row(1)], fence=fence).written == 1,
            lambda: redis_client.delete(lease))
        assert not isinstance(out["a"], BaseException), out["a"]
        assert not isinstance(out["b"], BaseException), out["b"]
        assert out["a"].status(1, "slow") is Status.HIT_REDIS  # the other process's fill
        # the row B got was loaded 10 s before B's call; `fast` has max_age 5 s
        assert out["b"].status(1, "fast") is not Status.HIT_REDIS, (
            "a row 10 s old was served as fresh for a feature with max_age 5 s"
        )


def test_a_miss_never_joins_an_early_refresh(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A asks for `slow` of rows 1 and 2: row 1 is exactly at its 1 h expiry (XFetch always
    picks it for an early refresh), row 2 is missing; another process holds both leases, so A
    keeps row 1 (_KEEP) and waits for row 2. B asks for `fast` of row 1, which for B is a plain
    miss with the same Redis bytes and epoch. B must read the row itself; when B could join
    A's flight it received A's _KEEP, which only the caller holding the early value can use,
    and a KeyError escaped to B."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=1.0, lease_wait=1.5) as fc:
        assert fc.put_rows("t", [fs_row(1)]).written == 1  # loaded_at = now
        clock.advance(3600)  # exactly slow's max_age: fresh, and certain to refresh early
        _hold_lease(redis_client, key_prefix, "t", 1)
        _hold_lease(redis_client, key_prefix, "t", 2)
        flights = _flights(fc)
        out: dict[str, Any] = {}
        a = _run(lambda: fc.get_features([1, 2], ["slow"]), out, "a")
        _wait_for(lambda: flights.in_flight == 2, what="A's fetch of rows 1 and 2")
        b = _run(lambda: fc.get_features([1], ["fast"]), out, "b")
        # B is in a fetch (its own, or A's joined) while A's is still waiting on row 2
        _wait_for(lambda: flights.in_flight == 3 or flights.joined == 1, what="B's fetch")
        a.join(10)
        b.join(10)
        assert not isinstance(out["a"], BaseException), repr(out["a"])
        assert not isinstance(out["b"], BaseException), repr(out["b"])
        assert out["b"].status(1, "fast") is Status.FILLED


def test_a_joiner_never_gets_a_row_narrower_than_it_asked(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """The same join, by width: during a rolling deploy a process still on the old schema
    (only `fast`) fills the row. A asks for `fast` (width 1) and accepts it; B asks for
    `slow` (width 2), joined A, and gets a 1-value row as HIT_REDIS: reading it raises
    IndexError in the caller."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    old_view = make_view("t", "t", None, FAST_SLOW[:1])
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=0, lease_wait=3.0) as fc, \
            make_cache([old_view], redis_url, sqlite_target.url, key_prefix, clock) as old:
        fc.fence("t", [1])  # creates the epoch
        lease = _hold_lease(redis_client, key_prefix, "t", 1)
        row = fs_row(1)
        del row["slow"]
        out = _while_another_process_fills(
            fc, ["fast"], ["slow"], lambda: old.put_rows("t", [row]).written == 1,
            lambda: redis_client.delete(lease))
        assert not isinstance(out["b"], BaseException), out["b"]
        assert out["b"][1]["slow"] == 7


def test_control_alone_the_strict_reader_rejects_the_old_row(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """Control for the first test (passes): without the lenient reader B does the right thing,
    rejects the 10 s old row, and, the lease gone with no row fresh enough for it, takes the
    lease over and reads SQL itself."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=0, lease_wait=1.0) as fc, \
            make_cache([view], redis_url, sqlite_target.url, key_prefix, clock) as other:
        fence = other.fence("t", [1])
        clock.advance(10)
        lease = _hold_lease(redis_client, key_prefix, "t", 1)
        out: dict[str, Any] = {}
        b = _run(lambda: fc.get_features([1], ["fast"]), out, "b")
        _wait_for(lambda: _flights(fc).in_flight == 1, what="B's fetch")
        assert other.put_rows("t", [fs_row(1)], fence=fence).written == 1
        redis_client.delete(lease)
        b.join(10)
        assert out["b"].status(1, "fast") is Status.FILLED
        stats = fc.stats()["t"]  # B waited on the lease, and the row that came was too old
        assert (stats["lease_waits"], stats["lease_takeovers"], stats["lease_timeouts"]) == (
            1, 1, 0)


# --------------------------------------------------------------------------- leases


@pytest.mark.one_server
def test_a_fill_releases_only_its_own_leases(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A lease carries a random token, but the fill deletes the lease keys without checking
    it: when our lease expired (lease_ttl) and another process took the row's lease, our fill
    deletes THAT process's lease, and a third process then reads SQL as well."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    theirs = key_layout(key_prefix).lease_keys("t", [1])[0]
    client, hooks = hooked_client(redis_url)
    took: list[list[Any]] = []  # lease round trips' replies: per row 1 (taken) or [holder],
    # then TIME

    def after_reply(packed: Sequence[bytes], reply: Any) -> None:
        if packed and is_command(packed[0], "EVALSHA") and isinstance(reply, list):
            took.append(reply)

    hooks.after_reply = after_reply
    with client, make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                            redis_client=client, xfetch_beta=0, lease_ttl=0.2,
                            lease_wait=1.0) as fc:
        fc.fence("t", [1])  # creates the epoch
        _hold_lease(redis_client, key_prefix, "t", 2)  # keeps our call busy for lease_wait
        out: dict[str, Any] = {}
        a = _run(lambda: fc.get_features([1, 2], ["slow"]), out, "a")
        _wait_for(lambda: bool(took), what="our lease round trip")
        assert took[0][:2] == [1, [b"another-process"]], (
            f"row 1's lease ours, row 2's held: {took[0]}")
        _wait_for(lambda: redis_client.exists(theirs) == 0, what="our lease's expiry")
        assert redis_client.set(theirs, "process-B-token", px=10_000, nx=True)
        assert _flights(fc).in_flight == 2, "our call's fill is not pending any more"
        a.join(10)
        assert not isinstance(out["a"], BaseException), out["a"]
        assert out["a"].status(1, "slow") is Status.FILLED
        assert redis_client.get(theirs) == b"process-B-token", (
            "our fill deleted a lease held by another process"
        )


# --------------------------------------------------------------------------- put_rows


@pytest.mark.parametrize("cold", [True, False], ids=["key-empty", "key-holds-old-row"])
def test_fenced_put_rows_writes_the_newer_of_two_rows_of_one_id(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str, cold: bool,
) -> None:
    """Unfenced, two rows of one id in one batch keep the one with the later event time
    (test_write_path.test_older_row_never_overwrites_newer). Fenced, the FIRST row wins
    whatever its event time: the newer one is reported fenced_off and the cache serves the
    older value as fresh."""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    older, newer = T0, T0 + dt.timedelta(hours=1)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=0) as fc:
        if not cold:  # a row from long ago in Redis, stale for `slow`
            fc.put_rows("t", [fs_row(1, T0 - dt.timedelta(days=1), slow=0)])
            clock.advance(2 * 3600)
        fence = fc.fence("t", [1])
        report = fc.put_rows("t", [fs_row(1, older, slow=1), fs_row(1, newer, slow=2)],
                             fence=fence)
        got = fc.get_features([1], ["slow"])
        assert got.status(1, "slow") is Status.HIT_REDIS
        assert got[1]["slow"] == 2, (
            f"the older row was kept, the newer one dropped ({report})"
        )


STR_INT = (
    Feature("label", "str", "1h"),
    Feature("count", "int", "1h"),
)


@pytest.fixture
def si_cache(sqlite_target: Any, redis_url: str, key_prefix: str) -> Iterator[FeatureCache]:
    make_table(sqlite_target.engine(), None, "si", STR_INT)
    view = make_view("si", "si", None, STR_INT)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, Clock(),
                    xfetch_beta=0) as fc:
        yield fc


@pytest.mark.parametrize("missing", ["label", "count"])
def test_put_rows_dataframe_missing_str_or_int_is_none(
    si_cache: FeatureCache, missing: str
) -> None:
    """pandas spells a missing str (pandas 3 string dtype) or int (the column becomes float64)
    as NaN: it is stored as missing. put_rows used to reject the whole frame ('expected a
    str, got float nan' / 'expected an int, got nan')."""
    rows = [
        {"entity_id": 1, "event_ts": T0, "updated_at": T0, "label": "a", "count": 1},
        {"entity_id": 2, "event_ts": T0, "updated_at": T0, "label": "b", "count": 2},
    ]
    rows[1][missing] = None
    report = si_cache.put_rows("si", pd.DataFrame(rows))
    assert report.written == 2
    got = si_cache.get_features([1, 2], ["label", "count"])
    assert got[2][missing] is None
    assert got.status(2, missing) is Status.HIT_REDIS


@pytest.mark.parametrize("column,value", [("fast", 10**400)], ids=["huge-int"])
def test_put_rows_float_too_large_is_invalid_request(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
    column: str, value: Any,
) -> None:
    """A value that does not fit its declared type is documented to raise InvalidRequest
    naming the row and column (a FeatcacheError), also for an int too large for a float (it
    escaped as a bare OverflowError, which `except FeatcacheError` does not catch)."""
    view = make_view("t", "t", None, FAST_SLOW)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, Clock()) as fc:
        row = fs_row(1)
        row[column] = value
        with pytest.raises(FeatcacheError) as info:
            fc.put_rows("t", [row])
        assert isinstance(info.value, InvalidRequest)


# --------------------------------------------------------------------------- L1 stamps


def test_l1_entry_of_a_joined_read_is_as_old_as_its_sql_read(
    sqlite_target: Any, fs_table: sa.Table, redis_url: str, key_prefix: str,
) -> None:
    """loaded_at is 'when the row was read from SQL (the start of that read, so the age is
    never understated)'. A thread that JOINS another thread's SQL read stamps the row with its
    OWN call start (readpath._apply: vr.loaded[eid] = now_ms), which is later than the read it
    joined. Its L1 entry then lives max_age past its own start: a 5 s feature is answered
    HIT_L1 7.5 s after the SQL read. (The SQL read is made slow by pausing after the query
    ran; an invalidation of another row of the view keeps the leader's own L1 entry out, as
    any invalidation of the view between the two calls' starts does.)"""
    clock = Clock()
    view = make_view("t", "t", None, FAST_SLOW)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    xfetch_beta=0, l1_policy="lru") as fc:
        fc.fence("t", [1])  # creates the epoch
        _wait_for(lambda: fc.subscriber_stats().get("connected"))  # its first reset is done
        in_sql, go_on = threading.Event(), threading.Event()

        def slow_read(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "fc_latest" in statement and not in_sql.is_set():
                in_sql.set()
                go_on.wait(10)

        sa.event.listen(fc.engine, "after_cursor_execute", slow_read)
        try:
            out: dict[str, Any] = {}
            a = _run(lambda: fc.get_features([1], ["fast"]), out, "a")  # SQL read at T
            assert in_sql.wait(10)
            fc.invalidate("t", [99])
            _wait_for(lambda: fc.subscriber_stats().get("entries_applied", 0) >= 1)
            clock.advance(3)  # the read takes 3 s
            b = _run(lambda: fc.get_features([1], ["fast"]), out, "b")  # joins A's read
            _wait_for(lambda: _flights(fc).joined == 1, what="B joining A's read")
            go_on.set()
            a.join(10)
            b.join(10)
        finally:
            sa.event.remove(fc.engine, "after_cursor_execute", slow_read)
        assert out["b"].status(1, "fast") is Status.FILLED
        assert fc.stats()["t"]["singleflight_joined"] == 1
        clock.advance(4.5)  # 7.5 s after the SQL read; `fast` has max_age 5 s
        got = fc.get_features([1], ["fast"])
        assert got.status(1, "fast") is not Status.HIT_L1, (
            "a value read from SQL 7.5 s ago was answered from L1 for a 5 s feature"
        )


# --------------------------------------------------------------------------- offline store


def test_latest_row_tie_on_event_time_prefers_the_dated_correction(
    sql_target: Any, redis_url: str, key_prefix: str,
) -> None:
    """Two rows of one entity with the same event time: the one whose updated_at says it was
    changed later must win (updated_at 'grows when a row changes'). The latest-row query
    orders `updated_at DESC` with no NULL handling (it has one for the event time): on
    PostgreSQL NULLs sort FIRST in DESC order, so a row with a NULL updated_at beats the
    corrected row there, while SQLite/MySQL return the corrected one."""
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "tie", FAST_SLOW)
    insert(engine, table, [
        {**fs_row(1, slow=1), "updated_at": None},          # the original, never stamped
        {**fs_row(1, slow=2), "updated_at": T0 + dt.timedelta(hours=1)},  # its correction
    ])
    view = make_view("tie", "tie", sql_target.schema, FAST_SLOW)
    with make_cache([view], redis_url, sql_target.url, key_prefix, Clock(),
                    xfetch_beta=0) as fc:
        got = fc.get_features([1], ["slow"])
        assert got.status(1, "slow") is Status.FILLED
        assert got[1]["slow"] == 2
