"""``python -m bench materialize``: bulk materialization from SQL into Redis, per SQL source.

The view is ``bench.dataset``'s ``user_stats`` (10 features: 4 float, 4 int, 2 short strings),
one row per entity, N rows (1M; ``--quick``: 100k) loaded untimed into

``sqlite``      a temp SQLite file (``executemany`` in chunks, one transaction, index after);
``postgresql``  a private PostgreSQL server started from ``/usr/lib/postgresql/*/bin`` (or the
                ``--pg-url`` server), in a unique schema dropped afterwards (``COPY``, then
                the index and ``VACUUM (ANALYZE)``: the state autovacuum leaves a bulk-loaded
                table in within a minute; see ``PostgresLoader.finish``).

Each source is then materialized into a fresh private Valkey (or the ``--redis-url`` server
under a unique prefix) with ``featcache.materialize.materialize(cache, view, all=True)``: the
timed figure is that call alone, run with the harness's own data (the generated rows and the
expected answers, ~1M objects) frozen out of the garbage collector
(``bench.common.frozen_heap``): a ``featcache materialize`` process holds none of it, and full
collections scanning it cost the timed call up to 0.5 s per 100k rows. Per source: rows
written, wall seconds, rows/s, the client's peak RSS (sampled every 50 ms in a thread; also
minus the baseline taken just before the call) and Redis ``used_memory`` growth per row, and
where the CPU went during the call (``cpu``: CPU-seconds per 100k rows of this process, of the
Redis server by ``INFO cpu``, and of the rest of the machine, which is mostly the SQL server
for PostgreSQL; and how busy the machine's CPUs were): the figure that says whether rows/s
can grow by overlapping more or only by doing less.
Afterwards ``get_features`` of 1000 random ids must be HIT_REDIS with exactly the generated
values, or the run fails. Then, unless ``--no-baseline``, the same table is copied by
``bench.naive_copy`` (SQLAlchemy stream + redis-py pipeline, no featcache) into a fresh server,
held to the same check: ``vs_baseline`` is featcache's rows/s over its rows/s in the same
minute, the figure this VM's changing speed moves least.

Then, unless ``--no-profile``: one materialization of 100k SQLite rows timed stage by stage
(the same calls ``materialize`` makes, serially, unprofiled), and the same loop under cProfile
(top 25 by tottime, plus cumulative time per stage: id listing, fence, SQL fetch, conversion,
encoding, Redis write).

``--topology cluster`` runs ``bench.materialize_cluster`` instead: the same rows into a private
3-primary Valkey Cluster and into one server, in one run.

The PostgreSQL helper here is deliberately minimal; ``tests/servers.py`` holds the test suite's
fuller one but is not a package the benchmarks may import.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import dataclasses
import datetime as dt
import gc
import glob
import io
import json
import os
import pstats
import pwd
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import psutil
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from bench import dataset
from bench.common import (
    Target,
    environment,
    frozen_heap,
    log,
    redis_target,
    server_cpu_seconds,
    server_description,
    settled_used_memory,
    used_memory,
)
from bench.naive_copy import naive_copy
from featcache import (
    CacheConfig,
    FeatureCache,
    FeatureView,
    OfflineStoreConfig,
    RedisConfig,
    Status,
)
from featcache.config_sections import StatsConfig
from featcache.materialize import CHUNK_ROWS, materialize
from featcache.offline import RowColumns, SqlRow
from featcache.offline.bulk import IdRunReader, iter_entity_ids, iter_latest_by_id, reads_id_runs
from featcache.redis_store import CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT

DESCRIPTION = ("bulk materialization (featcache.materialize.materialize) from SQLite and "
               "PostgreSQL into Redis")

FULL_ROWS = 1_000_000
QUICK_ROWS = 100_000
PROFILE_ROWS = 100_000
LOAD_CHUNK = 20_000  # rows generated, and written to SQL, at a time
VERIFY_SAMPLE = 1_000
RSS_INTERVAL_S = 0.05

TARGET_ROWS_PER_S = 200_000
TARGET_PEAK_RSS_MB = 400.0
TARGET_BYTES_PER_ROW = 200.0

COLUMNS: tuple[str, ...] = (dataset.ENTITY_COLUMN, dataset.EVENT_COLUMN, *dataset.FEATURE_NAMES)
_SA_TYPES: dict[str, Any] = {"float": sa.Double(), "int": sa.BigInteger(), "str": sa.String(16)}
_MB = 1024 * 1024


class BenchError(RuntimeError):
    """The run did not do what it claims (rows missing, a wrong value read back)."""


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT.json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROWS:,} rows instead of {FULL_ROWS:,}")
    parser.add_argument("--rows", type=_positive, default=None,
                        help="rows (= entities) to load and materialize (overrides --quick)")
    parser.add_argument("--pg-url", metavar="URL",
                        help="use this PostgreSQL server (a unique schema, dropped afterwards) "
                             "instead of a private one")
    parser.add_argument("--redis-url", metavar="URL",
                        help="use this server (keys under a unique fcbench-<hex> prefix, removed "
                             "afterwards) instead of a fresh private Valkey per source")
    parser.add_argument("--sources", default=None,
                        help="comma-separated: postgresql, sqlite (default: both; sqlite with "
                             "--topology cluster)")
    parser.add_argument("--topology", choices=("standalone", "cluster"), default="standalone",
                        help="cluster: into a private 3-primary Valkey Cluster, against one "
                             "private server in the same run (bench/materialize_cluster.py)")
    parser.add_argument("--chunk-rows", type=_positive, default=CHUNK_ROWS,
                        help=f"materialize(chunk_rows=...) (default: {CHUNK_ROWS}, its default)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the stage breakdown and cProfile of 100k SQLite rows")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the same-run baseline (bench.naive_copy) after each source")
    parser.add_argument("--engine", metavar="E",
                        help="spark, ray or both (comma-separated): the same rows loaded by "
                             "the engine beside the single-process paths "
                             "(bench/materialize_engines.py)")
    parser.add_argument("--seed", type=int, default=20_260_101, help="data seed")


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parse_sources(text: str) -> list[str]:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sources) - {"postgresql", "sqlite"})
    if unknown or not sources:
        raise SystemExit(f"--sources: unknown {', '.join(unknown) or '(none given)'}")
    return sources


def run(args: argparse.Namespace) -> int:
    if args.engine:
        from bench.materialize_engines import run_engines  # noqa: PLC0415 - Spark, Ray

        return run_engines(args)
    if args.topology == "cluster":
        from bench.materialize_cluster import run_cluster  # noqa: PLC0415 - its own servers

        return run_cluster(args)
    sources = parse_sources(args.sources or "postgresql,sqlite")
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    return run_benchmark(
        rows=rows, sources=sources, pg_url=args.pg_url, redis_url=args.redis_url,
        chunk_rows=args.chunk_rows, profile=not args.no_profile,
        baseline=not args.no_baseline, seed=args.seed,
        quick=args.quick, json_path=args.json,
    )


# --------------------------------------------------------------------------------------------
# Data: generated in chunks, written to every SQL store as it goes
# --------------------------------------------------------------------------------------------


def generate(n: int, seed: int, sample: set[int]) -> Iterator[tuple[list[tuple[Any, ...]],
                                                              dict[int, dict[str, Any]]]]:
    """Chunks of rows as tuples in ``COLUMNS`` order (naive UTC timestamps), with the feature
    dicts of the sampled user ids in that chunk. Never holds more than one chunk."""
    rng = random.Random(seed)
    now_dt = dt.datetime.now(dt.UTC)
    for start in range(0, n, LOAD_CHUNK):
        rows: list[tuple[Any, ...]] = []
        expected: dict[int, dict[str, Any]] = {}
        for uid in dataset.user_ids(min(LOAD_CHUNK, n - start), start):
            row = dataset.make_row(uid, rng, now_dt)
            row[dataset.EVENT_COLUMN] = row[dataset.EVENT_COLUMN].replace(tzinfo=None)
            rows.append(tuple(row[c] for c in COLUMNS))
            if uid in sample:
                expected[uid] = dataset.feature_dict(row)
        yield rows, expected


def table_def(metadata: sa.MetaData, schema: str | None) -> sa.Table:
    """The view's table, one row per entity; the index is created after loading."""
    return sa.Table(
        dataset.VIEW_NAME,
        metadata,
        sa.Column(dataset.ENTITY_COLUMN, sa.BigInteger(), nullable=False),
        sa.Column(dataset.EVENT_COLUMN, sa.DateTime(), nullable=False),
        *(sa.Column(f.column, _SA_TYPES[f.type.value]) for f in dataset.FEATURES),
        schema=schema,
    )


