"""The configuration: the YAML loader, environment overrides, the Python constructors.

A bad value must fail when the configuration is built (never later on the serving path) with a
``ConfigError`` whose ``path`` names the bad key and whose message says what was expected; a
URL's password must never appear in an error message or a repr. No server is needed here.
"""

from __future__ import annotations

import copy
import math
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from featcache import (
    CacheConfig,
    ChangeQuery,
    ConfigError,
    DegradationConfig,
    FeatcacheError,
    Feature,
    FeatureCache,
    FeatureType,
    FeatureView,
    FollowChangesConfig,
    InvalidationConfig,
    L1Config,
    LimitsConfig,
    OfflineStoreConfig,
    PopularityConfig,
    RedisConfig,
    ScheduleConfig,
    SchemaError,
    StampedeConfig,
    UnknownView,
    WarmerConfig,
    load_config,
)
from featcache.config import config_from_dict, parse_duration
from featcache.offline import safe_url
from featcache.redis_store import safe_redis_url

# ------------------------------------------------------------------------------------ helpers

MINIMAL = """\
views:
  user:
    table: user_stats
    entity: user_id
    event_timestamp: event_ts
    features:
      ctr_7d: float, 10m
"""

#: Every key the file format knows, each set to a value that differs from its default.
FULL = """\
redis:
  url: redis://cache.internal:6380/2
  key_prefix: feat.v2
  socket_timeout: 250ms
  connect_timeout: 3s
  max_connections: 32
  read_chunk: 500
offline_store:
  url: postgresql+psycopg://reader@db.internal/features
  chunk_size: 800
  connect_timeout: 10s
  pool_size: 8
limits:
  max_id_length: 128
defaults:
  negative_ttl: 2m
  stale_if_error: 10m
views:
  user:
    table: user_stats
    schema: analytics
    entity: {column: user_id, type: int}
    event_timestamp: event_ts
    updated_at: updated_at
    ttl: 2d
    negative_ttl: 30s
    features:
      ctr_7d: {type: float, max_age: 10m}
      clicks_1h: {type: int, max_age: 1h, column: clicks_last_hour}
      country: str, 1d
      embedding: list[float], 6h
  account:
    table: accounts
    entity: {column: account_id, type: str}
    event_timestamp: ts
    stale_if_error: 0
    features:
      plan: {type: string, max_age: 30m}
      vip: {type: boolean, max_age: 30m}
      signup: {type: datetime, max_age: 1d}
"""


def write(tmp_path: Path, text: str, name: str = "featcache.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def base_doc() -> dict[str, Any]:
    """A valid parsed document, fresh for every call (the loader must not keep references)."""
    return {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "views": {
            "user": {
                "table": "user_stats",
                "entity": "user_id",
                "event_timestamp": "event_ts",
                "features": {
                    "ctr_7d": {"type": "float", "max_age": "10m"},
                    "clicks": "int, 1h",
                },
            }
        },
    }


def load_error(doc: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, "test.yaml", env or {})
    return err.value


def a_view(**changes: Any) -> FeatureView:
    fields: dict[str, Any] = {
        "name": "user",
        "table": "user_stats",
        "entity_column": "user_id",
        "event_timestamp_column": "event_ts",
        "features": (Feature("ctr_7d", "float", "10m"),),
    }
    fields.update(changes)
    return FeatureView(**fields)


# ------------------------------------------------------------------------------ valid files


def test_full_file_loads_every_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={})
    assert config.redis.url == "redis://cache.internal:6380/2"
    assert config.redis.key_prefix == "feat.v2"
    assert config.redis.socket_timeout == 0.25
    assert config.redis.connect_timeout == 3.0
    assert config.redis.max_connections == 32
    assert config.redis.read_chunk == 500
    assert config.offline_store.url == "postgresql+psycopg://reader@db.internal/features"
    assert config.offline_store.chunk_size == 800
    assert config.offline_store.connect_timeout == 10.0
    assert config.offline_store.pool_size == 8
    assert config.limits.max_id_length == 128
    assert config.source == str(tmp_path / "featcache.yaml")

    user = config.view("user")
    assert (user.table, user.schema, user.entity_column, user.entity_type) == (
        "user_stats", "analytics", "user_id", "int")
    assert (user.event_timestamp_column, user.updated_at_column) == ("event_ts", "updated_at")
    assert (user.ttl, user.negative_ttl, user.stale_if_error) == (2 * 86400, 30.0, 600.0)
    assert user.features == (
        Feature("ctr_7d", FeatureType.FLOAT, 600),
        Feature("clicks_1h", FeatureType.INT, 3600, column="clicks_last_hour"),
        Feature("country", FeatureType.STR, 86400),
        Feature("embedding", FeatureType.EMBEDDING, 6 * 3600),
    )
    account = config.view("account")
    assert (account.entity_column, account.entity_type) == ("account_id", "str")
    assert account.negative_ttl == 120.0  # from defaults
    assert account.stale_if_error == 0.0  # its own value wins over defaults
    assert account.ttl == 86400.0  # longest max_age + stale_if_error
    assert [f.type for f in account.features] == [
        FeatureType.STR, FeatureType.BOOL, FeatureType.TIMESTAMP]


