"""``python -m bench.l1_policies --json OUT.json [--quick]``: which L1 eviction policy to use.

Pure in-process: no Redis, no SQL. Every number goes through ``featcache.l1.L1Cache``, so it
includes the cache's own bookkeeping (generations, max_ttl deadlines, counters), not just the
libraries behind it.

Hit rate, read-through like the client (``get_many``, then ``put_many`` of the misses), one id
per call so the result is the policy's and not the batching's, with ``max_ttl`` out of reach
(the study is about eviction; ``max_ttl`` drops the same entries under every policy):

``zipf``  Zipf(0.9) over 100k keys (ranks shuffled over the ids), the steady state of a
          serving workload with a popular head and a long tail;
``scan``  the same traffic in blocks of 15,000 requests, each followed by a sequential scan of
          5,000 ids never seen before and never seen again (a batch job, a crawler, a backfill
          reading through the serving path): 25% of requests, all one-hit;
``shift`` Zipf(0.9) in four equal phases, each with its own random popularity order
          (trending items, a new day's users): where frequency-based policies lag behind,

each at three cache sizes, 1%, 5% and 20% of the key space. ``tinylfu_sampled`` is
``tinylfu`` recording only a sample of its hits in its frequency sketch, at ``L1Config``'s
default ``access_sample_rate`` (1/8: what ``FeatureCache`` runs), where plain ``tinylfu``
records every hit. Two columns are references, not policies: ``tinylfu_theine_cache``, the
same trace through a raw ``theine.Cache`` (no L1Cache around it), to show that driving
theine's core directly gives theine's hit rate; and
``unbounded``, a cache that never evicts, where only the first reference of an id misses: the
bound no policy can beat at any size (200k requests over 100k ids leave many cold misses).

Throughput: ns per key of ``get_many`` of a batch of 100 (all hits, all misses) and of
``put_many`` of 100 new keys into a full cache, per policy, on a cache of 10,000 entries, and
for ``dict_floor``, the least a bounded batch cache costs in Python. Cases are interleaved
round by round in a balanced (Williams) order, so drift hits all alike. Each sample is 20
consecutive calls: "cold" is the first (the CPU caches hold the previous case's data, as on
a serving path between two calls), "warm" the mean of the last 10; medians over rounds are
printed, the 10th and 90th percentiles are in the JSON.

Memory: resident bytes per entry of each policy, measured in a fresh interpreter each.

tinylfu's hit rate depends slightly on Python's str hash seed: set ``PYTHONHASHSEED`` to
repeat a run (docs/l1-policies.md was measured with ``PYTHONHASHSEED=0``).

Also runnable as ``python -m bench l1_policies`` once registered in ``bench/__main__.py``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.common import cpu_probe_ms, load_and_speed, williams_orders
from featcache.config import DEFAULT_L1_ACCESS_SAMPLE_RATE, L1Config
from featcache.l1 import POLICIES, L1Cache

SAMPLED = "tinylfu_sampled"  # tinylfu with CacheConfig's default access_sample_rate
DESCRIPTION = "L1 eviction policies: hit rate on Zipf and scan-polluted traces, get_many cost"

KEYS = 100_000
ZIPF_S = 0.9
SIZES_PCT = (1, 5, 20)
SCAN_EVERY = 15_000  # Zipf requests between two scans
SCAN_LENGTH = 5_000
SHIFT_PHASES = 4  # popularity reshuffled 3 times in the "shift" trace
SCAN_BASE = 10_000_000  # scan ids start here: disjoint from the Zipf key space
NO_EXPIRY = 1e9  # seconds: max_ttl out of reach of the hit-rate study
VIEW = "user"
FLOOR = "dict_floor"


class _FrozenClock:
    """Time stands still: no entry reaches max_ttl during the hit-rate study."""

    def __call__(self) -> float:
        return 0.0


# ------------------------------------------------------------------------------------ traces


def zipf_trace(requests: int, seed: int, phases: int = 1) -> list[int]:
    """Ids drawn from Zipf(0.9) over ``KEYS`` ids, popularity ranks shuffled over the ids.

    With ``phases`` > 1 the trace is cut in that many equal parts, each with its own shuffle:
    what was popular becomes ordinary, and other ids become popular.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, KEYS + 1, dtype=np.float64) ** ZIPF_S
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(requests), side="right")
    ranks = np.minimum(ranks, KEYS - 1)
    ids: list[int] = []
    for part in np.array_split(ranks, phases):
        ids_by_rank = rng.permutation(KEYS)
        ids += [int(i) for i in ids_by_rank[part]]
    return ids


