"""The Redis store: the one place featcache talks to Redis (a small package).

``base`` holds the interface every backend implements (``RedisStore``, ``StreamTail``) and the
types it speaks; ``scripts`` the write scripts; ``errors`` the translation of redis-py's
exceptions (there and nowhere else); ``standalone`` the backend for one server (or the primary
Sentinel names); ``cluster`` a cluster's batched reads and ``cluster_store`` the backend of a
cluster built on them.
``open_store`` builds the backend a configuration names.
"""

from __future__ import annotations

import redis

from featcache.breaker import CircuitBreaker
from featcache.config_sections import DegradationConfig, RedisConfig
from featcache.redis_store.base import (
    Command,
    IfAbsent,
    LuaScript,
    RedisStore,
    ScriptCall,
    StreamTail,
    TimedRead,
    WriteBatch,
    WriteItem,
    fenced_write,
    row_write,
    split_if_absent,
)
from featcache.redis_store.cluster import NodeHealth
from featcache.redis_store.cluster_store import ClusterStore, connect_cluster
from featcache.redis_store.errors import translate, translated_errors
from featcache.redis_store.scripts import CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT
from featcache.redis_store.standalone import (
    StandaloneStore,
    connect,
    describe,
    open_tail,
    safe_redis_url,
)

__all__ = [
    "CONDITIONAL_SET",
    "ENSURE_EPOCH",
    "SET_IF_ABSENT",
    "ClusterStore",
    "Command",
    "IfAbsent",
    "LuaScript",
    "NodeHealth",
    "RedisStore",
    "ScriptCall",
    "StandaloneStore",
    "StreamTail",
    "TimedRead",
    "WriteBatch",
    "WriteItem",
    "connect",
    "fenced_write",
    "open_store",
    "open_tail",
    "row_write",
    "safe_redis_url",
    "split_if_absent",
    "translate",
    "translated_errors",
]


def open_store(
    config: RedisConfig,
    client: redis.Redis | redis.RedisCluster | None = None,
    degradation: DegradationConfig | None = None,
) -> RedisStore:
    """The store for ``config`` (a client of the application's own, when given, instead of
    one built from the URL). Nothing is connected yet (a cluster client asks for the slot map
    when it is built: an application's own has done so). ``degradation``: the circuit
    breaker each node of a cluster gets (its defaults when not given)."""
    if isinstance(client, redis.RedisCluster) or (client is None and config.mode == "cluster"):
        section = degradation or DegradationConfig()
        health = NodeHealth(lambda: CircuitBreaker.from_config(section))
        return ClusterStore(client or (lambda: connect_cluster(config)), describe(config),
                            health=health, replica_reads=config.read_from_replicas)
    if client is not None:
        return StandaloneStore(client, config.read_chunk)
    return StandaloneStore(connect(config), config.read_chunk, config=config)