def test_file_equals_the_python_constructor_equivalent(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, FULL), env={})
    built = CacheConfig(
        views=(
            FeatureView(
                name="user", table="user_stats", schema="analytics", entity_column="user_id",
                entity_type="int", event_timestamp_column="event_ts",
                updated_at_column="updated_at", ttl="2d", negative_ttl="30s",
                stale_if_error="10m",
                features=(
                    Feature("ctr_7d", "float", "10m"),
                    Feature("clicks_1h", "int", "1h", column="clicks_last_hour"),
                    Feature("country", "str", "1d"),
                    Feature("embedding", "list[float]", "6h"),
                ),
            ),
            FeatureView(
                name="account", table="accounts", entity_column="account_id",
                entity_type="str", event_timestamp_column="ts", negative_ttl="2m",
                stale_if_error=0,
                features=(
                    Feature("plan", "str", "30m"),
                    Feature("vip", "bool", "30m"),
                    Feature("signup", "timestamp", "1d"),
                ),
            ),
        ),
        redis=RedisConfig(
            url="redis://cache.internal:6380/2",
            key_prefix="feat.v2",
            socket_timeout="250ms",
            connect_timeout=3,
            max_connections=32,
            read_chunk=500,
        ),
        offline_store=OfflineStoreConfig(
            url="postgresql+psycopg://reader@db.internal/features",
            chunk_size=800,
            connect_timeout="10s",
            pool_size=8,
        ),
        limits=LimitsConfig(max_id_length=128),
    )
    assert loaded == built  # ``source`` does not take part in equality


#: Every section the file format has but those FULL sets, each key away from its default.
SECTIONS_TEXT = """\
invalidation: {fence_ttl: 2m, stream_maxlen: 5000}
l1: {policy: tinylfu, max_entries: 500, max_ttl: 2s, access_sample_rate: 0.5}
stampede: {lease_ttl: 3s, lease_wait: 0, xfetch_beta: 0.5}
degradation:
  breaker_failures: 3
  breaker_window: 30s
  breaker_open_for: 5s
  sql_concurrency: 4
  sql_queue_timeout: 250ms
  on_sql_error: mark
popularity: {sample_rate: 0.5, bucket: 30s, buckets: 10, half_life: 10m, flush_interval: 2s}
warmer:
  schedule: {cron: '*/5 * * * *'}
  jitter: 5s
  misfire_grace: 1m
  k: 50
  horizon: 5m
  lease_ttl: 1m
  chunk_rows: 100
  views: [user]
  follow_changes:
    interval: 10s
    rewrite: all
    lookback: 1m
    start: all
    views:
      user: {change_query: 'SELECT id AS entity_id, ts AS updated_at FROM a WHERE ts >= :watermark'}
  metrics_port: 9200
  metrics_addr: 0.0.0.0
"""


def test_every_section_from_the_file_equals_its_python_constructor(tmp_path: Path) -> None:
    """Each section of the file becomes its dataclass, key by key, and environment overrides
    (text) reach every kind of key: durations, integers, numbers, choices."""
    loaded = load_config(write(tmp_path, SECTIONS_TEXT + MINIMAL), env={})
    query = "SELECT id AS entity_id, ts AS updated_at FROM a WHERE ts >= :watermark"
    expected = {
        "invalidation": InvalidationConfig(fence_ttl="2m", stream_maxlen=5000),
        "l1": L1Config("tinylfu", 500, "2s", 0.5),
        "stampede": StampedeConfig(lease_ttl=3, lease_wait=0, xfetch_beta=0.5),
        "degradation": DegradationConfig(3, "30s", "5s", 4, "250ms", "mark"),
        "popularity": PopularityConfig(0.5, "30s", 10, "10m", "2s"),
        "warmer": WarmerConfig(
            schedule=ScheduleConfig(cron="*/5 * * * *"), jitter=5, misfire_grace=60, k=50,
            horizon="5m", lease_ttl="1m", chunk_rows=100, views=["user"],
            follow_changes=FollowChangesConfig("10s", "all", "1m", "all",
                                               {"user": ChangeQuery(query)}),
            metrics_port=9200, metrics_addr="0.0.0.0"),
    }
    for name, section in expected.items():
        assert getattr(loaded, name) == section, name
    assert loaded == CacheConfig(views=loaded.views, **expected)
    assert loaded.invalidation.fill_window == 60.0
    env = {
        "FEATCACHE__INVALIDATION__STREAM_MAXLEN": "6000",
        "FEATCACHE__L1__MAX_TTL": "3s",
        "FEATCACHE__STAMPEDE__XFETCH_BETA": "2",
        "FEATCACHE__DEGRADATION__ON_SQL_ERROR": "raise",
        "FEATCACHE__POPULARITY__SAMPLE_RATE": "0",
        "FEATCACHE__WARMER__FOLLOW_CHANGES__LOOKBACK": "2m",
        "FEATCACHE__WARMER__METRICS_PORT": "9300",
    }
    overridden = load_config(write(tmp_path, SECTIONS_TEXT + MINIMAL), env=env)
    assert overridden.invalidation.stream_maxlen == 6000
    assert overridden.l1.max_ttl == 3.0
    assert overridden.stampede.xfetch_beta == 2.0
    assert overridden.degradation.on_sql_error == "raise"
    assert overridden.popularity.sample_rate == 0.0
    assert overridden.warmer.follow_changes is not None
    assert overridden.warmer.follow_changes.lookback == 120.0
    assert overridden.warmer.metrics_port == 9300
    path = "warmer.follow_changes.views.user.change_query"
    assert overridden.warmer.follow_changes.change_queries["user"].path == path


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.offline_store.url == "sqlite:///featcache.db"
    assert config.redis.key_prefix == "fc"
    assert (config.redis.socket_timeout, config.redis.connect_timeout) == (0.5, 2.0)
    assert (config.redis.max_connections, config.redis.read_chunk) == (64, 1000)
    offline = config.offline_store
    assert (offline.chunk_size, offline.connect_timeout, offline.pool_size) == (1000, 5.0, 5)
    assert config.limits.max_id_length == 512
    (view,) = config.views
    assert (view.entity_type, view.schema, view.updated_at_column) == ("int", None, None)
    assert (view.negative_ttl, view.stale_if_error) == (60.0, 300.0)
    assert view.ttl == 600.0 + 300.0
    assert view.features == (Feature("ctr_7d", "float", 600.0, column="ctr_7d"),)


