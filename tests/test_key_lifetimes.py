"""How long each kind of key lives in Redis (README "Redis key layout"), and the race that
rests on it.

* a row (fills, ``put_rows``): the view's ``ttl`` (by default the longest ``max_age`` plus
  ``stale_if_error``);
* a negative entry: ``negative_ttl``;
* a tombstone: ``invalidation.fence_ttl``;
* a fill lease: ``stampede.lease_ttl``, deleted by the fill;
* the epoch and the stream: none.

Every lifetime below is a distinct number, so a key given another's TTL fails. A TTL is
checked exactly: right after the write, ``PTTL`` is the configured TTL less at most the time
the test spent between starting the write and reading ``PTTL`` (measured around them, so no
speed is assumed).

The no-stale-set argument rests on a tombstone outliving the fill deadline (``fence_ttl /
2``): a fill that raced with an invalidation and arrives before its deadline must find the
tombstone still there; one whose SQL read outlasted the tombstone must not be written at all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import sqlalchemy as sa
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

from featcache import FeatureCache, FeatureResult, FeatureView, Status

ROW_TTL_DEFAULT_S = 3600 + 300  # clicks' max_age (1 h, the longest) + stale_if_error (5 min)
ROW_TTL_EXPLICIT_S = 3 * 3600
NEGATIVE_TTL_S = 7 * 60
FENCE_TTL_S = 45.0
LEASE_TTL_S = 33.0
#: PTTL counts whole milliseconds on the server's clock; the test's window is measured on its own
CLOCK_SLACK_MS = 2
WAIT_S = 30.0


def _view(name: str, **options: Any) -> FeatureView:
    return make_view(name, name, None, stale_if_error="5m", negative_ttl="7m", **options)


@pytest.fixture
def views(sqlite_target: Any) -> dict[str, FeatureView]:
    engine = sqlite_target.engine()
    with engine.begin() as conn:  # a writer must commit while a reader's cursor is open
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    for name in ("dflt", "expl"):
        table = make_table(engine, None, name, STATS_FEATURES)
        insert(engine, table, [stats_row(i, clicks=0) for i in range(1, 10)])
    return {"dflt": _view("dflt"), "expl": _view("expl", ttl="3h")}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(views: dict[str, FeatureView], sqlite_target: Any, redis_url: str,
          key_prefix: str, clock: Clock) -> Iterator[FeatureCache]:
    with make_cache(list(views.values()), redis_url, sqlite_target.url, key_prefix, clock,
                    fence_ttl=FENCE_TTL_S, lease_ttl=LEASE_TTL_S, xfetch_beta=0) as fc:
        yield fc


class Lifetime:
    """The window around one write: started before it, ended by the ``PTTL`` read after it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.since = time.monotonic()

    def check(self, key: str, ttl_s: float) -> None:
        pttl = int(self.client.pttl(key))
        window_ms = (time.monotonic() - self.since) * 1000
        ttl_ms = int(ttl_s * 1000)
        assert ttl_ms - window_ms - CLOCK_SLACK_MS <= pttl <= ttl_ms, (
            f"{key}: PTTL {pttl} ms; expected {ttl_ms} ms, written within the last "
            f"{window_ms:.0f} ms"
        )


def _kind(client: redis.Redis, key: str) -> bytes:
    value = client.get(key)
    assert value is not None, f"{key} is not in Redis"
    return value[2:3]  # the kind byte (featcache.codec)


# --------------------------------------------------------------------------- rows, negative


@pytest.mark.parametrize(("view", "ttl_s"), [("dflt", ROW_TTL_DEFAULT_S),
                                             ("expl", ROW_TTL_EXPLICIT_S)])
def test_a_filled_row_lives_for_the_view_ttl(
    cache: FeatureCache, clock: Clock, redis_client: redis.Redis, key_prefix: str, view: str,
    ttl_s: float,
) -> None:
    """A fill into an empty key (``SET_IF_ABSENT``) and a refill over a stale row
    (``CONDITIONAL_SET``) both give the row the view's TTL."""
    key = f"{key_prefix}:{view}:1"
    window = Lifetime(redis_client)
    assert cache.get_features([1], [f"{view}:clicks"]).status(1, f"{view}:clicks") \
        is Status.FILLED
    window.check(key, ttl_s)
    assert _kind(redis_client, key) == b"R"

    clock.advance(3601)  # clicks' max_age is 1 h
    assert redis_client.pexpire(key, 5_000)  # what the refill must replace
    window = Lifetime(redis_client)
    assert cache.get_features([1], [f"{view}:clicks"]).status(1, f"{view}:clicks") \
        is Status.FILLED
    window.check(key, ttl_s)


