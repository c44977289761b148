"""``redis.mode``: the deployments featcache talks to, and a mode that does not match the server.

Validation of the section (no server needed) and the errors a wrong mode gives against real
servers: a Sentinel reached as a data server, a data server listed as a Sentinel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from featdata import make_cache, make_view

from featcache import CacheConfig, ConfigError, load_config
from featcache.config_sections import InvalidationConfig, RedisConfig


@pytest.mark.parametrize(("options", "path", "message"), [
    ({"mode": "clustered"}, "redis.mode",
     "expected one of standalone, sentinel, cluster, got 'clustered'"),
    ({"mode": "cluster", "url": "redis://h:7000/2"}, "redis.url", "a cluster has database 0"),
    ({"mode": "cluster", "master_name": "m"}, "redis.master_name",
     "only read with mode: sentinel"),
    ({"mode": "sentinel", "master_name": "m"}, "redis.sentinels",
     "mode sentinel needs the sentinels' addresses"),
    ({"mode": "sentinel", "sentinels": ["h:26379"]}, "redis.master_name",
     "mode sentinel needs the name"),
    ({"sentinels": ["h:26379"]}, "redis.sentinels", "only read with mode: sentinel"),
    ({"master_name": "m"}, "redis.master_name", "only read with mode: sentinel"),
    ({"mode": "sentinel", "master_name": "m", "sentinels": ["h"]}, "redis.sentinels",
     "expected host:port, got 'h'"),
    ({"mode": "sentinel", "master_name": "m", "sentinels": ["h:0"]}, "redis.sentinels",
     "expected host:port"),
    ({"mode": "sentinel", "master_name": "m", "sentinels": 7}, "redis.sentinels",
     "expected a list of host:port"),
])
def test_a_mode_and_its_settings_are_checked_together(
    options: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RedisConfig(**options)
    assert err.value.path == path and message in err.value.message, str(err.value)


def test_sentinels_from_the_file_and_from_an_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "redis: {mode: sentinel, master_name: fc, sentinels: [a:26379, 'b:26380']}\n"
        "views: {v: {table: t, entity: {column: id, type: int}, event_timestamp: ts,\n"
        "            features: {x: 'int, 1h'}}}\n")
    assert load_config(path, env={}).redis.sentinels == ("a:26379", "b:26380")
    overridden = load_config(path, env={"FEATCACHE__REDIS__SENTINELS": "c:1, d:2"})
    assert overridden.redis.sentinels == ("c:1", "d:2")


def test_a_replica_wait_must_end_before_the_connection_times_out() -> None:
    """The WAIT that ``invalidation.replicas`` adds runs on a connection with
    ``redis.socket_timeout``: a longer wait would time the connection out instead."""
    views = (make_view("v", "t", None),)
    with pytest.raises(ConfigError) as err:
        CacheConfig(views=views, invalidation=InvalidationConfig(replicas=1,
                                                                 replica_timeout="1s"))
    assert err.value.path == "invalidation.replica_timeout"
    ok = CacheConfig(views=views, invalidation=InvalidationConfig(replicas=1))
    assert ok.invalidation.replica_timeout == 0.25 < ok.redis.socket_timeout


@pytest.mark.topology
def test_the_caches_of_this_run_are_on_its_topology(
    redis_url: str, key_prefix: str, sqlite_target: Any
) -> None:
    """The control of a run per topology: the caches the marked tests build really are on the
    deployment FEATCACHE_TEST_TOPOLOGY names, so those runs test it and not a plain server."""
    topology = os.environ.get("FEATCACHE_TEST_TOPOLOGY") or "standalone"
    with make_cache([make_view("v", "t", None)], redis_url, sqlite_target.url,
                    key_prefix) as fc:
        assert fc.config.redis.mode == topology
        assert fc.store.url.startswith(
            {"sentinel": "sentinel ", "cluster": "cluster "}.get(topology, "redis://"))
