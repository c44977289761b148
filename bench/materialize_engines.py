"""``python -m bench materialize --engine spark|ray``: the same rows loaded by an engine, beside
the single-process command, in one run.

``bench.materialize``'s generated rows (the 10-feature ``user_stats`` view, N rows: 1M,
``--quick`` 100k) are written once into a SQLite file and once into a Parquet file (row groups
of 100k rows). Then, each into a fresh private Valkey (or the ``--redis-url`` server under a
unique prefix), timed as wall seconds of the call alone:

``cli_sqlite``    ``featcache.materialize.materialize(cache, view, all=True)`` from SQLite: the
                  single-process command's path, the same-run baseline
``cli_parquet``   ``write_batches`` over the Parquet file's batches in this process: what
                  ``featcache materialize --from-parquet`` does
``spark``         ``featcache.spark.materialize`` of ``spark.read.parquet`` on ``local[2]``
                  (the session started untimed; Python workers are this interpreter)
``ray``           ``featcache.ray.materialize`` of ``ray.data.read_parquet`` with 2 actors of
                  half a CPU, after ``ray.init(num_cpus=2)`` (untimed)

Each is checked afterwards: 1000 random ids read back HIT_REDIS with exactly the generated
values. Per case: rows written, seconds, rows/s and its ratio to ``cli_sqlite``'s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench import dataset
from bench.common import Target, log, redis_target
from bench.materialize import (
    COLUMNS,
    FULL_ROWS,
    QUICK_ROWS,
    SqliteLoader,
    fresh_cache,
    generate,
    verify,
    view_for,
)
from featcache import CacheConfig, OfflineStoreConfig, RedisConfig
from featcache.materialize import materialize, write_batches

CASES = ("cli_sqlite", "cli_parquet", "spark", "ray")


def run_engines(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    n = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = sorted(set(engines) - {"spark", "ray"})
    if unknown:
        raise SystemExit(f"--engine: unknown {', '.join(unknown)} (spark, ray)")
    rng = random.Random(args.seed)
    sample = set(rng.sample(list(dataset.user_ids(n)), min(1000, n)))
    with tempfile.TemporaryDirectory(prefix="fcbench-engines-") as tmp:
        sqlite = SqliteLoader(Path(tmp) / "offline.db")
        parquet = Path(tmp) / "rows.parquet"
        writer: pq.ParquetWriter | None = None
        expected: dict[int, dict[str, Any]] = {}
        for rows, chunk_expected in generate(n, args.seed, sample):
            sqlite.write(rows)
            expected.update(chunk_expected)
            table = pa.Table.from_pylist([dict(zip(COLUMNS, r, strict=True)) for r in rows])
            if writer is None:
                writer = pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table, row_group_size=100_000)
        assert writer is not None
        writer.close()
        sqlite.finish()
        log(f"data: {n:,} rows in SQLite and Parquet")
        results = []
        results.append(_timed("cli_sqlite", n, args, sqlite.url, expected,
                              lambda cache: materialize(cache, dataset.VIEW_NAME, all=True)))
        results.append(_timed(
            "cli_parquet", n, args, sqlite.url, expected,
            lambda cache: write_batches(cache, dataset.VIEW_NAME,
                                        pq.ParquetFile(parquet).iter_batches(batch_size=10_000))))
        if "spark" in engines:
            results.append(_spark(n, args, sqlite.url, parquet, expected))
        if "ray" in engines:
            results.append(_ray(n, args, sqlite.url, parquet, expected))
    base = results[0]["rows_per_s"]
    for r in results:
        r["vs_cli_sqlite"] = round(r["rows_per_s"] / base, 2)
    print(f"materialize by engine: {n:,} rows of {len(dataset.FEATURE_NAMES)} features, "
          f"{os.cpu_count()} CPUs")
    print()
    print(f"{'case':<12} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'vs cli_sqlite':>14}")
    for r in results:
        print(f"{r['case']:<12} {r['rows']:>10,} {r['seconds']:>8.2f} {r['rows_per_s']:>10,.0f} "
              f"{r['vs_cli_sqlite']:>13.2f}x")
    targets = [Target(f"{r['case']} wrote every row", r["rows"] == n, f"{r['rows']:,} of {n:,}")
               for r in results]
    print()
    for t in targets:
        print(t.line())
    if args.json:
        import json  # noqa: PLC0415

        Path(args.json).write_text(json.dumps({
            "rows": n, "cases": results, "targets": [t.__dict__ for t in targets],
            "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0 if all(t.passed for t in targets) else 1


def _timed(case: str, n: int, args: argparse.Namespace, offline_url: str,
           expected: dict[int, dict[str, Any]], call: Callable[[Any], Any]) -> dict[str, Any]:
    with fresh_cache(args.redis_url, offline_url, None) as (cache, _):
        started = time.perf_counter()
        report = call(cache)
        seconds = time.perf_counter() - started
        verify(cache, expected, case)
    return _row(case, report.rows_written, seconds)


def _row(case: str, rows: int, seconds: float) -> dict[str, Any]:
    result = {"case": case, "rows": rows, "seconds": round(seconds, 3),
              "rows_per_s": round(rows / seconds, 1)}
    log(f"{case}: {rows:,} rows in {seconds:.2f} s ({rows / seconds:,.0f} rows/s)")
    return result


def _config(target_url: str, prefix: str, offline_url: str) -> CacheConfig:
    return CacheConfig(views=(view_for(None),), redis=RedisConfig(url=target_url,
                                                                  key_prefix=prefix),
                       offline_store=OfflineStoreConfig(url=offline_url))


def _spark(n: int, args: argparse.Namespace, offline_url: str, parquet: Path,
           expected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from pyspark.sql import SparkSession  # noqa: PLC0415

    from featcache import FeatureCache  # noqa: PLC0415
    from featcache.spark import materialize as spark_materialize  # noqa: PLC0415

    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("featcache-bench")
               .config("spark.ui.enabled", "false").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        with redis_target(args.redis_url) as target:
            config = _config(target.url, target.prefix, offline_url)
            df = session.read.parquet(str(parquet))
            df.count()  # the file's footer and the plan, untimed
            started = time.perf_counter()
            report = spark_materialize(df, dataset.VIEW_NAME, config)
            seconds = time.perf_counter() - started
            with FeatureCache(config) as cache:
                verify(cache, expected, "spark")
    finally:
        session.stop()
    return _row("spark", report.rows_written, seconds)


def _ray(n: int, args: argparse.Namespace, offline_url: str, parquet: Path,
         expected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    import ray  # noqa: PLC0415

    from featcache import FeatureCache  # noqa: PLC0415
    from featcache.ray import materialize as ray_materialize  # noqa: PLC0415

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with redis_target(args.redis_url) as target:
            config = _config(target.url, target.prefix, offline_url)
            started = time.perf_counter()
            report = ray_materialize(ray.data.read_parquet(str(parquet), override_num_blocks=8),
                                     dataset.VIEW_NAME,
                                     config)
            seconds = time.perf_counter() - started
            with FeatureCache(config) as cache:
                verify(cache, expected, "ray")
    finally:
        ray.shutdown()
    return _row("ray", report.rows_written, seconds)
