"""``python -m bench read``: the read path, featcache against a raw MGET and a naive GET loop.

Cases, each timed at batches of 1, 10, 100 and 1000 distinct ids drawn afresh per sample:

``floor_mget``          one ``MGET`` of keys holding random bytes of exactly the size of
                        featcache's encoded row for the same id (same TTL), decoding nothing,
                        by the fastest path redis-py offers: packed by hiredis and sent on a
                        pooled connection, its reply read by redis-py's hiredis parser (what
                        featcache's transport does, less its error handling); the key list is
                        built inside the timed call, as any design must build it
``featcache_hit``       ``get_features(ids, <the 10 features>)``, every row in Redis
``featcache_hit_uncounted``   the same on a cache with popularity counting off
``featcache_hit_unpublished`` the same on a cache with stats publishing off (``stats.
                        publish_interval: 0``, calls not timed): what cluster-wide stats cost
``featcache_hit_traced``      the same on a cache recording a read trace (``stats.
                        trace_rate: 0.01``; its thread hashes every id read): what tracing costs
``featcache_hit_dicts`` the same, then every entity's dict built (``for e in res: res[e]``)
``featcache_miss``      every row from SQLite: the batch's keys are UNLINKed (untimed) first, so
                        the call misses Redis, reads SQL in one query and writes the fills back
``naive_get_loop``      cache-aside done naively: one ``GET`` + ``json.loads`` per entity

Also ``redis_bytes_per_row``: INFO ``used_memory`` before and after writing N rows of the view
through ``put_rows`` into a fresh private Valkey (or the ``--redis-url`` server), divided by N.

``--profile`` instead runs cProfile over ``featcache_hit`` and prints where the time goes, after
an unprofiled, interleaved breakdown of a hit into transport and decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import redis

from bench import dataset
from bench.common import (
    Case,
    RedisTarget,
    Report,
    Schedule,
    Summary,
    Target,
    finish,
    format_table,
    log,
    parser_name,
    ratios_to,
    redis_target,
    run_interleaved,
    server_description,
    settled_used_memory,
    unlink_matching,
    used_memory,
)
from featcache import FeatureCache, FeatureResult, PopularityConfig, Status
from featcache.codec import RowCodec
from featcache.config_sections import StatsConfig
from featcache.embedded import EmbeddedServer
from featcache.redis_store import StandaloneStore
from featcache.redis_store.base import pack

DESCRIPTION = "read path: featcache hits and misses vs one raw MGET and a naive GET loop"

BATCHES = (1, 10, 100, 1000)
BASELINE = "floor_mget"
#: featcache_hit p50 at most this many times floor_mget's, per batch
TARGET_RATIOS = {1: 1.3, 100: 1.5, 1000: 2.0}
CASE_ORDER = ("floor_mget", "featcache_hit", "featcache_hit_uncounted",
              "featcache_hit_unpublished", "featcache_hit_traced", "featcache_hit_dicts",
              "featcache_miss", "naive_get_loop")
SETUP_CHUNK = 5_000  # rows per put_rows call / per pipeline while loading
#: the trace rate of featcache_hit_traced: what docs/analysis.md suggests for production
TRACE_RATE = 0.01


@dataclass(frozen=True)
class Mode:
    users: int
    memory_rows: int
    schedules: dict[int, Schedule]


QUICK = Mode(
    users=20_000,
    memory_rows=20_000,
    schedules={
        1: Schedule(rounds=1_500, warmup_rounds=100, budget_s=4.0),
        10: Schedule(rounds=1_000, warmup_rounds=50, budget_s=4.0),
        100: Schedule(rounds=400, warmup_rounds=20, budget_s=6.0),
        1000: Schedule(rounds=150, warmup_rounds=5, budget_s=16.0),
    },
)
FULL = Mode(
    users=20_000,
    memory_rows=100_000,
    schedules={
        1: Schedule(rounds=10_000, warmup_rounds=300, budget_s=30.0),
        10: Schedule(rounds=6_000, warmup_rounds=200, budget_s=30.0),
        100: Schedule(rounds=2_500, warmup_rounds=50, budget_s=40.0),
        1000: Schedule(rounds=600, warmup_rounds=10, budget_s=70.0),
    },
)


class BenchError(RuntimeError):
    """The setup does not measure what the case claims (a hit that missed, a wrong value)."""


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT.json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and 20k rows for the memory figure (< 60 s)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="use this server (keys under a unique fcbench-<hex> prefix, removed "
                             "afterwards) instead of a private embedded Valkey")
    parser.add_argument("--batches", type=_int_list, default=None,
                        help="comma-separated batch sizes (default: 1,10,100,1000; "
                             "100,1000 with --profile)")
    parser.add_argument("--seed", type=int, default=20_260_101, help="data and id sampling seed")
    parser.add_argument("--topology", choices=("standalone", "cluster"), default="standalone",
                        help="cluster: featcache on a private 3-primary Valkey Cluster against "
                             "the raw ways to fetch the same keys (bench/read_cluster.py)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile featcache_hit instead of benchmarking (batches default "
                             "to 100,1000 unless --batches is given)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")\
            from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return values


def run(args: argparse.Namespace) -> int:
    if args.topology == "cluster":
        from bench.read_cluster import run_cluster  # noqa: PLC0415 - its own servers

        return run_cluster(args)
    if args.profile:
        return run_profile(args.redis_url, args.batches or (100, 1000), args.seed)
    return run_benchmark(args.redis_url, args.batches or BATCHES, args.quick, args.seed,
                         args.json)


# --------------------------------------------------------------------------------------------
# Environment: a populated offline store and Redis
# --------------------------------------------------------------------------------------------


@dataclass
class Env:
    cache: FeatureCache
    plain: redis.Redis  # the baselines' client: same URL, redis-py defaults (hiredis parser)
    prefix: str
    ids: list[int]
    rows: dict[int, dataset.Row]
    rng: random.Random
    value_bytes: dict[int, int]  # id -> size of featcache's encoded row
    uncounted: FeatureCache | None = None  # the same cache with popularity counting off
    unpublished: FeatureCache | None = None  # ... with stats publishing (and call timing) off
    traced: FeatureCache | None = None  # ... recording a read trace at stats.trace_rate 0.01

    @property
    def floor_head(self) -> str:
        return f"{self.prefix}:floor:"

    @property
    def naive_head(self) -> str:
        return f"{self.prefix}:naive:"

    def row_keys(self, ids: Sequence[int]) -> list[str]:
        return self.cache.layout.row_keys(dataset.VIEW_NAME, ids)


@contextlib.contextmanager
def prepared_env(target: RedisTarget, users: int, seed: int) -> Iterator[Env]:
    """SQLite with ``users`` users, every latest row in Redis (via ``put_rows``), floor and
    naive keys beside them."""
    rng = random.Random(seed)
    ids = list(dataset.user_ids(users))
    latest = dataset.make_rows(ids, rng)
    with tempfile.TemporaryDirectory(prefix="fcbench-") as tmp:
        started = time.perf_counter()
        offline_url = dataset.build_offline_store(Path(tmp) / "offline.db", latest, rng)
        log(f"offline store: SQLite, {users:,} users ({time.perf_counter() - started:.1f} s)")
        cache = dataset.make_cache(target.url, offline_url, target.prefix)
        uncounted = FeatureCache(cache.config.replace(popularity=PopularityConfig(sample_rate=0.0)))
        unpublished = FeatureCache(cache.config.replace(stats=StatsConfig(publish_interval=0)))
        traced = FeatureCache(cache.config.replace(stats=StatsConfig(trace_rate=TRACE_RATE)))
        plain = redis.Redis.from_url(target.url)
        try:
            started = time.perf_counter()
            for start in range(0, len(latest), SETUP_CHUNK):
                chunk = latest[start : start + SETUP_CHUNK]
                report = cache.put_rows(dataset.VIEW_NAME, chunk)
                if report.written != len(chunk):
                    raise BenchError(f"put_rows wrote {report.written} rows, expected all")
            rows = {r[dataset.ENTITY_COLUMN]: r for r in latest}
            env = Env(cache, plain, target.prefix, ids, rows, rng, {}, uncounted, unpublished,
                      traced)
            _write_baseline_keys(env)
            log(f"redis: {users:,} rows x3 (featcache, floor, naive) loaded "
                f"({time.perf_counter() - started:.1f} s)")
            yield env
        finally:
            cache.close()
            uncounted.close()
            unpublished.close()
            traced.close()
            plain.close()


def _write_baseline_keys(env: Env) -> None:
    ttl_ms = int(dataset.view().ttl * 1000)  # the TTL featcache's rows carry: same expiry work
    for start in range(0, len(env.ids), SETUP_CHUNK):
        chunk = env.ids[start : start + SETUP_CHUNK]
        values = env.plain.mget(env.row_keys(chunk))
        pipe = env.plain.pipeline(transaction=False)
        for eid, value in zip(chunk, values, strict=True):
            if value is None:
                raise BenchError(f"row of user {eid} is not in Redis after put_rows")
            env.value_bytes[eid] = len(value)
            pipe.set(f"{env.floor_head}{eid}", env.rng.randbytes(len(value)), px=ttl_ms)
            naive = json.dumps(dataset.feature_dict(env.rows[eid]))
            pipe.set(f"{env.naive_head}{eid}", naive, px=ttl_ms)
        pipe.execute()


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def build_cases(env: Env) -> list[Case]:
    names = list(dataset.FEATURE_NAMES)
    get_features = env.cache.get_features
    get = env.plain.get
    loads = json.loads
    floor_head, naive_head = env.floor_head, env.naive_head

    def featcache_hit(ids: list[int]) -> FeatureResult:
        return get_features(ids, names)

    uncounted_get = (env.uncounted or env.cache).get_features

    def featcache_hit_uncounted(ids: list[int]) -> FeatureResult:
        """The same call with popularity counting off: what counting costs."""
        return uncounted_get(ids, names)

    unpublished_get = (env.unpublished or env.cache).get_features

    def featcache_hit_unpublished(ids: list[int]) -> FeatureResult:
        """The same call with stats publishing off (calls not timed): what publishing costs."""
        return unpublished_get(ids, names)

    traced_get = (env.traced or env.cache).get_features

    def featcache_hit_traced(ids: list[int]) -> FeatureResult:
        """The same call recording the sampled read trace: what tracing costs."""
        return traced_get(ids, names)

    def featcache_hit_dicts(ids: list[int]) -> FeatureResult:
        res = get_features(ids, names)
        for e in res:
            res[e]
        return res

    def unlink_rows(ids: list[int]) -> None:
        env.plain.unlink(*env.row_keys(ids))

    pool = env.plain.connection_pool

    def floor_mget(ids: list[int]) -> list[Any]:
        conn = pool.get_connection()
        try:
            conn.send_packed_command(  # type: ignore[no-untyped-call]
                [pack(("MGET", *[f"{floor_head}{i}" for i in ids]))])
            values: list[Any] = conn.read_response()
        finally:
            pool.release(conn)
        return values

    def naive_get_loop(ids: list[int]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for eid in ids:
            raw = get(f"{naive_head}{eid}")
            out[eid] = None if raw is None else loads(raw)
        return out

    cases = {
        "floor_mget": Case("floor_mget", floor_mget, verify=_all_values),
        "featcache_hit": Case("featcache_hit", featcache_hit, verify=_statuses(Status.HIT_REDIS)),
        "featcache_hit_uncounted": Case("featcache_hit_uncounted", featcache_hit_uncounted,
                                        verify=_statuses(Status.HIT_REDIS)),
        "featcache_hit_unpublished": Case("featcache_hit_unpublished", featcache_hit_unpublished,
                                          verify=_statuses(Status.HIT_REDIS)),
        "featcache_hit_traced": Case("featcache_hit_traced", featcache_hit_traced,
                                     verify=_statuses(Status.HIT_REDIS)),
        "featcache_hit_dicts": Case("featcache_hit_dicts", featcache_hit_dicts,
                                    verify=_statuses(Status.HIT_REDIS)),
        "featcache_miss": Case("featcache_miss", featcache_hit, prepare=unlink_rows,
                               verify=_statuses(Status.FILLED)),
        "naive_get_loop": Case("naive_get_loop", naive_get_loop, verify=_all_values),
    }
    return [cases[name] for name in CASE_ORDER]


def _statuses(expected: Status) -> Callable[[Any, object], None]:
    def verify(ids: Any, out: object) -> None:
        assert isinstance(out, FeatureResult)
        counts = out.status_counts()
        if counts.get(expected, 0) != len(ids) * len(out.feature_names):
            raise BenchError(f"expected every value {expected.value}, got {dict(counts)}")

    return verify


def _all_values(ids: Any, out: object) -> None:
    values = list(out.values()) if isinstance(out, dict) else out
    if not isinstance(values, list) or len(values) != len(ids) or None in values:
        raise BenchError("a baseline key is missing from Redis")


def check_correctness(env: Env, n: int = 300) -> None:
    """Before timing: hits, misses and the naive loop return the rows that were written."""
    ids = env.rng.sample(env.ids, min(n, len(env.ids)))
    names = list(dataset.FEATURE_NAMES)
    cases = {c.name: c for c in build_cases(env)}
    for case_name, status in (("featcache_hit", Status.HIT_REDIS),
                              ("featcache_miss", Status.FILLED)):
        case = cases[case_name]
        if case.prepare is not None:
            case.prepare(ids)
        res = env.cache.get_features(ids, names)
        _statuses(status)(ids, res)
        for eid in ids:
            if res[eid] != dataset.feature_dict(env.rows[eid]):
                raise BenchError(f"{case_name}: user {eid}: {res[eid]} != {env.rows[eid]}")
    naive = cases["naive_get_loop"].run(ids)
    assert isinstance(naive, dict)
    for eid in ids:
        if naive[eid] != dataset.feature_dict(env.rows[eid]):
            raise BenchError(f"naive_get_loop: user {eid} differs")
    floor = cases["floor_mget"].run(ids)
    assert isinstance(floor, list)
    if [len(v) for v in floor] != [env.value_bytes[eid] for eid in ids]:
        raise BenchError("floor values differ in size from featcache's rows")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def measure_memory(target: RedisTarget, n: int, seed: int) -> dict[str, Any]:
    """Bytes of ``used_memory`` per row written through ``put_rows``.

    A private run uses a second, fresh embedded server; a ``--redis-url`` run uses that server
    (its own figure, shared with whatever else runs there) and removes the rows afterwards.
    """
    if target.private:
        with EmbeddedServer() as server:
            return _measure_memory(server.url, target.prefix, n, seed, fresh=True)
    try:
        return _measure_memory(target.url, target.prefix, n, seed, fresh=False)
    finally:
        client = redis.Redis.from_url(target.url)
        try:
            unlink_matching(client, f"{target.prefix}:*")
        finally:
            client.close()


def _measure_memory(url: str, prefix: str, n: int, seed: int, fresh: bool) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    rows = dataset.make_rows(dataset.user_ids(n), rng)
    with dataset.make_cache(url, "sqlite://", prefix) as cache:
        client = cache.redis
        # connect and load the write script before the first reading, so neither is counted
        cache.put_rows(dataset.VIEW_NAME, dataset.make_rows([dataset.ID_BASE - 1], rng))
        keys_before = client.dbsize()
        before = used_memory(client)
        started = time.perf_counter()
        written = 0
        for start in range(0, n, SETUP_CHUNK):
            written += cache.put_rows(dataset.VIEW_NAME, rows[start : start + SETUP_CHUNK]).written
        seconds = time.perf_counter() - started
        after = settled_used_memory(client)
        keys_added = client.dbsize() - keys_before
        server = server_description(client)
        key_example = cache.layout.row_key(dataset.VIEW_NAME, dataset.ID_BASE)
        sample = client.get(key_example)
        if written != n or (fresh and keys_added != n):
            raise BenchError(f"memory: wrote {written} rows, {keys_added} keys appeared; "
                             f"expected {n}")
    delta = after["used_memory"] - before["used_memory"]
    return {
        "redis_bytes_per_row": round(delta / n, 1),
        "memory": {
            "server": server,
            "fresh_server": fresh,
            "rows": n,
            "used_memory_before": before["used_memory"],
            "used_memory_after": after["used_memory"],
            "client_buffers_delta": after["mem_clients_normal"] - before["mem_clients_normal"],
            "key_example": key_example,
            "value_bytes_example": len(sample or b""),
            "put_rows_per_s": round(n / seconds),
        },
    }


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def run_benchmark(
    redis_url: str | None, batches: Sequence[int], quick: bool, seed: int, json_path: str | None
) -> int:
    mode = QUICK if quick else FULL
    started = time.perf_counter()
    with redis_target(redis_url) as target:
        log(f"memory: writing {mode.memory_rows:,} rows through put_rows")
        memory = measure_memory(target, mode.memory_rows, seed)
        with prepared_env(target, mode.users, seed) as env:
            server = server_description(env.plain)
            parsers = {parser_name(env.plain), parser_name(env.cache.redis)}
            check_correctness(env)
            summaries: list[Summary] = []
            gc_runs: dict[str, list[int]] = {}
            for batch in batches:
                if batch > len(env.ids):
                    raise BenchError(f"batch {batch} exceeds the {len(env.ids)} users")
                schedule = mode.schedules.get(batch) or _schedule_for(batch, quick)
                samples = run_interleaved(build_cases(env), _sampler(env, batch), schedule)
                summaries.extend(
                    Summary.of(name, batch, samples.by_case[name]) for name in CASE_ORDER
                )
                gc_runs[str(batch)] = samples.gc_collections
                log(f"batch {batch}: {samples.rounds} rounds ({samples.seconds:.1f} s timed), "
                    f"gc collections gen0/1/2: {'/'.join(map(str, samples.gc_collections))}")
            serving_gc = measure_serving_gc(env, [b for b in GC_BATCHES if b in batches], quick)
            summaries.extend(serving_gc)
            sizes = sorted(env.value_bytes.values())
    ratios = ratios_to(BASELINE, summaries)
    targets = evaluate_targets(summaries, memory["redis_bytes_per_row"])
    report = Report(
        cases=summaries,
        ratios=ratios,
        server=server,
        quick=quick,
        targets=targets,
        extra={
            "redis_bytes_per_row": memory["redis_bytes_per_row"],
            "memory": memory["memory"],
            "setup": {
                "redis": "private embedded server" if target.private else "given --redis-url",
                "key_prefix": target.prefix,
                "users": mode.users,
                "features": list(dataset.FEATURE_NAMES),
                "row_value_bytes": {"min": sizes[0], "p50": sizes[len(sizes) // 2],
                                    "max": sizes[-1]},
                "redis_py_parsers": sorted(parsers),
                "gc_collections_during_timed_rounds": gc_runs,
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 1),
            },
        },
    )
    print(f"featcache read path: {server} ({report.extra['setup']['redis']}), "
          f"{mode.users:,} users, {len(dataset.FEATURE_NAMES)} features, "
          f"row value {sizes[len(sizes) // 2]} B (p50); {'quick' if quick else 'full'} run, "
          f"interleaved rounds")
    print()
    print(format_table(summaries, ratios, BASELINE))
    print()
    print(f"redis_bytes_per_row: {memory['redis_bytes_per_row']} "
          f"({memory['memory']['rows']:,} rows via put_rows, {memory['memory']['server']}, "
          f"{'fresh private server' if memory['memory']['fresh_server'] else 'given server'})")
    return finish(report, json_path, started)


#: batches timed again with the collector as a serving process has it
GC_BATCHES = (100, 1000)
#: long-lived tracked objects a serving process holds besides featcache's (its framework, its
#: model, its own caches): 50k dicts of one list each
GC_HEAP_DICTS = 50_000


def measure_serving_gc(env: Env, batches: Sequence[int], quick: bool) -> list[Summary]:
    """``floor_mget``, ``featcache_hit`` and ``featcache_hit_dicts`` again, in a process that
    holds 100k more long-lived tracked objects, under each collector setting a serving process
    may choose (``GC_SETTINGS``): as a process has it by default (``<case>_gc``: the target is
    judged there), with ``gc.freeze()`` after start-up (``_gc_freeze``), with a larger
    first-generation threshold (``_gc_threshold``). Each case runs alone, call after call, as a
    serving loop would: interleaved, one case's garbage would trigger collections that another
    case's calls pay for."""
    by_name = {case.name: case for case in build_cases(env)}
    heap = [{"k": i, "v": [i]} for i in range(GC_HEAP_DICTS)]
    out: list[Summary] = []
    threshold = gc.get_threshold()
    for setting, apply in GC_SETTINGS.items():
        gc.collect()  # the heap is old, as a serving process's start-up objects are
        apply()
        try:
            for batch in batches:
                # the main runs' samples: a p99 of 100 calls is their second-worst, which
                # one full collection decides alone
                schedule = (QUICK if quick else FULL).schedules.get(batch) or _schedule_for(
                    batch, quick)
                for name in GC_CASES:
                    case = replace(by_name[name], name=f"{name}_{setting}")
                    samples = run_interleaved([case], _sampler(env, batch), schedule,
                                              freeze=False)
                    out.append(Summary.of(case.name, batch, samples.by_case[case.name]))
                    log(f"batch {batch} {case.name}: {len(gc.get_objects()):,} tracked "
                        f"objects, {samples.rounds} calls, gc collections gen0/1/2: "
                        f"{'/'.join(map(str, samples.gc_collections))}")
        finally:
            gc.unfreeze()
            gc.set_threshold(*threshold)
    del heap
    return out


