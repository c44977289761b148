"""No stampede (DESIGN section 4) on real servers: one SQL read per cold row, however many ask.

* Across processes: 4 spawned processes x 64 threads ask for one cold row at the same moment;
  single-flight collapses each process's threads, the fill lease collapses the processes, and
  SQL sees exactly one feature query in total.
* Within a process: 64 threads, one SQL query, the other 63 joined it (or read its fill).
* A lease whose holder never fills costs a reader ``lease_wait``, never an answer.
* XFetch: a hot row read 200 times a second is refreshed about once per ``max_age``, early,
  so no reader after the first has to wait on a miss.

The cold row has a long history (``HISTORY_ROWS`` rows for the one entity), so that the SQL
read's window function takes a while (about 0.2-0.35 s on a laptop-class machine, printed with
``-s``) and every request really does arrive while the first fill is in flight; the tests also
check that they did (lease waits, single-flight joins), so a pass cannot come from requests that
merely arrived one after another.

A reader that saw the miss before the first fill landed must not read SQL again once it gets
the lease (the lease script checks the row too): pinned by a deterministic test.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featdata import (
    T0,
    SqlCounter,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
    redis_config,
)
from procs_load import StampedeJob, run_stampede_worker
from wire import hooked_client, is_command

from featcache import (
    CacheConfig,
    Feature,
    FeatureView,
    OfflineStoreConfig,
    StampedeConfig,
    Status,
)
from featcache.codec import RowCodec

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

FEATURES = (Feature("clicks", "int", "1h"), Feature("ctr", "float", "1h"))
NAMES = ["clicks", "ctr"]
VIEW = "hot"
COLD = 7  # the entity every thread asks for
HISTORY_ROWS = 200_000  # rows of COLD's history: the latest one is the answer
N_PROCS = 4
N_THREADS = 64
WAIT_S = 120.0  # bound on every barrier, join and queue wait: nothing here runs forever
#: how long the 64-thread test holds its one fill's SQL read open
FILL_HOLD_S = 1.0
#: each Redis round trip's bound in the 64-thread tests: 64 threads (or coroutines) on a loaded
#: 2-CPU box can hold one past the default 0.5 s, which opens the breaker and skips the fill;
#: these tests are about one SQL read for many readers, tests/test_faults.py about timeouts
SOCKET_TIMEOUT_S = 5.0


def _history_table(target: Any, rows: int) -> tuple[sa.Table, FeatureView]:
    """COLD with ``rows`` versions (clicks = version); the latest has clicks = rows - 1."""
    engine = target.engine()
    table = make_table(engine, target.schema, VIEW, FEATURES)
    insert(engine, table, (
        {"entity_id": COLD, "event_ts": T0 + dt.timedelta(seconds=i), "updated_at": T0,
         "clicks": i, "ctr": i / rows}
        for i in range(rows)
    ))
    return table, make_view(VIEW, VIEW, target.schema, FEATURES)


def _latest(rows: int) -> dict[str, Any]:
    return {"clicks": rows - 1, "ctr": (rows - 1) / rows}


def _fill_ms(client: redis.Redis, prefix: str, view: FeatureView, entity: int) -> int:
    """How long the SQL read behind the cached row took, as featcache recorded it."""
    raw = client.get(key_layout(prefix).row_key(view.name, entity))
    assert isinstance(raw, bytes), "the fill was never written to Redis"
    row = RowCodec(view).decode(raw)
    assert row is not None
    return int(row.fill_ms)


# ------------------------------------------------------------------------ across processes


@pytest.mark.slow
def test_4_processes_of_64_threads_one_cold_row_one_sql_read(
    sql_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    _, view = _history_table(sql_target, HISTORY_ROWS)
    config = CacheConfig(
        views=(view,),
        redis=replace(redis_config(redis_url, key_prefix), socket_timeout=SOCKET_TIMEOUT_S),
        offline_store=OfflineStoreConfig(url=sql_target.url),
        # a waiter must outlast the fill (a few tenths of a second, on a loaded 2-CPU box
        # maybe seconds), and the lease must outlast the waiters, or a late waiter reads SQL
        stampede=StampedeConfig(lease_wait=30.0, lease_ttl=30.0),
    )
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(N_PROCS)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=run_stampede_worker, name=f"stampede{k}",
            args=(StampedeJob(config, COLD, 1_000 + k, tuple(NAMES), N_THREADS, WAIT_S),
                  start, out),
        )
        for k in range(N_PROCS)
    ]
    for proc in procs:
        proc.start()
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_S * 1.5
    try:
        while len(reports) < N_PROCS and time.monotonic() < deadline:
            try:
                reports.append(out.get(timeout=1.0))
            except queue.Empty:
                if not any(proc.is_alive() for proc in procs) and out.empty():
                    break  # a worker died without reporting: no use waiting
    finally:
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        hung = [proc.name for proc in procs if proc.is_alive()]
        for proc in procs:  # only the processes this test started, by handle
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    assert not hung, f"worker processes hung: {hung}"
    failures = [r["error"] for r in reports if "error" in r]
    assert not failures, "\n".join(failures)
    assert len(reports) == N_PROCS, (
        f"only {len(reports)} of {N_PROCS} workers reported; exit codes "
        f"{[proc.exitcode for proc in procs]}"
    )

    expected = _latest(HISTORY_ROWS)
    fill_ms = _fill_ms(redis_client, key_prefix, view, COLD)
    released = [r["released"] for r in reports]
    summary = "\n".join(
        f"  pid {r['pid']}: sql={r['sql_queries']} {dict(r['statuses'])} "
        f"joined={r['stats'].get('singleflight_joined', 0)} "
        f"lease_waits={r['stats'].get('lease_waits', 0)} "
        f"lease_timeouts={r['stats'].get('lease_timeouts', 0)} "
        f"fills_fenced={r['stats'].get('fills_fenced', 0)} "
        f"last answer {r['last_answer_s']:.3f} s after release"
        for r in reports
    )
    print(f"\n[{sql_target.name}] one fill took {fill_ms} ms; processes released within "
          f"{(max(released) - min(released)) * 1000:.1f} ms of each other\n{summary}")

    for r in reports:
        assert not r["errors"], "\n".join(r["errors"])
        assert r["hung"] == 0 and r["answered"] == N_THREADS, summary
        assert all(values == expected for values in r["values"]), summary
        assert set(r["statuses"]) <= {Status.FILLED.value, Status.HIT_REDIS.value}, summary
        assert r["stats"].get("lease_timeouts", 0) == 0, summary
    # the point of the test: one SQL read in total
    assert sum(r["sql_queries"] for r in reports) == 1, summary
    # featcache's own count agrees (each process also made one warm-up read, before counting)
    assert sum(r["stats"].get("sql_queries", 0) for r in reports) == N_PROCS + 1, summary
    (filler,) = [r for r in reports if r["sql_queries"] == 1]
    # FILLED: the thread that read SQL and the threads of its process that joined its read
    assert filler["statuses"][Status.FILLED.value] == (
        1 + filler["stats"].get("singleflight_joined", 0)
    ), summary
    assert all(Status.FILLED.value not in r["statuses"] for r in reports if r is not filler)
    # ... and they really raced: other processes found the lease taken and waited for the
    # fill, and threads joined the read in flight (not one request after the other)
    assert sum(r["stats"].get("lease_waits", 0) for r in reports) >= 1, summary
    assert filler["stats"].get("singleflight_joined", 0) >= 1, summary


# ------------------------------------------------------------------------ within a process


def test_64_threads_one_cold_row_one_sql_query(
    sql_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    rows = 50_000
    _, view = _history_table(sql_target, rows)
    with make_cache([view], redis_url, sql_target.url, key_prefix, lease_wait=30.0,
                    lease_ttl=30.0, redis_socket_timeout=SOCKET_TIMEOUT_S) as fc:
        fc.get_features([1_000], NAMES)  # connect and reflect before counting (ABSENT)
        counter = SqlCounter(fc.engine)

        def held_fill(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # the fill's read takes FILL_HOLD_S more: every reader has its miss while it runs,
            # whatever the machine's load does to when each thread (or coroutine) starts
            if "fc_latest" in statement:
                time.sleep(FILL_HOLD_S)

        sa.event.listen(fc.engine, "before_cursor_execute", held_fill)
        go = threading.Barrier(N_THREADS)
        statuses: list[Status] = []
        values: list[dict[str, Any]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def reader() -> None:
            try:
                go.wait(WAIT_S)
                result = fc.get_features([COLD], NAMES)
                with lock:
                    statuses.append(result.status(COLD, "clicks"))
                    values.append(dict(result[COLD]))
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(N_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in threads), "reader threads hung"
        assert not errors, errors
        stats = fc.stats()[VIEW]
        counts = Counter(statuses)
        fill_ms = _fill_ms(redis_client, key_prefix, view, COLD)
        print(f"\n[{sql_target.name}] one fill took {fill_ms} ms; statuses {dict(counts)}; "
              f"joined={stats['singleflight_joined']} lease_waits={stats['lease_waits']}")
        assert counter.count == 1, counter.statements
        assert stats["sql_queries"] == 1 + 1  # the warm-up read, then exactly one
        assert values == [_latest(rows)] * N_THREADS
        assert set(counts) <= {Status.FILLED, Status.HIT_REDIS}
        # one leader; every other thread joined its read or, arriving after it, read its fill
        assert counts[Status.FILLED] == 1 + stats["singleflight_joined"]
        assert stats["singleflight_joined"] + counts[Status.HIT_REDIS] == N_THREADS - 1
        assert stats["singleflight_joined"] >= 1  # they did overlap
        assert stats["lease_timeouts"] == 0
        sa.event.remove(fc.engine, "before_cursor_execute", held_fill)


class Parking:
    """Parks one chosen thread right after its first MGET answer (through ``wire`` hooks on a
    real client).

    It stands for what the scheduler does to a thread of a busy process (seen in the load
    tests above, e.g. about one PostgreSQL run in seven of the 4-process test on a 2-CPU box):
    the thread has read "missing" from Redis and gets the CPU back only after another
    reader's fill has landed and its lease has been released.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.parked = threading.Event()
        self.resume = threading.Event()

    def after_reply(self, packed: Sequence[bytes], reply: Any) -> None:
        if (packed and is_command(packed[0], "MGET")
                and threading.current_thread() is self.thread):
            self.thread = None
            self.parked.set()
            self.resume.wait(WAIT_S)


