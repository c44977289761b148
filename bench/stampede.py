"""``python -m bench stampede``: many processes and threads asking for the same cold row.

N spawned processes x M threads, each process with its own ``FeatureCache`` (L1 on, as a
serving process would run), ask for the same cold row at the same instant (barriers, then every
thread sleeps until a start time the main process set): a row in SQL, not in Redis, not in any
L1. R rounds, a fresh cold row each. The SQL read is honestly slow: the table holds ~280k rows
and has *no index* on the entity column, so the latest-row query scans it
(``bench.slow_store``). Every thread records its latency (``time.monotonic_ns``, one clock for
all processes on Linux); the thread whose call ran the SQL query (seen through a SQLAlchemy
``before_cursor_execute`` listener on the cache's engine) is the *filler*, its latency the
round's fill time; everyone else is a *waiter*: same-process threads join the in-process
single-flight, other processes wait on the fill lease and poll Redis.

Baseline, in the same run: after every round, while everyone else waits at a barrier, one
thread reads another cold row of the same table alone (``cold_fill``).
``waiters_p99_minus_fill_ms`` is the p99 over waiters of (the waiter's latency - its round's
fill time); also reported is when each waiter got its answer relative to the filler's call
returning, which start skew does not affect. Per-process stats deltas check that every round
read SQL exactly once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import sqlalchemy as sa

from bench import dataset
from bench.common import (
    BenchError,
    RedisTarget,
    Target,
    add_common_arguments,
    finish,
    format_ms_table,
    log,
    ms,
    ms_stats,
    percentile,
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
from featcache import (
    CacheConfig,
    FeatureCache,
    FeatureResult,
    OfflineStoreConfig,
    RedisConfig,
    Status,
)

DESCRIPTION = ("stampede: processes x threads asking for one cold row at once, against one "
               "uncontended cold read")

QUICK = Rounds(rounds=15, warmup=2)
FULL = Rounds(rounds=100, warmup=3)

START_LEAD_S = 0.1  # every thread starts this long after the round is set up
STAMPEDE_STATUSES = frozenset({Status.FILLED, Status.HIT_REDIS})
STAT_EVENTS = ("hit_l1", "hit_redis", "filled", "sql_queries", "singleflight_joined",
               "lease_waits", "lease_timeouts", "fills_fenced", "rows_written")

TARGET_STAMPEDE_EXCESS_MS = 20.0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fewer rounds (< 60 s)")
    parser.add_argument("--processes", type=positive_int, default=4,
                        help="processes (default 4)")
    parser.add_argument("--threads", type=positive_int, default=16,
                        help="threads per process (default 16)")


def run(args: argparse.Namespace) -> int:
    ctx, report = run_on_slow_store(
        args, "featcache stampede", "stampede",
        lambda target, store, rng: measure_stampede(target, store, args.processes,
                                                    args.threads,
                                                    QUICK if args.quick else FULL, rng),
        evaluate_targets,
    )
    stampede = report.extra["stampede"]
    print(f"{stampede['processes']} processes x {stampede['threads_per_process']} threads on "
          f"one cold row, {stampede['rounds']} rounds; SQL: {stampede['table_rows']:,}-row "
          f"SQLite table without an index on the entity (a scan)")
    print(format_ms_table([
        ("fill (the call that read SQL)", stampede["fill_ms"]),
        ("cold_fill (same read, alone)", stampede["cold_fill_ms"]),
        ("waiters, all", stampede["waiters_ms"]),
        ("  same process (single-flight)", stampede["waiters_same_process_ms"]),
        ("  other processes (lease)", stampede["waiters_other_processes_ms"]),
        ("waiter - fill, per round", stampede["waiters_minus_fill_ms"]),
        ("waiter done - filler done", stampede["waiter_done_after_filler_ms"]),
        ("start skew per round", stampede["start_skew_ms"]),
    ]))
    totals = stampede["stats_totals"]
    print(f"SQL reads per round: {stampede['sql_reads_per_round']} (rounds by count); "
          f"lease waits {totals.get('lease_waits', 0)}, lease timeouts "
          f"{totals.get('lease_timeouts', 0)}, single-flight joins "
          f"{totals.get('singleflight_joined', 0)}")
    return finish(report, args.json, ctx.started)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StampedeJob:
    worker: int
    config: CacheConfig
    threads: int
    solo_id: int  # read alone first: binds the table, opens connections, loads scripts
    round_ids: tuple[int, ...]  # warm-up rounds first
    baseline_ids: tuple[int, ...]  # worker 0 only: one uncontended cold read after each round
    expected: dict[int, dict[str, Any]] = field(repr=False)


def _stat_counts(cache: FeatureCache) -> Counter[str]:
    view = cache.stats().get(dataset.VIEW_NAME, {})
    return Counter({k: int(view.get(k, 0)) for k in STAT_EVENTS})


def _row_problem(res: FeatureResult, eid: int, expected: Mapping[str, Any],
                 statuses: frozenset[Status]) -> str | None:
    counts = res.status_counts()
    if sum(counts[s] for s in statuses) != len(res.feature_names):
        return f"row {eid}: statuses {dict(counts)}"
    if res[eid] != expected:
        return f"row {eid}: {res[eid]} != {dict(expected)}"
    return None


def stampede_worker(job: StampedeJob, barrier: Barrier, start_at: Synchronized[float],
                    results: ResultQueue[Any]) -> None:
    report_from(job.worker, results, barrier, lambda: _stampede_body(job, barrier, start_at))


def _stampede_body(job: StampedeJob, barrier: Barrier, start_at: Synchronized[float]
                   ) -> dict[str, Any]:
    names = list(dataset.FEATURE_NAMES)
    sql_calls: dict[int, int] = {}  # thread ident -> latest-row queries it ran

    def on_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                   executemany: bool) -> None:
        if "fc_latest" in statement:  # the latest-row query's subquery alias
            me = threading.get_ident()
            sql_calls[me] = sql_calls.get(me, 0) + 1

    with FeatureCache(job.config) as cache:
        sa.event.listen(cache.engine, "before_cursor_execute", on_execute)
        problem = _row_problem(cache.get_features([job.solo_id], names), job.solo_id,
                               job.expected[job.solo_id], frozenset({Status.FILLED}))
        if problem:
            raise BenchError(f"solo warm-up read: {problem}")
        # per thread: (round, start_ns, end_ns, ran SQL, problem or None)
        samples: list[list[tuple[int, int, int, bool, str | None]]] = [
            [] for _ in range(job.threads)
        ]
        deltas: list[dict[str, int]] = []
        baseline: list[tuple[int, int, bool, str | None]] = []
        errors: list[str] = []

        def body(t: int) -> None:
            get_features = cache.get_features
            mine = samples[t]
            before = _stat_counts(cache)
            for r, eid in enumerate(job.round_ids):
                barrier.wait(BARRIER_TIMEOUT_S)  # ready: the coordinator sets start_at
                barrier.wait(BARRIER_TIMEOUT_S)  # go
                # every thread starts at the same instant, not in barrier-release order
                time.sleep(max(0.0, start_at.value - time.monotonic()))
                me = threading.get_ident()
                calls = sql_calls.get(me, 0)
                start = time.monotonic_ns()
                res = get_features([eid], names)
                end = time.monotonic_ns()
                ran_sql = sql_calls.get(me, 0) != calls
                mine.append((r, start, end, ran_sql,
                             _row_problem(res, eid, job.expected[eid], STAMPEDE_STATUSES)))
                del res
                barrier.wait(BARRIER_TIMEOUT_S)  # done
                if t != 0:
                    continue
                # every thread of every process is done with round r: this process's share
                after = _stat_counts(cache)
                deltas.append(dict(after - before))
                if job.baseline_ids:  # everyone else waits at the next barrier meanwhile
                    bid = job.baseline_ids[r]
                    calls = sql_calls.get(me, 0)
                    start = time.monotonic_ns()
                    res = get_features([bid], names)
                    elapsed = time.monotonic_ns() - start
                    baseline.append((r, elapsed, sql_calls.get(me, 0) != calls,
                                     _row_problem(res, bid, job.expected[bid],
                                                  frozenset({Status.FILLED}))))
                    del res
                    after = _stat_counts(cache)
                before = after

        def guarded(t: int) -> None:
            try:
                body(t)
            except BaseException:
                errors.append(traceback.format_exc())
                barrier.abort()

        threads = [threading.Thread(target=guarded, args=(t,), name=f"stampede-{t}")
                   for t in range(job.threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            real = [e for e in errors if "BrokenBarrierError" not in e.splitlines()[-1]]
            raise BenchError((real or errors)[0])
    return {"samples": samples, "deltas": deltas, "baseline": baseline}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def measure_stampede(target: RedisTarget, store: SlowStore, procs: int, threads: int,
                     mode: Rounds, rng: random.Random) -> dict[str, Any]:
    warmup, rounds = mode.warmup, mode.rounds
    cold = rng.sample(store.copy_ids(), procs + 2 * (warmup + rounds))
    solo, cold = cold[:procs], cold[procs:]
    round_ids, baseline_ids = cold[: warmup + rounds], cold[warmup + rounds :]
    expected = {eid: store.expected(eid) for eid in (*solo, *round_ids, *baseline_ids)}
    config = l1_config(CacheConfig(
        views=(dataset.view(),), redis=RedisConfig(url=target.url, key_prefix=target.prefix),
        offline_store=OfflineStoreConfig(url=store.url),
    ), PROCESS_L1_MAX_TTL)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs * threads + 1)  # + this process, which paces the rounds
    start_at: Synchronized[float] = ctx.Value("d", 0.0)
    results: ResultQueue[Any] = ctx.Queue()
    jobs = [
        StampedeJob(w, config, threads, solo[w], tuple(round_ids),
                    tuple(baseline_ids) if w == 0 else (), expected)
        for w in range(procs)
    ]
    started = time.perf_counter()
    workers = [ctx.Process(target=stampede_worker, args=(job, barrier, start_at, results),
                           name=f"stampede-{job.worker}") for job in jobs]
    for p in workers:
        p.start()
    try:
        for _ in round_ids:
            barrier.wait(BARRIER_TIMEOUT_S)  # ready: the previous round is over
            start_at.value = time.monotonic() + START_LEAD_S
            barrier.wait(BARRIER_TIMEOUT_S)  # go
            barrier.wait(BARRIER_TIMEOUT_S)  # done
    except threading.BrokenBarrierError:
        pass  # a worker failed: collect reports why
    out = collect(workers, results, timeout_s=BARRIER_TIMEOUT_S * 2 + 30 * (warmup + rounds))
    log(f"stampede: {procs} processes x {threads} threads, {warmup}+{rounds} rounds "
        f"({time.perf_counter() - started:.1f} s with spawning)")
    return summarize_stampede(out, warmup, rounds, procs, threads, store.rows)


def summarize_stampede(out: list[dict[str, Any]], warmup: int, rounds: int, procs: int,
                       threads: int, table_rows: int) -> dict[str, Any]:
    problems = [s[4] for w in out for th in w["samples"] for s in th if s[4]]
    problems += [b[3] for b in out[0]["baseline"] if b[3]]
    if problems:
        raise BenchError(f"stampede: {len(problems)} wrong answers, e.g. {problems[0]}")
    # per round: (worker, start_ns, end_ns, ran_sql)
    by_round: dict[int, list[tuple[int, int, int, bool]]] = {}
    for w in out:
        for th in w["samples"]:
            for r, start, end, ran_sql, _ in th:
                by_round.setdefault(r, []).append((int(w["worker"]), start, end, ran_sql))
    fills: list[int] = []
    waiters: list[int] = []
    joiners: list[int] = []  # waiters in the filler's process (single-flight)
    remote: list[int] = []  # waiters in other processes (fill lease)
    excess: list[int] = []  # waiter latency - that round's fill latency
    after_fill: list[int] = []  # waiter end - filler end
    skews: list[int] = []
    sql_reads: Counter[int] = Counter()
    sql_queries: Counter[int] = Counter()  # per process and round, from its stats delta
    totals: Counter[str] = Counter()
    for r in range(warmup, warmup + rounds):
        calls = by_round[r]
        readers = sorted((c for c in calls if c[3]), key=lambda c: c[1])
        sql_reads[len(readers)] += 1
        for w in out:
            sql_queries[int(w["deltas"][r].get("sql_queries", 0))] += 1
        skews.append(max(c[1] for c in calls) - min(c[1] for c in calls))
        for w in out:
            totals.update(w["deltas"][r])
        if not readers:
            continue  # nobody read SQL: cannot happen for a cold row; counted in sql_reads
        filler = readers[0]
        fill = filler[2] - filler[1]
        fills.append(fill)
        for c in calls:
            if c is filler:
                continue
            latency = c[2] - c[1]
            waiters.append(latency)
            (joiners if c[0] == filler[0] else remote).append(latency)
            excess.append(latency - fill)
            after_fill.append(c[2] - filler[2])
    baseline = [b[1] for b in out[0]["baseline"][warmup:]]
    if not all(b[2] for b in out[0]["baseline"]):
        raise BenchError("a cold_fill baseline read did not run SQL")
    if not fills:
        raise BenchError("stampede: no round read SQL")
    fill_s, cold_s = ms_stats(fills), ms_stats(baseline)
    waiters_s = ms_stats(waiters)
    return {
        "processes": procs,
        "threads_per_process": threads,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "table_rows": table_rows,
        "table_index_on_entity": False,
        "fill_ms": fill_s,
        "cold_fill_ms": cold_s,
        "waiters_ms": waiters_s,
        "waiters_same_process_ms": ms_stats(joiners),
        "waiters_other_processes_ms": ms_stats(remote),
        "waiters_p99_ms": waiters_s["p99"],
        # "the waiters' p99 minus the fill time", read both ways: the waiters' p99 less the
        # fills' p50, and the p99 over waiters of (latency - its own round's fill); the
        # target holds only if both do
        "waiters_p99_minus_fill_p50_ms": round(waiters_s["p99"] - fill_s["p50"], 2),
        "waiters_p99_minus_fill_ms": ms(percentile(sorted(excess), 0.99)),
        "waiters_minus_fill_ms": ms_stats(excess),
        "waiters_p99_minus_cold_fill_p50_ms": round(waiters_s["p99"] - cold_s["p50"], 2),
        "waiter_done_after_filler_ms": ms_stats(after_fill),
        "start_skew_ms": ms_stats(skews),
        "sql_reads_per_round": {str(k): v for k, v in sorted(sql_reads.items())},
        "sql_queries_per_process_round": {str(k): v for k, v in sorted(sql_queries.items())},
        "stats_totals": dict(totals),
    }


# --------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------


def evaluate_targets(stampede: Mapping[str, Any]) -> list[Target]:
    reads = stampede["sql_reads_per_round"]
    one_read = reads == {"1": stampede["rounds"]} and set(
        stampede["sql_queries_per_process_round"]) <= {"0", "1"} and sum(
        int(k) * v for k, v in stampede["sql_queries_per_process_round"].items()
    ) == stampede["rounds"]
    excess = max(stampede["waiters_p99_minus_fill_ms"],
                 stampede["waiters_p99_minus_fill_p50_ms"])
    return [
        Target(
            f"stampede waiters p99 - fill <= {TARGET_STAMPEDE_EXCESS_MS:g} ms, exactly 1 SQL "
            "read per round",
            excess <= TARGET_STAMPEDE_EXCESS_MS and one_read,
            f"{excess:.2f} ms, the larger of: waiters p99 {stampede['waiters_p99_ms']:.2f} ms "
            f"- fill p50 {stampede['fill_ms']['p50']:.2f} ms = "
            f"{stampede['waiters_p99_minus_fill_p50_ms']:.2f} ms, p99 of (waiter - its round's "
            f"fill) {stampede['waiters_p99_minus_fill_ms']:.2f} ms (cold_fill p50 "
            f"{stampede['cold_fill_ms']['p50']:.2f} ms); SQL reads per round {reads}, SQL "
            f"queries per process and round {stampede['sql_queries_per_process_round']}",
        ),
    ]