def scan_trace(requests: int, seed: int) -> tuple[list[int], list[bool]]:
    """Zipf traffic with a scan of fresh one-hit ids after every ``SCAN_EVERY`` requests.

    Returns the ids and, per request, whether it belongs to a scan.
    """
    zipf = zipf_trace(requests, seed)
    ids: list[int] = []
    is_scan: list[bool] = []
    next_scan_id = SCAN_BASE
    z = 0
    while len(ids) < requests:
        block = zipf[z : z + min(SCAN_EVERY, requests - len(ids))]
        z += len(block)
        ids += block
        is_scan += [False] * len(block)
        length = min(SCAN_LENGTH, requests - len(ids))
        ids += range(next_scan_id, next_scan_id + length)
        is_scan += [True] * length
        next_scan_id += length
    return ids, is_scan


# ------------------------------------------------------------------------------------ hit rate


@dataclass(frozen=True)
class HitRate:
    workload: str
    size_pct: int
    max_entries: int
    policy: str
    requests: int
    hits: int
    hit_rate: float
    zipf_requests: int  # the requests that are not part of a scan
    zipf_hits: int
    zipf_hit_rate: float
    evictions: int
    seconds: float


def simulate(
    policy: str, max_entries: int, ids: Sequence[int], sample_rate: float = 1.0
) -> tuple[list[bool], int]:
    """Per request, whether L1Cache answered it; and the evictions it reported."""
    cache: L1Cache[int] = L1Cache(L1Config(policy, max_entries, NO_EXPIRY, sample_rate),
                                  clock=_FrozenClock())
    get, put = cache.get_many, cache.put_many
    hit: list[bool] = []
    record = hit.append
    for entity in ids:
        if get(VIEW, (entity,)):
            record(True)
        else:
            record(False)
            put(VIEW, {entity: entity})
    return hit, cache.stats()["evictions"]


def simulate_theine_cache(max_entries: int, ids: Sequence[int]) -> tuple[list[bool], int]:
    """The same trace through a raw ``theine.Cache``: the reference for ``tinylfu``."""
    from theine import Cache  # noqa: PLC0415 (starts a maintenance thread: only when asked for)

    cache: Cache[tuple[str, int], int] = Cache(max_entries)
    hit: list[bool] = []
    record = hit.append
    try:
        for entity in ids:
            key = (VIEW, entity)
            if cache.get(key)[1]:
                record(True)
            else:
                record(False)
                cache.set(key, entity)
    finally:
        cache.close()
    return hit, -1  # theine.Cache does not report evictions


def simulate_unbounded(max_entries: int, ids: Sequence[int]) -> tuple[list[bool], int]:
    """The bound no policy can beat at any size: only first references miss."""
    seen: set[int] = set()
    hit: list[bool] = []
    for entity in ids:
        hit.append(entity in seen)
        seen.add(entity)
    return hit, 0