#: the collector settings a serving process may choose, applied after its start-up
GC_SETTINGS: dict[str, Callable[[], None]] = {
    "gc": lambda: None,
    "gc_freeze": gc.freeze,
    "gc_threshold": lambda: gc.set_threshold(50_000, 20, 20),
}
GC_CASES = ("floor_mget", "featcache_hit", "featcache_hit_dicts")


def _sampler(env: Env, batch: int) -> Callable[[], list[int]]:
    """Each call: ``batch`` distinct ids, drawn afresh."""
    return lambda: env.rng.sample(env.ids, batch)


def _schedule_for(batch: int, quick: bool) -> Schedule:
    """For a batch size outside BATCHES: about as many ids per case as the nearest ones."""
    rounds = max(50, (200_000 if quick else 1_000_000) // (batch * 10))
    return Schedule(rounds=rounds, warmup_rounds=max(3, rounds // 20),
                    budget_s=8.0 if quick else 40.0)


def evaluate_targets(summaries: Sequence[Summary], bytes_per_row: float) -> list[Target]:
    by = {(s.case, s.batch): s for s in summaries}
    targets: list[Target] = []

    def pair(batch: int) -> tuple[Summary, Summary, float] | None:
        hit, floor = by.get(("featcache_hit", batch)), by.get((BASELINE, batch))
        if hit is None or floor is None:
            return None
        return hit, floor, hit.p50_us / floor.p50_us

    for batch, most in TARGET_RATIOS.items():
        if (p := pair(batch)) is not None:
            hit_b, floor_b, r = p
            targets.append(Target(
                f"batch {batch} featcache_hit p50 <= {most}x floor_mget", r <= most,
                f"{hit_b.p50_us:.1f} us vs {floor_b.p50_us:.1f} us = {r:.2f}x",
            ))
    if (hit := by.get(("featcache_hit", 1000))) is not None and (
        floor := by.get((BASELINE, 1000))
    ) is not None:
        tail = hit.p99_us / hit.p50_us
        targets.append(Target(
            "batch 1000 featcache_hit p99 <= 2x p50", tail <= 2.0,
            f"p99 {hit.p99_us:.1f} us = {tail:.2f}x p50 {hit.p50_us:.1f} us "
            f"(for scale: floor_mget's own p99 = {floor.p99_us / floor.p50_us:.2f}x its p50)",
        ))
    if (hit := by.get(("featcache_hit_gc", 1000))) is not None and (
        floor := by.get(("floor_mget_gc", 1000))
    ) is not None:
        tail = hit.p99_us / hit.p50_us
        targets.append(Target(
            "batch 1000 featcache_hit p99 <= 3x p50 without gc.freeze, 100k more objects",
            tail <= 3.0,
            f"p99 {hit.p99_us:.1f} us = {tail:.2f}x p50 {hit.p50_us:.1f} us (for scale: "
            f"floor_mget's own p99 = {floor.p99_us / floor.p50_us:.2f}x its p50 there)",
        ))
    hit, uncounted = by.get(("featcache_hit", 100)), by.get(("featcache_hit_uncounted", 100))
    if hit is not None and uncounted is not None:
        r = hit.p50_us / uncounted.p50_us
        targets.append(Target(
            "batch 100 popularity counting adds <= 5% to featcache_hit p50", r <= 1.05,
            f"{hit.p50_us:.1f} us counted (the default sample_rate) "
            f"vs {uncounted.p50_us:.1f} us uncounted = {r:.3f}x",
        ))
    hit, unpublished = by.get(("featcache_hit", 100)), by.get(("featcache_hit_unpublished", 100))
    if hit is not None and unpublished is not None:
        r = hit.p50_us / unpublished.p50_us
        targets.append(Target(
            "batch 100 stats publishing adds <= 3% to featcache_hit p50", r <= 1.03,
            f"{hit.p50_us:.1f} us published (every 10 s, calls timed) "
            f"vs {unpublished.p50_us:.1f} us unpublished = {r:.3f}x",
        ))
    targets.append(Target(
        "redis bytes per row <= 200", bytes_per_row <= 200.0, f"{bytes_per_row:.1f} B/row"
    ))
    return targets


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


def run_profile(redis_url: str | None, batches: Sequence[int], seed: int) -> int:
    """An unprofiled breakdown of a hit, then cProfile of ``featcache_hit`` per batch size."""
    with redis_target(redis_url) as target, prepared_env(target, QUICK.users, seed) as env:
        check_correctness(env)
        print(f"server: {server_description(env.plain)}; {QUICK.users:,} users, "
              f"{len(dataset.FEATURE_NAMES)} features")
        for batch in batches:
            print_breakdown(env, batch)
        for batch in batches:
            profile_hits(env, batch)
    return 0


def print_breakdown(env: Env, batch: int) -> None:
    """Where a hit's time goes, each part timed alone and interleaved with the floor:
    featcache's transport (RedisStore.read: key building + MGET), decoding the rows
    (RowCodec.decode_rows, typed), msgpack alone (untyped), and the whole call."""
    names = list(dataset.FEATURE_NAMES)
    store = StandaloneStore(env.cache.redis)
    codec = RowCodec(dataset.view())
    blobs: list[Any] = []
    unpackb = msgpack.unpackb

    def fetch_blobs(ids: list[int]) -> None:
        blobs[:] = env.plain.mget(env.row_keys(ids))

    def transport(ids: list[int]) -> object:
        return store.read(env.row_keys(ids))

    def decode(_: object) -> object:
        return codec.decode_rows(blobs)

    def msgpack_only(_: object) -> object:
        return [unpackb(b) for b in blobs]

    def hit(ids: list[int]) -> object:
        return env.cache.get_features(ids, names)

    baseline = {c.name: c for c in build_cases(env)}
    cases = [
        baseline["floor_mget"],
        Case("fc_transport_mget", transport),
        Case("fc_decode_rows", decode, prepare=fetch_blobs),
        Case("msgpack_unpackb_rows", msgpack_only, prepare=fetch_blobs),
        Case("featcache_hit", hit),
        baseline["featcache_hit_dicts"],
    ]
    rounds = max(100, min(3_000, 100_000 // batch))
    samples = run_interleaved(
        cases, _sampler(env, batch),
        Schedule(rounds=rounds, warmup_rounds=max(5, rounds // 20), budget_s=15.0),
    )
    summaries = [Summary.of(c.name, batch, samples.by_case[c.name]) for c in cases]
    p50 = {s.case: s.p50_us for s in summaries}
    print(f"\n=== breakdown of featcache_hit, batch {batch} (unprofiled, interleaved) ===")
    print(format_table(summaries, ratios_to(BASELINE, summaries), BASELINE))
    rest = p50["featcache_hit"] - p50["fc_transport_mget"] - p50["fc_decode_rows"]
    print(f"featcache_hit p50 {p50['featcache_hit']:.1f} us = transport "
          f"{p50['fc_transport_mget']:.1f} + decode {p50['fc_decode_rows']:.1f} "
          f"(msgpack alone {p50['msgpack_unpackb_rows']:.1f}) + the rest {rest:.1f} us "
          f"(ids, plan, freshness checks, Answer/result objects, stats); "
          f"floor_mget {p50['floor_mget']:.1f} us")


def profile_hits(env: Env, batch: int, top: int = 25) -> None:
    names = list(dataset.FEATURE_NAMES)
    calls = max(100, min(5_000, 200_000 // batch))
    inputs = [env.rng.sample(env.ids, batch) for _ in range(calls)]
    get_features = env.cache.get_features
    for ids in inputs[: max(5, calls // 10)]:  # warm up
        get_features(ids, names)
    profiler = cProfile.Profile()
    profiler.enable()
    for ids in inputs:
        get_features(ids, names)
    profiler.disable()
    print(f"\n=== cProfile: featcache_hit, batch {batch}, {calls} calls "
          f"(profiler overhead inflates Python-heavy code) ===")
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    for key in ("cumulative", "tottime"):
        print(f"\n--- top {top} by {key} ---")
        stats.sort_stats(key).print_stats(top)
