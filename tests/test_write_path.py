"""put_rows: the one write path (dicts, DataFrame, Arrow); an older row never wins."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
import redis
from featdata import (
    STATS_FEATURES,
    T0,
    Clock,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
    stats_row,
)

from featcache import Feature, FeatureCache, InvalidRequest, Status, UnknownView

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

NAMES = [f.name for f in STATS_FEATURES]


@pytest.fixture
def cache(sqlite_target: Any, redis_url: str, key_prefix: str
          ) -> Iterator[tuple[FeatureCache, Clock]]:
    make_table(sqlite_target.engine(), None, "w", STATS_FEATURES)
    clock = Clock()
    with make_cache([make_view("w", "w", None)], redis_url, sqlite_target.url, key_prefix,
                    clock) as fc:
        yield fc, clock


def test_put_rows_then_hit_without_sql(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    report = fc.put_rows("w", [stats_row(1, clicks=11), stats_row(2, clicks=22)])
    assert (report.written, report.skipped_older) == (2, 0)
    result = fc.get_features([1, 2], ["clicks"])
    assert result.status(1, "clicks") is Status.HIT_REDIS  # the table is empty: no SQL
    assert [result[1]["clicks"], result[2]["clicks"]] == [11, 22]


def test_older_row_never_overwrites_newer(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    newer, older = T0 + dt.timedelta(hours=1), T0
    assert fc.put_rows("w", [stats_row(1, newer, clicks=2)]).written == 1
    report = fc.put_rows("w", [stats_row(1, older, clicks=1)])
    assert (report.written, report.skipped_older) == (0, 1)
    assert fc.get_features([1], ["clicks"])[1]["clicks"] == 2
    # the same event time rewrites (a correction of the same row, and a fresher loaded_at)
    assert fc.put_rows("w", [stats_row(1, newer, clicks=3)]).written == 1
    assert fc.get_features([1], ["clicks"])[1]["clicks"] == 3
    # within one batch too: the later, older row loses
    report = fc.put_rows("w", [stats_row(5, newer, clicks=5), stats_row(5, older, clicks=4)])
    assert (report.written, report.skipped_older) == (1, 1)
    assert fc.get_features([5], ["clicks"])[5]["clicks"] == 5
    assert fc.stats()["w"]["rows_skipped_older"] == 2


@pytest.mark.parametrize("epoch", [5, 200, 70_000, 2**40, 1_790_000_000_000_000],
                         ids=["fixint", "uint8", "uint32", "uint64", "server-clock"])
def test_a_newer_row_of_an_invalidated_epoch_gives_way(
    cache: tuple[FeatureCache, Clock], redis_client: redis.Redis, key_prefix: str, epoch: int
) -> None:
    """The script reads the epoch out of the old row's msgpack, whatever size msgpack gave
    that integer: the older row is kept out while the newer one's epoch is current, and
    replaces it once the view's epoch moved on (the newer one is then a miss to readers)."""
    fc, _ = cache
    epoch_key = key_layout(key_prefix).epoch_key("w")
    redis_client.set(epoch_key, epoch)
    newer, older = T0 + dt.timedelta(hours=1), T0
    assert fc.put_rows("w", [stats_row(1, newer, clicks=2)]).written == 1
    assert fc.put_rows("w", [stats_row(1, older, clicks=1)]).skipped_older == 1
    redis_client.set(epoch_key, epoch + 1)  # a whole-view invalidation
    assert fc.put_rows("w", [stats_row(1, older, clicks=1)]).written == 1
    got = fc.get_features([1], ["clicks"])
    assert got.status(1, "clicks") is Status.HIT_REDIS and got[1]["clicks"] == 1


