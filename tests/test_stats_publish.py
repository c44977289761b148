"""Cluster-wide stats: serving processes publish their counts into Redis and ``featcache stats``
sums them; the latency histogram and the report's arithmetic."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clienv import featcache
from featdata import key_layout, make_view, redis_config, redis_yaml, stats_table

from featcache import CacheConfig, FeatureCache
from featcache.config_sections import OfflineStoreConfig, StatsConfig
from featcache.embedded import EmbeddedServer
from featcache.keys import KeyLayout
from featcache.redis_store import open_store
from featcache.stats import bucket_bounds, latency_bucket
from featcache.stats_publish import read_window
from featcache.stats_report import percentile_ms, summarize

pytestmark = pytest.mark.topology

VIEW = "sv"
IDS = list(range(1, 301))

_SERVE = """
import json, random, sys
from featcache import FeatureCache
seed, calls = int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with FeatureCache.from_config(sys.argv[1]) as fc:
    for _ in range(calls):
        fc.get_features(rng.sample(range(1, 301), 20), ["clicks"])
    totals = fc.stats_counters.totals()
print(json.dumps(totals))
"""


def _config_file(tmp_path: Path, redis_url: str, key_prefix: str, sql_url: str) -> Path:
    path = tmp_path / "stats.yaml"
    path.write_text(
        redis_yaml(redis_url, key_prefix)
        + f"offline_store: {{url: '{sql_url}'}}\n"
        "stats: {publish_interval: 200ms}\n"
        "popularity: {sample_rate: 0}\n"
        f"views: {{{VIEW}: {{table: {VIEW}, entity: {{column: entity_id, type: int}}, "
        "event_timestamp: event_ts, features: {clicks: 'int, 1h'}}}\n")
    return path


def test_featcache_stats_sums_three_serving_processes_exactly(
    tmp_path: Path, redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config = _config_file(tmp_path, redis_url, key_prefix, str(sqlite_target.url))
    script = tmp_path / "serve.py"
    script.write_text(_SERVE)
    procs = [subprocess.Popen([sys.executable, str(script), str(config), str(seed), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    totals: dict[str, int] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for field, n in json.loads(out).items():
            totals[field] = totals.get(field, 0) + n
    assert totals[f"{VIEW}|e|filled"] > 0 and totals[f"{VIEW}|e|hit_redis"] > 0
    done = featcache("stats", "--config", str(config), "--json", "--since", "5m")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["views"] == summarize(totals, [VIEW])  # every count, summed exactly
    assert len(report["processes"]) == 3
    view = report["views"][VIEW]
    assert view["calls"]["total"] == 120
    assert view["values"]["total"] == 120 * 20
    assert view["latency_ms"]["hit"]["p50"] is not None
    # the keys of the view: its 300 rows and its epoch, counted by a full scan
    assert report["redis"][VIEW]["keys"] == 301 and report["redis"][VIEW]["exact"]
    assert 100 * 301 < report["redis"][VIEW]["bytes"] < 1000 * 301
    text = featcache("stats", "--config", str(config), "--view", VIEW)
    assert text.returncode == 0, text.stderr
    assert f"view {VIEW}" in text.stdout and "3 process(es) reporting" in text.stdout
    unknown = featcache("stats", "--config", str(config), "--view", "nope")
    assert unknown.returncode == 78, unknown.stderr


def test_close_publishes_the_last_counts_and_a_failed_publish_loses_nothing(
    key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    server = EmbeddedServer().start()  # private: this test stops and restarts it
    restarted: EmbeddedServer | None = None
    try:
        config = CacheConfig(
            views=(make_view(VIEW, VIEW, None),), redis=redis_config(server.url, key_prefix),
            offline_store=OfflineStoreConfig(url=str(sqlite_target.url)),
            stats=StatsConfig(publish_interval="1h"))
        layout = KeyLayout(key_prefix)
        with FeatureCache(config) as fc:
            fc.get_features(IDS[:50], ["clicks"])
            publisher = fc.stats_publisher
            assert publisher.publish() > 0
            first = fc.stats_counters.totals()
            fc.get_features(IDS[:80], ["clicks"])
            port = server.port
            server.stop()
            assert publisher.publish() == 0 and publisher.errors == 1
            restarted = EmbeddedServer(port=port).start()
            fc.get_features(IDS[:10], ["clicks"])
            # back: everything since the last publish that landed, counted once
            assert publisher.publish() > 0
            fc.get_features(IDS[:5], ["clicks"])
            final = fc.stats_counters.totals()
        store = open_store(config.redis)
        try:
            window = read_window(store, layout, 300, time.time())
        finally:
            store.close()
        # the restarted server lost the first publish: it holds exactly what came after it
        assert window.totals == {field: n - first.get(field, 0) for field, n in final.items()
                                 if n != first.get(field, 0)}
    finally:
        if restarted is not None:
            restarted.stop()
        server.stop()


def test_every_process_adds_into_the_same_minute(
    redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config = CacheConfig(
        views=(make_view(VIEW, VIEW, None),), redis=redis_config(redis_url, key_prefix),
        offline_store=OfflineStoreConfig(url=str(sqlite_target.url)),
        stats=StatsConfig(publish_interval=0))
    with FeatureCache(config) as one, FeatureCache(config) as two:
        for fc in (one, two):
            fc.get_features(IDS[:30], ["clicks"])
            fc.get_features(IDS[:30], ["clicks"])
        assert one.stats_publisher.publish() > 0 and two.stats_publisher.publish() > 0
        a, b = one.stats_counters.totals(), two.stats_counters.totals()
        summed = {field: a.get(field, 0) + b.get(field, 0) for field in a.keys() | b.keys()}
        store = open_store(config.redis)
        try:
            window = read_window(store, key_layout(key_prefix), 120,
                                 time.time())
        finally:
            store.close()
    assert {f: n for f, n in window.totals.items() if "|e|" in f} == {
        f: n for f, n in summed.items() if "|e|" in f and n}
    assert len(window.processes) == 2


def test_latency_buckets_hold_their_latencies_and_percentiles_come_from_them() -> None:
    rng = random.Random(7)
    for ns in [*range(0, 64), *(rng.randrange(1, 10**11) for _ in range(5000))]:
        low, high = bucket_bounds(latency_bucket(ns))
        assert low <= ns < high
        assert high - low <= max(1, ns // 4 + 1)  # about 19% wide, never more than 25%
    assert [latency_bucket(n) for n in (10**6, 2 * 10**6, 4 * 10**6)] == sorted(
        {latency_bucket(n) for n in (10**6, 2 * 10**6, 4 * 10**6)})
    histogram: dict[int, int] = {}
    for ms in [1.0] * 98 + [50.0] * 2:
        bucket = latency_bucket(int(ms * 1e6))
        histogram[bucket] = histogram.get(bucket, 0) + 1
    p50 = percentile_ms(histogram, 0.5)
    p99 = percentile_ms(histogram, 0.99)
    assert p50 is not None and 0.9 < p50 < 1.15
    assert p99 is not None and 45 < p99 < 57
    assert percentile_ms({}, 0.5) is None


def test_the_report_counts_values_and_calls_per_tier() -> None:
    one_ms = latency_bucket(10**6)
    totals = {
        "v|e|hit_l1": 10, "v|e|hit_redis": 60, "v|e|negative_hit": 10, "v|e|filled": 15,
        "v|e|absent": 5, "v|e|sql_queries": 2, "v|e|sql_rows": 15,
        f"v|c|l1|{one_ms}": 1, f"v|c|redis|{one_ms}": 6, f"v|c|sql|{one_ms}": 2,
    }
    view = summarize(totals)["v"]
    assert view["values"] == {"l1": 10, "redis": 70, "sql": 20, "degraded": 0, "total": 100}
    assert view["value_hit_rate"]["cache"] == pytest.approx(0.8)
    assert view["calls"] == {"l1": 1, "redis": 6, "sql": 2, "total": 9}
    assert view["call_hit_rate"]["cache"] == pytest.approx(7 / 9)
    assert view["sql"]["queries_saved"] == pytest.approx(1 - 2 / 9)
    assert view["latency_ms"]["hit"]["calls"] == 7
    assert summarize(totals, ["other"]) == {}


def test_prediction_caches_are_published_and_reported_per_model_version(
    tmp_path: Path, redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config_path = _config_file(tmp_path, redis_url, key_prefix, str(sqlite_target.url))
    config = CacheConfig(
        views=(make_view(VIEW, VIEW, None),), redis=redis_config(redis_url, key_prefix),
        offline_store=OfflineStoreConfig(url=str(sqlite_target.url)),
        stats=StatsConfig(publish_interval="1h"))

    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    with FeatureCache(config) as fc:
        ranker = fc.model("ranker", version="v1")
        ranker.get_or_compute(list(range(10)), compute=double)  # 10 computed
        ranker.get_or_compute(list(range(10)), compute=double)  # 10 from Redis
        ranker.get_or_compute(list(range(5, 15)), compute=double)  # 5 from Redis, 5 computed
        fc.model("ranker", version="v2").get_or_compute([1], compute=double)
        fc.get_features(IDS[:3], ["clicks"])
        counts = fc.model_stats()
    # close published them; the window holds this process's counts alone
    done = featcache("stats", "--config", str(config_path), "--json", "--since", "5m")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["views"]) == {VIEW}  # a model version is not a view
    v1 = report["models"]["ranker"]["v1"]
    assert v1["events"] == counts[("ranker", "v1")]
    assert v1["outputs"] == {"l1": 0, "redis": 15, "compute": 15, "total": 30}
    assert v1["calls"] == {"l1": 0, "redis": 1, "compute": 2, "total": 3}
    assert v1["inference_saved"]["outputs"] == pytest.approx(0.5)
    assert v1["inference_saved"]["model_calls"] == pytest.approx(1 / 3)
    assert v1["latency_ms"]["hit"]["calls"] == 1 and v1["latency_ms"]["compute"]["calls"] == 2
    assert report["models"]["ranker"]["v2"]["outputs"]["compute"] == 1
    text = featcache("stats", "--config", str(config_path), "--since", "5m")
    assert text.returncode == 0, text.stderr
    assert "model ranker version v1" in text.stdout and "model ranker version v2" in text.stdout
    assert "saved 33.3% of calls, 50.0% of outputs" in text.stdout
    one_view = featcache("stats", "--config", str(config_path), "--json", "--view", VIEW)
    assert json.loads(one_view.stdout)["models"] == {}


def test_stats_watch_prints_a_report_per_refresh_until_stopped(
    tmp_path: Path, redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config = _config_file(tmp_path, redis_url, key_prefix, str(sqlite_target.url))
    script = shutil.which("featcache", path=os.path.dirname(sys.executable))
    assert script is not None
    watch = subprocess.Popen([script, "stats", "--config", str(config), "--json", "--watch",
                              "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        with FeatureCache.from_config(str(config)) as fc:  # a process serves between refreshes
            fc.get_features(IDS[:10], ["clicks"])
        later = first
        deadline = time.monotonic() + 30
        while not later["views"] and time.monotonic() < deadline:
            later = json.loads(watch.stdout.readline())
        assert first["views"] == {} and later["views"][VIEW]["calls"]["total"] == 1
    finally:
        watch.terminate()
        _, err = watch.communicate(timeout=30)
    assert watch.returncode == 143, err  # SIGTERM: stopped, as every command documents
