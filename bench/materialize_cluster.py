"""``python -m bench materialize --topology cluster``: bulk materialization into a private
3-primary Valkey Cluster, against one private server in the same run.

The rows, the sources and the timed call are ``bench.materialize``'s (N rows of
``bench.dataset``'s ``user_stats``, 1M; ``--quick``: 100k; SQLite by default, PostgreSQL with
``--sources postgresql,sqlite``). Per source, each into servers started for it alone:

``cluster``     ``featcache.materialize.materialize(cache, view, all=True)`` with
                ``redis.mode: cluster`` into a fresh ``EmbeddedCluster`` of 3 primaries and no
                replicas (the VM has 2 cores);
``standalone``  the same call into one fresh private Valkey (``bench.materialize.measure``);
``naive_copy``  unless ``--no-baseline``: ``bench.naive_copy`` into one fresh server, the
                standalone benchmark's baseline.

Each is held to the standalone benchmark's checks (every row written, exactly the rows and the
epoch key in Redis, 1000 sampled ids read back ``HIT_REDIS`` with their generated values) and
reports its figures (rows/s, client peak RSS, settled Redis bytes per row, CPU per 100k rows);
on the cluster, memory, keys and Redis CPU are summed over the primaries (INFO of each), and
``nodes`` gives each primary's share: keys, bytes, CPU, and the write scripts it ran (INFO
commandstats: calls and server time). ``vs_standalone`` is the cluster's rows/s over the
standalone's in the same minute.

Then, unless ``--no-profile``: the serial stage breakdown of 100k SQLite rows on a fresh
cluster, with each primary's script calls and time during it, then on one fresh server (its
script time too), then cProfile of the cluster's loop on another fresh cluster: the stages,
``ClusterStore.write``, the node shares it sent (a node's ``StandaloneStore`` script calls) and
how long the client waited on their replies, beside the primaries' script time in that run. A
client that waits about as long as the primaries' script time summed writes to one node after
another; one that waits about as long as the busiest primary's writes to all at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from bench import dataset
from bench.common import cpu_probe_ms, environment, frozen_heap, load_and_speed, log
from bench.materialize import (
    FULL_ROWS,
    PROFILE_ROWS,
    QUICK_ROWS,
    STAGE_FUNCS,
    BenchError,
    CalledFrom,
    cprofile_stages,
    evaluate_targets,
    fresh_cache,
    load_sources,
    measure,
    measure_baseline,
    measure_on,
    parse_sources,
    print_profile,
    script_stats,
    stage_breakdown,
    view_for,
)
from featcache import CacheConfig, FeatureCache, OfflineStoreConfig, RedisConfig
from featcache.embedded_cluster import EmbeddedCluster
from featcache.keys import CLUSTER_BUCKETS
from featcache.redis_store import CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT

PRIMARIES = 3

#: The standalone breakdown's stages, the write as the cluster backend does it.
CLUSTER_STAGE_FUNCS: dict[str, tuple[str, str]] = {
    **{k: v for k, v in STAGE_FUNCS.items() if "StandaloneStore.write" not in k},
    "  of which ClusterStore.write": ("redis_store/cluster_store.py", "write"),
}
NODE_SHARES = "node shares: a node store's scripts called by ClusterStore"
REPLY_WAIT = "waiting on replies: read_response called by a node store"
#: A node's share is sent by a StandaloneStore of that node, whose replies are read in
#: ``_round_trip`` (in ``_receive`` when sending and reading are two halves): every write's,
#: and the TIME of each chunk's fence.
CALLED_FROM: dict[str, CalledFrom] = {
    NODE_SHARES: [(("redis_store/standalone.py", func), ("redis_store/cluster_store.py", None))
                  for func in ("eval_scripts", "start_scripts")],
    REPLY_WAIT: [(("redis/connection.py", "read_response"), ("redis_store/standalone.py", func))
                 for func in ("_round_trip", "_receive")],
}


def run_cluster(args: argparse.Namespace) -> int:
    if args.redis_url is not None:
        raise SystemExit("--topology cluster starts its own cluster and server; "
                         "--redis-url names one server")
    sources = parse_sources(args.sources or "sqlite")
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    return run_benchmark(
        rows=rows, sources=sources, pg_url=args.pg_url, chunk_rows=args.chunk_rows,
        profile=not args.no_profile, baseline=not args.no_baseline, seed=args.seed,
        quick=args.quick, json_path=args.json,
    )


# --------------------------------------------------------------------------------------------
# A fresh cluster and a cache on it
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_cache(offline_url: str, schema: str | None
                  ) -> Iterator[tuple[FeatureCache, list[redis.Redis]]]:
    """A cache with ``redis.mode: cluster`` on a fresh private cluster, and a client of each
    primary alone. The slot map, a connection to every primary and featcache's scripts on
    each are there before the caller's clock starts, as ``fresh_cache`` has them on one
    server."""
    with EmbeddedCluster(primaries=PRIMARIES, replicas=0) as cluster:
        clients = [node.client() for node in cluster.primaries()]
        try:
            for client in clients:
                for script in (CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT):
                    client.script_load(script.text)
            config = CacheConfig(
                views=(view_for(schema),),
                redis=RedisConfig(url=f"redis://{cluster.seeds[0]}/0", mode="cluster"),
                offline_store=OfflineStoreConfig(url=offline_url))
            with FeatureCache(config) as cache:
                # one absent key in each of the view's buckets: a connection to every primary
                cache.store.read(cache.layout.row_keys(dataset.VIEW_NAME,
                                                       range(CLUSTER_BUCKETS)))
                yield cache, clients
        finally:
            for client in clients:
                client.close()


def measure_cluster(source: str, offline_url: str, schema: str | None, n: int, chunk_rows: int,
                    expected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    with cluster_cache(offline_url, schema) as (cache, clients):
        result = measure_on(cache, clients, source, n, chunk_rows, expected,
                            fresh_servers=True)
    result["redis"]["server"] += f", cluster of {PRIMARIES} primaries, no replicas"
    return result


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


def profile_cluster(offline_url: str, chunk_rows: int, n: int) -> dict[str, Any]:
    """The serial stage breakdown on a fresh cluster (each primary's script calls and time
    during it), the same on one fresh server, then cProfile of the cluster's loop."""
    with cluster_cache(offline_url, None) as (cache, clients), frozen_heap():
        before = [script_stats(c) for c in clients]
        stages = stage_breakdown(cache, chunk_rows)
        after = [script_stats(c) for c in clients]
    if stages["rows"] != n:
        raise BenchError(f"profile: stage breakdown wrote {stages['rows']} rows, expected {n}")
    nodes = [{"script_calls": a["calls"] - b["calls"],
              "script_s": round((a["usec"] - b["usec"]) / 1e6, 3)}
             for a, b in zip(after, before, strict=True)]
    script_s = [node["script_s"] for node in nodes]
    with fresh_cache(None, offline_url, None) as (cache, _), frozen_heap():
        single_before = script_stats(cache.redis)
        single = stage_breakdown(cache, chunk_rows)
        single_after = script_stats(cache.redis)
    with cluster_cache(offline_url, None) as (cache, clients):
        before = [script_stats(c) for c in clients]
        profiled = cprofile_stages(cache, chunk_rows, n, CLUSTER_STAGE_FUNCS,
                                   called_from=CALLED_FROM)
        after = [script_stats(c) for c in clients]
    profiled_script_s = [round((a["usec"] - b["usec"]) / 1e6, 3)
                         for a, b in zip(after, before, strict=True)]
    return {
        "rows": n,
        "chunk_rows": chunk_rows,
        "unprofiled_stages_s": stages,
        "unprofiled_nodes": nodes,
        # a chunk's writes, node after node, cannot take less than the nodes' script time
        # summed; written to every node at once, they could approach the longest node's
        "nodes_script_s_sum": round(sum(script_s), 3),
        "nodes_script_s_max": round(max(script_s), 3),
        "standalone_unprofiled_stages_s": single,
        "standalone_unprofiled_script_s": round(
            (single_after["usec"] - single_before["usec"]) / 1e6, 3),
        **profiled,
        "profiled_nodes_script_s": profiled_script_s,
    }


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def run_benchmark(*, rows: int, sources: list[str], pg_url: str | None, chunk_rows: int,
                  profile: bool, seed: int, quick: bool, baseline: bool,
                  json_path: str | None) -> int:
    started = time.perf_counter()
    load_before = os.getloadavg()
    probe_before = cpu_probe_ms()
    results: list[dict[str, Any]] = []
    setup: dict[str, Any] = {"rows": rows, "chunk_rows": chunk_rows, "seed": seed,
                             "features": list(dataset.FEATURE_NAMES), "code": code_state()}
    profile_out: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        loaded = load_sources(stack, sources=sources, pg_url=pg_url, rows=rows, seed=seed,
                              profile=profile, setup=setup)
        expected = loaded.expected
        for source, loader in loaded.loaders.items():
            log(f"{source}: materializing {rows:,} rows into a {PRIMARIES}-primary cluster")
            result = measure_cluster(source, loader.url, loader.schema, rows, chunk_rows,
                                     expected)
            log(f"{source}: materializing {rows:,} rows into one server")
            single = measure(source, loader.url, loader.schema, None, rows, chunk_rows,
                             expected)
            entry: dict[str, Any] = {
                **result,
                "topology": "cluster",
                "standalone": single,
                "vs_standalone": round(result["rows_per_s"] / single["rows_per_s"], 2),
            }
            if baseline:
                naive = measure_baseline(source, loader.url, loader.schema, None, rows,
                                         chunk_rows, expected)
                entry["baseline"] = naive
                entry["vs_baseline"] = round(result["rows_per_s"] / naive["rows_per_s"], 2)
                single["vs_baseline"] = round(single["rows_per_s"] / naive["rows_per_s"], 2)
            results.append(entry)
        if loaded.profile_db is not None:
            log(f"profile: {PROFILE_ROWS:,} SQLite rows on a cluster and on one server, "
                "stages then cProfile")
            profile_out = profile_cluster(loaded.profile_db.url, chunk_rows, PROFILE_ROWS)
    targets = evaluate_targets([{**r, "source": f"{r['source']} on the cluster"}
                                for r in results])
    print_results(results, rows)
    if profile_out is not None:
        print_profile(profile_out)
        print_nodes_profile(profile_out)
    print()
    for t in targets:
        print(t.line())
    if json_path:
        out = {
            "sources": results,
            "targets": [dataclasses.asdict(t) for t in targets],
            "quick": quick,
            "setup": {**setup,
                      "redis": f"fresh private Valkey Cluster ({PRIMARIES} primaries, no "
                               "replicas) and fresh private Valkey per source",
                      "cpus": os.cpu_count(),
                      **load_and_speed(load_before, probe_before),
                      "seconds": round(time.perf_counter() - started, 1)},
            "profile": profile_out,
            "environment": environment(),
        }
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {json_path}")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0  # a measurement, not a test: the PASS/FAIL lines above say how it went


