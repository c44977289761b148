"""One shard at a time on a real Valkey Cluster: a circuit breaker per node (a hung primary
costs its own rows a trip to SQL, not every call a socket timeout, and never opens the
breaker that sends every row to SQL), a write that some shards did (``PartlyUnavailable``),
and reads from replicas (``redis.read_from_replicas``) with invalidations that every replica
holds before they return.

The cluster is this module's own (3 primaries with a replica each), with a node timeout far
longer than a test, so a stopped primary is not failed over while it is stopped.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from featdata import make_view, stats_row, stats_table

from featcache import (
    CacheConfig,
    CacheUnavailable,
    ConfigError,
    FeatureCache,
    PartlyUnavailable,
    Status,
    load_config,
)
from featcache.config_sections import DegradationConfig, OfflineStoreConfig, RedisConfig
from featcache.embedded_cluster import ClusterNode, EmbeddedCluster
from featcache.errors import EmbeddedServerError
from featcache.keys import CLUSTER_BUCKETS, KeyLayout
from featcache.metrics import CacheCollector
from featcache.redis_store import ClusterStore

VIEW = "nv"
IDS = list(range(1, 201))
FAILURES = 3  # degradation.breaker_failures of these tests
CALLS = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    try:
        cluster = EmbeddedCluster(node_timeout_ms=120_000)
    except EmbeddedServerError as exc:
        pytest.fail(f"valkey-server/valkey-cli are part of the test dependencies: {exc}")
    with cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    return f"fcn{secrets.token_hex(4)}"  # the cluster is this module's: nothing to clean


@pytest.fixture
def sql_url(sqlite_target: Any) -> str:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    return str(sqlite_target.url)


def _config(cluster: EmbeddedCluster, prefix: str, sql_url: str, timeout: float = 0.3,
            **redis: Any) -> CacheConfig:
    return CacheConfig(
        views=(make_view(VIEW, VIEW, None),),
        redis=RedisConfig(url=f"redis://{cluster.seeds[0]}/0", mode="cluster",
                          key_prefix=prefix, socket_timeout=timeout, connect_timeout=timeout,
                          **redis),
        offline_store=OfflineStoreConfig(url=sql_url),
        degradation=DegradationConfig(breaker_failures=FAILURES, breaker_window=60,
                                      breaker_open_for=0.5))


def _victim(cluster: EmbeddedCluster, layout: KeyLayout) -> ClusterNode:
    """A primary that holds rows of the view but neither its epoch key (without which no
    row of the view is served) nor the seed node the client asks for the slot map."""
    spared = {cluster.node_for_key(layout.epoch_key(VIEW)).port,
              int(cluster.seeds[0].rsplit(":", 1)[1])}
    return next(node for node in cluster.primaries() if node.port not in spared)


def _replicas_listed(cluster: EmbeddedCluster, prefix: str) -> None:
    """Wait until the slot map lists every shard's replica: Valkey leaves out a replica
    whose replication offset it knows as 0 (nothing replicated yet), learnt by gossip."""
    client = redis.RedisCluster.from_url(f"redis://{cluster.seeds[0]}/0")
    try:
        for i in range(64):
            client.set(f"{prefix}:warm:{{{i}}}", "1")
    finally:
        client.close()
    node = cluster.primaries()[0]
    deadline = time.monotonic() + 30
    while not all(len(shard) > 3 for shard in node.execute("CLUSTER", "SLOTS")):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the replicas never appeared in CLUSTER SLOTS"
        time.sleep(0.1)


def _circuit_gauge(fc: FeatureCache) -> dict[str, float]:
    """The ``featcache_redis_node_circuit_open`` samples a scrape would show, by node."""
    family = next(f for f in CacheCollector(fc).collect()
                  if f.name == "featcache_redis_node_circuit_open")
    return {sample.labels["node"]: sample.value for sample in family.samples}


def _mget_calls(node: ClusterNode) -> int:
    stats: Any = node.info("commandstats").get("cmdstat_mget", {})
    return int(stats.get("calls", 0))


def _command_calls(node: ClusterNode, command: str) -> int:
    stats: Any = node.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def test_a_hung_shard_costs_its_own_rows_a_trip_to_sql_not_every_call_a_timeout(
    cluster: EmbeddedCluster, prefix: str, sql_url: str
) -> None:
    layout = KeyLayout(prefix, buckets=CLUSTER_BUCKETS)
    victim = _victim(cluster, layout)
    on_victim = [e for e in IDS if cluster.node_for_key(layout.row_key(VIEW, e)) is victim]
    elsewhere = [e for e in IDS if e not in on_victim]
    assert on_victim and elsewhere
    with FeatureCache(_config(cluster, prefix, sql_url)) as fc:
        store = fc.store
        assert isinstance(store, ClusterStore)
        fc.get_features(IDS, ["clicks"])
        primaries = cluster.primaries()  # asked now: a stopped node answers nothing
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)  # hung: every read of it waits socket_timeout
        try:
            for _ in range(CALLS):
                result = fc.get_features(IDS, ["clicks"])
                assert [result[e]["clicks"] for e in IDS] == IDS  # SQL answers the hung rows
                assert {result.status(e, "clicks") for e in elsewhere} == {Status.HIT_REDIS}
                assert {result.status(e, "clicks") for e in on_victim} == {Status.FILLED}
            reader = store.reader
            # without a breaker per node every call would wait out the hung node once
            assert reader.node_errors < CALLS // 2, reader.node_errors
            assert reader.skipped >= CALLS - reader.node_errors
            assert store.health.states()[victim.address] in ("open", "half_open")
            assert _circuit_gauge(fc) == {node.address: int(node is victim)
                                          for node in primaries}
            # no call lost Redis as a whole: the read path's own breaker never opened
            assert fc.stats()[VIEW].get("redis_errors", 0) == 0
            # a write over every shard: the healthy ones are written, the call says it
            with pytest.raises(PartlyUnavailable, match=r"circuit is open|Timeout|timed out"):
                fc.put_rows(VIEW, [stats_row(e, clicks=5000 + e) for e in IDS])
            written = fc.get_features(elsewhere, ["clicks"])
            assert [written[e]["clicks"] for e in elsewhere] == [5000 + e for e in elsewhere]
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while fc.get_features(IDS, ["clicks"]).status_counts() != {Status.HIT_REDIS: len(IDS)}:
            assert time.monotonic() < deadline, "the node's rows never came back from Redis"
            time.sleep(0.1)
        final = fc.get_features(IDS, ["clicks"])
        assert [final[e]["clicks"] for e in IDS] == [
            e if e in on_victim else 5000 + e for e in IDS]
        assert store.health.states()[victim.address] == "closed"
        assert _circuit_gauge(fc)[victim.address] == 0


def test_reads_from_replicas_and_invalidations_every_replica_holds(
    cluster: EmbeddedCluster, prefix: str, sql_url: str
) -> None:
    layout = KeyLayout(prefix, buckets=CLUSTER_BUCKETS)
    _replicas_listed(cluster, prefix)
    with FeatureCache(_config(cluster, prefix, sql_url, timeout=2.0,
                                  read_from_replicas=True)) as fc:
        assert fc.store.replica_reads
        fc.get_features(IDS, ["clicks"])
        primaries = cluster.primaries()
        replicas = [r for p in primaries for r in cluster.replicas_of(p)]
        assert len(replicas) == 3
        before = {node.port: _mget_calls(node) for node in [*primaries, *replicas]}
        for _ in range(5):
            hits = fc.get_features(IDS, ["clicks"])
            assert hits.status_counts() == {Status.HIT_REDIS: len(IDS)}
            assert [hits[e]["clicks"] for e in IDS] == IDS
        assert all(_mget_calls(p) == before[p.port] for p in primaries)
        assert all(_mget_calls(r) >= before[r.port] + 5 for r in replicas)
        # an invalidation returns once every replica of each shard it wrote holds it
        waits = {p.port: _command_calls(p, "wait") for p in primaries}
        fc.put_rows(VIEW, [stats_row(e, clicks=9000 + e) for e in IDS])
        for e in IDS[:20]:
            fc.invalidate(VIEW, [e])
            assert fc.get_features([e], ["clicks"])[e]["clicks"] == e  # SQL's, at once
        owners = {cluster.node_for_key(layout.row_key(VIEW, e)).port for e in IDS[:20]}
        assert all(_command_calls(p, "wait") > waits[p.port] for p in primaries
                   if p.port in owners)
        # a replica that serves reads and cannot hold the invalidation: it does not return
        shard = cluster.node_for_key(layout.row_key(VIEW, 150))
        replica = cluster.replicas_of(shard)[0]
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with pytest.raises(CacheUnavailable, match="read_from_replicas"):
                fc.invalidate(VIEW, [150])
            # and its reads move to the primary once its breaker opens: no call fails
            for _ in range(CALLS):
                result = fc.get_features(IDS[100:], ["clicks"])
                assert result[150]["clicks"] == 150
        finally:
            os.kill(replica.pid, signal.SIGCONT)


def test_read_from_replicas_is_a_cluster_setting(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"redis\.read_from_replicas"):
        RedisConfig(read_from_replicas=True)
    with pytest.raises(ConfigError, match="true or false"):
        RedisConfig(mode="cluster", read_from_replicas="yes")  # type: ignore[arg-type]
    path = tmp_path / "c.yaml"
    path.write_text(
        "redis: {url: 'redis://127.0.0.1:7000/0', mode: cluster}\n"
        "offline_store: {url: 'sqlite:///x.db'}\n"
        "views: {v: {table: t, entity: id, event_timestamp: ts, features: {f: 'int, 1m'}}}\n")
    env = {"FEATCACHE__REDIS__READ_FROM_REPLICAS": "true"}
    assert load_config(path, env=env).redis.read_from_replicas is True
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(path, env={"FEATCACHE__REDIS__READ_FROM_REPLICAS": "maybe"})