def test_row_replaces_negative_entry(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    assert fc.get_features([9], ["clicks"]).status(9, "clicks") is Status.ABSENT
    assert fc.put_rows("w", [stats_row(9, clicks=9)]).written == 1
    result = fc.get_features([9], ["clicks"])
    assert result.status(9, "clicks") is Status.HIT_REDIS and result[9]["clicks"] == 9


def test_put_rows_sets_loaded_at_so_freshness_counts_from_the_write(
    cache: tuple[FeatureCache, Clock]
) -> None:
    fc, clock = cache
    fc.put_rows("w", [stats_row(1)])
    clock.advance(8 * 60)  # not 9: XFetch may refresh early in the last minute (SQL is empty)
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.HIT_REDIS
    clock.advance(3 * 60)  # 11 min after the write: ctr (10 min) is stale; SQL has nothing
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.ABSENT


def test_rows_written_under_a_fence_are_as_old_as_the_fence(
    cache: tuple[FeatureCache, Clock]
) -> None:
    """Rows read from SQL after a fence are stamped loaded when the fence was taken (before
    the read), not when they reach Redis: a slow read never makes them look younger, so
    they never pass as fresh past max_age counted from the read. (Checks stay minutes away
    from the expiry: XFetch may refresh a row early in its last seconds, and SQL is empty.)"""
    fc, clock = cache
    fence = fc.fence("w", [1, 2])
    clock.advance(8 * 60)  # a slow SQL read and conversion between the fence and the write
    assert fc.put_rows("w", [stats_row(1)], fence=fence).written == 1
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.HIT_REDIS
    clock.advance(2 * 60 + 30)  # 10.5 min after the fence, 2.5 after the write
    # ctr's max_age is 10 min: stale, so read again (SQL has nothing)
    assert fc.get_features([1], ["ctr"]).status(1, "ctr") is Status.ABSENT


def test_a_started_fence_sees_redis_as_it_was_when_sent(
    cache: tuple[FeatureCache, Clock]
) -> None:
    """``start_fence`` prepares a fence and ``send()`` takes it: an invalidation before the
    send is what the fence saw (a row read from SQL after it is current and lands), one after
    the send keeps the row out. Without ``send()``, ``result()`` takes it."""
    fc, _ = cache
    fc.put_rows("w", [stats_row(1, clicks=1), stats_row(2, clicks=2)])
    before = fc.start_fence("w", [1])
    fc.invalidate("w", [1])
    before.send()
    after = fc.start_fence("w", [2])
    after.send()
    fc.invalidate("w", [2])
    assert fc.put_rows("w", [stats_row(1, clicks=11)], fence=before.result()).written == 1
    report = fc.put_rows("w", [stats_row(2, clicks=22)], fence=after.result())
    assert (report.written, report.fenced_off) == (0, 1)
    unsent = fc.start_fence("w", [3])
    assert fc.put_rows("w", [stats_row(3, clicks=3)], fence=unsent.result()).written == 1
    result = fc.get_features([1, 2, 3], ["clicks"])
    assert [result[1]["clicks"], result[3]["clicks"]] == [11, 3]
    assert result.status(2, "clicks") is not Status.HIT_REDIS  # invalidated: not written


def test_put_rows_accepts_dataframe_and_arrow(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    rows = [stats_row(i, clicks=i, emb=[float(i)]) for i in range(3)]
    frame = pd.DataFrame(rows)
    assert fc.put_rows("w", frame).written == 3
    table = pa.Table.from_pylist([stats_row(i, clicks=10 * i) for i in range(3, 6)])
    assert fc.put_rows("w", table).written == 3
    result = fc.get_features(range(6), NAMES)
    assert [result[i]["clicks"] for i in range(6)] == [0, 1, 2, 30, 40, 50]
    assert result[2]["emb"] == [2.0]
    assert result[4]["last_seen"] == T0
    assert result.status_counts() == {Status.HIT_REDIS: 6 * len(NAMES)}


def test_dataframe_nan_and_nat_mean_missing(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    frame = pd.DataFrame([stats_row(1, ctr=float("nan"), last_seen=pd.NaT)])
    fc.put_rows("w", frame)
    result = fc.get_features([1], ["ctr", "last_seen"])
    assert math.isnan(result[1]["ctr"])  # a float column keeps NaN as NaN
    assert result[1]["last_seen"] is None


def test_put_rows_rejects_bad_input_before_writing(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    with pytest.raises(UnknownView):
        fc.put_rows("nope", [stats_row(1)])
    incomplete = stats_row(1)
    del incomplete["clicks"]
    with pytest.raises(InvalidRequest, match="clicks"):
        fc.put_rows("w", [incomplete])
    with pytest.raises(InvalidRequest, match="row 1"):
        fc.put_rows("w", [stats_row(1), stats_row(2, clicks="many")])
    with pytest.raises(InvalidRequest, match="64-bit"):
        fc.put_rows("w", [stats_row(1, clicks=2**63)])
    with pytest.raises(InvalidRequest):
        fc.put_rows("w", "not rows")
    assert fc.get_features([1, 2], ["clicks"]).status(1, "clicks") is Status.ABSENT


def test_put_rows_empty_is_a_no_op(cache: tuple[FeatureCache, Clock]) -> None:
    fc, _ = cache
    report = fc.put_rows("w", [])
    assert (report.written, report.skipped_older) == (0, 0)


def test_exact_round_trips_through_redis(sqlite_target: Any, redis_url: str,
                                         key_prefix: str) -> None:
    features = (
        Feature("f", "float", "1h"), Feature("i", "int", "1h"), Feature("b", "bool", "1h"),
        Feature("s", "str", "1h"), Feature("t", "timestamp", "1h"),
        Feature("e", "list[float]", "1h"),
    )
    make_table(sqlite_target.engine(), None, "rt", features)
    plus5 = dt.timezone(dt.timedelta(hours=5, minutes=30))
    cases: list[dict[str, Any]] = [
        {"f": float("nan"), "i": 2**62, "b": True, "s": "", "t": None, "e": []},
        {"f": float("inf"), "i": -(2**63), "b": False, "s": "ünï 码 🚀", "e": [float("nan")],
         "t": dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)},
        {"f": -0.0, "i": 2**63 - 1, "b": None, "s": "x" * 10_000,
         "t": dt.datetime(2030, 5, 6, 7, 8, 9, 1, tzinfo=plus5),
         "e": [5e-324, 1.7976931348623157e308]},
        {"f": None, "i": None, "b": None, "s": None, "t": None, "e": None},
        {"f": 0.1 + 0.2, "i": 0, "b": True, "s": "\x00nul", "t": T0, "e": [1.0] * 768},
    ]
    rows = [{"entity_id": n, "event_ts": T0, **case} for n, case in enumerate(cases)]
    with make_cache([make_view("rt", "rt", None, features)], redis_url, sqlite_target.url,
                    key_prefix) as fc:
        fc.put_rows("rt", rows)
        result = fc.get_features(range(len(cases)), [f.name for f in features])
    for n, case in enumerate(cases):
        got = result[n]
        assert result.status(n, "f") is Status.HIT_REDIS
        for name, want in case.items():
            have = got[name]
            if isinstance(want, float) and math.isnan(want):
                assert isinstance(have, float) and math.isnan(have)
            elif name == "e" and want and math.isnan(want[0]):
                assert math.isnan(have[0])
            else:
                assert have == want and type(have) is type(want), (n, name, have, want)
            if isinstance(want, float) and want == 0.0:
                assert math.copysign(1, have) == math.copysign(1, want)
            if isinstance(want, dt.datetime):
                assert have.tzinfo == dt.UTC  # the same instant, returned in UTC
    arrow = result.to_arrow()
    assert arrow.schema.field("i").type == pa.int64()
    assert arrow.schema.field("t").type == pa.timestamp("us", tz="UTC")
    assert arrow.schema.field("e").type == pa.list_(pa.float64())
    assert arrow.column("f").null_count == 1  # None is null, NaN is not
    frame = result.to_pandas()
    assert frame.loc[0, "i"] == 2**62  # no float64 detour for ints
    assert pd.isna(frame.loc[3, "i"])


def test_put_latest_writes_rows_as_the_offline_store_returns_them(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    table = make_table(sqlite_target.engine(), None, "pl", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i, clicks=i) for i in range(3)])
    with make_cache([make_view("pl", "pl", None)], redis_url, sqlite_target.url,
                    key_prefix) as fc:
        fence = fc.fence("pl", [0, 1, 2])
        found, _ = fc.offline.fetch_latest(fc.config.view("pl"), [0, 1, 2])
        report = fc.put_latest("pl", found, fence=fence)
        assert (report.written, report.fenced_off) == (3, 0)
        result = fc.get_features([0, 1, 2], NAMES)
        assert result.status_counts() == {Status.HIT_REDIS: 3 * len(NAMES)}
        assert [result[i]["clicks"] for i in range(3)] == [0, 1, 2]
        assert result[1]["last_seen"] == T0 and result[1]["emb"] == [0.5, -1.25]
        with pytest.raises(InvalidRequest, match="not in the fence"):
            fc.put_latest("pl", found, fence=fc.fence("pl", [0]))


def test_prepare_latest_encodes_now_and_writes_on_send(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """``prepare_latest`` checks and encodes without touching Redis; ``send`` writes and
    reports as ``put_latest`` would, and judges the fence's age when it writes: a fence that
    aged past ``fence_ttl / 2`` between the two writes nothing."""
    table = make_table(sqlite_target.engine(), None, "pp", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i, clicks=i) for i in range(4)])
    with make_cache([make_view("pp", "pp", None)], redis_url, sqlite_target.url,
                    key_prefix, fence_ttl=1.0) as fc:
        found, _ = fc.offline.fetch_latest(fc.config.view("pp"), [0, 1, 2, 3])
        early = {i: found[i] for i in (0, 1)}
        late = {i: found[i] for i in (2, 3)}
        pending = fc.prepare_latest("pp", early, fence=fc.fence("pp", [0, 1]))
        stale = fc.prepare_latest("pp", late, fence=fc.fence("pp", [2, 3]))
        assert fc.get_features([0, 1], ["clicks"]).status_counts() == {Status.FILLED: 2}
        fc.invalidate("pp", [0, 1])  # the fills above went to Redis: clear them again
        assert (pending.send().written, pending.rows) == (0, 2)  # invalidated: fenced off
        time.sleep(0.6)  # past fence_ttl / 2 for the second fence
        report = stale.send()
        assert (report.written, report.fenced_off) == (0, 2)
        fresh = fc.prepare_latest("pp", late, fence=fc.fence("pp", [2, 3]))
        assert (fresh.send().written, fresh.send().written) == (2, 0)  # once only
        assert fc.get_features([2, 3], ["clicks"]).status_counts() == {Status.HIT_REDIS: 2}
        with pytest.raises(InvalidRequest, match="not in the fence"):
            fc.prepare_latest("pp", found, fence=fc.fence("pp", [0]))