@pytest.mark.one_server
@pytest.mark.sync_io
def test_a_reader_that_saw_the_miss_before_a_fill_landed_does_not_read_sql_again(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    _, view = _history_table(sqlite_target, 10)
    client, hooks = hooked_client(redis_url)
    parking = Parking()
    hooks.after_reply = parking.after_reply
    try:
        with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                        redis_client=client) as fc:
            fc.get_features([1_000], NAMES)  # connect and reflect before counting
            counter = SqlCounter(fc.engine)
            late: list[Any] = []
            reader = threading.Thread(
                target=lambda: late.append(fc.get_features([COLD], NAMES)), daemon=True
            )
            parking.thread = reader
            reader.start()
            assert parking.parked.wait(WAIT_S), "the late reader never read Redis"
            # meanwhile another reader misses, takes the lease, reads SQL, fills, releases
            first = fc.get_features([COLD], NAMES)
            assert first.status(COLD, "clicks") is Status.FILLED
            assert counter.count == 1
            parking.resume.set()
            reader.join(WAIT_S)
            assert not reader.is_alive()
            assert dict(late[0][COLD]) == _latest(10)
            stats = fc.stats()[VIEW]
            # the row it wants is in Redis, fresh, before it takes the lease: no second read
            assert counter.count == 1, (
                f"{counter.count} SQL reads; the late reader answered "
                f"{late[0].status(COLD, 'clicks').value}, fills_fenced={stats['fills_fenced']}"
            )
    finally:
        parking.resume.set()
        client.close()