def code_state() -> dict[str, Any]:
    """The commit measured and the files that differ from it (none, for a clean tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=False, cwd=Path(__file__).parent).stdout
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "uncommitted": [line[3:] for line in git("status", "--porcelain").splitlines()]}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0])]
                               + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_results(results: Sequence[dict[str, Any]], rows: int) -> None:
    server = results[0]["standalone"]["redis"]["server"] if results else "?"
    print(f"featcache materialize(all=True): {rows:,} rows x {len(dataset.FEATURE_NAMES)} "
          f"features into a fresh {PRIMARIES}-primary cluster (no replicas) and a fresh "
          f"single server, {server}")
    print()
    table: list[tuple[str, ...]] = [("source", "into", "seconds", "rows_per_s", "peak_rss_mb",
                                     "bytes_per_row", "redis_cpu_s_100k", "machine_busy",
                                     "vs_standalone", "vs_baseline")]
    for r in results:
        naive = r.get("baseline")
        for name, m in (("cluster", r), ("standalone", r["standalone"])):
            table.append((r["source"], name, f"{m['seconds']:.2f}", f"{m['rows_per_s']:,}",
                          f"{m['peak_rss_mb']:.1f}", f"{m['bytes_per_row']:.1f}",
                          f"{m['cpu']['redis_per_100k']:.3f}",
                          f"{m['cpu']['machine_busy']:.0%}",
                          f"{m['rows_per_s'] / r['standalone']['rows_per_s']:.2f}x",
                          f"{m['vs_baseline']:.2f}x" if naive else "-"))
        if naive:
            table.append((r["source"], "naive_copy", f"{naive['seconds']:.2f}",
                          f"{naive['rows_per_s']:,}", "-", "-", "-", "-",
                          f"{naive['rows_per_s'] / r['standalone']['rows_per_s']:.2f}x",
                          "1.00x"))
    print(_table(table))
    print("\nvs_standalone: rows/s over the single server's in the same run; vs_baseline: over "
          "bench.naive_copy's\n(one server, measured right after). Cluster memory and Redis "
          "CPU are summed over the primaries.")
    for r in results:
        print(f"\n{r['source']}, per server during the timed call (busy: of one CPU; "
              "script: EVALSHA calls and server time, INFO commandstats):")
        table = [("server", "keys", "mb", "cpu_s", "busy", "script_calls", "script_s",
                  "rows_per_call")]
        for name, m in (("cluster", r), ("standalone", r["standalone"])):
            for node in m["nodes"]:
                table.append((f"{name} {node['address']}", f"{node['keys']:,}",
                              f"{node['bytes_delta'] / 2**20:.1f}", f"{node['cpu_s']:.2f}",
                              f"{node['busy']:.0%}", f"{node['script_calls']:,}",
                              f"{node['script_s']:.3f}",
                              f"{node['rows_per_script_call'] or 0:.1f}"))
        print(_table(table))


def print_nodes_profile(p: dict[str, Any]) -> None:
    stages, single = p["unprofiled_stages_s"], p["standalone_unprofiled_stages_s"]
    print(f"\n=== the write stage, node by node ({p['rows']:,} rows, serial loop) ===")
    table = [("stage (unprofiled)", "cluster_s", "one_server_s")]
    for key in ("list_ids", "fence", "sql_read_convert", "write", "total"):
        table.append((key, f"{stages[key]:.3f}", f"{single[key]:.3f}"))
    print(_table(table))
    nodes = p["unprofiled_nodes"]
    print("\nscript calls and server time per primary during the cluster's breakdown: "
          + ", ".join(f"{n['script_calls']:,} calls {n['script_s']:.3f} s" for n in nodes))
    print(f"  sum {p['nodes_script_s_sum']:.3f} s, longest {p['nodes_script_s_max']:.3f} s, "
          f"against a write stage of {stages['write']:.3f} s (one server: "
          f"{p['standalone_unprofiled_script_s']:.3f} s of scripts in a write stage of "
          f"{single['write']:.3f} s)")
    calls, seconds = p["profiled_called_from_calls"], p["profiled_called_from_s"]
    chunks = p["profiled_stage_calls"].get("write (PendingWrite.send)", 0)
    node_s = p["profiled_nodes_script_s"]
    print(f"cProfile: {chunks:,} chunk writes, {calls[NODE_SHARES]:,} node shares; replies "
          f"waited for {seconds[REPLY_WAIT]:.3f} s in {calls[REPLY_WAIT]:,} reads, while the "
          f"primaries ran scripts for {sum(node_s):.3f} s in all, {max(node_s):.3f} s the "
          "longest")
