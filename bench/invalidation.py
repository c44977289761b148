"""``python -m bench invalidation``: how soon other processes' L1 drop an invalidated row.

K spawned subscriber processes, each with an L1 cache holding the round's row; the main
process (an ETL job: no L1) calls ``cache.invalidate(view, [id])`` and records when the call
returned; each subscriber polls ``cache.l1.get_many`` (sleeping ``POLL_S`` between polls) and
records when the row left its L1. Reported: ``dropped - returned`` over every subscriber and
round (negative when a subscriber dropped the row before the publisher's call had returned),
and per round the slowest subscriber's, which the target judges. ``l1.max_ttl`` is 10 min
there, so only the invalidation can drop the row; the subscribers' reset counters are
reported to show none cleared its L1. The rows are those of ``bench.slow_store`` (the
offline store ``bench stampede`` reads), written to Redis first by the publisher.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench import dataset
from bench.common import (
    BenchError,
    RedisTarget,
    Target,
    add_common_arguments,
    finish,
    format_ms_table,
    log,
    ms_stats,
    positive_int,
)
from bench.processes import (
    BARRIER_TIMEOUT_S,
    Barrier,
    ResultQueue,
    Rounds,
    collect,
    report_from,
    run_on_slow_store,
)
from bench.serving_l1 import PROCESS_L1_MAX_TTL, l1_config
from bench.slow_store import SlowStore
from featcache import CacheConfig, FeatureCache, OfflineStoreConfig, RedisConfig, Status

DESCRIPTION = ("invalidation: from invalidate() returning to every subscribed process's L1 "
               "dropping the row")

QUICK = Rounds(rounds=50, warmup=5)
FULL = Rounds(rounds=200, warmup=10)

POLL_S = 0.0002  # subscribers' sleep between two L1 polls
DROP_TIMEOUT_S = 5.0  # a subscriber gives up on a row after this

TARGET_INVALIDATION_P99_MS = 50.0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fewer rounds (< 60 s)")
    parser.add_argument("--subscribers", type=positive_int, default=3,
                        help="subscriber processes (default 3)")


def run(args: argparse.Namespace) -> int:
    ctx, report = run_on_slow_store(
        args, "featcache invalidation", "invalidation",
        lambda target, store, rng: measure_invalidation(target, store, args.subscribers,
                                                        QUICK if args.quick else FULL, rng),
        evaluate_targets,
    )
    invalidation = report.extra["invalidation"]
    print(f"{invalidation['subscribers']} subscriber processes, {invalidation['rounds']} "
          f"rounds; each polls its L1 every {POLL_S * 1000:g} ms")
    print(format_ms_table([
        ("invalidate() call", invalidation["invalidate_call_ms"]),
        ("dropped - call returned", invalidation["dropped_minus_returned_ms"]),
        ("every subscriber dropped", invalidation["every_subscriber_dropped_ms"]),
    ]))
    print(f"dropped before the call returned: {invalidation['dropped_before_call_returned']}; "
          f"not dropped within {DROP_TIMEOUT_S:g} s: "
          f"{invalidation['not_dropped_within_s']['count']}; subscriber resets "
          f"{invalidation['subscriber_resets']}, gaps {invalidation['subscriber_gaps']}")
    return finish(report, args.json, ctx.started)


# --------------------------------------------------------------------------------------------
# Subscribers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberJob:
    worker: int
    config: CacheConfig
    round_ids: tuple[int, ...]  # warm-up rounds first


def subscriber_worker(job: SubscriberJob, barrier: Barrier, results: ResultQueue[Any]) -> None:
    report_from(job.worker, results, barrier, lambda: _subscriber_body(job, barrier))


def _subscriber_body(job: SubscriberJob, barrier: Barrier) -> dict[str, Any]:
    names = list(dataset.FEATURE_NAMES)
    view = dataset.VIEW_NAME
    dropped: list[int | None] = []  # monotonic ns when the row was seen gone, per round
    with FeatureCache(job.config) as cache:
        l1 = cache.l1
        assert l1 is not None
        get_many = l1.get_many
        for eid in job.round_ids:
            for _ in range(5):  # an L1 fill is refused if an invalidation raced with it
                status = cache.get_features([eid], names).status(eid, names[0])
                if status is not Status.HIT_REDIS:
                    raise BenchError(f"subscriber: row {eid} is {status}, expected HIT_REDIS")
                if get_many(view, (eid,)):
                    break
            else:
                raise BenchError(f"subscriber: row {eid} never stayed in the L1")
            barrier.wait(BARRIER_TIMEOUT_S)  # everyone holds it: the publisher may go
            deadline = time.monotonic() + DROP_TIMEOUT_S
            seen_gone: int | None = None
            while True:
                if not get_many(view, (eid,)):
                    seen_gone = time.monotonic_ns()
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            dropped.append(seen_gone)
            barrier.wait(BARRIER_TIMEOUT_S)
        stats = cache.subscriber_stats()
        l1_stats = l1.stats()
    return {"dropped": dropped, "subscriber": stats, "l1": l1_stats}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def measure_invalidation(target: RedisTarget, store: SlowStore, subscribers: int, mode: Rounds,
                         rng: random.Random) -> dict[str, Any]:
    warmup, rounds = mode.warmup, mode.rounds
    ids = rng.sample(sorted(store.base), warmup + rounds)
    config = CacheConfig(
        views=(dataset.view(),), redis=RedisConfig(url=target.url, key_prefix=target.prefix),
        offline_store=OfflineStoreConfig(url=store.url),
    )
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(subscribers + 1)
    results: ResultQueue[Any] = ctx.Queue()
    published: list[tuple[int, int]] = []  # (called, returned), monotonic ns
    started = time.perf_counter()
    with FeatureCache(config) as publisher:  # an ETL job: no L1
        report = publisher.put_rows(dataset.VIEW_NAME, [store.base[eid] for eid in ids])
        if report.written != len(ids):
            raise BenchError(f"put_rows wrote {report.written} of {len(ids)} rows")
        sub_config = l1_config(config, PROCESS_L1_MAX_TTL)
        workers = [
            ctx.Process(target=subscriber_worker,
                        args=(SubscriberJob(w, sub_config, tuple(ids)), barrier, results),
                        name=f"subscriber-{w}")
            for w in range(subscribers)
        ]
        for p in workers:
            p.start()
        try:
            for eid in ids:
                barrier.wait(BARRIER_TIMEOUT_S)
                time.sleep(rng.uniform(0.0, 0.003))  # land at any phase of the tails' loops
                called = time.monotonic_ns()
                publisher.invalidate(dataset.VIEW_NAME, [eid])
                returned = time.monotonic_ns()
                published.append((called, returned))
                barrier.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass  # a subscriber failed: collect reports why
        out = collect(workers, results, timeout_s=60.0)
    log(f"invalidation: {subscribers} subscribers, {warmup}+{rounds} rounds "
        f"({time.perf_counter() - started:.1f} s with spawning)")
    return summarize_invalidation(out, published, warmup, subscribers)


def summarize_invalidation(out: list[dict[str, Any]], published: list[tuple[int, int]],
                           warmup: int, subscribers: int) -> dict[str, Any]:
    delays: list[int] = []
    slowest: dict[int, int] = {}  # per round: the last subscriber to drop the row
    missed = 0
    for w in out:
        for r, seen_gone in enumerate(w["dropped"]):
            if r < warmup:
                continue
            if seen_gone is None:
                missed += 1
            else:
                delay = seen_gone - published[r][1]
                delays.append(delay)
                slowest[r] = max(slowest.get(r, delay), delay)
    calls = [ret - called for called, ret in published[warmup:]]
    subs = [w["subscriber"] for w in out]
    stats = ms_stats(delays) if delays else {}
    return {
        "subscribers": subscribers,
        "rounds": len(published) - warmup,
        "warmup_rounds": warmup,
        "poll_interval_ms": POLL_S * 1000,
        "stream_block_ms": 500,
        "invalidate_call_ms": ms_stats(calls),
        "dropped_minus_returned_ms": stats,
        "p50_ms": stats.get("p50"),
        "p99_ms": stats.get("p99"),
        # the target: "to every subscribed process dropping the row", one figure per round
        "every_subscriber_dropped_ms": ms_stats(list(slowest.values())),
        "dropped_before_call_returned": sum(d < 0 for d in delays),
        "not_dropped_within_s": {"seconds": DROP_TIMEOUT_S, "count": missed},
        "subscriber_resets": sum(int(s.get("resets", 0)) for s in subs),
        "subscriber_gaps": sum(int(s.get("gaps", 0)) for s in subs),
        "entries_applied": [int(s.get("entries_applied", 0)) for s in subs],
        "l1_invalidated": [int(w["l1"]["invalidated"]) for w in out],
    }


# --------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------


def evaluate_targets(invalidation: Mapping[str, Any]) -> list[Target]:
    every = invalidation["every_subscriber_dropped_ms"]
    p99 = every.get("p99")
    missed = invalidation["not_dropped_within_s"]["count"]
    resets = invalidation["subscriber_resets"]
    return [
        Target(
            f"invalidation: every subscriber dropped - returned p99 <= "
            f"{TARGET_INVALIDATION_P99_MS:g} ms",
            p99 is not None and p99 <= TARGET_INVALIDATION_P99_MS and missed == 0
            and resets == 0,
            f"p99 {p99} ms, p50 {every.get('p50')} ms over {every.get('n', 0)} rounds (the "
            f"slowest of the subscribers each round; over all drops p99 "
            f"{invalidation['p99_ms']} ms); subscriber resets {resets}"
            + (f"; {missed} rows not dropped within {DROP_TIMEOUT_S:g} s" if missed else ""),
        ),
    ]