# ------------------------------------------------------------------------ lease timeout


def test_lease_held_by_a_silent_holder_costs_lease_wait_then_reads_sql(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    _, view = _history_table(sqlite_target, 10)
    lease_key = key_layout(key_prefix).lease_keys(VIEW, [COLD])[0]
    if not key_layout(key_prefix).buckets:
        assert lease_key == f"{key_prefix}:~{VIEW}:lease:{COLD}"  # the documented spelling
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, lease_wait=0.05) as fc:
        counter = SqlCounter(fc.engine)
        assert redis_client.set(lease_key, "x", px=5000)  # another process that never fills
        result = fc.get_features([COLD], NAMES)
        assert result.status(COLD, "clicks") is Status.FILLED  # answered, from SQL itself
        assert dict(result[COLD]) == _latest(10)
        stats = fc.stats()[VIEW]
        assert (stats["lease_waits"], stats["lease_timeouts"]) == (1, 1)
        assert stats["sql_queries"] == 1 and counter.count == 1
        # the fill was written back (the key was empty before and after the wait) ...
        assert fc.get_features([COLD], NAMES).status(COLD, "clicks") is Status.HIT_REDIS
        # ... and the other holder's lease was left alone: only its holder or its TTL ends it
        assert redis_client.get(lease_key) == b"x"
        assert 0 < redis_client.pttl(lease_key) <= 5000
        assert counter.count == 1


