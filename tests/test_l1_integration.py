"""The L1 cache inside FeatureCache: HIT_L1, per-tier statistics, invalidation through the
stream from another cache (another process, as far as L1 is concerned), clean shutdown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
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

from featcache import FeatureCache, Status
from featcache.errors import InvalidEntityId


@pytest.fixture
def caches(sqlite_target: Any, redis_url: str, key_prefix: str
           ) -> Iterator[tuple[FeatureCache, FeatureCache, Any]]:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "l1v", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in range(1, 6)])
    view = make_view("l1v", "l1v", None)
    clock = Clock()
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, clock,
                    l1_policy="tinylfu", l1_max_ttl=60.0, xfetch_beta=0) as serving, \
            make_cache([view], redis_url, sqlite_target.url, key_prefix, clock) as etl:
        yield serving, etl, table


def test_second_read_hits_l1_and_counts_per_tier(caches: Any) -> None:
    serving, _, _ = caches
    assert serving.get_features([1, 9], ["clicks"]).status(1, "clicks") is Status.FILLED
    again = serving.get_features([1, 9], ["clicks"])
    assert again.status(1, "clicks") is Status.HIT_L1 and again[1]["clicks"] == 1
    assert again.status(9, "clicks") is Status.ABSENT  # negative entries live in L1 too
    stats = serving.stats()["l1v"]
    assert stats["hit_l1"] == 2 and stats["filled"] == 1 and stats["absent"] == 1
    assert serving.l1 is not None and serving.l1.stats()["hits"] >= 2


def test_invalidation_from_another_cache_reaches_l1(caches: Any, sqlite_target: Any) -> None:
    serving, etl, table = caches
    serving.get_features([1, 2], ["clicks"])
    assert serving.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_L1
    applied = serving.subscriber_stats()["entries_applied"]
    with sqlite_target.engine().begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == 1).values(clicks=100))
    etl.invalidate("l1v", [1])
    until(lambda: serving.subscriber_stats()["entries_applied"] > applied, "the stream entry")
    after = serving.get_features([1, 2], ["clicks"])
    assert after.status(1, "clicks") is Status.FILLED and after[1]["clicks"] == 100
    assert after.status(2, "clicks") is Status.HIT_L1
    etl.invalidate("l1v")  # whole view
    until(lambda: serving.subscriber_stats()["entries_applied"] > applied + 1, "the entry")
    assert serving.get_features([2], ["clicks"]).status(2, "clicks") is Status.FILLED


def test_own_invalidation_drops_l1_at_once(caches: Any) -> None:
    serving, _, _ = caches
    serving.get_features([3], ["clicks"])
    serving.invalidate("l1v", [3])  # no wait: the calling process drops its own rows
    assert serving.get_features([3], ["clicks"]).status(3, "clicks") is Status.FILLED


def test_l1_respects_max_age_of_the_row(caches: Any) -> None:
    serving, _, _ = caches
    serving.get_features([4], ["ctr"])  # ctr: max_age 10 min
    assert serving.get_features([4], ["ctr"]).status(4, "ctr") is Status.HIT_L1
    clock: Clock = serving.clock  # type: ignore[assignment]
    clock.advance(11 * 60)
    assert serving.get_features([4], ["ctr"]).status(4, "ctr") is Status.FILLED


def test_l1_serves_long_lived_features_past_the_views_strictest_max_age(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """L1 entries are known fresh until the view's strictest max_age (ctr: 10 min); after it,
    a call for the 1 h features still hits L1 (rechecked against their own max_age), a call
    for ctr does not, and past 1 h neither does a call for the 1 h features, though the entry
    is still within l1_max_ttl (2 h here; L1 runs on the injected clock)."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "l1m", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in range(1, 6)])
    clock = Clock()
    with make_cache([make_view("l1m", "l1m", None)], redis_url, sqlite_target.url,
                    key_prefix, clock, l1_policy="tinylfu", l1_max_ttl=7200.0,
                    xfetch_beta=0) as serving:
        serving.get_features([4, 5], ["clicks", "ctr"])
        clock.advance(11 * 60)
        both = serving.get_features([5, 4], ["clicks", "country"])
        assert [both.status(e, "clicks") for e in (5, 4)] == [Status.HIT_L1] * 2
        assert list(both) == [5, 4] and both[4]["clicks"] == 4
        assert serving.get_features([4], ["ctr"]).status(4, "ctr") is Status.FILLED
        clock.advance(50 * 60)  # 61 min after the fill: past clicks' max_age
        assert serving.get_features([5], ["clicks"]).status(5, "clicks") is Status.FILLED


