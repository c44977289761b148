"""Spawned serving processes for ``bench stampede`` and ``bench invalidation``, and the run
around them.

Each worker is a fresh interpreter (``spawn``) with its own ``FeatureCache``; the main process
paces the rounds through one ``multiprocessing`` barrier and collects one result per worker
from a queue. A worker that fails breaks the barrier, so nobody waits for it, and its
traceback is what the run reports.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.synchronize
import queue
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import dataset
from bench.common import BenchError, RedisTarget, Report, RunContext, Target, run_context
from bench.slow_store import SlowStore, slow_store

BARRIER_TIMEOUT_S = 180.0  # covers spawning and importing on a loaded 2-core box

Barrier = multiprocessing.synchronize.Barrier
ResultQueue = multiprocessing.queues.Queue  # of dict[str, Any]


def report_from(worker: int, results: ResultQueue[Any], barrier: Barrier,
                body: Callable[[], dict[str, Any]]) -> None:
    """Run a worker's body and put what it returns (or its traceback) on the queue; a failure
    breaks the barrier so nobody else waits for this worker."""
    try:
        out = body()
    except BaseException:
        barrier.abort()
        results.put({"worker": worker, "error": traceback.format_exc()})
        return
    results.put({"worker": worker, **out})


def collect(procs: Sequence[multiprocessing.process.BaseProcess], results: ResultQueue[Any],
            timeout_s: float) -> list[dict[str, Any]]:
    """One result per process (read before joining, so no queue feeder blocks), by worker."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                what = f"exit codes {[p.exitcode for p in procs]}" if dead else "timed out"
                raise BenchError(f"workers lost ({what})") from None
    for p in procs:
        p.join(30)
    errors = [r["error"] for r in got if "error" in r]
    real = [e for e in errors if "BrokenBarrierError" not in e.splitlines()[-1]]
    if errors:
        raise BenchError(f"a worker failed:\n{(real or errors)[0]}")
    return sorted(got, key=lambda r: int(r["worker"]))


@dataclass(frozen=True)
class Rounds:
    """How many rounds a cross-process benchmark runs: ``warmup`` untimed ones first."""

    rounds: int
    warmup: int


def run_on_slow_store(
    args: argparse.Namespace, title: str, key: str,
    measure: Callable[[RedisTarget, SlowStore, random.Random], dict[str, Any]],
    evaluate: Callable[[dict[str, Any]], list[Target]],
) -> tuple[RunContext, Report]:
    """A cross-process benchmark's run up to its own table: the Redis target and the slow
    offline store set up, ``measure`` run, its figures put under ``key`` in the report with
    ``evaluate``'s targets, and the run's header printed."""
    rng = random.Random(args.seed + 3)
    with run_context(args.redis_url) as ctx, slow_store(args.seed) as store:
        figures = measure(ctx.target, store, rng)
        setup = {**ctx.setup(args.seed), "features": list(dataset.FEATURE_NAMES)}
    report = Report(cases=[], ratios=[], server=ctx.server, quick=args.quick,
                    targets=evaluate(figures), extra={key: figures, "setup": setup})
    print(ctx.header(title, args.quick, setup))
    print()
    return ctx, report
