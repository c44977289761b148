"""A configuration built in Python instead of read from YAML, durations given as text.

    FEATCACHE_REDIS_URL=redis://127.0.0.1:6379/0 \\
    FEATCACHE_OFFLINE_URL=postgresql+psycopg://app@db/features \\
        python examples/config_in_python.py

It builds the configuration of docs/configuration.md ("In Python"), checked as a file's would
be, and prints what each duration became: every duration field takes a number of seconds or
text (``"500ms"``, ``"10m"``, ``"2d"``) and holds float seconds. Type checkers accept both
forms and read the field as ``float`` (``mypy --strict`` checks this file in CI). Pass the
result to ``FeatureCache(config)`` to open the cache.
"""

from __future__ import annotations

import os

from featcache import (
    CacheConfig,
    Feature,
    FeatureView,
    L1Config,
    OfflineStoreConfig,
    RedisConfig,
)


def build() -> CacheConfig:
    return CacheConfig(
        views=(
            FeatureView(
                name="user",
                table="user_stats",
                schema="analytics",
                entity_column="user_id",
                entity_type="int",
                event_timestamp_column="event_ts",
                updated_at_column="updated_at",
                ttl="2d",  # 0 (the default): longest max_age + stale_if_error
                negative_ttl="30s",
                stale_if_error="10m",
                features=(
                    Feature("ctr_7d", "float", "10m"),
                    Feature("clicks_1h", "int", "1h", column="clicks_last_hour"),
                    Feature("country", "str", "1d"),
                ),
            ),
        ),
        redis=RedisConfig(url=os.environ.get("FEATCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                          key_prefix="fc", socket_timeout="500ms"),
        offline_store=OfflineStoreConfig(
            url=os.environ.get("FEATCACHE_OFFLINE_URL", "sqlite:///features.db")),
        l1=L1Config(policy="tinylfu", max_ttl="5s"),
    )


def main() -> None:
    config = build()
    view = config.views[0]
    seconds: float = view.ttl + view.negative_ttl + view.stale_if_error
    print(f"view {view.name}: ttl {view.ttl:g} s, negative_ttl {view.negative_ttl:g} s, "
          f"stale_if_error {view.stale_if_error:g} s ({seconds:g} s in all)")
    for feature in view.features:
        print(f"  {feature.name}: max_age {feature.max_age:g} s")
    print(f"redis.socket_timeout {config.redis.socket_timeout:g} s, "
          f"l1.max_ttl {config.l1.max_ttl:g} s")


if __name__ == "__main__":
    main()