def test_shorthand_feature_spec_equals_the_long_form() -> None:
    doc = base_doc()
    features = doc["views"]["user"]["features"]
    features.clear()
    features.update({
        "a": "float, 10m",
        "b": "float,10m",
        "c": "  INT ,  1h ",
        "d": {"type": "float", "max_age": "10m"},
    })
    config = config_from_dict(doc, "t", {})
    a, b, c, d = config.views[0].features
    assert a == Feature("a", FeatureType.FLOAT, 600)
    assert (b.type, b.max_age) == (d.type, d.max_age) == (FeatureType.FLOAT, 600.0)
    assert (c.type, c.max_age) == (FeatureType.INT, 3600.0)


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("int", FeatureType.INT), ("int64", FeatureType.INT), ("integer", FeatureType.INT),
        ("float", FeatureType.FLOAT), ("double", FeatureType.FLOAT),
        ("float64", FeatureType.FLOAT), ("bool", FeatureType.BOOL),
        ("boolean", FeatureType.BOOL), ("str", FeatureType.STR), ("string", FeatureType.STR),
        ("timestamp", FeatureType.TIMESTAMP), ("datetime", FeatureType.TIMESTAMP),
        ("list[float]", FeatureType.EMBEDDING), ("embedding", FeatureType.EMBEDDING),
        ("Float", FeatureType.FLOAT),
    ],
)
def test_feature_type_spellings(alias: str, expected: FeatureType) -> None:
    assert Feature("x", alias, 60).type is expected


def test_view_ttl_defaults_to_longest_max_age_plus_stale_if_error() -> None:
    view = a_view(
        features=(Feature("a", "float", "10m"), Feature("b", "int", "2h")),
        stale_if_error="5m",
    )
    assert view.ttl == 7200 + 300
    assert a_view(ttl=7200 + 300 + 1, stale_if_error="5m").ttl == 7501.0


# -------------------------------------------------------------------------------- bad files

BAD_FILES = [
    pytest.param(
        "l1:\n  policy: tinylfu\n  access_sample_rate: 0\n" + MINIMAL, "l1.access_sample_rate",
        ["greater than 0 and at most 1, got 0"], id="l1-access-sample-rate-zero",
    ),
    pytest.param(
        "redsi:\n  url: redis://h\n" + MINIMAL, "redsi", ["unknown key 'redsi'", "'redis'"],
        id="unknown-top-level-key-suggests-closest",
    ),
    pytest.param(
        MINIMAL.replace("    table:", "    tabel:"), "views.user.tabel",
        ["unknown key 'tabel'", "did you mean 'table'"], id="unknown-key-in-view",
    ),
    pytest.param(
        MINIMAL.replace("ctr_7d: float, 10m", "ctr_7d: {type: float, max_age: 10m, colum: c}"),
        "views.user.features.ctr_7d.colum", ["unknown key 'colum'", "'column'"],
        id="unknown-key-in-feature",
    ),
    pytest.param(
        MINIMAL.replace("entity: user_id", "entity: {column: user_id, kind: int}"),
        "views.user.entity.kind", ["unknown key 'kind'"], id="unknown-key-in-entity",
    ),
    pytest.param(
        MINIMAL + "redis:\n  sockettimeout: 1s\n", "redis.sockettimeout",
        ["unknown key 'sockettimeout'", "'socket_timeout'"], id="unknown-key-in-section",
    ),
    pytest.param(
        "defaults:\n  ttl: 1h\n" + MINIMAL, "defaults.ttl",
        ["unknown key 'ttl'", "negative_ttl", "stale_if_error"], id="unknown-key-in-defaults",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "flaot, 10m"), "views.user.features.ctr_7d.type",
        ["expected a type among", "float", "'flaot'"], id="bad-feature-type",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "{type: decimal, max_age: 10m}"),
        "views.user.features.ctr_7d.type", ["expected a type among", "'decimal'"],
        id="bad-feature-type-long-form",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "{type: float}"), "views.user.features.ctr_7d.max_age",
        ["missing required key 'max_age'"], id="missing-max-age",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "float"), "views.user.features.ctr_7d.max_age",
        ["missing required key 'max_age'"], id="missing-max-age-shorthand",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "{max_age: 10m}"), "views.user.features.ctr_7d.type",
        ["missing required key 'type'"], id="missing-type",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "{type: float, max_age: 10 minutes}"),
        "views.user.features.ctr_7d.max_age",
        ["expected a duration like", "'10m'", "got '10 minutes'"], id="bad-duration",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "float, 10 minutes"),
        "views.user.features.ctr_7d.max_age", ["expected a duration", "'10 minutes'"],
        id="bad-duration-shorthand",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "{type: float, max_age: 0}"),
        "views.user.features.ctr_7d.max_age", ["greater than zero"], id="max-age-zero",
    ),
    pytest.param(
        MINIMAL.replace("float, 10m", "float, 0s"),
        "views.user.features.ctr_7d.max_age", ["greater than zero"], id="max-age-zero-string",
    ),
    pytest.param(
        MINIMAL + "redis:\n  socket_timeout: -1\n", "redis.socket_timeout",
        ["non-negative duration", "-1"], id="negative-timeout",
    ),
    pytest.param(
        MINIMAL + "offline_store:\n  connect_timeout: -5s\n", "offline_store.connect_timeout",
        ["expected a duration", "'-5s'"], id="negative-timeout-string",
    ),
    pytest.param(
        MINIMAL + "redis:\n  connect_timeout: 0\n", "redis.connect_timeout",
        ["greater than zero"], id="zero-timeout",
    ),
    pytest.param(
        MINIMAL.replace("    features:\n      ctr_7d: float, 10m\n", "    features: {}\n"),
        "views.user.features", ["at least one feature"], id="view-without-features",
    ),
    pytest.param(
        MINIMAL.replace("    features:\n      ctr_7d: float, 10m\n", "    features:\n"),
        "views.user.features", ["expected a mapping"], id="view-with-null-features",
    ),
    pytest.param(
        MINIMAL.replace("    table:", "    ttl: 10m\n    table:"), "views.user.ttl",
        ["at least the longest max_age plus stale_if_error", "900"], id="ttl-too-short",
    ),
    pytest.param(
        MINIMAL.replace("    table:", "    negative_ttl: 0\n    table:"),
        "views.user.negative_ttl", ["greater than zero"], id="negative-ttl-zero",
    ),
    pytest.param(
        MINIMAL + "redis:\n  key_prefix: 'my prefix'\n", "redis.key_prefix",
        ["expected 1-64 characters", "'my prefix'"], id="bad-key-prefix",
    ),
    pytest.param(
        MINIMAL + "redis:\n  key_prefix: 'fc:v2'\n", "redis.key_prefix",
        ["expected 1-64 characters", "'fc:v2'"], id="key-prefix-with-colon",
    ),
    pytest.param(
        MINIMAL.replace("  user:", "  user-stats:"), "views.user-stats",
        ["expected a view name", "'user-stats'"], id="view-name-not-identifier",
    ),
    pytest.param(
        MINIMAL.replace("  user:", "  2fast:"), "views.2fast",
        ["expected a view name", "not starting with a digit"], id="view-name-leading-digit",
    ),
    pytest.param(
        MINIMAL.replace("ctr_7d:", "ctr-7d:"), "views.user.features.ctr-7d",
        ["expected a feature name", "'ctr-7d'"], id="feature-name-not-identifier",
    ),
    pytest.param(
        MINIMAL.replace("table: user_stats", "table: 'user stats'"), "views.user.table",
        ["expected a SQL table name", "'user stats'"], id="table-not-identifier",
    ),
    pytest.param(
        MINIMAL.replace("entity: user_id", "entity: {column: user_id, type: uuid}"),
        "views.user.entity.type", ["expected 'int' or 'str'", "'uuid'"], id="bad-entity-type",
    ),
    pytest.param(
        MINIMAL.replace("    entity: user_id\n", ""), "views.user.entity",
        ["missing required key 'entity'"], id="missing-entity",
    ),
    pytest.param(
        MINIMAL + "offline_store:\n  chunk_size: 1.5\n", "offline_store.chunk_size",
        ["expected an integer from 1 to 30000", "1.5"], id="non-integer-chunk-size",
    ),
    pytest.param(
        MINIMAL + "redis:\n  max_connections: 0\n", "redis.max_connections",
        ["expected an integer from 1 to 10000"], id="max-connections-zero",
    ),
    pytest.param(
        MINIMAL + "limits:\n  max_id_length: true\n", "limits.max_id_length",
        ["expected an integer"], id="bool-is-not-an-integer",
    ),
    pytest.param(
        "views: {}\n", "views", ["declare at least one view"], id="no-views",
    ),
    pytest.param(
        MINIMAL + "redis: redis://h\n", "redis", ["expected a mapping, got str"],
        id="section-not-a-mapping",
    ),
    pytest.param(
        "- a\n- b\n", "", ["expected a mapping, got list"], id="file-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragments"), BAD_FILES)
