"""``python -m bench read --topology cluster``: featcache hits on a private 3-primary Valkey
Cluster against the raw ways to fetch the same keys from it, and against featcache on one
server, in one interleaved run.

* ``featcache_hit``: ``get_features(ids, 10 features)`` with ``redis.mode: cluster``, every
  row a hit;
* ``floor_cluster`` (baseline): the same keys fetched the fastest raw way: one MGET per slot
  (each of the view's 64 hash tags' slot computed once, before the run), packed by hiredis per
  node and sent to every node before any reply is read; nothing decoded;
* ``floor_cluster_untagged``: the floor's fetch of the same values under keys without a hash
  tag (one slot per row): what the 64 buckets per view are measured against;
* ``redispy_mget_nonatomic``: redis-py's ``RedisCluster.mget_nonatomic`` of the same keys;
* ``featcache_hit_standalone``: ``featcache_hit`` on one embedded server with the same rows.

Targets (issue 15): ``featcache_hit`` <= 2x ``floor_cluster`` at batch 100 and 1000, faster
than ``redispy_mget_nonatomic`` at batch 1000, <= 2x ``featcache_hit_standalone`` at 1000.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from bench import dataset
from bench.common import (
    Case,
    Report,
    Schedule,
    Summary,
    Target,
    finish,
    format_table,
    log,
    ratios_to,
    run_interleaved,
)
from featcache import CacheConfig, FeatureCache, Status
from featcache.config_sections import OfflineStoreConfig, RedisConfig
from featcache.embedded import EmbeddedServer
from featcache.embedded_cluster import EmbeddedCluster
from featcache.keys import CLUSTER_BUCKETS, KeyLayout
from featcache.redis_store.base import pack

BASELINE = "floor_cluster"
BATCHES = (1, 100, 1000)
USERS = 20_000
SCHEDULES = {
    False: {1: Schedule(3_000, 100, 20.0), 100: Schedule(1_500, 30, 25.0),
            1000: Schedule(400, 10, 40.0)},
    True: {1: Schedule(600, 30, 6.0), 100: Schedule(300, 10, 8.0),
           1000: Schedule(80, 5, 12.0)},
}


def _cache(url: str, offline_url: str, prefix: str, mode: str) -> FeatureCache:
    return FeatureCache(CacheConfig(
        views=(dataset.view(),),
        redis=RedisConfig(url=url, key_prefix=prefix, mode=mode, socket_timeout=5),
        offline_store=OfflineStoreConfig(url=offline_url)))


def _load(cache: FeatureCache, rows: Sequence[dataset.Row]) -> None:
    for start in range(0, len(rows), 2_000):
        chunk = rows[start : start + 2_000]
        if cache.put_rows(dataset.VIEW_NAME, chunk).written != len(chunk):
            raise RuntimeError("put_rows did not write every row")


class FloorUntagged:
    """The same fetch for keys without a hash tag (one slot per row, as the standalone layout
    would spread them): each key's slot looked up in a table built before the run."""

    def __init__(self, client: redis.RedisCluster, head: str, ids: Sequence[int]) -> None:
        self.client = client
        self.head = head
        self.slot = {i: key_slot(f"{head}{i}".encode()) for i in ids}

    def __call__(self, ids: Sequence[int]) -> list[Any]:
        by_slot: dict[int, list[str]] = {}
        for i in ids:
            by_slot.setdefault(self.slot[i], []).append(f"{self.head}{i}")
        return _fetch(self.client, by_slot)


class FloorCluster:
    """The fastest raw fetch of the view's keys: slots per hash tag computed once; per call
    one MGET per slot, packed per node and sent to every node before any reply is read."""

    def __init__(self, client: redis.RedisCluster, layout: KeyLayout) -> None:
        self.client = client
        heads = layout.row_keys(dataset.VIEW_NAME, range(CLUSTER_BUCKETS))
        self.slot_of_bucket = [key_slot(h.encode()) for h in heads]
        self.head_of_bucket = [h.rpartition(":")[0] + ":" for h in heads]

    def __call__(self, ids: Sequence[int]) -> list[Any]:
        by_slot: dict[int, list[str]] = {}
        heads, slots = self.head_of_bucket, self.slot_of_bucket
        for i in ids:
            b = i % CLUSTER_BUCKETS
            by_slot.setdefault(slots[b], []).append(f"{heads[b]}{i}")
        return _fetch(self.client, by_slot)


def _fetch(client: redis.RedisCluster, by_slot: dict[int, list[str]]) -> list[Any]:
    """One MGET per slot, packed per node, sent to every node before any reply is read."""
    cache = client.nodes_manager.slots_cache
    by_node: dict[str, tuple[Any, list[bytes]]] = {}
    for slot, keys in by_slot.items():
        node = cache[slot][0]
        by_node.setdefault(node.name, (node, []))[1].append(pack(("MGET", *keys)))
    sent = []
    for node, packed in by_node.values():
        pool = node.redis_connection.connection_pool
        conn = pool.get_connection()
        conn.send_packed_command([b"".join(packed)])
        sent.append((pool, conn, len(packed)))
    out: list[Any] = []
    for pool, conn, n in sent:
        try:
            for _ in range(n):
                out.extend(conn.read_response())
        finally:
            pool.release(conn)
    return out


