"""``redis.mode: cluster`` end to end on a real Valkey Cluster (``EmbeddedCluster``: 3
primaries, a replica each): fills and hits over every shard, writes, fences, invalidations
(per entity and whole view), the L1 following the stream, popularity, and a mode that does not
match the server."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from featdata import ReadLoad, make_view, stats_row, stats_table
from redis.crc import key_slot

from featcache import (
    CacheConfig,
    CacheConfigError,
    CacheUnavailable,
    ConfigError,
    FeatureCache,
    Status,
)
from featcache.codec import TOMBSTONE_HEAD
from featcache.config_sections import (
    L1Config,
    OfflineStoreConfig,
    PopularityConfig,
    RedisConfig,
)
from featcache.embedded import free_port
from featcache.embedded_cluster import EmbeddedCluster
from featcache.keys import CLUSTER_BUCKETS, KeyLayout
from featcache.redis_store import ClusterStore

VIEW = "cv"
IDS = list(range(1, 201))


@pytest.fixture
def sql_url(sqlite_target: Any) -> str:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    return str(sqlite_target.url)


def _config(cluster: EmbeddedCluster, prefix: str, sql_url: str, **sections: Any) -> CacheConfig:
    return CacheConfig(views=(make_view(VIEW, VIEW, None),),
                       redis=RedisConfig(url=f"redis://{cluster.seeds[0]}/0", mode="cluster",
                                         key_prefix=prefix, socket_timeout=2),
                       offline_store=OfflineStoreConfig(url=sql_url), **sections)


def test_fills_hits_writes_and_invalidations_on_every_shard(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    with FeatureCache(_config(redis_cluster, cluster_key_prefix, sql_url)) as fc:
        assert isinstance(fc.store, ClusterStore)
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.FILLED: len(IDS)}
        hits = fc.get_features(IDS, ["clicks"])
        assert hits.status_counts() == {Status.HIT_REDIS: len(IDS)}
        assert [hits[e]["clicks"] for e in IDS] == IDS
        layout = KeyLayout(cluster_key_prefix, buckets=CLUSTER_BUCKETS)
        keys = layout.row_keys(VIEW, IDS)
        owners = {redis_cluster.node_for_key(k).port for k in keys}
        assert len(owners) == 3  # the rows are on every shard
        assert len({key_slot(k.encode()) for k in keys}) == CLUSTER_BUCKETS
        # put_rows: one conditional write per slot
        assert fc.put_rows(VIEW, [stats_row(e, clicks=1000 + e) for e in IDS[:70]]).written == 70
        assert [fc.get_features([e], ["clicks"])[e]["clicks"] for e in (1, 70, 71)] == [
            1001, 1070, 71]
        # invalidate some ids: tombstones in their rows' slots, then read from SQL again
        report = fc.invalidate(VIEW, [1, 2, 65, 130])
        assert report.entities == 4 and len(report.stream_ids) == 1
        node = redis_cluster.node_for_key(layout.row_key(VIEW, 65))
        assert bytes(node.client().get(layout.row_key(VIEW, 65))).startswith(TOMBSTONE_HEAD)
        after = fc.get_features([1, 2, 65, 130, 3], ["clicks"])
        assert {e: after.status(e, "clicks") for e in (1, 2, 65, 130, 3)} == {
            1: Status.FILLED, 2: Status.FILLED, 65: Status.FILLED, 130: Status.FILLED,
            3: Status.HIT_REDIS}
        assert after[1]["clicks"] == 1  # SQL's value, not the put_rows one
        # the whole view: its epoch moves, every row is a miss
        assert fc.invalidate(VIEW).whole_view
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.FILLED: len(IDS)}
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.HIT_REDIS: len(IDS)}


def test_concurrent_cold_readers_share_the_fills(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    """Leases (a row's lease in its row's slot) and the fenced fill scripts, under 4 threads
    of 2 caches reading the same cold rows: every value equal to SQL, no call failing."""
    config = _config(redis_cluster, cluster_key_prefix, sql_url)
    with FeatureCache(config) as one, FeatureCache(config) as two:
        failures: list[BaseException] = []
        wrong: list[tuple[int, Any]] = []

        def load(fc: FeatureCache) -> None:
            try:
                for _ in range(5):
                    result = fc.get_features(IDS, ["clicks"])
                    wrong.extend((e, result[e]["clicks"]) for e in IDS
                                 if result[e]["clicks"] != e)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=load, args=(fc,)) for fc in (one, two, one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[:3]
        assert not wrong, wrong[:5]
        assert one.get_features(IDS, ["clicks"]).status_counts() == {Status.HIT_REDIS: len(IDS)}


def test_the_l1_follows_invalidations_on_the_cluster(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    config = _config(redis_cluster, cluster_key_prefix, sql_url,
                     l1=L1Config(policy="lru", max_ttl="10m"))
    writer_config = _config(redis_cluster, cluster_key_prefix, sql_url)
    with FeatureCache(config) as reader, FeatureCache(writer_config) as etl:
        reader.get_features([5, 6], ["clicks"])
        assert reader.get_features([5], ["clicks"]).status(5, "clicks") is Status.HIT_L1
        deadline = time.monotonic() + 30
        while not reader.subscriber_stats()["connected"]:
            assert time.monotonic() < deadline, reader.subscriber_stats()
            time.sleep(0.05)
        engine = sa.create_engine(sql_url)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VIEW} SET clicks = 500 WHERE entity_id = 5"))
        engine.dispose()
        etl.invalidate(VIEW, [5])
        while reader.get_features([5], ["clicks"])[5]["clicks"] != 500:
            assert time.monotonic() < deadline, "the L1 kept the invalidated row"
            time.sleep(0.05)
        assert reader.get_features([6], ["clicks"]).status(6, "clicks") is Status.HIT_L1
        etl.invalidate(VIEW)  # the whole view: the L1 drops it
        while reader.get_features([6], ["clicks"]).status(6, "clicks") is Status.HIT_L1:
            assert time.monotonic() < deadline, "the L1 kept the view"
            time.sleep(0.05)


def test_popularity_counts_and_top_k_on_the_cluster(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    config = _config(redis_cluster, cluster_key_prefix, sql_url,
                     popularity=PopularityConfig(sample_rate=1.0))
    with FeatureCache(config) as fc:
        counter = fc.popularity_counts
        counter.record(VIEW, [7, 7, 8])
        counter.record(VIEW, [7])
        assert counter.flush() == 4
        top = counter.top_k(VIEW, 2)
        assert [e for e, _ in top] == [7, 8]


def test_a_mode_that_does_not_match_the_server_is_a_config_error(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str, redis_url: str
) -> None:
    at_one_server = CacheConfig(
        views=(make_view(VIEW, VIEW, None),),
        redis=RedisConfig(url=redis_url, mode="cluster", key_prefix=cluster_key_prefix),
        offline_store=OfflineStoreConfig(url=sql_url))
    with pytest.raises(CacheConfigError, match="not a cluster node"):
        FeatureCache(at_one_server)
    at_a_node = CacheConfig(
        views=(make_view(VIEW, VIEW, None),),
        redis=RedisConfig(url=f"redis://{redis_cluster.seeds[0]}/0",
                          key_prefix=cluster_key_prefix),
        offline_store=OfflineStoreConfig(url=sql_url))
    with pytest.raises(CacheConfigError, match=r"redis\.mode: cluster"):
        FeatureCache(at_a_node).get_features(IDS, ["clicks"])
    with pytest.raises(ConfigError, match="database 0 only"):
        RedisConfig(url=f"redis://{redis_cluster.seeds[0]}/3", mode="cluster")


def test_other_seed_nodes_serve_the_slot_map_when_the_urls_node_is_down(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    seeded = RedisConfig(url=down, mode="cluster", key_prefix=cluster_key_prefix,
                         socket_timeout=2, cluster_nodes=tuple(redis_cluster.seeds))
    config = CacheConfig(views=(make_view(VIEW, VIEW, None),), redis=seeded,
                         offline_store=OfflineStoreConfig(url=sql_url))
    with FeatureCache(config) as fc:
        fc.get_features(IDS, ["clicks"])
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.HIT_REDIS: len(IDS)}
    alone = config.replace(redis=RedisConfig(url=down, mode="cluster",
                                             key_prefix=cluster_key_prefix))
    with FeatureCache(alone) as fc:  # the node it knows is down: every row from SQL
        result = fc.get_features(IDS, ["clicks"])
        assert result.status_counts() == {Status.FILLED: len(IDS)}
        assert fc.stats()[VIEW]["redis_errors"] == 1
    with pytest.raises(ConfigError, match="only read with mode: cluster"):
        RedisConfig(cluster_nodes=("127.0.0.1:7000",))
    with pytest.raises(ConfigError, match="expected host:port"):
        RedisConfig(mode="cluster", cluster_nodes=("127.0.0.1",))


def test_reads_under_load_survive_a_migration_a_failover_and_a_killed_primary(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sql_url: str
) -> None:
    """4 threads read while a slot moves (ASK, TRYAGAIN, then MOVED), a replica takes over
    (CLUSTER FAILOVER) and a primary is SIGKILLed: no call fails, every value is SQL's, an
    invalidation issued during each leaves no stale value, and Redis hits resume."""
    layout = KeyLayout(cluster_key_prefix, buckets=CLUSTER_BUCKETS)
    engine = sa.create_engine(sql_url)
    updated: dict[int, int] = {}
    config = _config(redis_cluster, cluster_key_prefix, sql_url)
    with FeatureCache(config) as fc:
        fc.get_features(IDS, ["clicks"])

        def update_and_invalidate(eid: int) -> None:
            """A new value in SQL, then the hook (retried while a slot has no primary, as
            an ETL retries it); the next read must be the new value."""
            updated[eid] = 1000 + eid
            with engine.begin() as conn:
                conn.execute(sa.text(f"UPDATE {VIEW} SET clicks = :c WHERE entity_id = :e"),
                             {"c": 1000 + eid, "e": eid})
            deadline = time.monotonic() + 30
            while True:
                try:
                    fc.invalidate(VIEW, [eid])
                    break
                except CacheUnavailable:
                    assert time.monotonic() < deadline, "the invalidation never went through"
                    time.sleep(0.1)
            assert fc.get_features([eid], ["clicks"])[eid]["clicks"] == 1000 + eid

        def acceptable(eid: int, clicks: Any) -> bool:
            return clicks in (eid, updated.get(eid))  # SQL's value, before or after its update

        try:
            with ReadLoad(fc, IDS, 20, acceptable) as load:
                time.sleep(0.3)
                # a slot moved under the load: half its keys first (TRYAGAIN, ASK), then all
                slot = key_slot(layout.row_key(VIEW, 5).encode())
                owner = redis_cluster.primary_for_slot(slot)
                target = next(n for n in redis_cluster.primaries() if n is not owner)
                migration = redis_cluster.begin_migration(slot, target)
                in_slot = [k for k in layout.row_keys(VIEW, IDS) if key_slot(k.encode()) == slot]
                migration.move_keys(in_slot[: len(in_slot) // 2])
                time.sleep(0.2)
                update_and_invalidate(5)
                migration.finish()
                time.sleep(0.2)
                # a replica takes over its primary
                primary = redis_cluster.node_for_key(layout.row_key(VIEW, 6))
                redis_cluster.failover(redis_cluster.replicas_of(primary)[0])
                update_and_invalidate(6)
                time.sleep(0.2)
                # a primary killed: its rows come from SQL until its replica is promoted
                victim = redis_cluster.node_for_key(layout.row_key(VIEW, 7))
                redis_cluster.kill(victim)
                update_and_invalidate(7)
                redis_cluster.wait_ok(60)
                time.sleep(0.3)
        finally:
            engine.dispose()
        assert not load.failures, load.failures[:3]
        assert not load.wrong, load.wrong[:5]
        assert load.calls > 20
        deadline = time.monotonic() + 30
        while fc.get_features(IDS, ["clicks"]).status_counts() != {Status.HIT_REDIS: len(IDS)}:
            assert time.monotonic() < deadline, "Redis hits never resumed"
            time.sleep(0.2)
        final = fc.get_features(IDS, ["clicks"])
        assert [final[e]["clicks"] for e in IDS] == [updated.get(e, e) for e in IDS]