def measure_hit_rates(requests: int, seed: int, reference: bool) -> list[HitRate]:
    zipf = zipf_trace(requests, seed)
    scan_ids, scan_flags = scan_trace(requests, seed + 1)
    shift = zipf_trace(requests, seed + 2, phases=SHIFT_PHASES)
    workloads = {
        "zipf": (zipf, [False] * len(zipf)),
        "scan": (scan_ids, scan_flags),
        "shift": (shift, [False] * len(shift)),
    }
    runners: dict[str, Callable[[int, Sequence[int]], tuple[list[bool], int]]] = {
        policy: functools.partial(simulate, policy) for policy in POLICIES
    }
    # what FeatureCache runs by default: only a sample of tinylfu's hits reach its sketch
    runners[SAMPLED] = functools.partial(
        simulate, "tinylfu", sample_rate=DEFAULT_L1_ACCESS_SAMPLE_RATE
    )
    if reference:
        runners["tinylfu_theine_cache"] = simulate_theine_cache
    runners["unbounded"] = simulate_unbounded
    results: list[HitRate] = []
    for workload, (ids, flags) in workloads.items():
        zipf_requests = flags.count(False)
        for pct in SIZES_PCT:
            max_entries = KEYS * pct // 100
            for name, run in runners.items():
                started = time.perf_counter()
                hit, evictions = run(max_entries, ids)
                seconds = time.perf_counter() - started
                hits = sum(hit)
                zipf_hits = sum(h for h, s in zip(hit, flags, strict=True) if not s)
                results.append(
                    HitRate(
                        workload,
                        pct,
                        max_entries,
                        name,
                        len(ids),
                        hits,
                        hits / len(ids),
                        zipf_requests,
                        zipf_hits,
                        zipf_hits / zipf_requests,
                        evictions,
                        round(seconds, 3),
                    )
                )
                print(
                    f"  {workload:5} {pct:>3}% {name:21} hit {hits / len(ids):6.1%}"
                    f"  ({seconds:.1f}s)",
                    file=sys.stderr,
                )
    return results


# ------------------------------------------------------------------------------------ throughput