# ------------------------------------------------------------------------ XFetch

XF_MAX_AGE_S = 2.0
XF_DURATION_S = 20.0
XF_RATE = 200  # reads per second, all threads together
XF_THREADS = 4


@pytest.mark.slow
def test_xfetch_hot_row_is_refreshed_early_without_hard_misses(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """200 reads/s of one row for 20 s, max_age 2 s: after the first fill no read finds the
    row expired (a *hard miss*: FILLED but not an early refresh, or a wait on someone else's
    fill of a missing row), and SQL sees at most 1.2 refreshes per max_age window.

    Read ``n`` happens at ``n * 5 ms`` on the cache's clock and starts 5 ms of real time after
    read ``n - 1`` started. A stall of the whole test process (a CI run saw one of over 100 ms,
    four reads bunched up after the row had expired) then delays the reads instead of jumping
    the clock past an expiry no read had a chance to see coming: XFetch can only refresh a row
    someone reads, and the property is about reads every 5 ms. SQL, Redis, the threads and the
    measured fill time stay real.
    """
    features = (Feature("clicks", "int", f"{XF_MAX_AGE_S:g}s"),)
    engine = sqlite_target.engine()
    table = make_table(engine, None, VIEW, features)
    insert(engine, table, [{"entity_id": COLD, "event_ts": T0, "updated_at": T0, "clicks": 5}])
    view = make_view(VIEW, VIEW, None, features)
    period = 1.0 / XF_RATE
    total = int(XF_DURATION_S * XF_RATE)
    base = time.time()
    now = [base]
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    clock=lambda: now[0]) as fc:
        assert fc.config.stampede.xfetch_beta == 1.0  # the default is what is under test
        counter = SqlCounter(fc.engine)
        first = fc.get_features([COLD], ["clicks"])
        assert first.status(COLD, "clicks") is Status.FILLED
        seen: list[tuple[float, Status]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        tickets = iter(range(total))
        next_start = [time.monotonic()]
        t0 = time.monotonic()

        def reader() -> None:
            try:
                while True:
                    with lock:
                        n = next(tickets, None)
                        if n is None:
                            return
                        start = max(next_start[0], time.monotonic())
                        next_start[0] = start + period
                    pause = start - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    at = n * period
                    with lock:
                        now[0] = max(now[0], base + at)
                    result = fc.get_features([COLD], ["clicks"])
                    assert result[COLD]["clicks"] == 5
                    with lock:
                        seen.append((at, result.status(COLD, "clicks")))
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(XF_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(XF_DURATION_S * 5)
        assert not any(thread.is_alive() for thread in threads), "reader threads hung"
        real_s = time.monotonic() - t0
        assert not errors, errors[:3]
        stats = fc.stats()[VIEW]
        fill_ms = _fill_ms(redis_client, key_prefix, view, COLD)

    reads = len(seen)
    elapsed = total * period
    windows = elapsed / XF_MAX_AGE_S
    refreshes = counter.count - 1
    early = stats["early_refreshes"]
    # FILLED rows that were not early refreshes are fills of a missing/expired row (joiners
    # of such a fill included); lease waits are reads that found it missing while another
    # thread's fill was being written. The first fill is the one allowed hard miss.
    hard = stats["filled"] - early - 1 + stats["lease_waits"]
    filled_at = [round(t, 3) for t, s in sorted(seen) if s is Status.FILLED]
    report = (f"{reads} reads in {elapsed:.1f} s ({reads / elapsed:.0f}/s; {real_s:.1f} s real), "
              f"{refreshes} refreshes ({refreshes / windows:.2f} per max_age window), "
              f"early {early}, hard misses after the first {hard}; last fill took {fill_ms} ms "
              f"(XFetch delta); stats { {k: v for k, v in stats.items() if v} }; "
              f"FILLED at {filled_at} s")
    print("\n" + report)
    assert reads == total
    assert stats["sql_queries"] == counter.count  # featcache's count and SQLAlchemy's agree
    assert early >= 1, report  # XFetch is at work at all
    assert refreshes / windows <= 1.2, report
    assert hard == 0, report


def test_an_early_refresh_in_flight_is_not_waited_for_by_other_threads(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """While one thread's early refresh is parked in SQL, another thread that also draws an
    early refresh of the row answers at once with the fresh Redis value (HIT_REDIS): waiting
    for a refresh of a value it already holds would only add latency (the CI failure this pins
    down: three readers joined a slow refresh and came back FILLED, 15 ms late)."""
    _, view = _history_table(sqlite_target, 10)
    now = [1_000_000.0]
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    clock=lambda: now[0], xfetch_beta=1e6) as fc:
        assert fc.get_features([COLD], NAMES).status(COLD, "clicks") is Status.FILLED
        now[0] += 3600 - 0.001  # 1 ms before max_age (1 h): every read draws a refresh
        parked, resume = threading.Event(), threading.Event()

        def park(*_: Any) -> None:
            # the first statement is the refresher's (run by its thread, or by the async
            # client's pool for it): parked there; any other goes through, and is counted
            if not parked.is_set():
                parked.set()
                assert resume.wait(WAIT_S)

        counter = SqlCounter(fc.engine)
        sa.event.listen(fc.engine, "before_cursor_execute", park)
        early: list[Any] = []
        refresher = threading.Thread(
            target=lambda: early.append(fc.get_features([COLD], NAMES)), daemon=True
        )
        try:
            refresher.start()
            assert parked.wait(WAIT_S), "the early refresh never reached SQL"
            other = fc.get_features([COLD], NAMES)  # returns while the refresh is parked
            assert other.status(COLD, "clicks") is Status.HIT_REDIS
            assert dict(other[COLD]) == _latest(10)
            assert counter.count == 1
        finally:
            resume.set()
            refresher.join(WAIT_S)
            sa.event.remove(fc.engine, "before_cursor_execute", park)
        assert not refresher.is_alive()
        assert early[0].status(COLD, "clicks") is Status.FILLED
        stats = fc.stats()[VIEW]
        assert stats["early_refreshes"] == 1 and stats["singleflight_joined"] == 0
        assert counter.count == 1