def test_bad_file_fails_at_load_naming_the_key(
    tmp_path: Path, text: str, path: str, fragments: list[str]
) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    error = err.value
    assert error.path == path
    assert error.source == str(file)
    message = str(error)
    assert message.startswith(f"{file}: ")
    if path:
        assert f": {path}: " in message
    for fragment in fragments:
        assert fragment in message


def test_config_error_is_a_value_error_and_a_featcache_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, MINIMAL.replace("float, 10m", "float, soon")), env={})
    assert isinstance(err.value, FeatcacheError)
    assert isinstance(err.value, ConfigError)


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    text = "views:\n  user:\n    table: [unclosed\n    entity: user_id\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    message = str(err.value)
    assert "not valid YAML" in message
    assert "line 4, column" in message
    assert err.value.path == ""


def test_invalid_yaml_indentation(tmp_path: Path) -> None:
    text = "redis:\n  url: redis://h\n   key_prefix: x\n"
    with pytest.raises(ConfigError, match=r"line 3, column \d+: not valid YAML"):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, text), env={})


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing, env={})
    assert err.value.source == str(missing)
    assert "cannot read the file" in str(err.value)
    assert "No such file" in str(err.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path, env={})


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 (here Latin-1) is a ConfigError naming the file, like any
    other unreadable file, never a bare UnicodeDecodeError outside the featcache tree."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.replace("user_stats", "us\xe9r_stats").encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.source == str(path)


def test_duplicate_yaml_keys_keep_the_last_value(tmp_path: Path) -> None:
    """PyYAML accepts duplicate keys and keeps the last one (documented in configuration.md);
    duplicate features can only be caught through the Python constructor."""
    text = MINIMAL.replace("ctr_7d: float, 10m", "ctr_7d: float, 10m\n      ctr_7d: int, 1h")
    (view,) = load_config(write(tmp_path, text), env={}).views
    assert view.features == (Feature("ctr_7d", "int", "1h"),)


# ------------------------------------------------------------------------ environment


def test_env_redis_url_replaces_the_file_value(tmp_path: Path) -> None:
    file = write(tmp_path, FULL)
    config = load_config(file, env={"FEATCACHE_REDIS_URL": "rediss://app:pw@cache:6390/1"})
    assert config.redis.url == "rediss://app:pw@cache:6390/1"
    assert config.redis.socket_timeout == 0.25  # the rest of the section is kept