class DictFloor:
    """The least a bounded batch cache can do in Python: a dict, FIFO eviction, no lock, no
    TTL, no counters. Its cost is the interpreter's and the memory's, not a policy's.

    An ``OrderedDict``: evicting from the front of a plain dict makes ``next(iter(d))`` walk
    the deleted slots, which would make this floor slower than the caches it is a floor for.
    """

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[tuple[str, int], tuple[int, int]] = OrderedDict()
        self._max = max_entries

    def get_many(self, view: str, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        data, found = self._data, {}
        for entity in ids:
            value = data.get((view, entity))
            if value is not None:
                found[entity] = value
        return found

    def put_many(self, view: str, items: dict[int, tuple[int, int]]) -> None:
        data = self._data
        for entity, value in items.items():
            data[(view, entity)] = value
        while len(data) > self._max:
            data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class Throughput:
    policy: str
    op: str
    batch: int
    #: the first call of a sample, right after other cases ran: the CPU caches hold
    #: someone else's data, as they do on a serving path between two calls
    cold_ns_per_key_median: float
    cold_ns_per_key_p10: float
    cold_ns_per_key_p90: float
    #: the mean of the last ``CALLS // 2`` calls of a sample, after the same case ran before
    warm_ns_per_key_median: float
    warm_ns_per_key_p10: float
    warm_ns_per_key_p90: float
    rounds: int


def measure_throughput(rounds: int, seed: int) -> list[Throughput]:
    batch, entries, calls = 100, 10_000, 20
    rng = np.random.default_rng(seed)

    def filled(policy: str) -> L1Cache[tuple[int, int]]:
        # the real clock
        cache: L1Cache[tuple[int, int]] = L1Cache(L1Config(policy, entries, 3600.0))
        for _ in range(10):  # tinylfu's admission may refuse some: offer them again
            missing = [i for i in range(entries) if not cache.get_many(VIEW, [i])]
            if not missing:
                break
            for start in range(0, len(missing), batch):
                cache.put_many(VIEW, {i: (i, i) for i in missing[start : start + batch]})
        return cache

    def floor() -> L1Cache[tuple[int, int]]:
        cache = DictFloor(entries)
        for start in range(0, entries, batch):
            cache.put_many(VIEW, {i: (i, i) for i in range(start, start + batch)})
        return cast(L1Cache[tuple[int, int]], cache)  # the same two methods

    # reads and writes on separate caches: the writes would evict what the reads expect
    readers = {policy: filled(policy) for policy in POLICIES}
    writers = {policy: filled(policy) for policy in POLICIES}
    readers[FLOOR], writers[FLOOR] = floor(), floor()
    for policy, cache in readers.items():
        assert len(cache) == entries, f"{policy}: {len(cache)} entries, the hit case would miss"

    def draw(low: int, high: int) -> list[list[int]]:
        return [[int(i) for i in rng.integers(low, high, batch)] for _ in range(calls)]

    fresh = iter(range(20_000_000, 10**12, batch))

    def new_rows() -> list[dict[int, tuple[int, int]]]:
        return [{i: (i, i) for i in range(s, s + batch)} for s in itertools.islice(fresh, calls)]

    def get_hit(cache: L1Cache[tuple[int, int]]) -> list[int]:
        return timed(cache.get_many, draw(0, entries))

    def get_miss(cache: L1Cache[tuple[int, int]]) -> list[int]:
        return timed(cache.get_many, draw(entries, 10**9))

    def put_new(cache: L1Cache[tuple[int, int]]) -> list[int]:
        return timed(cache.put_many, new_rows())

    def timed(call: Callable[[str, Any], object], inputs: Sequence[Any]) -> list[int]:
        out = []
        for arg in inputs:
            t0 = time.perf_counter_ns()
            call(VIEW, arg)
            out.append(time.perf_counter_ns() - t0)
        return out

    ops: dict[str, Callable[[L1Cache[tuple[int, int]]], list[int]]] = {
        "get_many_hit": get_hit,
        "get_many_miss": get_miss,
        "put_many_new": put_new,
    }
    cases = [(policy, op) for op in ops for policy in [*POLICIES, FLOOR]]
    orders = williams_orders(len(cases))
    cold: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    warm: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    gc.collect()
    for r in range(rounds + 2):  # the first two rounds warm up and are discarded
        for index in orders[r % len(orders)]:
            policy, op = cases[index]
            per_call = ops[op](writers[policy] if op == "put_many_new" else readers[policy])
            if r >= 2:
                cold[(policy, op)].append(per_call[0] / batch)
                warm[(policy, op)].append(statistics.fmean(per_call[calls // 2 :]) / batch)
    out = []
    for case in cases:
        c, w = statistics.quantiles(cold[case], n=10), statistics.quantiles(warm[case], n=10)
        out.append(
            Throughput(
                *case,
                batch,
                round(statistics.median(cold[case]), 1),
                round(c[0], 1),
                round(c[-1], 1),
                round(statistics.median(warm[case]), 1),
                round(w[0], 1),
                round(w[-1], 1),
                rounds,
            )
        )
    return out


# ------------------------------------------------------------------------------------ memory

_MEMORY_PROBE = """
import gc, sys, psutil
from featcache.config import L1Config
from featcache.l1 import L1Cache
n, policy = int(sys.argv[1]), sys.argv[2]
value = (1, 2)  # one shared value: what is measured is the cache's own cost per entry
ids = list(range(n))
cache = L1Cache(L1Config(policy, n, 3600.0))
gc.collect()
before = psutil.Process().memory_info().rss
for start in range(0, n, 100):
    cache.put_many("user", dict.fromkeys(ids[start : start + 100], value))
gc.collect()
print(psutil.Process().memory_info().rss - before, len(cache))
"""


def measure_memory(entries: int) -> dict[str, float]:
    """Resident bytes per entry, each policy in a fresh interpreter (freed memory is not
    returned to the OS, so measuring in one process would flatter every cache after the
    first). Includes theine's Rust-side allocations, which tracemalloc would not see. The ids
    are allocated before the baseline, so an entry's cost is its key tuple and entry tuple
    plus the policy's structures."""
    out: dict[str, float] = {}
    for policy in POLICIES:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(entries), policy],
            capture_output=True,
            text=True,
            check=True,
        )
        grown, held = (int(x) for x in done.stdout.split())
        out[policy] = round(grown / held, 1)
    return out


# ------------------------------------------------------------------------------------ output


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def hit_rate_table(results: Sequence[HitRate], zipf_part: bool = False) -> str:
    names = list(dict.fromkeys(r.policy for r in results))
    header = "| workload | size | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    rows: dict[tuple[str, int], dict[str, HitRate]] = {}
    for r in results:
        rows.setdefault((r.workload, r.size_pct), {})[r.policy] = r
    for (workload, pct), by_policy in rows.items():
        cells = []
        for name in names:
            r = by_policy[name]
            rate = r.zipf_hit_rate if zipf_part else r.hit_rate
            cells.append(f"{rate:.1%}")
        size = f"{pct}% ({by_policy[names[0]].max_entries:,})"
        lines.append(f"| {workload} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(results: Sequence[Throughput]) -> str:
    ops = list(dict.fromkeys(r.op for r in results))
    lines = ["| policy | " + " | ".join(f"{op} cold / warm" for op in ops) + " |"]
    lines.append("|" + "---|" * (len(ops) + 1))
    for policy in [*POLICIES, FLOOR]:
        cells = []
        for op in ops:
            r = next(t for t in results if t.policy == policy and t.op == op)
            cells.append(f"{r.cold_ns_per_key_median:.0f} / {r.warm_ns_per_key_median:.0f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument(
        "--quick", action="store_true", help="40k requests per trace, fewer rounds (a smoke run)"
    )
    parser.add_argument("--requests", type=int, help="requests per trace (default 200,000)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the raw theine.Cache reference rows"
    )


def run(args: argparse.Namespace) -> int:
    requests = args.requests or (40_000 if args.quick else 200_000)
    load_before, probe_before = os.getloadavg(), cpu_probe_ms()
    if "PYTHONHASHSEED" not in os.environ:
        print(
            "note: PYTHONHASHSEED is unset; tinylfu's hit rate moves by a few tenths of a point"
            " from run to run (its sketch sees str hashes). Set it to reproduce a run exactly.",
            file=sys.stderr,
        )
    rounds = 40 if args.quick else 200
    print(f"hit rates: {requests:,} requests per trace, seed {args.seed}", file=sys.stderr)
    hit_rates = measure_hit_rates(requests, args.seed, reference=not args.no_reference)
    print(f"throughput: {rounds} rounds", file=sys.stderr)
    throughput = measure_throughput(rounds, args.seed)
    memory_entries = 20_000 if args.quick else 200_000
    memory = measure_memory(memory_entries)

    print("\nHit rate, all requests:")
    print(hit_rate_table(hit_rates))
    print("\nHit rate, scan workload, the Zipf requests only (scans cannot hit):")
    print(hit_rate_table([r for r in hit_rates if r.workload == "scan"], zipf_part=True))
    print("\nns per key, batches of 100, median over rounds; cold: first call of a sample:")
    print(throughput_table(throughput))
    print(f"\nResident bytes per entry, {memory_entries:,} entries, values not counted:")
    print("| " + " | ".join(memory) + " |\n|" + "---|" * len(memory))
    print("| " + " | ".join(f"{b:.0f}" for b in memory.values()) + " |")

    if args.json is not None:
        report: dict[str, Any] = {
            "argv": sys.argv,
            "environment": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "machine": platform.machine(),
                "cachetools": _version("cachetools"),
                "theine": _version("theine"),
                "theine-core": _version("theine-core"),
                "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
                "cpus": os.cpu_count(),
                **load_and_speed(load_before, probe_before),
            },
            "parameters": {
                "keys": KEYS,
                "zipf_s": ZIPF_S,
                "requests": requests,
                "seed": args.seed,
                "sizes_pct": SIZES_PCT,
                "scan_every": SCAN_EVERY,
                "scan_length": SCAN_LENGTH,
                "shift_phases": SHIFT_PHASES,
                "throughput_rounds": rounds,
            },
            "hit_rates": [asdict(r) for r in hit_rates],
            "throughput": [asdict(t) for t in throughput],
            "memory_entries": memory_entries,
            "memory_bytes_per_entry": memory,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.l1_policies", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
