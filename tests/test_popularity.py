"""Read popularity: sampled counting in serving processes, decayed top-K for the warmer."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
import pytest
import redis
from featdata import STATS_FEATURES, Clock, insert, make_cache, make_table, make_view, stats_row

from featcache import PopularityConfig
from featcache.keys import KeyLayout
from featcache.popularity import IDS_PER_SAMPLE, PopularityCounter, bucket_weights
from featcache.redis_store import StandaloneStore


def test_bucket_weights_halve_every_half_life() -> None:
    weights = bucket_weights(now=3600.0 * 10 + 30, bucket_seconds=60, buckets=3, half_life=60)
    assert [start for start, _ in weights] == [36000, 35940, 35880]
    assert weights[0][1] == pytest.approx(1.0)
    assert weights[1][1] == pytest.approx(0.5)
    assert weights[2][1] == pytest.approx(0.25)


def _counter(redis_url: str, prefix: str, clock: Clock, rate: float = 1.0,
             rng: Any = None) -> PopularityCounter:
    store = StandaloneStore(redis.Redis.from_url(redis_url))
    return PopularityCounter(
        store, KeyLayout(prefix),
        PopularityConfig(sample_rate=rate, bucket=60, buckets=10, half_life=60.0,
                         flush_interval=0.05),
        clock=clock, rng=rng or (lambda: 0.0),
    )


def test_counts_decay_so_recent_reads_win(redis_url: str, key_prefix: str) -> None:
    clock = Clock(start=1_800_000_000.0)
    counter = _counter(redis_url, key_prefix, clock)
    counter.record("v", [1] * 10)  # 10 reads of 1, three minutes ago...
    counter.flush()
    clock.advance(180)
    counter.record("v", [2] * 4)  # ... lose to 4 reads of 2 now: 10 / 2**2.5 < 4
    counter.flush()
    weights = dict(bucket_weights(clock(), 60, 10, 60.0))
    top = counter.top_k("v", 2)
    assert [entity for entity, _ in top] == [2, 1]
    assert top[0][1] == pytest.approx(4 * weights[1_800_000_180])
    assert top[1][1] == pytest.approx(10 * weights[1_800_000_000])
    assert weights[1_800_000_000] == pytest.approx(0.5 ** 2.5)
    counter.close()


def test_sampling_weights_counts_to_estimate_reads(redis_url: str, key_prefix: str) -> None:
    draws = iter([0.05, 0.5, 0.05, 0.9] * 10)
    counter = _counter(redis_url, key_prefix, Clock(), rate=0.1, rng=lambda: next(draws))
    for _ in range(40):
        counter.record("v", [7])
    assert counter.flush() == 20  # the draws below 0.1 were sampled
    assert counter.top_k("v", 1) == [(7, pytest.approx(200.0))]  # each counts 1 / 0.1
    counter.close()


def test_get_features_counts_reads(sqlite_target: Any, redis_url: str, key_prefix: str) -> None:
    table = make_table(sqlite_target.engine(), None, "pop", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i) for i in range(5)])
    with make_cache([make_view("pop", "pop", None)], redis_url, sqlite_target.url, key_prefix,
                    Clock(), popularity_sample_rate=1.0) as cache:
        for _ in range(3):
            cache.get_features([1, 2], ["clicks"])
        cache.get_features([2, 3], ["clicks"])
        assert cache.popularity is not None
        cache.popularity.flush()
        top = cache.top_k("pop", 3)
    assert [entity for entity, _ in top] == [2, 1, 3]
    assert [score for _, score in top] == [pytest.approx(4), pytest.approx(3), pytest.approx(1)]


def _reader(redis_url: str, prefix: str, seed: int, calls: int, batch: int,
            rate: float, out: Any) -> None:
    rng = np.random.default_rng(seed)
    n = 100_000
    weights = 1.0 / np.arange(1, n + 1)
    ids = rng.choice(n, size=calls * batch, p=weights / weights.sum())
    counter = _counter(redis_url, prefix, Clock(), rate=rate, rng=rng.random)
    counts = np.bincount(ids, minlength=n)
    for call in ids.reshape(calls, batch):
        counter.record("users", call.tolist())
    counter.close()  # the final flush
    out.put(counts.tolist())


@pytest.mark.slow
def test_top_k_recall_across_three_processes(redis_url: str, key_prefix: str) -> None:
    """Zipf(1.0) over 100k entities read by 3 processes; the 1000 most read are found."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(redis_url, key_prefix, seed, 12_000, 50, 0.5, out))
             for seed in (1, 2, 3)]
    for proc in procs:
        proc.start()
    totals = np.zeros(100_000, dtype=np.int64)
    for _ in procs:
        totals += np.array(out.get(timeout=300))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    truth = set(np.argsort(-totals, kind="stable")[:1000].tolist())
    counter = _counter(redis_url, key_prefix, Clock())
    found = {entity for entity, _ in counter.top_k("users", 1000)}
    counter.close()
    recall = len(truth & found) / 1000
    assert recall >= 0.95, recall


def test_a_big_call_is_counted_by_a_weighted_subset_that_keeps_every_estimate(
        redis_url: str, key_prefix: str) -> None:
    """A sampled call of more than IDS_PER_SAMPLE ids writes IDS_PER_SAMPLE of them, each
    weighted up: the sum is exact and every id's count stays an unbiased estimate."""
    counter = _counter(redis_url, key_prefix, Clock(), rate=1.0)  # every call sampled
    ids = list(range(10 * IDS_PER_SAMPLE))
    counter.record("one", ids)
    assert counter.flush() == len(ids)  # the reads it stands for
    written = counter.top_k("one", len(ids))
    assert len(written) == IDS_PER_SAMPLE  # a subset, each standing for ten ids
    assert all(n == pytest.approx(10.0) for _, n in written)
    calls = 300
    for _ in range(calls):
        counter.record("big", ids)
        assert counter.flush() == len(ids)
    top = dict(counter.top_k("big", len(ids)))
    counter.close()
    assert sum(top.values()) == pytest.approx(calls * len(ids))
    # one call picks an id with chance 1/10 and counts it 10: over 300 calls an id's count
    # is 300 on average, standard deviation 10 * sqrt(300 * 0.1 * 0.9) = 52
    assert len(top) == len(ids)  # 300 draws of 1/10 each: every id picked (1 - 0.9**300)
    assert all(20 < n < 700 for n in top.values()), sorted(top.values())[:3]
    mean = sum(top.values()) / len(top)
    assert mean == pytest.approx(calls)
    assert sorted(top.values())[len(top) // 2] == pytest.approx(calls, rel=0.25)


def test_a_small_call_counts_every_id(redis_url: str, key_prefix: str) -> None:
    counter = _counter(redis_url, key_prefix, Clock(), rate=1.0)
    counter.record("small", list(range(IDS_PER_SAMPLE)))
    counter.flush()
    top = dict(counter.top_k("small", 2 * IDS_PER_SAMPLE))
    counter.close()
    assert top == dict.fromkeys(range(IDS_PER_SAMPLE), 1.0)