def test_env_aliases_create_missing_sections(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={
        "FEATCACHE_REDIS_URL": "redis://other:1/2",
        "FEATCACHE_OFFLINE_URL": "postgresql://u@h/db",
        "FEATCACHE_KEY_PREFIX": "canary",
    })
    assert (config.redis.url, config.offline_store.url, config.redis.key_prefix) == (
        "redis://other:1/2", "postgresql://u@h/db", "canary")


def test_env_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATCACHE_REDIS_URL", "redis://from-env:7000/3")
    monkeypatch.setenv("FEATCACHE__REDIS__SOCKET_TIMEOUT", "250ms")
    config = load_config(write(tmp_path, MINIMAL))
    assert config.redis.url == "redis://from-env:7000/3"
    assert config.redis.socket_timeout == 0.25


def test_env_ignores_unrelated_variables(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={
        "FEATCACHE_TEST_REDIS_URL": "redis://ignored", "PATH": "/bin", "FEATCACHEX": "1",
    })
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_env_socket_timeout_is_parsed_as_duration(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, FULL), env={"FEATCACHE__REDIS__SOCKET_TIMEOUT": "1.5s"}
    )
    assert config.redis.socket_timeout == 1.5
    config = load_config(write(tmp_path, FULL), env={"FEATCACHE__REDIS__SOCKET_TIMEOUT": "250ms"})
    assert config.redis.socket_timeout == 0.25


def test_env_bad_timeout_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), env={"FEATCACHE__REDIS__SOCKET_TIMEOUT": "soon"})
    assert err.value.path == "redis.socket_timeout"
    assert "'soon'" in str(err.value)


def test_env_float_fields(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={
        "FEATCACHE__L1__ACCESS_SAMPLE_RATE": "0.5",
        "FEATCACHE__STAMPEDE__XFETCH_BETA": "2",
    })
    assert (config.l1.access_sample_rate, config.stampede.xfetch_beta) == (0.5, 2.0)


def test_env_integer_fields(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={
        "FEATCACHE__OFFLINE_STORE__CHUNK_SIZE": " 250 ",
        "FEATCACHE__REDIS__MAX_CONNECTIONS": "8",
        "FEATCACHE__LIMITS__MAX_ID_LENGTH": "64",
    })
    assert (config.offline_store.chunk_size, config.redis.max_connections,
            config.limits.max_id_length) == (250, 8, 64)


@pytest.mark.parametrize("value", ["abc", "1.5", "1e3", ""])
def test_env_non_integer_chunk_size_fails(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            write(tmp_path, MINIMAL), env={"FEATCACHE__OFFLINE_STORE__CHUNK_SIZE": value}
        )
    assert err.value.path == "offline_store.chunk_size"
    assert "expected an integer" in str(err.value)


def test_env_integer_out_of_range_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            write(tmp_path, MINIMAL), env={"FEATCACHE__OFFLINE_STORE__CHUNK_SIZE": "50000"}
        )
    assert err.value.path == "offline_store.chunk_size"
    assert "from 1 to 30000" in str(err.value)


def test_env_overrides_one_feature_max_age(tmp_path: Path) -> None:
    file = write(tmp_path, FULL)
    config = load_config(file, env={"FEATCACHE__VIEWS__USER__FEATURES__CTR_7D__MAX_AGE": "30s"})
    features = {f.name: f for f in config.view("user").features}
    assert features["ctr_7d"].max_age == 30.0
    assert features["clicks_1h"].max_age == 3600.0  # the others are untouched
    assert features["ctr_7d"].type is FeatureType.FLOAT


def test_env_overrides_view_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={
        "FEATCACHE__VIEWS__USER__TTL": "3d",
        "FEATCACHE__VIEWS__ACCOUNT__ENTITY__COLUMN": "acct",
        "FEATCACHE__DEFAULTS__NEGATIVE_TTL": "5m",
    })
    assert config.view("user").ttl == 3 * 86400
    assert config.view("account").entity_column == "acct"
    assert config.view("account").negative_ttl == 300.0


def test_env_override_is_validated_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            write(tmp_path, FULL),
            env={"FEATCACHE__VIEWS__USER__FEATURES__CTR_7D__MAX_AGE": "0"},
        )
    assert err.value.path == "views.user.features.ctr_7d.max_age"


def test_env_overrides_max_age_of_a_shorthand_feature(tmp_path: Path) -> None:
    """``country: str, 1d`` is a feature as much as the long form: the shorthand is expanded
    before overrides apply, so its max_age can be overridden like any other feature's."""
    config = load_config(
        write(tmp_path, FULL), env={"FEATCACHE__VIEWS__USER__FEATURES__COUNTRY__MAX_AGE": "2h"}
    )
    country = next(f for f in config.view("user").features if f.name == "country")
    assert (country.type, country.max_age) == (FeatureType.STR, 7200.0)


@pytest.mark.parametrize(
    ("var", "path"),
    [
        ("FEATCACHE__VIEWS__NOPE__TTL", "views.nope"),
        ("FEATCACHE__VIEWS__USER__FEATURES__NOPE__MAX_AGE", "views.user.features.nope"),
        ("FEATCACHE__NOPE__X", "nope"),
    ],
)
def test_env_override_of_missing_node_names_the_variable(
    tmp_path: Path, var: str, path: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, FULL), env={var: "1h"})
    assert var in str(err.value)
    assert err.value.path == path
    assert "not in the configuration" in str(err.value)