def _index_sql(qualified: str) -> str:
    return (f"CREATE INDEX ix_{dataset.VIEW_NAME}_entity_ts ON {qualified} "
            f"({dataset.ENTITY_COLUMN}, {dataset.EVENT_COLUMN})")


class SqliteLoader:
    """A temp SQLite file filled with ``executemany``; timestamps as SQLAlchemy writes them."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.schema: str | None = None
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            table_def(sa.MetaData(), None).metadata.create_all(engine)
        finally:
            engine.dispose()
        self._conn = sqlite3.connect(path)
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._insert = (f"INSERT INTO {dataset.VIEW_NAME} ({', '.join(COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(COLUMNS))})")
        self.rows = 0

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        # the text SQLAlchemy's DateTime stores, always with microseconds
        self._conn.executemany(self._insert, (
            (r[0], r[1].strftime("%Y-%m-%d %H:%M:%S.%f"), *r[2:]) for r in rows
        ))
        self.rows += len(rows)

    def finish(self) -> None:
        self._conn.execute(_index_sql(dataset.VIEW_NAME))
        self._conn.commit()
        self._conn.execute("ANALYZE")
        self._conn.close()


class PostgresLoader:
    """One unique schema on a PostgreSQL server, filled with ``COPY ... FROM STDIN``."""

    name = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg  # noqa: PLC0415 - only when PostgreSQL is measured

        self.url = url
        self.schema = f"fcbench_{secrets.token_hex(4)}"
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
            table_def(sa.MetaData(), self.schema).metadata.create_all(engine)
        finally:
            engine.dispose()
        libpq = sa.make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._conn = psycopg.connect(libpq)
        self.qualified = f'"{self.schema}".{dataset.VIEW_NAME}'
        self._copy_sql = f"COPY {self.qualified} ({', '.join(COLUMNS)}) FROM STDIN"
        self.rows = 0

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with self._conn.cursor() as cur, cur.copy(self._copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        self.rows += len(rows)

    def finish(self) -> None:
        """The index, then ``VACUUM (ANALYZE)``: the table as autovacuum leaves a bulk-loaded
        one within a minute (its insert threshold, PostgreSQL 13+) and as a production table
        is. Without it the timed run was the table's first reader: it set every tuple's hint
        bits, and the id listing's index-only scan fetched every heap tuple (``EXPLAIN
        ANALYZE`` of the listing of 300k ids: 181 ms with 300,000 heap fetches, 122 ms with
        none after the VACUUM). A few percent of a materialize (docs/benchmarks.md)."""
        with self._conn.cursor() as cur:
            cur.execute(_index_sql(self.qualified))
        self._conn.commit()
        self._conn.autocommit = True  # VACUUM runs outside a transaction block
        with self._conn.cursor() as cur:
            cur.execute(f"VACUUM (ANALYZE) {self.qualified}")
        self._conn.close()

    def drop(self) -> None:
        """Drop this run's schema, and nothing else."""
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        finally:
            engine.dispose()


