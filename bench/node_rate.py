"""``python -m bench node_rate``: what one Redis node spends per row of a bulk load, by write form.

``bench materialize`` times a whole process (SQL, client and Redis on the same two cores); this
times the Redis side alone, the figure a load's sizing divides by (docs/materialize.md,
"Sizing"): the rows of ``bench materialize`` (the ``user_stats`` view, 1M; ``--quick`` 200k),
keyed and encoded by featcache before each chunk's timed part, written in chunks of 20,000
(``featcache.materialize.CHUNK_ROWS``) into a fresh private Valkey per form (or the
``--redis-url`` server under a unique prefix per form), with the client doing nothing else
while the server works. Per form: the server's CPU per row (``INFO cpu``, all its threads),
for the whole load and for its first and last tenth of chunks (the keyspace grows tenfold
between them) and its worst chunk (a hash table doubling), the wall rows/s of the timed parts,
and the server's memory per row once its keyspace has settled (the reload's: of the keyspace
it leaves).

``featcache_cold``      what ``materialize`` sends into an empty keyspace: per chunk its fence
                        (``Parts.fence``: one ``MGET`` per 1,000 keys, and ``TIME``) and its
                        write (``prepare_latest(...).send()``: ``SET_IF_ABSENT``, 500 rows a
                        call, each row a ``SET ... PXAT ... NX GET`` behind the epoch and deadline
                        checks), both timed
``featcache_reload``    the same rows again, one microsecond newer, over the loaded keyspace:
                        the fence finds every row, so the write is ``CONDITIONAL_SET``'s
                        general path (a ``GET`` and the comparisons per row)
``set_nx``              baseline: the same keys and values as plain pipelined
                        ``SET key value PXAT t NX`` (packed untimed), the cheapest commands
                        that keep the write's NX and absolute expiry, without the guard
                        (epoch, deadline) a fenced write needs
``multi_set_nx``        the same commands inside ``MULTI``/``EXEC``: the all-or-nothing a guard
                        without a script would be built on (``WATCH``), here without even the
                        ``WATCH``

``vs_set_nx`` is each form's server CPU per row over the baseline's in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import redis

from bench import dataset
from bench.common import (
    aligned,
    environment,
    log,
    positive_int,
    redis_target,
    server_cpu_seconds,
    server_description,
    settled_used_memory,
    used_memory,
)
from featcache import CacheConfig, FeatureCache, OfflineStoreConfig, RedisConfig
from featcache.config_sections import StatsConfig
from featcache.materialize import CHUNK_ROWS
from featcache.offline import SqlRow
from featcache.redis_store.base import pack

DESCRIPTION = ("what one Redis node spends per row of a bulk load, by write form "
               "(featcache's fenced scripts against plain SET NX)")

FULL_ROWS = 1_000_000
QUICK_ROWS = 200_000
BASELINE = "set_nx"
FORMS = ("featcache_cold", "featcache_reload", "set_nx", "multi_set_nx")


@dataclass(frozen=True)
class FormResult:
    """One write form's figures (server microseconds are CPU, summed over its threads)."""

    form: str
    rows: int
    written: int
    seconds: float
    rows_per_s: float
    server_us_per_row: float
    first_tenth_us_per_row: float
    last_tenth_us_per_row: float
    worst_chunk_us_per_row: float
    fence_us_per_row: float  # of server_us_per_row: the fences' share (featcache forms)
    bytes_per_row: float
    vs_set_nx: float = 0.0