@pytest.mark.parametrize(
    "var",
    [
        "FEATCACHE__REDIS__SOCKETTIMEOUT",
        "FEATCACHE__VIEWS__USER__TABEL",
        "FEATCACHE__VIEWS__USER__FEATURES__CTR_7D__MAXAGE",
        "FEATCACHE__NOPE",
    ],
)
def test_env_override_of_unknown_key_names_the_variable(tmp_path: Path, var: str) -> None:
    """When only the last segment is wrong, the "unknown key" error names the environment
    variable that set it, so the user is not sent searching the file for a key it lacks."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, FULL), env={var: "1h"})
    assert var in str(err.value)


def test_config_from_dict_does_not_modify_its_argument() -> None:
    """config_from_dict works on a deep copy of ``doc``: an override never lands in the
    caller's nested dicts, so a later build from the same dict (without the variable) gets the
    file's value back."""
    doc = base_doc()
    before = copy.deepcopy(doc)
    config = config_from_dict(
        doc, "t", {"FEATCACHE__VIEWS__USER__FEATURES__CTR_7D__MAX_AGE": "30s"}
    )
    assert config.views[0].features[0].max_age == 30.0
    assert doc == before
    assert config_from_dict(doc, "t", {}).views[0].features[0].max_age == 600.0


def test_config_from_dict_applies_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATCACHE_KEY_PREFIX", "from-env")
    assert config_from_dict(base_doc()).redis.key_prefix == "from-env"


# ------------------------------------------------------------------ Python constructors

CONSTRUCTOR_ERRORS = [
    pytest.param(lambda: Feature("ctr_7d", "flaot", "10m"), "features.ctr_7d.type",
                 "expected a type among", id="feature-bad-type"),
    pytest.param(lambda: Feature("ctr_7d", "float", None), "features.ctr_7d.max_age",
                 "expected a duration", id="feature-missing-max-age"),
    pytest.param(lambda: Feature("ctr_7d", "float", "10 minutes"), "features.ctr_7d.max_age",
                 "expected a duration", id="feature-bad-duration"),
    pytest.param(lambda: Feature("ctr_7d", "float", 0), "features.ctr_7d.max_age",
                 "greater than zero", id="feature-max-age-zero"),
    pytest.param(lambda: Feature("ctr_7d", "float", -5), "features.ctr_7d.max_age",
                 "non-negative", id="feature-max-age-negative"),
    pytest.param(lambda: Feature("ctr-7d", "float", 60), "features.ctr-7d",
                 "expected a feature name", id="feature-bad-name"),
    pytest.param(lambda: Feature("x", "float", 60, column="x y"), "features.x.column",
                 "expected a SQL column name", id="feature-bad-column"),
    pytest.param(lambda: a_view(features=()), "views.user.features",
                 "at least one feature", id="view-without-features"),
    pytest.param(lambda: a_view(features=("ctr_7d",)), "views.user.features",
                 "expected a Feature", id="view-feature-not-a-feature"),
    pytest.param(
        lambda: a_view(features=(Feature("x", "float", "10m"), Feature("x", "int", "1h"))),
        "views.user.features.x", "declared twice", id="view-duplicate-feature"),
    pytest.param(lambda: a_view(name="user-stats"), "views.user-stats",
                 "expected a view name", id="view-name-not-identifier"),
    pytest.param(lambda: a_view(name="~user"), "views.~user",
                 "expected a view name", id="view-name-bookkeeping-prefix"),
    pytest.param(lambda: a_view(table="user_stats; drop"), "views.user.table",
                 "expected a SQL table name", id="view-bad-table"),
    pytest.param(lambda: a_view(schema="a.b"), "views.user.schema",
                 "expected a SQL schema name", id="view-bad-schema"),
    pytest.param(lambda: a_view(entity_column="user id"), "views.user.entity.column",
                 "expected a SQL column", id="view-bad-entity-column"),
    pytest.param(lambda: a_view(event_timestamp_column=""), "views.user.event_timestamp",
                 "expected a SQL column", id="view-bad-event-timestamp"),
    pytest.param(lambda: a_view(entity_type="uuid"), "views.user.entity.type",
                 "expected 'int' or 'str'", id="view-bad-entity-type"),
    pytest.param(lambda: a_view(ttl="10m"), "views.user.ttl",
                 "at least the longest max_age plus stale_if_error (900 s)", id="view-ttl-short"),
    pytest.param(lambda: a_view(ttl=-1), "views.user.ttl", "non-negative", id="view-ttl-neg"),
    pytest.param(lambda: a_view(negative_ttl=0), "views.user.negative_ttl",
                 "greater than zero", id="view-negative-ttl-zero"),
    pytest.param(lambda: a_view(stale_if_error="a while"), "views.user.stale_if_error",
                 "expected a duration", id="view-bad-stale-if-error"),
    pytest.param(lambda: CacheConfig(views=()), "views", "at least one view", id="no-views"),
    pytest.param(lambda: CacheConfig(views=(a_view(), a_view())), "views.user",
                 "declared twice", id="duplicate-view"),
    pytest.param(lambda: CacheConfig(views=("user",)), "views", "expected a FeatureView",
                 id="view-not-a-featureview"),
    pytest.param(lambda: RedisConfig(key_prefix="my prefix"),
                 "redis.key_prefix", "expected 1-64 characters", id="bad-key-prefix"),
    pytest.param(lambda: RedisConfig(key_prefix="x" * 65),
                 "redis.key_prefix", "expected 1-64 characters", id="key-prefix-too-long"),
    pytest.param(lambda: RedisConfig(socket_timeout=-0.5),
                 "redis.socket_timeout", "non-negative", id="negative-timeout"),
    pytest.param(lambda: OfflineStoreConfig(connect_timeout=0),
                 "offline_store.connect_timeout", "greater than zero", id="zero-timeout"),
    pytest.param(lambda: OfflineStoreConfig(chunk_size=0),
                 "offline_store.chunk_size", "from 1 to 30000", id="chunk-size-zero"),
    pytest.param(lambda: OfflineStoreConfig(chunk_size="100"),
                 "offline_store.chunk_size", "expected an integer", id="chunk-size-str"),
    pytest.param(lambda: LimitsConfig(max_id_length=True),
                 "limits.max_id_length", "expected an integer", id="max-id-length-bool"),
    pytest.param(lambda: L1Config(access_sample_rate=0),
                 "l1.access_sample_rate", "greater than 0 and at most 1", id="l1-sample-zero"),
    pytest.param(lambda: L1Config(access_sample_rate=1.5),
                 "l1.access_sample_rate", "greater than 0 and at most 1", id="l1-sample-big"),
    pytest.param(lambda: RedisConfig(url=""),
                 "redis.url", "expected a URL", id="empty-redis-url"),
    pytest.param(lambda: OfflineStoreConfig(url=None),
                 "offline_store.url", "expected a URL", id="no-offline-url"),
    pytest.param(lambda: CacheConfig(views=(a_view(),), redis={"url": "redis://h"}),
                 "redis", "expected a RedisConfig", id="section-not-a-section"),
    pytest.param(lambda: CacheConfig(views=(a_view(),), warmer=WarmerConfig(views=("nope",))),
                 "warmer.views.nope", "unknown view; configured: user", id="warmer-unknown-view"),
]


