"""A server older than Redis 7.0, which featcache does not support (its write scripts send
``SET ... NX GET``), is refused with one clear error wherever featcache meets it: by
``featcache validate``, by the first fill of a read, by a bulk load. Run on a real Redis 6.2
(``FEATCACHE_TEST_REDIS6_SERVER``, backend ``redis6``; .ci/run provides it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from clienv import featcache, write_config
from featdata import STATS_FEATURES, insert, make_table, stats_row
from servers import SqlTarget, redis6_server

from featcache import FeatureCache
from featcache.config import load_config
from featcache.embedded import EmbeddedServer
from featcache.errors import CacheConfigError

pytestmark = pytest.mark.machine

EX_CONFIG = 78
NEEDS = "featcache needs Redis >= 7.0 or Valkey"


@pytest.fixture(scope="module")
def old_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(binary=redis6_server(),
                        extra_args=("--maxmemory", "64mb",
                                    "--maxmemory-policy", "allkeys-lfu")) as server:
        client = redis.Redis.from_url(server.url)
        version = str(client.info("server")["redis_version"])
        client.close()
        major = int(version.partition(".")[0])
        assert major < 7, f"not an older server: Redis {version}"
        yield server


@pytest.fixture
def config_path(old_server: EmbeddedServer, sqlite_target: SqlTarget, tmp_path: Path) -> Path:
    table = make_table(sqlite_target.engine(), sqlite_target.schema, "cv", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(i) for i in range(1, 6)])
    return write_config(tmp_path / "featcache.yaml", old_server.url, "fc6", sqlite_target.url,
                        schema=sqlite_target.schema)


def _rows(server: EmbeddedServer) -> list[bytes]:
    """The keys of view cv's rows (its epoch, popularity and stats keys start ``fc6:~``)."""
    client = redis.Redis.from_url(server.url)
    try:
        return list(client.scan_iter("fc6:cv:*"))
    finally:
        client.close()


def test_validate_exits_78_naming_the_version_featcache_needs(config_path: Path) -> None:
    done = featcache("validate", "--config", str(config_path))
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "is older than Redis 7.0, which featcache needs" in done.stderr
    assert "1 error" in done.stdout and "Traceback" not in done.stderr


def test_a_read_whose_fill_meets_the_server_raises_a_config_error(
        config_path: Path, old_server: EmbeddedServer) -> None:
    """Not degraded to SQL for the process's life: a ``CacheConfigError`` at the first fill
    (the probe at construction only reads, which an old server does), and nothing written."""
    with FeatureCache(load_config(config_path)) as cache:
        with pytest.raises(CacheConfigError, match=r"needs Redis >= 7\.0 or Valkey") as caught:
            cache.get_features([1, 2], ["cv:ctr"])
        assert "SET ... NX GET" in str(caught.value) and "redis.url" in str(caught.value)
    assert _rows(old_server) == []


def test_a_bulk_load_exits_78(config_path: Path, old_server: EmbeddedServer) -> None:
    done = featcache("materialize", "--config", str(config_path), "--view", "cv", "--all")
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert NEEDS in done.stderr and "Traceback" not in done.stderr
    assert _rows(old_server) == []