class ChunkTiming(NamedTuple):
    """One chunk's timed parts: the server's CPU seconds (the fence's among them) and the
    wall seconds, and the rows written."""

    server_s: float
    fence_server_s: float
    written: int
    wall_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT.json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows")
    parser.add_argument("--rows", type=positive_int, help=f"rows per form (default {FULL_ROWS:,})")
    parser.add_argument("--redis-url", metavar="URL",
                        help="use this server (keys under a unique fcbench-<hex> prefix per form, "
                             "removed afterwards) instead of a private Valkey per form")
    parser.add_argument("--seed", type=int, default=20_260_101, help="data seed")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    n = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    n -= n % CHUNK_ROWS
    if n < CHUNK_ROWS:
        raise SystemExit(f"--rows: at least {CHUNK_ROWS:,} (one chunk)")
    log(f"generating {n:,} rows...")
    ids = list(dataset.user_ids(n))
    rows = _sql_rows(dataset.make_rows(ids, random.Random(args.seed)))
    results: list[FormResult] = []
    server = ""
    with tempfile.TemporaryDirectory() as tmp:
        offline_url = f"sqlite:///{Path(tmp) / 'unused.db'}"  # never read: rows come ready
        for form in FORMS:
            with redis_target(args.redis_url, private_prefix="fcn") as target:
                client = redis.Redis.from_url(target.url)
                server = server or server_description(client)
                try:
                    log(f"{form}: writing {n:,} rows...")
                    results.append(_run_form(form, target.url, target.prefix, offline_url,
                                             client, ids, rows))
                finally:
                    client.close()
    base = next(r for r in results if r.form == BASELINE).server_us_per_row
    results = [replace(r, vs_set_nx=round(r.server_us_per_row / base, 2)) for r in results]
    print(f"\nbench node_rate: {server} "
          f"({'private server per form' if args.redis_url is None else 'given --redis-url'}); "
          f"{n:,} rows per form in chunks of {CHUNK_ROWS:,}; {os.cpu_count()} CPUs\n")
    print(_table(results))
    print(f"\nserver us/row: CPU of the Redis server (INFO cpu) per row written; first/last "
          f"tenth: the first and last {n // 10:,} rows' chunks; vs_set_nx: server us/row over "
          f"set_nx's")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "forms": [asdict(r) for r in results], "rows": n, "chunk_rows": CHUNK_ROWS,
            "server": server, "private": args.redis_url is None, "seed": args.seed,
            "cpus": os.cpu_count(), "environment": environment(),
        }, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _sql_rows(made: Sequence[dataset.Row]) -> dict[int, SqlRow]:
    """The rows as the offline store returns them: event time in microseconds, the features
    in the view's order."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    out: dict[int, SqlRow] = {}
    for row in made:
        event_us = (row[dataset.EVENT_COLUMN] - epoch) // dt.timedelta(microseconds=1)
        out[row[dataset.ENTITY_COLUMN]] = SqlRow(
            event_us, tuple(row[name] for name in dataset.FEATURE_NAMES))
    return out


def _run_form(form: str, url: str, prefix: str, offline_url: str, client: redis.Redis,
              ids: Sequence[int], rows: dict[int, SqlRow]) -> FormResult:
    with contextlib.closing(_cache(url, offline_url, prefix)) as cache:
        memory_before = used_memory(client)["used_memory"]
        if form == "featcache_reload":  # the keyspace it reloads, loaded untimed
            for chunk in _chunks(ids):
                cache.prepare_latest(dataset.VIEW_NAME, {i: rows[i] for i in chunk},
                                     fence=cache.fence(dataset.VIEW_NAME, chunk)).send()
            rows = {i: SqlRow((r.event_us or 0) + 1, r.values) for i, r in rows.items()}
        timed = _featcache_chunk(cache, rows) if form.startswith("featcache") else \
            _plain_chunk(cache, client, rows, multi=form == "multi_set_nx")
        per_chunk = [timed(chunk, lambda: server_cpu_seconds(client)) for chunk in _chunks(ids)]
        settled = settled_used_memory(client)["used_memory"]
    n = len(ids)
    written = sum(c.written for c in per_chunk)
    if written != n:
        raise RuntimeError(f"{form}: {written:,} of {n:,} rows written")
    server_s = sum(c.server_s for c in per_chunk)
    wall = sum(c.wall_s for c in per_chunk)
    tenth = max(1, len(per_chunk) // 10)
    chunk_us = [c.server_s / CHUNK_ROWS * 1e6 for c in per_chunk]
    return FormResult(
        form=form, rows=n, written=written, seconds=round(wall, 3),
        rows_per_s=round(n / wall), server_us_per_row=round(server_s / n * 1e6, 3),
        first_tenth_us_per_row=round(sum(chunk_us[:tenth]) / tenth, 3),
        last_tenth_us_per_row=round(sum(chunk_us[-tenth:]) / tenth, 3),
        worst_chunk_us_per_row=round(max(chunk_us), 3),
        fence_us_per_row=round(sum(c.fence_server_s for c in per_chunk) / n * 1e6, 3),
        bytes_per_row=round((settled - memory_before) / n, 1))


def _cache(url: str, offline_url: str, prefix: str) -> FeatureCache:
    """The benchmark view's cache, publishing no stats (no server work but the load's)."""
    return FeatureCache(CacheConfig(
        views=(dataset.view(),), redis=RedisConfig(url=url, key_prefix=prefix),
        offline_store=OfflineStoreConfig(url=offline_url), stats=StatsConfig(publish_interval=0)))


Timed = Callable[[Sequence[int], Callable[[], float]], ChunkTiming]


def _featcache_chunk(cache: FeatureCache, rows: dict[int, SqlRow]) -> Timed:
    """One chunk as ``materialize`` writes it: the fence (timed), the rows encoded under it
    (untimed: the client's work, not the server's), the write (timed)."""
    def timed(chunk: Sequence[int], server_cpu: Callable[[], float]) -> ChunkTiming:
        cpu0, t0 = server_cpu(), time.perf_counter()
        fence = cache.fence(dataset.VIEW_NAME, chunk)
        fence_wall, cpu1 = time.perf_counter() - t0, server_cpu()
        pending = cache.prepare_latest(dataset.VIEW_NAME, {i: rows[i] for i in chunk},
                                       fence=fence)
        cpu2, t2 = server_cpu(), time.perf_counter()
        written = pending.send().written
        wall = time.perf_counter() - t2 + fence_wall
        cpu3 = server_cpu()
        return ChunkTiming((cpu1 - cpu0) + (cpu3 - cpu2), cpu1 - cpu0, written, wall)
    return timed


def _plain_chunk(cache: FeatureCache, client: redis.Redis, rows: dict[int, SqlRow], *,
                 multi: bool) -> Timed:
    """One chunk as plain ``SET key value PXAT t NX`` commands of the same keys and encoded
    values, packed untimed, sent in one write, every reply read."""
    view = cache.config.view(dataset.VIEW_NAME)
    ttl_ms = int(view.ttl * 1000)

    def timed(chunk: Sequence[int], server_cpu: Callable[[], float]) -> ChunkTiming:
        # the values featcache would write: encoded under a fence, not sent
        pending = cache.prepare_latest(dataset.VIEW_NAME, {i: rows[i] for i in chunk},
                                       fence=cache.fence(dataset.VIEW_NAME, chunk))
        batch = pending.batch
        if batch is None or batch.if_absent is None:
            raise RuntimeError("a cold chunk must encode as one SET_IF_ABSENT group")
        seconds, micros = client.time()
        expires = str(seconds * 1000 + micros // 1000 + ttl_ms)
        commands = [pack(("SET", key, value, "PXAT", expires, "NX"))
                    for key, value in zip(batch.if_absent.keys, batch.if_absent.values,
                                          strict=True)]
        if multi:
            commands = [pack(("MULTI",)), *commands, pack(("EXEC",))]
        payload = b"".join(commands)
        conn = client.connection_pool.get_connection()
        try:
            cpu0, t0 = server_cpu(), time.perf_counter()
            conn.send_packed_command([payload])  # type: ignore[no-untyped-call]
            replies = [conn.read_response() for _ in commands]
            wall = time.perf_counter() - t0
            cpu1 = server_cpu()
        finally:
            client.connection_pool.release(conn)
        answers = replies[-1] if multi else replies
        return ChunkTiming(cpu1 - cpu0, 0.0, sum(1 for r in answers if r), wall)
    return timed


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), CHUNK_ROWS):
        yield ids[start : start + CHUNK_ROWS]


def _table(results: Sequence[FormResult]) -> str:
    head = ("form", "rows/s", "server us/row", "fences", "first tenth", "last tenth",
            "worst chunk", "B/row", "vs_set_nx")
    return aligned([head, *((r.form, f"{r.rows_per_s:,.0f}", f"{r.server_us_per_row:.2f}",
                             f"{r.fence_us_per_row:.2f}", f"{r.first_tenth_us_per_row:.2f}",
                             f"{r.last_tenth_us_per_row:.2f}",
                             f"{r.worst_chunk_us_per_row:.2f}", f"{r.bytes_per_row:.1f}",
                             f"{r.vs_set_nx:.2f}x") for r in results)])