@pytest.mark.parametrize(("build", "path", "fragment"), CONSTRUCTOR_ERRORS)
def test_constructor_validation(build: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.path == path
    assert fragment in str(err.value)


@pytest.mark.parametrize("bad_type", [int, None, 3], ids=["builtin-int", "None", "number"])
def test_feature_type_that_is_not_a_string_is_rejected(bad_type: Any) -> None:
    """A type that is neither a FeatureType nor one of its spellings (the builtin ``int``,
    None, a number) is a ConfigError at construction, not a failure much later in the codec."""
    with pytest.raises(ConfigError) as err:
        Feature("x", bad_type, 60)
    assert err.value.path == "features.x.type"


def test_key_prefix_that_is_not_a_string_is_a_config_error() -> None:
    """A key_prefix that is not a str is a ConfigError at redis.key_prefix, not a TypeError."""
    with pytest.raises(ConfigError) as err:
        RedisConfig(key_prefix=5)  # type: ignore[arg-type]
    assert err.value.path == "redis.key_prefix"


def test_features_none_is_a_config_error() -> None:
    """features=None is a ConfigError at views.<name>.features, not a TypeError."""
    with pytest.raises(ConfigError) as err:
        a_view(features=None)
    assert err.value.path == "views.user.features"


def test_views_none_is_a_config_error() -> None:
    """views=None is a ConfigError at views, not a TypeError."""
    with pytest.raises(ConfigError) as err:
        CacheConfig(views=None)  # type: ignore[arg-type]
    assert err.value.path == "views"


def test_constructor_accepts_lists_and_durations() -> None:
    view = a_view(features=[Feature("a", FeatureType.INT, 60)], negative_ttl="90s")
    assert isinstance(view.features, tuple)
    assert view.negative_ttl == 90.0
    config = CacheConfig(views=[view], redis=RedisConfig(socket_timeout="250ms"),
                         offline_store=OfflineStoreConfig(connect_timeout=3))
    assert isinstance(config.views, tuple)
    assert (config.redis.socket_timeout, config.offline_store.connect_timeout) == (0.25, 3.0)


def test_config_view_lookup() -> None:
    config = CacheConfig(views=(a_view(),))
    assert config.view("user").table == "user_stats"
    with pytest.raises(UnknownView) as err:
        config.view("usr")
    assert isinstance(err.value, KeyError)
    assert "known views: user" in str(err.value)


def test_replace_revalidates() -> None:
    config = CacheConfig(views=(a_view(),))
    canary = config.replace(redis=replace(config.redis, key_prefix="canary"))
    assert canary.redis.key_prefix == "canary"
    assert canary.offline_store is config.offline_store  # the other sections are kept
    with pytest.raises(ConfigError) as err:
        config.replace(offline_store=replace(config.offline_store, chunk_size=0))
    assert err.value.path == "offline_store.chunk_size"
    with pytest.raises(ConfigError) as err:
        config.replace(views=())
    assert err.value.path == "views"


# ------------------------------------------------------------------------ parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0), (2.5, 2.5), (0, 0.0), ("45", 45.0), ("0", 0.0), ("500ms", 0.5),
        ("1ms", 0.001), ("10s", 10.0), ("10m", 600.0), ("1h", 3600.0), ("1.5h", 5400.0),
        ("7d", 604800.0), (" 10 s ", 10.0), ("2.25m", 135.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [
        "10 minutes", "1w", "10S", "-1s", ".5s", "1e3", "", "abc", "10m30s", True, False,
        None, [10], -1, -0.5, math.nan, math.inf,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_duration(value, "views.v.ttl")
    assert err.value.path == "views.v.ttl"
    assert "duration" in err.value.message
    assert repr(value) in err.value.message


# --------------------------------------------------------------------------------- secrets

SECRET = "s3cr3t-Pa55"


def test_repr_of_config_never_shows_a_password() -> None:
    """repr() and str() of a CacheConfig (logged on startup, shown in tracebacks and by
    debuggers) show redis.url and offline_store.url with their passwords masked."""
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url=f"redis://app:{SECRET}@cache:6379/0"),
        offline_store=OfflineStoreConfig(url=f"postgresql://reader:{SECRET}@db/features"),
    )
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    for section in (config.redis, config.offline_store):  # each section's own repr too
        assert SECRET not in repr(section) and "***" in repr(section), repr(section)


def test_file_error_never_shows_the_password_of_a_url(tmp_path: Path) -> None:
    text = f"redis:\n  url: redis://app:{SECRET}@cache:6379/0\n  key_prefix: 'a b'\n" + MINIMAL
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        f"http://app:{SECRET}@cache:6379/0",  # wrong scheme
        f"redis://app:{SECRET}@cache:notaport/0",  # unparsable port
        f"redis://:{SECRET}@cache:6379/0?socket_timeout=abc",  # bad query option
        f"unix://app:{SECRET}@/run/redis.sock?db=zero",  # bad db option
        f"rediss://app:{SECRET}@cache:6379/0?ssl_check_hostname=x&max_connections=lots",
    ],
)
def test_bad_redis_url_error_never_shows_the_password(tmp_path: Path, url: str) -> None:
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url=url),
        offline_store=OfflineStoreConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
    )
    with pytest.raises(ConfigError) as err:
        FeatureCache(config)
    assert err.value.path == "redis.url"
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://cache:6379/0?password={SECRET}&socket_timeout=abc",
        f"http://cache:6379/0?password={SECRET}",
        f"unix:///run/redis.sock?db=0&password={SECRET}&max_connections=lots",
    ],
)
def test_query_string_password_is_masked_too(tmp_path: Path, url: str) -> None:
    """redis-py also takes a password from a ``?password=`` query option, so safe_redis_url,
    and with it every URL error, masks that option as well as the userinfo part."""
    assert SECRET not in safe_redis_url(url)
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url=url),
        offline_store=OfflineStoreConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
    )
    with pytest.raises(ConfigError) as err:
        FeatureCache(config)
    assert SECRET not in str(err.value)


