"""``python -m bench analyze [--json OUT.json] [--quick]``: the LRU hit rate curve of a large
trace, exact against SHARDS, and what each costs.

Pure computation (``featcache.analysis``), no Redis. The trace: 10,000,000 accesses drawn from
Zipf(alpha 1.0) over 1,000,000 ids (popularity ranks shuffled over the ids; ``--quick``:
1,000,000 over 100,000). Timed, once each, in one run:

``exact``      the stack distances of every access and the curve at every size
               (``featcache.analysis.mattson.lru_curve``), the dense id codes included;
``sample``     spatial sampling of the trace at 1% (``featcache.analysis.trace.sample``: one
               BLAKE2b hash per distinct id);
``shards``     fixed-rate SHARDS on that sample; ``shards_adj`` SHARDS-adj on the same (the
               whole trace's length is known here).

Error of each SHARDS curve against the exact one, the baseline of the same run: the mean
absolute difference of the hit rates over every size from 1 to the distinct ids (the target's
figure), over 80 sizes evenly spaced on a log scale from 1/R (the smallest size a 1/R sample
resolves) to the distinct ids, and the largest difference. Which ids a 1% sample holds decides
much of the error (on Zipf(1.0) the 100 most read ids take a third of the reads, and a 1%
sample holds about one of them), so the error is measured on ``SAMPLES`` samples: the same
trace sampled under as many view names (the hash covers the name), the first being the timed
one. Before any figure counts, the exact curve of the trace's first 200,000 accesses is checked
against an ``OrderedDict`` LRU at three sizes (equal hit counts, or the run fails).

Targets: the mean absolute error of SHARDS-adj <= 0.02 in every sample, and of fixed-rate
SHARDS in the median sample; the whole run (trace generation included) under 120 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchError, Report, Target, cpu_probe_ms, load_and_speed, log
from featcache.analysis.mattson import HitRateCurve, lru_curve, reference_lru_hits
from featcache.analysis.report import size_grid
from featcache.analysis.sampling import sampled
from featcache.analysis.trace import Trace, sample

DESCRIPTION = "LRU hit rate curve of a 10M-access Zipf trace: exact (stack distances) vs SHARDS"

ACCESSES, IDS = 10_000_000, 1_000_000
QUICK_ACCESSES, QUICK_IDS = 1_000_000, 100_000
ALPHA = 1.0
RATE = 0.01
SAMPLES = 10
VIEW = "bench"
CHECK_ACCESSES = 200_000
CHECK_SIZES = (10, 1_000, 20_000)
READS_PER_SECOND = 1_000  # the timestamps --write-trace gives the accesses
MAE_TARGET = 0.02
SECONDS_TARGET = 120.0


def zipf_ids(accesses: int, ids: int, alpha: float, seed: int) -> np.ndarray[Any, Any]:
    """``accesses`` ids drawn from Zipf(``alpha``) over ``ids`` ids, ranks shuffled over ids."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, ids + 1, dtype=np.float64) ** alpha)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(accesses), side="right"), ids - 1)
    return rng.permutation(ids).astype(np.int64)[ranks]


def write_trace(ids: np.ndarray[Any, Any], path: str) -> None:
    """The trace as a Parquet file ``featcache analyze --trace`` reads."""
    import pyarrow as pa  # noqa: PLC0415 - only when asked for
    import pyarrow.parquet as pq  # noqa: PLC0415

    table = pa.table({
        "view": pa.DictionaryArray.from_arrays(np.zeros(len(ids), np.int8), pa.array([VIEW])),
        "entity_id": pa.array(ids),
        "ts": pa.array(np.arange(len(ids), dtype=np.float64) / READS_PER_SECOND),
    })
    pq.write_table(table, path)
    log(f"wrote the trace to {path}")


brute_force_lru_hits = reference_lru_hits