def test_close_stops_the_tail_thread(sqlite_target: Any, redis_url: str,
                                     key_prefix: str) -> None:
    make_table(sqlite_target.engine(), None, "l1c", STATS_FEATURES)
    before = {t.name for t in threading.enumerate()}
    cache = make_cache([make_view("l1c", "l1c", None)], redis_url, sqlite_target.url,
                       key_prefix, l1_policy="lru")
    started = {t.name for t in threading.enumerate()} - before
    assert any("featcache-l1" in name for name in started)
    cache.close()
    until(lambda: not any("featcache-l1" in t.name for t in threading.enumerate()
                           if t.name not in before), "the thread to stop")


# ------------------------------------------------ ids L1 answers are not checked twice


def test_ids_l1_does_not_answer_whole_are_still_checked(caches: Any) -> None:
    """An all-L1 call skips the limit checks (each id L1 holds was checked when stored); any
    other call is checked before Redis or SQL sees it, as without L1."""
    serving, _, _ = caches
    serving.get_features([1, 2], ["clicks"])
    assert serving.get_features([1, 2], ["clicks"]).status_counts() == {Status.HIT_L1: 2}
    for bad in ([1, 2**63], [1, -(2**63) - 1], [1, True], [True], [1, 2.0], [1, "2"]):
        with pytest.raises(InvalidEntityId):
            serving.get_features(bad, ["clicks"])
    again = serving.get_features([2, 1, 2, 1], ["clicks"])  # repeats: normalized, one answer
    assert list(again) == [2, 1] and again.status_counts() == {Status.HIT_L1: 2}
    assert serving.get_features((i for i in (1, 2)), ["clicks"])[2]["clicks"] == 2


def test_str_ids_beyond_the_limits_are_refused_beside_l1_hits(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "l1s", STATS_FEATURES, entity_type="str")
    insert(engine, table, [stats_row("a", clicks=1), stats_row("b", clicks=2)])
    view = make_view("l1s", "l1s", None, entity_type="str")
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, Clock(),
                    l1_policy="tinylfu", l1_max_ttl=60.0, max_id_length=8) as cache:
        cache.get_features(["a", "b"], ["clicks"])
        assert cache.get_features(["b", "a"], ["clicks"]).status_counts() == {Status.HIT_L1: 2}
        for bad in (["a", "b\x00"], ["a", "\ud800"], ["a", "x" * 9], ["a", ""], ["a", 1]):
            with pytest.raises(InvalidEntityId):
                cache.get_features(bad, ["clicks"])
        assert cache.get_features(["a", "c"], ["clicks"]).status(
            "c", "clicks") is Status.ABSENT


def test_every_call_is_counted_once_for_popularity(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """All-L1 calls, partial ones and L1-less ones each count their ids once."""
    engine = sqlite_target.engine()
    table = make_table(engine, None, "l1p", STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in range(1, 4)])
    view = make_view("l1p", "l1p", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix, Clock(),
                    l1_policy="tinylfu", l1_max_ttl=60.0, popularity_sample_rate=1.0) as cache:
        cache.get_features([1, 2], ["clicks"])  # filled
        cache.get_features([1, 2], ["clicks"])  # all from L1
        cache.get_features([1, 3], ["clicks"])  # partial: 1 from L1, 3 filled
        assert cache.popularity is not None
        cache.popularity.flush()
        counts = dict(cache.top_k("l1p", 10))
    assert counts == pytest.approx({1: 3.0, 2: 2.0, 3: 1.0}, rel=0.01)