def test_redis_url_that_urlsplit_rejects_is_a_config_error(tmp_path: Path) -> None:
    """A URL urlsplit() rejects (an unbalanced IPv6 bracket) is a ConfigError at redis.url,
    without the password, not a bare ValueError("Invalid IPv6 URL")."""
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url=f"redis://app:{SECRET}@[::1/0"),
        offline_store=OfflineStoreConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
    )
    with pytest.raises(ConfigError) as err:
        FeatureCache(config)
    assert err.value.path == "redis.url"
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        f"nosuchdb://reader:{SECRET}@db/features",
        f"postgresql+nodriver://reader:{SECRET}@db/features",
        f"not a url reader:{SECRET}",
    ],
)
def test_bad_offline_url_error_never_shows_the_password(url: str) -> None:
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url="redis://127.0.0.1:1/0"),
        offline_store=OfflineStoreConfig(url=url),
    )
    with pytest.raises(ConfigError) as err:
        FeatureCache(config)
    assert err.value.path == "offline_store.url"
    assert SECRET not in str(err.value)


def test_offline_url_with_bad_port_is_a_config_error() -> None:
    """A non-numeric port in the offline URL is a ConfigError at offline_store.url from
    FeatureCache(), without the password, not a bare ValueError from SQLAlchemy's URL parser."""
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url="redis://127.0.0.1:1/0"),
        offline_store=OfflineStoreConfig(url=f"postgresql://reader:{SECRET}@db:badport/features"),
    )
    with pytest.raises(ConfigError) as err:
        FeatureCache(config)
    assert err.value.path == "offline_store.url"
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"redis://app:{SECRET}@cache:6379/0", "redis://app:***@cache:6379/0"),
        (f"redis://:{SECRET}@cache/0", "redis://:***@cache/0"),
        (f"rediss://app:{SECRET}@cache:6380/0?ssl_cert_reqs=required",
         "rediss://app:***@cache:6380/0?ssl_cert_reqs=required"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
    ],
)
def test_safe_redis_url(url: str, masked: str) -> None:
    assert safe_redis_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://reader:{SECRET}@db:5432/features",
        f"mysql+pymysql://reader:{SECRET}@db/features?charset=utf8mb4",
        "garbage that is not a url",
    ],
)
def test_safe_url_masks_sql_passwords(url: str) -> None:
    masked = safe_url(url)
    assert SECRET not in masked
    if "://" in url:
        assert "reader:***@db" in masked


def test_schema_error_is_a_config_error() -> None:
    assert issubclass(SchemaError, ConfigError)
    error = SchemaError("column 'x' does not exist", "views.v.features.x", "f.yaml")
    assert (error.path, error.source) == ("views.v.features.x", "f.yaml")
    assert str(error) == "f.yaml: views.v.features.x: column 'x' does not exist"


def test_pool_size_reaches_the_sql_engine() -> None:
    """offline_store.pool_size is passed to create_engine: the pool has the
    configured size, not SQLAlchemy's default of 5."""
    config = CacheConfig(
        views=(a_view(),), redis=RedisConfig(url="redis://127.0.0.1:1/0"),
        offline_store=OfflineStoreConfig(
            url="postgresql+psycopg://reader@127.0.0.1:1/features", pool_size=8),
    )
    with FeatureCache(config) as cache:  # nothing connects until the first read
        assert cache.engine.pool.size() == 8  # type: ignore[attr-defined]


def test_env_override_matches_keys_case_insensitively_and_creates_sections(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "views:\n  UserStats:\n    table: t\n    entity: id\n    event_timestamp: ts\n"
        "    features:\n      CTR: float, 10m\n"
    )
    config = load_config(path, env={
        "FEATCACHE__VIEWS__USERSTATS__FEATURES__CTR__MAX_AGE": "20m",
        "FEATCACHE__DEFAULTS__NEGATIVE_TTL": "5s",
        "FEATCACHE__VIEWS__USERSTATS__FEATURES__CTR": "int, 1h",
    })
    view = config.view("UserStats")
    assert view.negative_ttl == 5.0
    # sorted order: the whole-feature shorthand is applied before its MAX_AGE
    assert view.features[0].type.value == "int"
    assert view.features[0].max_age == 20 * 60