def pg_sqlalchemy_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` URLs get the psycopg (3) driver SQLAlchemy needs."""
    parsed = sa.make_url(url.replace("postgres://", "postgresql://", 1)
                         if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------------
# A private PostgreSQL (minimal: trust auth on loopback, dies with us, no durability)
# --------------------------------------------------------------------------------------------


class PrivatePostgres:
    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                      else -1, reverse=True)
        found = [Path(b) for b in bins if os.access(Path(b) / "initdb", os.X_OK)]
        if not found and shutil.which("initdb"):
            found = [Path(str(shutil.which("initdb"))).parent]
        if not found:
            raise BenchError("no PostgreSQL server binaries (initdb, postgres); pass --pg-url")
        self.bin_dir = found[0]
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def version(self) -> str:
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip()

    def __enter__(self) -> PrivatePostgres:
        # PostgreSQL refuses to run as root: drop to nobody then
        account = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="fcbench-pg-"))
        try:
            if account is not None:
                os.chown(self.dir, account.pw_uid, account.pw_gid)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C",
                   "HOME": str(self.dir)}

            def setup() -> None:  # in the child: drop root, then die with the parent
                if account is not None:
                    os.setgroups([])
                    os.setgid(account.pw_gid)
                    os.setuid(account.pw_uid)
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

            data = self.dir / "data"
            init = subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--locale", "C", "--no-sync"],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=120, check=False, preexec_fn=setup,
            )
            if init.returncode != 0:
                raise BenchError(f"initdb failed: {(init.stdout + init.stderr).decode()[-800:]}")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
            with (self.dir / "server.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                     "-c", "listen_addresses=127.0.0.1",
                     "-c", f"unix_socket_directories={self.dir}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_wal_size=4GB"],
                    cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=setup,  # noqa: PLW1509
                )
            deadline = time.monotonic() + 30
            pid_file = data / "postmaster.pid"
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    lines = pid_file.read_text().splitlines()
                    if len(lines) >= 8 and lines[7].strip() == "ready":
                        return self
                time.sleep(0.02)
            log_tail = (self.dir / "server.log").read_text(errors="replace")[-800:]
            raise BenchError(f"postgres did not start: {log_tail}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# --------------------------------------------------------------------------------------------
# Measuring one materialization
# --------------------------------------------------------------------------------------------


class RssSampler:
    """This process's RSS every ``interval`` seconds in a daemon thread; ``peak`` in bytes."""

    def __init__(self, interval: float = RSS_INTERVAL_S) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self.samples = 0
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self._interval)

    def _take(self) -> None:
        rss = self._proc.memory_info().rss
        self.samples += 1
        self.peak = max(self.peak, rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def view_for(schema: str | None) -> FeatureView:
    return dataclasses.replace(dataset.view(), schema=schema)


@contextlib.contextmanager
def fresh_cache(redis_url: str | None, offline_url: str, schema: str | None,
                ) -> Iterator[tuple[FeatureCache, bool]]:
    """A cache over ``offline_url`` and a fresh private Valkey (or ``redis_url``, prefixed),
    connected and with featcache's scripts loaded, so none of that is timed or counted."""
    with redis_target(redis_url) as target:
        # no stats publishing: `featcache materialize` runs on Parts, which publishes none,
        # and the keys the run leaves are counted
        config = CacheConfig(views=(view_for(schema),),
                             redis=RedisConfig(url=target.url, key_prefix=target.prefix),
                             offline_store=OfflineStoreConfig(url=offline_url),
                             stats=StatsConfig(publish_interval=0))
        with FeatureCache(config) as cache:
            cache.redis.ping()
            for script in (CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT):
                cache.redis.script_load(script.text)
            yield cache, target.private


def measure(source: str, offline_url: str, schema: str | None, redis_url: str | None,
            n: int, chunk_rows: int, expected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    with fresh_cache(redis_url, offline_url, schema) as (cache, private):
        return measure_on(cache, [cache.redis], source, n, chunk_rows, expected,
                          fresh_servers=private)


def measure_on(cache: FeatureCache, servers: Sequence[redis.Redis], source: str, n: int,
               chunk_rows: int, expected: dict[int, dict[str, Any]], *,
               fresh_servers: bool) -> dict[str, Any]:
    """Time ``materialize(cache, view, all=True)`` and check what it left in ``servers``: the
    one server or every primary of a cluster, each a client of that server alone. Memory,
    keys and Redis CPU are summed over them; ``nodes`` has each one's share. With
    ``fresh_servers`` they held nothing before, so exactly the rows and the epoch key must
    have appeared."""
    keys_before = sum(int(s.dbsize()) for s in servers)
    mem_before = [used_memory(s) for s in servers]
    stats_before = [script_stats(s) for s in servers]
    with frozen_heap(), RssSampler() as rss:
        cpu_before = cpu_seconds(servers)
        started = time.perf_counter()
        report = materialize(cache, dataset.VIEW_NAME, all=True, chunk_rows=chunk_rows)
        seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(servers)
    cpu = cpu_split(cpu_before, cpu_after, seconds, n)
    stats_after = [script_stats(s) for s in servers]
    mem_right_after = [used_memory(s) for s in servers]
    settle_started = time.perf_counter()
    mem_after = [settled_used_memory(s) for s in servers]  # they settle at the same time
    settle_s = time.perf_counter() - settle_started
    keys_per_server = [int(s.dbsize()) for s in servers]
    keys_added = sum(keys_per_server) - keys_before
    server = server_description(servers[0])
    if report.rows_written != n or report.fenced_off or not report.complete:
        raise BenchError(f"{source}: {report}; expected {n} rows written")
    if fresh_servers and keys_added != n + 1:  # the rows and the view's epoch key
        raise BenchError(f"{source}: {keys_added} keys appeared in Redis, expected "
                         f"{n} rows + 1 epoch key")
    verify(cache, expected, source)

    def total(mem: Sequence[dict[str, int]], field: str = "used_memory") -> int:
        return sum(m[field] for m in mem)

    delta = total(mem_after) - total(mem_before)
    log(f"{source}: {n:,} rows in {seconds:.2f} s; CPU-s per 100k rows: client "
        f"{cpu['client_per_100k']}, redis {cpu['redis_per_100k']}, rest of the machine "
        f"{cpu['rest_per_100k']} (SQL server, other); machine busy {cpu['machine_busy']:.0%} "
        f"of {cpu['cpus']} CPUs")
    nodes = []
    for i, server_client in enumerate(servers):
        calls = stats_after[i]["calls"] - stats_before[i]["calls"]
        usec = stats_after[i]["usec"] - stats_before[i]["usec"]
        redis_cpu = cpu_after["servers"][i] - cpu_before["servers"][i]
        nodes.append({
            "address": address_of(server_client),
            "keys": keys_per_server[i],
            "bytes_delta": mem_after[i]["used_memory"] - mem_before[i]["used_memory"],
            "cpu_s": round(redis_cpu, 3),
            "busy": round(redis_cpu / seconds, 3),  # of one CPU: a server runs one thread
            "script_calls": calls,
            "script_s": round(usec / 1e6, 3),
            "rows_per_script_call": round(keys_per_server[i] / calls, 1) if calls else None,
        })
    return {
        "source": source,
        "rows": report.rows_written,
        "seconds": round(seconds, 3),
        "rows_per_s": round(n / seconds),
        "peak_rss_mb": round(rss.peak / _MB, 1),
        "rss_baseline_mb": round(rss.baseline / _MB, 1),
        "peak_rss_delta_mb": round((rss.peak - rss.baseline) / _MB, 1),
        "rss_samples": rss.samples,
        "bytes_per_row": round(delta / n, 1),
        # before the keyspace's hash tables finished resizing (bench.common.settled_used_memory)
        "bytes_per_row_right_after": round(
            (total(mem_right_after) - total(mem_before)) / n, 1),
        "memory_settle_seconds": round(settle_s, 1),
        "redis": {
            "server": server,
            "fresh_private_server": fresh_servers,
            "used_memory_before": total(mem_before),
            "used_memory_after": total(mem_after),
            "client_buffers_delta": total(mem_after, "mem_clients_normal")
            - total(mem_before, "mem_clients_normal"),
        },
        "nodes": nodes,
        "report": dataclasses.asdict(report),
        "verified_ids": len(expected),
        "cpu": cpu,
    }


def script_stats(client: redis.Redis) -> dict[str, int]:
    """Calls of the write scripts (EVALSHA, EVAL) this server has run, and the microseconds
    it spent in them (INFO commandstats)."""
    stats = client.info("commandstats")
    picked = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    return {"calls": sum(int(s.get("calls", 0)) for s in picked),
            "usec": sum(int(s.get("usec", 0)) for s in picked)}


def address_of(client: redis.Redis) -> str:
    """``host:port`` of the server ``client`` talks to (its socket path on a unix socket)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def measure_baseline(source: str, offline_url: str, schema: str | None, redis_url: str | None,
                     n: int, chunk_rows: int, expected: dict[int, dict[str, Any]],
                     ) -> dict[str, Any]:
    """``bench.naive_copy`` of the same table into a fresh server (or under its own prefix),
    right after featcache's call: the same minute's yardstick, held to the same check (every
    row there, the sampled ones with their latest values). Its memory is handed back to the
    OS afterwards, so the next source's RSS figures start where they would have."""
    with redis_target(redis_url) as target, frozen_heap(), RssSampler() as rss:
        out = naive_copy(offline_url, table_def(sa.MetaData(), schema), target.url,
                         target.prefix, chunk_rows)
        client = redis.Redis.from_url(target.url)
        try:
            keys = len(list(client.scan_iter(match=f"{target.prefix}:naive:*", count=10_000)))
            ids = sorted(expected)
            stored = client.mget([f"{target.prefix}:naive:{eid}" for eid in ids])
        finally:
            client.close()
    for eid, raw in zip(ids, stored, strict=True):
        values = msgpack.unpackb(raw)[1:] if raw is not None else None
        if values != [expected[eid][f] for f in dataset.FEATURE_NAMES]:
            raise BenchError(f"{source} baseline: user {eid}: read {values}, "
                             f"expected {expected[eid]}")
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if out["rows"] != n or keys != n:
        raise BenchError(f"{source} baseline: {out['rows']} rows copied, {keys} keys found, "
                         f"expected {n}")
    log(f"{source} baseline (SQLAlchemy stream + redis-py pipeline): {n:,} rows in "
        f"{out['seconds']:.2f} s")
    return {**out, "peak_rss_delta_mb": round((rss.peak - rss.baseline) / _MB, 1),
            "method": "SQLAlchemy Core stream ordered by (entity, event time), last row per "
                      "entity, msgpack, redis-py pipeline(transaction=False) of SET PX, one "
                      "execute per chunk; no fence, no conditional write"}


def cpu_seconds(servers: Sequence[redis.Redis]) -> dict[str, Any]:
    """CPU seconds used so far by this process, the Redis servers (INFO cpu: all their
    threads; summed, and each in ``servers``) and the whole machine (busy = not idle, not
    waiting on I/O)."""
    own = psutil.Process().cpu_times()
    per_server = [server_cpu_seconds(client) for client in servers]
    machine = psutil.cpu_times()
    return {
        "client": own.user + own.system,
        "redis": sum(per_server),
        "machine": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
        "servers": per_server,
    }


def cpu_split(before: dict[str, Any], after: dict[str, Any], seconds: float,
              rows: int) -> dict[str, Any]:
    """Where the CPU time of the timed call went, per 100k rows: with the machine's CPUs all
    busy, rows/s can only grow by taking work away, not by overlapping more of it. The rest
    is the machine minus client and Redis: the SQL server for PostgreSQL, plus anything else
    running (it is measured, not assumed to be zero)."""
    used = {k: after[k] - before[k] for k in ("client", "redis", "machine")}
    per = 100_000 / rows
    cpus = psutil.cpu_count() or 1
    return {
        "cpus": cpus,
        "client_per_100k": round(used["client"] * per, 3),
        "redis_per_100k": round(used["redis"] * per, 3),
        "rest_per_100k": round(max(0.0, used["machine"] - used["client"] - used["redis"]) * per,
                               3),
        "machine_per_100k": round(used["machine"] * per, 3),
        "machine_busy": round(used["machine"] / (seconds * cpus), 3),
    }


def verify(cache: FeatureCache, expected: dict[int, dict[str, Any]], source: str) -> None:
    """Every sampled id is HIT_REDIS with exactly the values generated for it."""
    ids = sorted(expected)
    names = list(dataset.FEATURE_NAMES)
    res = cache.get_features(ids, names)
    counts = res.status_counts()
    if counts.get(Status.HIT_REDIS, 0) != len(ids) * len(names):
        raise BenchError(f"{source}: expected every value HIT_REDIS, got {dict(counts)}")
    for eid in ids:
        if res[eid] != expected[eid]:
            raise BenchError(f"{source}: user {eid}: read {res[eid]}, wrote {expected[eid]}")


# --------------------------------------------------------------------------------------------
# Profile: stages unprofiled, then cProfile
# --------------------------------------------------------------------------------------------


def stage_breakdown(cache: FeatureCache, chunk_rows: int) -> dict[str, float]:
    """``materialize(all=True)``'s loop, run serially (materialize writes a chunk while it
    encodes the next and reads the one after it), with a clock around each call it makes."""
    view = cache.config.view(dataset.VIEW_NAME)
    times = dict.fromkeys(("list_ids", "fence", "sql_read_convert", "write"), 0.0)
    rows_done = 0
    started = time.perf_counter()
    mark = started
    by_range = reads_id_runs(cache.offline, view)
    with contextlib.closing(iter_entity_ids(cache.offline, view, chunk_rows=chunk_rows,
                                            ordered=by_range)) as chunks, \
            IdRunReader(cache.offline, view) as runs:
        for chunk in chunks:
            now = time.perf_counter()
            times["list_ids"] += now - mark
            fence = cache.fence(view, chunk)
            t1 = time.perf_counter()
            rows: RowColumns | dict[Any, SqlRow]
            if by_range:
                rows = runs.read_columns(chunk)
            else:
                latest: dict[Any, SqlRow] = {}
                for part in iter_latest_by_id(cache.offline, view, chunk,
                                              chunk_rows=len(chunk)):
                    latest.update(part)
                rows = latest
            t2 = time.perf_counter()
            if isinstance(rows, RowColumns):
                rows_done += cache.prepare_columns(view, rows, fence=fence).send().written
            else:
                rows_done += cache.put_latest(view, rows, fence=fence).written
            mark = time.perf_counter()
            times["fence"] += t1 - now
            times["sql_read_convert"] += t2 - t1
            times["write"] += mark - t2
    total = time.perf_counter() - started
    out = {k: round(v, 3) for k, v in times.items()}
    out["total"] = round(total, 3)
    out["rows"] = rows_done
    return out


#: Stages by the cumulative time of one function (file name, function name).
STAGE_FUNCS: dict[str, tuple[str, str]] = {
    "list_ids (iter_entity_ids)": ("offline/bulk.py", "iter_entity_ids"),
    "fence (RowWriter.fence)": ("writes.py", "fence"),
    "sql read+convert (bulk.IdRunReader.read_columns)": ("offline/bulk.py", "read_columns"),
    "  of which OfflineStore.convert_to_columns": ("offline/store.py", "convert_to_columns"),
    "encode (RowWriter.prepare_columns)": ("writes.py", "prepare_columns"),
    "  of which RowCodec.encode_columns": ("codec.py", "encode_columns"),
    "write (PendingWrite.send)": ("writes.py", "send"),
    "  of which StandaloneStore.write": ("redis_store/standalone.py", "write"),
}


def profile_materialize(url: str, redis_url: str | None, chunk_rows: int, n: int,
                        top: int = 25) -> dict[str, Any]:
    """The stage breakdown on a fresh cache, then the same loop under cProfile on another."""
    with fresh_cache(redis_url, url, None) as (cache, _), frozen_heap():
        stages = stage_breakdown(cache, chunk_rows)
    if stages["rows"] != n:
        raise BenchError(f"profile: stage breakdown wrote {stages['rows']} rows, expected {n}")
    with fresh_cache(redis_url, url, None) as (cache, _):
        profiled = cprofile_stages(cache, chunk_rows, n, STAGE_FUNCS, top)
    return {"rows": n, "chunk_rows": chunk_rows, "unprofiled_stages_s": stages, **profiled}


#: A function as (file name, function name); a caller's function name None: any in the file.
CalledFrom = Sequence[tuple[tuple[str, str], tuple[str, str | None]]]


def cprofile_stages(
    cache: FeatureCache, chunk_rows: int, n: int, stage_funcs: dict[str, tuple[str, str]],
    top: int = 25, called_from: dict[str, CalledFrom] | None = None,
) -> dict[str, Any]:
    """``stage_breakdown`` under cProfile: the cumulative time and calls of each of
    ``stage_funcs``, the ``top`` functions by tottime, and for each ``called_from`` label the
    cumulative time and calls of its callees in the calls its callers made."""
    with frozen_heap():
        profiler = cProfile.Profile()
        profiler.enable()  # the serial loop: cProfile sees one thread only
        profiled = stage_breakdown(cache, chunk_rows)
        profiler.disable()
    if profiled["rows"] != n:
        raise BenchError(f"profile: wrote {profiled['rows']} rows, expected {n}")
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total = max(t[3] for (_, _, name), t in raw.items() if name == "stage_breakdown")
    cumulative: dict[str, float] = {}
    calls: dict[str, int] = {}
    for label, (file, func) in stage_funcs.items():
        picked = [t for (path, _, name), t in raw.items()
                  if name == func and path.endswith(file)]
        cumulative[label] = round(sum(t[3] for t in picked), 3)
        calls[label] = sum(int(t[1]) for t in picked)
    from_caller: dict[str, float] = {}
    from_caller_calls: dict[str, int] = {}
    for label, pairs in (called_from or {}).items():
        picked = [by_caller
                  for (file, func), (caller_file, caller) in pairs
                  for (path, _, name), t in raw.items() if name == func and path.endswith(file)
                  for (c_path, _, c_name), by_caller in t[4].items()
                  if c_path.endswith(caller_file) and caller in (None, c_name)]
        from_caller[label] = round(sum(c[3] for c in picked), 3)
        from_caller_calls[label] = sum(int(c[1]) for c in picked)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    top_rows = []
    stripped: dict[Any, tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for key in stats.fcn_list[:top]:  # type: ignore[attr-defined]
        _, nc, tt, ct, _ = stripped[key]
        top_rows.append({"function": pstats.func_std_string(key),  # type: ignore[attr-defined]
                         "ncalls": nc,
                         "tottime": round(tt, 3), "cumtime": round(ct, 3)})
    return {
        "profiled_total_s": round(total, 3),
        "profiled_stage_cumtime_s": cumulative,
        "profiled_stage_calls": calls,
        "profiled_called_from_s": from_caller,
        "profiled_called_from_calls": from_caller_calls,
        "top_tottime": top_rows,
        "text": buf.getvalue(),
    }


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    """The SQL stores a run materializes from, filled with the same generated rows."""

    loaders: dict[str, SqliteLoader | PostgresLoader]  # by source name, in --sources order
    profile_db: SqliteLoader | None  # PROFILE_ROWS rows, when the profile is run
    expected: dict[int, dict[str, Any]]  # the sampled ids' generated feature values


def load_sources(stack: contextlib.ExitStack, *, sources: Sequence[str], pg_url: str | None,
                 rows: int, seed: int, profile: bool, setup: dict[str, Any]) -> Loaded:
    """Generate ``rows`` rows once and load them, untimed, into every source (and the profile's
    SQLite file); the servers and files live until ``stack`` closes. Records what it did in
    ``setup``."""
    sample_rng = random.Random(seed + 1)
    sample = set(dataset.user_ids(rows)[i] for i in
                 sample_rng.sample(range(rows), min(VERIFY_SAMPLE, rows)))
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fcbench-mat-")))
    loaders: list[SqliteLoader | PostgresLoader] = []
    if "postgresql" in sources:
        if pg_url is None:
            server = stack.enter_context(PrivatePostgres())
            setup["postgresql"] = f"private server, {server.version()}"
            base = server.url
        else:
            base = pg_sqlalchemy_url(pg_url)
            setup["postgresql"] = "given --pg-url"
        pg = PostgresLoader(base)
        stack.callback(pg.drop)
        setup["postgresql_schema"] = pg.schema
        setup["postgresql_table"] = "COPY, then the index, then VACUUM (ANALYZE)"
        loaders.append(pg)
    if "sqlite" in sources:
        loaders.append(SqliteLoader(tmp / "offline.db"))
    profile_db: SqliteLoader | None = None
    if profile:
        sqlite_same = rows == PROFILE_ROWS and "sqlite" in sources
        profile_db = next(x for x in loaders if isinstance(x, SqliteLoader)) \
            if sqlite_same else SqliteLoader(tmp / "profile.db")
    expected: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    load_s = dict.fromkeys((x.name for x in loaders), 0.0)
    for i, (chunk, exp) in enumerate(generate(max(rows, PROFILE_ROWS if profile else 0),
                                              seed, sample)):
        start = i * LOAD_CHUNK
        if start < rows:
            expected.update(exp)
            for loader in loaders:
                t = time.perf_counter()
                loader.write(chunk[: rows - start])
                load_s[loader.name] += time.perf_counter() - t
        if profile_db is not None and profile_db not in loaders and start < PROFILE_ROWS:
            profile_db.write(chunk[: PROFILE_ROWS - start])
    for loader in loaders:
        t = time.perf_counter()
        loader.finish()
        load_s[loader.name] += time.perf_counter() - t
    if profile_db is not None and profile_db not in loaders:
        profile_db.finish()
    setup["load_seconds"] = {k: round(v, 1) for k, v in load_s.items()}
    setup["generate_and_load_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"loaded {rows:,} rows into {', '.join(x.name for x in loaders)} "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in load_s.items())}; "
        f"{setup['generate_and_load_seconds']} s with generation)")
    gc.collect()
    by_name = {x.name: x for x in loaders}
    return Loaded({s: by_name[s] for s in sources}, profile_db, expected)


def run_benchmark(*, rows: int, sources: list[str], pg_url: str | None, redis_url: str | None,
                  chunk_rows: int, profile: bool, seed: int, quick: bool, baseline: bool,
                  json_path: str | None) -> int:
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    setup: dict[str, Any] = {"rows": rows, "chunk_rows": chunk_rows, "seed": seed,
                             "features": list(dataset.FEATURE_NAMES)}
    profile_out: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        loaded = load_sources(stack, sources=sources, pg_url=pg_url, rows=rows, seed=seed,
                              profile=profile, setup=setup)
        expected = loaded.expected
        for source, loader in loaded.loaders.items():
            log(f"{source}: materializing {rows:,} rows")
            result = measure(source, loader.url, loader.schema, redis_url, rows, chunk_rows,
                             expected)
            if baseline:
                naive = measure_baseline(source, loader.url, loader.schema, redis_url, rows,
                                         chunk_rows, expected)
                result["baseline"] = naive
                result["vs_baseline"] = round(result["rows_per_s"] / naive["rows_per_s"], 2)
            results.append(result)
        if loaded.profile_db is not None:
            log(f"profile: {PROFILE_ROWS:,} SQLite rows, stages then cProfile")
            profile_out = profile_materialize(loaded.profile_db.url, redis_url, chunk_rows,
                                              PROFILE_ROWS)
    targets = evaluate_targets(results)
    print_results(results, targets, rows, redis_url)
    if profile_out is not None:
        print_profile(profile_out)
    if json_path:
        out = {
            "sources": results,
            "targets": [dataclasses.asdict(t) for t in targets],
            "quick": quick,
            "setup": {**setup, "redis": "fresh private Valkey per source" if redis_url is None
                      else "given --redis-url", "seconds": round(time.perf_counter() - started, 1)},
            "profile": profile_out,
            "environment": environment(),
        }
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {json_path}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0  # a measurement, not a test: the PASS/FAIL lines above say how it went


def evaluate_targets(results: Sequence[dict[str, Any]]) -> list[Target]:
    targets: list[Target] = []
    for r in results:
        s = r["source"]
        targets.append(Target(f"{s}: >= {TARGET_ROWS_PER_S:,} rows/s",
                              r["rows_per_s"] >= TARGET_ROWS_PER_S,
                              f"{r['rows_per_s']:,} rows/s ({r['rows']:,} rows in "
                              f"{r['seconds']:.2f} s)"))
        targets.append(Target(f"{s}: client peak RSS <= {TARGET_PEAK_RSS_MB:.0f} MB",
                              r["peak_rss_mb"] <= TARGET_PEAK_RSS_MB,
                              f"{r['peak_rss_mb']:.1f} MB (baseline {r['rss_baseline_mb']:.1f} "
                              f"MB, +{r['peak_rss_delta_mb']:.1f} MB)"))
        targets.append(Target(f"{s}: redis bytes per row <= {TARGET_BYTES_PER_ROW:.0f}",
                              r["bytes_per_row"] <= TARGET_BYTES_PER_ROW,
                              f"{r['bytes_per_row']:.1f} B/row once the keyspace settled "
                              f"({r['memory_settle_seconds']:.1f} s after the call; "
                              f"{r['bytes_per_row_right_after']:.1f} B/row right after it, "
                              "hash tables mid-resize)"))
    return targets


def print_results(results: Sequence[dict[str, Any]], targets: Sequence[Target], rows: int,
                  redis_url: str | None) -> None:
    server = results[0]["redis"]["server"] if results else "?"
    print(f"featcache materialize(all=True): {rows:,} rows x {len(dataset.FEATURE_NAMES)} "
          f"features into {server} "
          f"({'fresh private server per source' if redis_url is None else 'given server'})")
    print()
    header = ("source", "rows", "seconds", "rows_per_s", "peak_rss_mb", "rss_delta_mb",
              "bytes_per_row", "baseline_rows_per_s", "vs_baseline")
    table = [header] + [
        (r["source"], f"{r['rows']:,}", f"{r['seconds']:.2f}", f"{r['rows_per_s']:,}",
         f"{r['peak_rss_mb']:.1f}", f"{r['peak_rss_delta_mb']:.1f}", f"{r['bytes_per_row']:.1f}",
         f"{r['baseline']['rows_per_s']:,}" if "baseline" in r else "-",
         f"{r['vs_baseline']:.2f}x" if "baseline" in r else "-")
        for r in results
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join([row[0].ljust(widths[0])]
                        + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if any("baseline" in r for r in results):
        print("\nbaseline: bench.naive_copy, measured right after each source on the same table "
              "into a fresh server\n(SQLAlchemy stream, last row per entity, msgpack, redis-py "
              "pipeline of SET PX; no fence, no conditional write).\nvs_baseline = rows_per_s / "
              "baseline_rows_per_s: both from the same minute, so the VM's speed moves it "
              "less than either.")
    print()
    for t in targets:
        print(t.line())


def print_profile(p: dict[str, Any]) -> None:
    stages = p["unprofiled_stages_s"]
    total = stages["total"]
    print(f"\n=== where the time goes: materialize of {p['rows']:,} SQLite rows, "
          f"chunk_rows={p['chunk_rows']:,} ===")
    print(f"unprofiled, by stage, serially ({total:.2f} s = {p['rows'] / total:,.0f} rows/s; "
          "materialize overlaps a chunk's write, the next one's encoding and the read of the "
          "one after it):")
    for key in ("list_ids", "fence", "sql_read_convert", "write"):
        print(f"  {key:<18} {stages[key]:7.3f} s  {100 * stages[key] / total:5.1f}%")
    print(f"\ncProfile, cumulative time of each stage (profiled total "
          f"{p['profiled_total_s']:.2f} s; the profiler inflates Python-heavy code):")
    calls = p.get("profiled_stage_calls", {})
    for label, seconds in p["profiled_stage_cumtime_s"].items():
        print(f"  {label:<52} {seconds:7.3f} s  {100 * seconds / p['profiled_total_s']:5.1f}%"
              f"  {calls.get(label, 0):>7,} calls")
    print(f"\n--- top {len(p['top_tottime'])} by tottime ---")
    print(p["text"].rstrip())
    sys.stdout.flush()