def test_a_negative_entry_lives_for_negative_ttl_not_the_row_ttl(
    cache: FeatureCache, clock: Clock, redis_client: redis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:dflt:99"  # SQL has no entity 99
    window = Lifetime(redis_client)
    assert cache.get_features([99], ["dflt:clicks"]).status(99, "dflt:clicks") is Status.ABSENT
    window.check(key, NEGATIVE_TTL_S)
    assert _kind(redis_client, key) == b"A"

    clock.advance(NEGATIVE_TTL_S + 1)
    assert redis_client.pexpire(key, 5_000)  # the expired entry the next fill replaces
    window = Lifetime(redis_client)
    assert cache.get_features([99], ["dflt:clicks"]).status(99, "dflt:clicks") is Status.ABSENT
    window.check(key, NEGATIVE_TTL_S)
    assert cache.stats()["dflt"]["negative_hit"] == 0  # both were read from SQL


@pytest.mark.parametrize("view", ["dflt", "expl"])
@pytest.mark.parametrize("how", ["unfenced", "fenced-empty-key", "fenced-over-a-row"])
def test_put_rows_writes_rows_for_the_view_ttl(
    cache: FeatureCache, redis_client: redis.Redis, key_prefix: str, view: str, how: str
) -> None:
    ttl_s = ROW_TTL_DEFAULT_S if view == "dflt" else ROW_TTL_EXPLICIT_S
    key = f"{key_prefix}:{view}:5"
    if how == "fenced-over-a-row":
        assert cache.put_rows(view, [stats_row(5, clicks=1)]).written == 1
        assert redis_client.pexpire(key, 5_000)
    fence = cache.fence(view, [5]) if how.startswith("fenced") else None
    window = Lifetime(redis_client)
    assert cache.put_rows(view, [stats_row(5, clicks=2)], fence=fence).written == 1
    window.check(key, ttl_s)


# --------------------------------------------------------------------------- invalidation


def test_a_tombstone_lives_for_fence_ttl_in_every_chunk(
    cache: FeatureCache, redis_client: redis.Redis, key_prefix: str
) -> None:
    """1,500 ids are two atomic chunks; key 0 held a row (the tombstone replaces its TTL)."""
    cache.get_features([1], ["dflt:clicks"])
    window = Lifetime(redis_client)
    report = cache.invalidate("dflt", range(1, 1501))
    assert len(report.stream_ids) == 2
    for entity in (1, 1000, 1001, 1500):
        key = f"{key_prefix}:dflt:{entity}"
        window.check(key, FENCE_TTL_S)
        assert _kind(redis_client, key) == b"T"


def test_the_epoch_and_the_stream_never_expire(
    cache: FeatureCache, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache.get_features([1], ["dflt:clicks"])  # creates the epoch
    assert redis_client.pttl(f"{key_prefix}:~dflt:epoch") == -1
    cache.invalidate("dflt")  # moves it
    cache.invalidate("dflt", [1])
    assert redis_client.pttl(f"{key_prefix}:~dflt:epoch") == -1
    assert redis_client.pttl(cache.layout.stream_key()) == -1


# --------------------------------------------------------------------------- leases


def _during_sql_reads(engine: sa.Engine, action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action`` right after each feature query featcache sends (its SQL read), on the
    reading thread; returns the remover."""

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "fc_latest" in statement:
            action()

    sa.event.listen(engine, "after_cursor_execute", hook)
    return lambda: sa.event.remove(engine, "after_cursor_execute", hook)


def test_a_lease_lives_for_lease_ttl_and_goes_with_the_fill(
    cache: FeatureCache, redis_client: redis.Redis, key_prefix: str
) -> None:
    lease_key = f"{key_prefix}:~dflt:lease:7"
    seen: list[tuple[int, float]] = []
    window = Lifetime(redis_client)
    remove = _during_sql_reads(cache.engine, lambda: seen.append(
        (int(redis_client.pttl(lease_key)), time.monotonic())))
    try:
        assert cache.get_features([7], ["dflt:clicks"]).status(7, "dflt:clicks") \
            is Status.FILLED
    finally:
        remove()
    assert len(seen) == 1, "no SQL read"
    pttl, at = seen[0]
    window_ms = (at - window.since) * 1000
    assert LEASE_TTL_S * 1000 - window_ms - CLOCK_SLACK_MS <= pttl <= LEASE_TTL_S * 1000, (
        f"lease PTTL {pttl} ms during the SQL read, {window_ms:.0f} ms into the call")
    assert redis_client.exists(lease_key) == 0, "the fill did not delete its lease"


# --------------------------------------------------------------------------- the race


@dataclass
class Race:
    """What one race left: the reader's answer and stats, what row 1's key held right after
    the invalidation and after the reader's fill, and the reader (still open)."""

    answer: FeatureResult
    stats: dict[str, int]
    tombstone: bytes | None
    after: bytes | None
    reader: FeatureCache


@contextlib.contextmanager
def race(
    sqlite_target: Any, redis_url: str, key_prefix: str, fence_ttl: float,
    hold: Callable[[redis.Redis, str], None],
) -> Iterator[Race]:
    """A reader misses row 1 (nothing cached) and reads v0 from SQL; right after its SQL
    read the ETL commits v1 and invalidates row 1, then ``hold(client, key)`` keeps the
    reader from writing its fill until it returns."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "race", STATS_FEATURES)
    insert(engine, table, [stats_row(1, clicks=0)])
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    view = make_view("race", "race", None)
    key = f"{key_prefix}:race:1"
    client = redis.Redis.from_url(redis_url)
    tombstone: list[bytes | None] = []

    def etl_commits_and_invalidates_then_the_read_goes_on() -> None:
        if tombstone:
            return
        with engine.begin() as conn:
            conn.execute(table.update().where(table.c.entity_id == 1).values(clicks=111))
        with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                        fence_ttl=fence_ttl) as etl:
            etl.invalidate("race", [1])
        tombstone.append(client.get(key))
        hold(client, key)

    with client, make_cache([view], redis_url, sqlite_target.url, key_prefix,
                            fence_ttl=fence_ttl, xfetch_beta=0) as reader:
        remove = _during_sql_reads(reader.engine,
                                   etl_commits_and_invalidates_then_the_read_goes_on)
        try:
            answer = reader.get_features([1], ["clicks"])
        finally:
            remove()
        assert tombstone, "the reader never read SQL"
        yield Race(answer, reader.stats()["race"], tombstone[0], client.get(key), reader)


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_tombstone_outlives_a_fill_that_raced_with_it(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """fence_ttl 2 s: the fill deadline is 1 s after the call started. The reader's SQL read
    goes on 300 ms after the invalidation (by the server's clock), and its fill, well within
    the deadline, must meet the tombstone and be refused. A tombstone living less than those
    300 ms (a TTL cut a hundredfold) lets v0 land."""
    left_ms: list[int] = []

    def for_300_ms_of_server_time(client: redis.Redis, key: str) -> None:
        start = _server_ms(client)
        until(lambda: _server_ms(client) >= start + 300, "300 ms on the server's clock",
              timeout=WAIT_S)
        left_ms.append(int(client.pttl(key)))

    with race(sqlite_target, redis_url, key_prefix, 2.0, for_300_ms_of_server_time) as done:
        assert done.answer[1]["clicks"] == 0  # v0: read before the commit
        assert done.tombstone is not None and done.tombstone[2:3] == b"T"
        assert left_ms[0] > 0, f"the tombstone expired during the SQL read ({left_ms[0]})"
        # the fill was sent in time and refused by the tombstone, not abandoned
        stats = done.stats
        assert (stats["fills_abandoned"], stats["fills_fenced"], stats["rows_written"]) == (
            0, 1, 0), stats
        assert done.after == done.tombstone
        again = done.reader.get_features([1], ["clicks"])
        assert (again.status(1, "clicks"), again[1]["clicks"]) == (Status.FILLED, 111)


def test_a_fill_whose_sql_read_outlasts_the_tombstone_is_not_written(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """fence_ttl 300 ms: the reader's SQL read goes on until the invalidation's tombstone has
    expired, so the key is empty again, as it was when the reader looked: only the fill
    deadline (``fence_ttl / 2``) keeps v0 out."""

    def until_the_tombstone_is_gone(client: redis.Redis, key: str) -> None:
        until(lambda: client.exists(key) == 0, "the tombstone to expire", timeout=WAIT_S)

    with race(sqlite_target, redis_url, key_prefix, 0.3, until_the_tombstone_is_gone) as done:
        assert done.answer[1]["clicks"] == 0
        assert done.tombstone is not None and done.tombstone[2:3] == b"T"
        stats = done.stats
        assert (stats["fills_abandoned"], stats["rows_written"]) == (1, 0), stats
        assert done.after is None, f"v0 landed after the tombstone expired: {done.after!r}"
        again = done.reader.get_features([1], ["clicks"])
        assert (again.status(1, "clicks"), again[1]["clicks"]) == (Status.FILLED, 111)
        assert done.reader.get_features([1], ["clicks"]).status(1, "clicks") \
            is Status.HIT_REDIS
