"""``featcache analyze``: hit rate against cache size for a view, from a trace of its reads.

``featcache analyze (--trace FILE | --config C) --view V [--max-age 10m] [--l1-size N]
[--maxmemory BYTES] [--bytes-per-row B] [--out curve.png] [--json OUT]``

The trace comes from a CSV or Parquet file (``featcache.analysis.readers``) or, with
``--config``, from the sampled trace kept in Redis (``featcache.analysis.redis_trace``); the
rest is the same for both: the curves (``featcache.analysis.report``), the text printed, the
PNG (``featcache.analysis.plot``) and the JSON. This module only declares the arguments
(``add_parser``, which ``cli.py`` registers) and wires them; it imports numpy, pyarrow and
matplotlib only when the command runs, so ``featcache --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.config_sections import L1_POLICIES

from .argtypes import duration, int_at_least, number_above, rate

if TYPE_CHECKING:
    from featcache.analysis.trace import Trace
    from featcache.config import CacheConfig

__all__ = ["add_parser", "parse_bytes", "run_analyze"]

EXIT_USAGE = 2  # argparse's status for a bad command line (``cli.EXIT_USAGE``)

# Redis' units (redis.conf): k = 1000, kb = 1024, m = 10**6, mb = 1024**2, g, gb
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|m|mb|g|gb|t|tb)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {None: 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9,
               "gb": 2**30, "t": 10**12, "tb": 2**40}


def parse_bytes(text: str) -> int:
    """A memory size as redis.conf writes one: ``1073741824``, ``512mb``, ``2gb``, ``100k``."""
    match = _BYTES_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected bytes, as redis.conf writes them (1073741824, 512mb, 2gb), got {text!r}")
    unit = match.group(2).lower() if match.group(2) else None
    value = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _policies(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in L1_POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(L1_POLICIES)}, or none; "
            f"got {text!r}")
    return names


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Declare ``featcache analyze`` on ``commands`` (what ``add_subparsers()`` returned)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "analyze",
        help="hit rate against cache size for a view, from a trace of its reads",
        description=(
            "Compute, from a trace of a view's reads, the hit rate an LRU cache would have at "
            "every size (exactly, by stack distances, or by SHARDS from a sampled trace), the "
            "simulated hit rate of each L1 policy at a range of sizes, and with --max-age the "
            "freshness ceiling (the hit rate of an unbounded cache when rows older than "
            "max_age are misses). Prints the sizes that reach 90, 95 and 99% hits; writes "
            "the picture (--out) and every figure as JSON (--json). A trace file is CSV or "
            "Parquet with columns view, entity_id and optionally ts (seconds). Reads nothing "
            "from Redis or SQL with --trace. docs/analysis.md explains the method and the "
            "picture."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", type=Path,
                        help="a CSV or Parquet trace file (columns view, entity_id[, ts])")
    source.add_argument("--config", metavar="C",
                        help="the featcache YAML config: analyse the view's sampled trace kept "
                             "in its Redis (stats.trace_rate), with the bytes per row and "
                             "maxmemory measured there")
    parser.add_argument("--view", metavar="V", required=True, help="the feature view")
    parser.add_argument(
        "--sampling-rate", type=rate, default=1.0, metavar="R",
        help="the rate the trace file was spatially sampled at (featcache.analysis.sampling; "
             "default 1: every access)",
    )
    parser.add_argument(
        "--full-accesses", type=int_at_least(1), metavar="N",
        help="for a sampled trace file: the reads of the whole trace it was sampled from; "
             "the LRU curve is then SHARDS-adj instead of fixed-rate SHARDS, whose error is "
             "several times larger (a warning says so when it is missing)",
    )
    parser.add_argument(
        "--max-age", type=duration, metavar="D",
        help="show the freshness ceiling for this max_age (seconds, or 500ms, 10m, 1h; needs "
             "the ts column); with --config, default: the view's shortest max_age",
    )
    parser.add_argument("--l1-size", type=int_at_least(1), metavar="N",
                        help="mark the L1 size (entries) and simulate the policies at it "
                             "(with --config, default: l1.max_entries when l1.policy is set)")
    parser.add_argument("--maxmemory", type=parse_bytes, metavar="BYTES",
                        help="mark Redis maxmemory (bytes, or 512mb, 2gb) in rows; needs "
                             "--bytes-per-row")
    parser.add_argument("--bytes-per-row", type=number_above, metavar="B",
                        help="Redis memory of one cached row of the view (MEMORY USAGE of a "
                             "row key): sizes are also given in memory")
    parser.add_argument(
        "--policies", type=_policies, default=L1_POLICIES, metavar="LIST",
        help=f"L1 policies to simulate, comma-separated, or none (default "
             f"{','.join(L1_POLICIES)})",
    )
    parser.add_argument(
        "--max-simulated", type=int_at_least(1), default=None, metavar="N",
        help="accesses each policy simulation runs at most; a longer trace is simulated in "
             "miniature on a spatial sample of about N accesses (default 100000)",
    )
    parser.add_argument("--out", type=Path, metavar="PNG", help="write the picture here")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure here")
    parser.set_defaults(handler=run_analyze, analyze_parser=parser)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    """The command's handler: returns the exit status (errors raise ``FeatcacheError``)."""
    from featcache.analysis import report  # noqa: PLC0415 - numpy: only when it runs
    from featcache.analysis.policies import DEFAULT_MAX_ACCESSES  # noqa: PLC0415

    parser: argparse.ArgumentParser = args.analyze_parser
    started = time.perf_counter()
    trace, bytes_per_row, max_age, l1_size, maxmemory = _source(args)
    if maxmemory is not None and bytes_per_row is None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: --maxmemory needs --bytes-per-row (the Redis memory of "
              f"one row, to count rows in maxmemory)", file=sys.stderr)
        return EXIT_USAGE
    analysis = report.analyze(
        trace,
        max_age=max_age,
        l1_size=l1_size,
        maxmemory=maxmemory,
        bytes_per_row=bytes_per_row,
        policies=args.policies,
        max_simulated=args.max_simulated or DEFAULT_MAX_ACCESSES,
    )
    if args.trace is not None and args.sampling_rate < 1 and args.full_accesses is None:
        print(f"{parser.prog}: warning: a sampled trace without --full-accesses: the LRU curve "
              f"is fixed-rate SHARDS, whose mean absolute error at 1% sampling measured up to "
              f"0.10 where SHARDS-adj measured 0.005 (docs/analysis.md); give the whole "
              f"trace's read count for SHARDS-adj", file=sys.stderr)
    for line in report.summary_lines(analysis):
        print(line)
    if args.out is not None:
        from featcache.analysis import plot  # noqa: PLC0415 - matplotlib: only when drawing

        print(f"wrote {plot.draw(analysis, args.out)}")
    if args.json is not None:
        args.json.write_text(json.dumps(analysis.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    print(f"analysed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _source(
    args: argparse.Namespace,
) -> tuple[Trace, float | None, float | None, int | None, int | None]:
    """The trace, and the bytes per row, max_age, L1 size and Redis maxmemory: given, or from
    the config and its Redis (a row's memory measured by ``MEMORY USAGE`` of sampled rows,
    maxmemory summed over the primaries)."""
    if args.trace is not None:
        from featcache.analysis.readers import read_trace  # noqa: PLC0415

        trace = read_trace(args.trace, args.view, args.sampling_rate, args.full_accesses)
        return trace, args.bytes_per_row, args.max_age, args.l1_size, args.maxmemory
    from featcache.analysis.redis_trace import read_redis_trace  # noqa: PLC0415
    from featcache.config import load_config  # noqa: PLC0415

    config = load_config(args.config)
    view = config.view(args.view)
    found = read_redis_trace(config, args.view)
    max_age = args.max_age
    if max_age is None and found.trace.timestamps is not None:
        max_age = min(feature.max_age for feature in view.features)
    l1_size = args.l1_size
    if l1_size is None and config.l1.policy is not None:
        l1_size = config.l1.max_entries
    bytes_per_row, maxmemory = args.bytes_per_row, args.maxmemory
    if bytes_per_row is None or maxmemory is None:
        measured_bytes, measured_max = _measured(config, view.name)
        bytes_per_row = bytes_per_row if bytes_per_row is not None else measured_bytes
        maxmemory = maxmemory if maxmemory is not None else measured_max
    return found.trace, bytes_per_row, max_age, l1_size, maxmemory


def _measured(config: CacheConfig, view: str) -> tuple[float | None, int | None]:
    """The Redis memory of one row of ``view`` (None without rows) and the maxmemory of the
    primaries summed (None when any of them has none: the cache may grow to the machine)."""
    from featcache.redis_store import admin, open_store  # noqa: PLC0415

    from .stats_cmd import key_census  # noqa: PLC0415

    store = open_store(config.redis, degradation=config.degradation)
    try:
        census = key_census(store, config)[view]
        limits = [int(admin.server_info(node).get("maxmemory") or 0)
                  for node in admin.primaries(store, config.redis.mode)]
    finally:
        store.close()
    per_row = census["bytes"] / census["keys"] if census["keys"] else None
    return per_row, (sum(limits) if limits and all(limits) else None)