def check_exact(ids: np.ndarray[Any, Any]) -> None:
    prefix = Trace(VIEW, ids[:CHECK_ACCESSES])
    curve = lru_curve(prefix)
    as_list = prefix.ids.tolist()
    for size in CHECK_SIZES:
        expected = brute_force_lru_hits(as_list, size)
        got = round(curve.hit_rate(size) * len(prefix))
        if got != expected:
            raise BenchError(f"exact curve at size {size}: {got} hits, OrderedDict LRU "
                             f"{expected}")
    log(f"exact curve checked against an OrderedDict LRU at sizes {CHECK_SIZES} "
        f"({CHECK_ACCESSES:,} accesses): equal")


def sample_as(trace: Trace, view: str, rate: float) -> Trace:
    """``sample(trace, rate)`` as if the trace were of ``view``: another set of ids, the
    trace's id codes reused (a new ``Trace`` would factorize 10M ids again)."""
    keep_id = np.fromiter((sampled(view, i, rate) for i in trace.distinct_ids.tolist()),
                          dtype=bool, count=trace.distinct)
    keep = keep_id[trace.codes]
    return Trace(view, trace.ids[keep], None, rate, len(trace))


def errors(exact: HitRateCurve, estimate: HitRateCurve, rate: float) -> dict[str, float]:
    every = np.arange(1, int(np.ceil(exact.distinct)) + 1)
    diff = np.abs(exact.hit_rates(every) - estimate.hit_rates(every))
    grid = size_grid(int(np.ceil(1 / rate)), int(np.ceil(exact.distinct)), 80)
    diff_log = np.abs(exact.hit_rates(grid) - estimate.hit_rates(grid))
    return {
        "mae_every_size": round(float(diff.mean()), 5),
        "mae_log_grid": round(float(diff_log.mean()), 5),
        "max_error": round(float(diff.max()), 5),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT.json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ACCESSES:,} accesses over {QUICK_IDS:,} ids (seconds)")
    parser.add_argument("--seed", type=int, default=20_261_206, help="trace seed")
    parser.add_argument(
        "--write-trace", metavar="FILE.parquet",
        help=f"also write the trace as a featcache analyze input (view {VIEW!r}, ts at "
             f"{READS_PER_SECOND:,} reads a second)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_before = os.getloadavg()
    probe_before = cpu_probe_ms()
    accesses, ids = (QUICK_ACCESSES, QUICK_IDS) if args.quick else (ACCESSES, IDS)
    log(f"trace: {accesses:,} accesses, Zipf({ALPHA}) over {ids:,} ids, seed {args.seed}")
    t0 = time.perf_counter()
    trace_ids = zipf_ids(accesses, ids, ALPHA, args.seed)
    generate_s = time.perf_counter() - t0
    if args.write_trace:
        write_trace(trace_ids, args.write_trace)
    check_exact(trace_ids)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    trace = Trace(VIEW, trace_ids)
    exact = lru_curve(trace)
    seconds["exact"] = time.perf_counter() - t0
    log(f"exact: {seconds['exact']:.1f} s")
    t0 = time.perf_counter()
    first = sample(trace, RATE)
    seconds["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = lru_curve(first)
    seconds["shards"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards_adj = lru_curve(first, adjusted=True)
    seconds["shards_adj"] = time.perf_counter() - t0
    if not np.array_equal(sample_as(trace, VIEW, RATE).ids, first.ids):
        raise BenchError("sample_as does not sample as featcache.analysis.trace.sample does")

    samples: list[dict[str, Any]] = []
    for k in range(SAMPLES):
        part = first if k == 0 else sample_as(trace, f"{VIEW}-{k}", RATE)
        samples.append({
            "view": part.view, "accesses": len(part), "ids": part.distinct,
            "shards": errors(exact, shards if k == 0 else lru_curve(part), RATE),
            "shards_adj": errors(exact, shards_adj if k == 0 else lru_curve(part, adjusted=True),
                                 RATE),
        })
    total_s = time.perf_counter() - started

    print(f"\nLRU curve, {accesses:,} accesses, {trace.distinct:,} distinct ids, Zipf({ALPHA}); "
          f"SHARDS at rate {RATE}")
    print(f"{'case':12} {'seconds':>8} {'accesses':>11}")
    for name, n in (("exact", len(trace)), ("sample", len(first)), ("shards", len(first)),
                    ("shards_adj", len(first))):
        print(f"{name:12} {seconds[name]:>8.2f} {n:>11,}")
    print(f"\nMean absolute error against the exact curve, {SAMPLES} samples at {RATE:.0%} "
          f"(over every size / log grid from {int(1 / RATE)}; largest error):")
    print(f"{'sample':9} {'accesses':>9} {'ids':>6}  {'shards':>24}  {'shards_adj':>24}")
    for s in samples:
        cells = [f"{s[v]['mae_every_size']:.4f} / {s[v]['mae_log_grid']:.4f}; "
                 f"{s[v]['max_error']:.3f}" for v in ("shards", "shards_adj")]
        print(f"{s['view']:9} {s['accesses']:>9,} {s['ids']:>6,}  {cells[0]:>24}  "
              f"{cells[1]:>24}")
    median = {v: statistics.median(s[v]["mae_every_size"] for s in samples)
              for v in ("shards", "shards_adj")}
    worst = {v: max(s[v]["mae_every_size"] for s in samples) for v in ("shards", "shards_adj")}
    print(f"median    {'':>9} {'':>6}  {median['shards']:>24.4f}  {median['shards_adj']:>24.4f}")
    print(f"worst     {'':>9} {'':>6}  {worst['shards']:>24.4f}  {worst['shards_adj']:>24.4f}")
    sizes = [s for s in (100, 1_000, 10_000, 100_000, 1_000_000) if s <= trace.distinct]
    print(f"\nhit rate at a size, the timed sample ({VIEW}):")
    print(f"{'size':>10} {'exact':>7} {'shards':>7} {'adj':>7}")
    for size in sizes:
        print(f"{size:>10,} {exact.hit_rate(size):>7.2%} {shards.hit_rate(size):>7.2%} "
              f"{shards_adj.hit_rate(size):>7.2%}")

    targets = [
        Target("SHARDS-adj mean absolute error <= 0.02, every sample",
               worst["shards_adj"] <= MAE_TARGET,
               f"worst {worst['shards_adj']:.4f}, median {median['shards_adj']:.4f} over "
               f"every size 1..{trace.distinct:,}, {SAMPLES} samples at {RATE:.0%}"),
        Target("fixed-rate SHARDS mean absolute error <= 0.02, median sample",
               median["shards"] <= MAE_TARGET,
               f"median {median['shards']:.4f}, worst {worst['shards']:.4f}"),
        Target("whole run under 120 s", total_s < SECONDS_TARGET,
               f"{total_s:.1f} s (exact curve {seconds['exact']:.1f} s)"),
    ]
    report = Report(
        cases=[], ratios=[], server="none (pure computation)", quick=args.quick,
        targets=targets,
        extra={
            "parameters": {"accesses": accesses, "ids": ids, "alpha": ALPHA, "rate": RATE,
                           "samples": SAMPLES, "seed": args.seed,
                           "distinct_ids": trace.distinct},
            "seconds": {**{k: round(v, 3) for k, v in seconds.items()},
                        "generate": round(generate_s, 3), "total": round(total_s, 3)},
            "samples": samples,
            "median_mae_every_size": median,
            "worst_mae_every_size": worst,
            "hit_rates": {str(s): {"exact": round(exact.hit_rate(s), 5),
                                   "shards": round(shards.hit_rate(s), 5),
                                   "shards_adj": round(shards_adj.hit_rate(s), 5)}
                          for s in sizes},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        **load_and_speed(load_before, probe_before)},
        },
    )
    print()
    for t in targets:
        print(t.line())
    if args.json:
        doc = report.to_json()
        # one timed call per case, with the collector as it is: nothing here is frozen
        doc["environment"]["gc_frozen_during_timed_rounds"] = False
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analyze", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
