"""The sampled read trace recorded into Redis (``stats.trace_rate``): which reads it keeps,
in what order, at what rate, and how many reads it covered."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from clienv import featcache
from featdata import key_layout, make_view, redis_config, redis_yaml, stats_table

from featcache import CacheConfig, FeatureCache
from featcache.access_trace import read_trace
from featcache.analysis.sampling import sampled
from featcache.config_sections import OfflineStoreConfig, StatsConfig

pytestmark = pytest.mark.topology

VIEW = "tv"
IDS = list(range(1, 2001))


def _config(redis_url: str, key_prefix: str, sql_url: str, rate: float) -> CacheConfig:
    return CacheConfig(views=(make_view(VIEW, VIEW, None),),
                       redis=redis_config(redis_url, key_prefix),
                       offline_store=OfflineStoreConfig(url=sql_url),
                       stats=StatsConfig(publish_interval=0, trace_rate=rate))


def test_the_trace_keeps_every_read_of_the_sampled_ids_in_order(
    redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    rng = random.Random(5)
    calls = [rng.sample(IDS, 25) for _ in range(60)]
    with FeatureCache(_config(redis_url, key_prefix, str(sqlite_target.url), 0.3)) as fc:
        for ids in calls:
            fc.get_features(ids, ["clicks"])
        store = fc.store
        assert fc.access_trace is not None
        fc.access_trace.flush()
        trace = read_trace(store, key_layout(key_prefix), VIEW)
    assert trace is not None
    expected = [e for ids in calls for e in ids if sampled(VIEW, e, 0.3)]
    assert trace.ids == expected
    assert 0.2 < len(expected) / (60 * 25) < 0.4
    assert trace.rate == 0.3 and trace.reads == 60 * 25
    assert trace.times == sorted(trace.times)


def test_processes_at_two_rates_give_one_sample_at_the_lower(
    redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    url = str(sqlite_target.url)
    with FeatureCache(_config(redis_url, key_prefix, url, 0.5)) as high, \
            FeatureCache(_config(redis_url, key_prefix, url, 0.1)) as low:
        high.get_features(IDS[:500], ["clicks"])
        low.get_features(IDS[500:1000], ["clicks"])
    store_config = _config(redis_url, key_prefix, url, 0.1)
    with FeatureCache(store_config.replace(stats=StatsConfig(publish_interval=0))) as reader:
        trace = read_trace(reader.store, key_layout(key_prefix), VIEW)
        assert read_trace(reader.store, key_layout(key_prefix), "other") is None
    assert trace is not None and trace.rate == 0.1 and trace.reads == 1000
    assert sorted(trace.ids) == [e for e in IDS[:1000] if sampled(VIEW, e, 0.1)]


def test_the_trace_keeps_at_most_trace_max_ids_reads_and_expires_after_its_window(
    redis_url: str, key_prefix: str, sqlite_target: Any, redis_client: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config = _config(redis_url, key_prefix, str(sqlite_target.url), 1.0)
    config = config.replace(stats=StatsConfig(publish_interval=0, trace_rate=1.0,
                                              trace_window="10m", trace_max_ids=3000))
    with FeatureCache(config) as fc:
        assert fc.access_trace is not None
        fc.get_features(IDS[:1500], ["clicks"])
        fc.get_features(IDS[1500:], ["clicks"])
        assert fc.access_trace.flush() == 2000  # one flush of 2000 reads: two entries
        trace = read_trace(fc.store, key_layout(key_prefix), VIEW)
        assert trace is not None and trace.ids == IDS and trace.reads == 2000
        for _ in range(3):  # a burst: 6000 more reads, far past the bound
            fc.get_features(IDS, ["clicks"])
        assert fc.access_trace.flush() == 6000
        trace = read_trace(fc.store, key_layout(key_prefix), VIEW)
    key = key_layout(key_prefix).trace_key(VIEW)
    assert redis_client.xlen(key) == 3  # 3000 reads kept, in entries of at most 1000
    assert trace is not None and len(trace.ids) == 3000 and trace.reads == 3000
    assert trace.ids == (IDS * 3)[-3000:]  # the newest reads stay
    assert 0 < redis_client.pttl(key) <= 600_000


def test_no_trace_is_recorded_at_rate_zero(
    redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    with FeatureCache(_config(redis_url, key_prefix, str(sqlite_target.url), 0.0)) as fc:
        assert fc.access_trace is None
        fc.get_features(IDS[:100], ["clicks"])
        assert read_trace(fc.store, key_layout(key_prefix), VIEW) is None


def test_featcache_analyze_reads_the_recorded_trace(
    redis_url: str, key_prefix: str, sqlite_target: Any, tmp_path: Any
) -> None:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        redis_yaml(redis_url, key_prefix)
        + f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "stats: {publish_interval: 0, trace_rate: 0.5}\n"
        f"views: {{{VIEW}: {{table: {VIEW}, entity: {{column: entity_id, type: int}}, "
        "event_timestamp: event_ts, features: {clicks: 'int, 1h'}}}\n")
    rng = random.Random(9)
    with FeatureCache.from_config(config_path) as fc:
        for _ in range(200):
            fc.get_features([int(rng.paretovariate(1.2)) % 2000 + 1 for _ in range(10)],
                            ["clicks"])
    out = tmp_path / "a.json"
    png = tmp_path / "a.png"
    done = featcache("analyze", "--config", str(config_path), "--view", VIEW, "--policies",
                     "lru", "--json", str(out), "--out", str(png))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["view"] == VIEW and doc["sampling_rate"] == 0.5
    assert 0 < doc["accesses"] <= 2000
    assert 50 < doc["bytes_per_row"] < 1000  # measured in Redis: MEMORY USAGE of its rows
    assert png.stat().st_size > 10_000