def run_cluster(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    quick = bool(args.quick)
    batches = args.batches or BATCHES
    rng = random.Random(args.seed)
    ids = list(dataset.user_ids(USERS))
    rows = dataset.make_rows(ids, rng)
    prefix = f"fcbench-{rng.getrandbits(32):08x}"
    with tempfile.TemporaryDirectory(prefix="fcbench-") as tmp, \
            EmbeddedCluster(replicas=0) as cluster, EmbeddedServer() as server:
        offline_url = dataset.build_offline_store(Path(tmp) / "offline.db", rows, rng)
        on_cluster = _cache(f"redis://{cluster.seeds[0]}/0", offline_url, prefix, "cluster")
        standalone = _cache(server.url, offline_url, prefix, "standalone")
        host, _, port = cluster.seeds[0].rpartition(":")
        plain = redis.RedisCluster(host=host, port=int(port))
        try:
            _load(on_cluster, rows)
            _load(standalone, rows)
            log(f"loaded {len(rows):,} rows into a 3-primary cluster and one server")
            layout = KeyLayout(prefix, buckets=CLUSTER_BUCKETS)
            names = list(dataset.FEATURE_NAMES)
            floor = FloorCluster(plain, layout)
            untagged_head = f"{prefix}:untagged:"
            sample = layout.row_keys(dataset.VIEW_NAME, ids)
            for start in range(0, len(ids), 2_000):  # the same values, one slot per row
                values = plain.mget_nonatomic(sample[start : start + 2_000])
                copies = {f"{untagged_head}{i}": v for i, v in zip(
                    ids[start : start + 2_000], values, strict=True) if v is not None}
                if len(copies) != len(values):
                    raise RuntimeError("setup: a row to copy is not in the cluster")
                plain.mset_nonatomic(copies)
            untagged = FloorUntagged(plain, untagged_head, ids)

            def keys_of(batch: Sequence[int]) -> list[str]:
                return layout.row_keys(dataset.VIEW_NAME, batch)

            cases = [
                Case("floor_cluster", floor, verify=_all_present),
                Case("featcache_hit", lambda b: on_cluster.get_features(b, names),
                     verify=_all_hits),
                Case("floor_cluster_untagged", untagged, verify=_all_present),
                Case("redispy_mget_nonatomic", lambda b: plain.mget_nonatomic(keys_of(b)),
                     verify=_all_present),
                Case("featcache_hit_standalone", lambda b: standalone.get_features(b, names),
                     verify=_all_hits),
            ]
            summaries: list[Summary] = []
            for batch in batches:
                schedule = SCHEDULES[quick].get(batch) or SCHEDULES[quick][100]
                samples = run_interleaved(cases, _sampler(rng, ids, batch), schedule)
                summaries.extend(Summary.of(c.name, batch, samples.by_case[c.name])
                                 for c in cases)
                log(f"batch {batch}: {samples.rounds} rounds")
            ratios = ratios_to(BASELINE, summaries)
            print(format_table(summaries, ratios, BASELINE))
            report = Report(summaries, ratios, "valkey cluster, 3 primaries (embedded)", quick,
                            targets=_targets(summaries))
            return finish(report, args.json, started)
        finally:
            on_cluster.close()
            standalone.close()
            plain.close()


def _sampler(rng: random.Random, ids: list[int], batch: int) -> Callable[[], list[int]]:
    return lambda: rng.sample(ids, batch)


def _all_present(batch: Any, out: object) -> None:
    if not isinstance(out, list) or len(out) != len(batch) or None in out:
        raise RuntimeError("the raw fetch missed keys")


def _all_hits(batch: Any, out: object) -> None:
    counts: dict[Status, int] = dict(getattr(out, "status_counts", dict)())
    if set(counts) != {Status.HIT_REDIS}:
        raise RuntimeError(f"expected every value a Redis hit, got {dict(counts)}")


def _targets(summaries: Sequence[Summary]) -> list[Target]:
    by = {(s.case, s.batch): s for s in summaries}
    out = []

    def ratio(case: str, other: str, batch: int, most: float, name: str) -> None:
        a, b = by.get((case, batch)), by.get((other, batch))
        if a is None or b is None:
            return
        r = a.p50_us / b.p50_us
        out.append(Target(name, r <= most,
                          f"{a.p50_us:.1f} us vs {b.p50_us:.1f} us = {r:.2f}x"))

    for batch in (100, 1000):
        ratio("featcache_hit", BASELINE, batch, 2.0,
              f"batch {batch} featcache_hit p50 <= 2x floor_cluster")
    ratio("featcache_hit", "redispy_mget_nonatomic", 1000, 1.0,
          "batch 1000 featcache_hit p50 faster than redispy_mget_nonatomic")
    ratio("featcache_hit", "featcache_hit_standalone", 1000, 2.0,
          "batch 1000 featcache_hit p50 <= 2x featcache_hit_standalone")
    return out
