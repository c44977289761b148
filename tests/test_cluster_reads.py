"""Batched reads from a real Valkey Cluster (``ClusterReader``): one overlapped round trip per
node, the keys' order kept, a slot moved (MOVED) or moving (ASK, TRYAGAIN) and a dead node
costing misses, never an error, while any node answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from featcache.embedded_cluster import EmbeddedCluster
from featcache.errors import CacheUnavailable
from featcache.keys import CLUSTER_BUCKETS, KeyLayout
from featcache.redis_store.base import coalesce, pack
from featcache.redis_store.cluster import ClusterReader, SlotCache

VIEW = "cv"


@pytest.fixture
def cluster_client(redis_cluster: EmbeddedCluster) -> Iterator[redis.RedisCluster]:
    host, _, port = redis_cluster.seeds[0].rpartition(":")
    client = redis.RedisCluster(host=host, port=int(port), socket_timeout=2,
                                socket_connect_timeout=2)
    yield client
    client.close()


def _fill(client: redis.RedisCluster, keys: list[str]) -> dict[str, bytes]:
    values = {key: f"value of {key}".encode() for key in keys}
    for key, value in values.items():
        client.set(key, value)
    return values


def _rows(
    client: redis.RedisCluster, prefix: str, count: int
) -> tuple[list[str], dict[str, bytes], ClusterReader]:
    """``count`` rows of the cluster layout stored, their values, and a reader."""
    keys = KeyLayout(prefix, buckets=CLUSTER_BUCKETS).row_keys(VIEW, range(count))
    return keys, _fill(client, keys), ClusterReader(client, "cluster")


def test_a_batch_over_every_bucket_reads_in_key_order(
    cluster_client: redis.RedisCluster, cluster_key_prefix: str
) -> None:
    layout = KeyLayout(cluster_key_prefix, buckets=CLUSTER_BUCKETS)
    keys = layout.row_keys(VIEW, range(1000))
    stored = _fill(cluster_client, keys[::2])  # every other key is absent
    epoch_key = layout.epoch_key(VIEW)  # an untagged key in its own slot rides along
    cluster_client.set(epoch_key, b"17")
    reader = ClusterReader(cluster_client, "cluster")
    values = reader.read([*keys, epoch_key, "no-such-key"])
    assert values == [*(stored.get(k) for k in keys), b"17", None]
    assert len({key_slot(k.encode()) for k in keys}) == CLUSTER_BUCKETS
    assert (reader.node_errors, reader.redirects) == (0, 0)
    assert reader.read([]) == []


def test_slot_cache_knows_tagged_and_plain_keys() -> None:
    cache = SlotCache()
    for key in ["fc:{v:07}:1", "fc:{v:07}:abc}", "fc:{v:07}:{x}", "fc:~v:epoch", "plain"]:
        assert cache.slots([key]) == [key_slot(key.encode())], key
    assert len(cache.slots([f"fc:{{v:07}}:{i}" for i in range(100)])) == 100
    assert "fc:{v:07" in cache  # one entry for the whole tag


def test_a_moved_slot_is_read_from_its_new_owner(
    redis_cluster: EmbeddedCluster, cluster_client: redis.RedisCluster, cluster_key_prefix: str
) -> None:
    keys, stored, reader = _rows(cluster_client, cluster_key_prefix, 200)
    assert reader.read(keys) == [stored[k] for k in keys]
    slot = key_slot(keys[3].encode())
    owner = redis_cluster.primary_for_slot(slot)
    target = next(n for n in redis_cluster.primaries() if n is not owner)
    redis_cluster.migrate_slot(slot, target)  # the reader's slot map still names the owner
    assert reader.read(keys) == [stored[k] for k in keys]
    assert reader.redirects >= 1 and reader.node_errors == 0
    assert cluster_client.nodes_manager.slots_cache[slot][0].port == target.port


def test_a_slot_being_migrated_answers_ask_or_misses(
    redis_cluster: EmbeddedCluster, cluster_client: redis.RedisCluster, cluster_key_prefix: str
) -> None:
    layout = KeyLayout(cluster_key_prefix, buckets=CLUSTER_BUCKETS)
    keys = layout.row_keys(VIEW, range(640))  # 10 keys per bucket
    stored = _fill(cluster_client, keys)
    slot = key_slot(keys[5].encode())
    in_slot = [k for k in keys if key_slot(k.encode()) == slot]
    owner = redis_cluster.primary_for_slot(slot)
    target = next(n for n in redis_cluster.primaries() if n is not owner)
    migration = redis_cluster.begin_migration(slot, target)
    try:
        reader = ClusterReader(cluster_client, "cluster")
        migration.move_keys(in_slot[:4])  # half moved: the source answers TRYAGAIN
        values = reader.read(keys)
        assert [v for k, v in zip(keys, values, strict=True) if k not in in_slot] == [
            stored[k] for k in keys if k not in in_slot]
        assert all(values[keys.index(k)] is None for k in in_slot)  # misses, not an error
        migration.move_keys()  # all moved: the source answers ASK, the target serves them
        assert reader.read(keys) == [stored[k] for k in keys]
        assert reader.redirects >= 2
    finally:
        migration.finish()
    assert reader.read(keys) == [stored[k] for k in keys]


def test_a_dead_node_costs_its_keys_and_no_node_is_an_outage(
    redis_cluster: EmbeddedCluster, cluster_client: redis.RedisCluster, cluster_key_prefix: str
) -> None:
    keys, stored, reader = _rows(cluster_client, cluster_key_prefix, 300)
    victim = redis_cluster.node_for_key(keys[0])
    redis_cluster.kill(victim)
    values = reader.read(keys)
    on_victim = {k for k in keys if redis_cluster.node_for_key(k) is victim}
    assert on_victim and len(on_victim) < len(keys)
    assert [values[i] for i, k in enumerate(keys) if k not in on_victim] == [
        stored[k] for k in keys if k not in on_victim]
    assert all(values[i] is None for i, k in enumerate(keys) if k in on_victim)
    assert reader.node_errors >= 1
    others = [n for n in redis_cluster.primaries() if n is not victim]
    for node in others:
        redis_cluster.kill(node)
    with pytest.raises(CacheUnavailable, match="no cluster node answered"):
        reader.read(keys)


def test_commands_are_coalesced_into_bounded_writes() -> None:
    """Small commands share one socket write (one system call, not one each); a large
    pipeline goes out in writes of about 64 KiB, each within its own socket timeout."""
    small = [pack(("MGET", f"k{i}")) for i in range(64)]
    assert coalesce(small) == [b"".join(small)]
    big = [pack(("SET", "k", b"x" * 10_000)) for _ in range(100)]
    writes = coalesce(big)
    assert b"".join(writes) == b"".join(big) and len(writes) == 15  # 7 commands a write
    assert all(len(w) >= 65_536 for w in writes[:-1]) and coalesce([]) == []
