"""Inputs at the edges of the public API, checked end to end on real servers: ids and
values that are not UTF-8 text or hold a NUL, timestamps beyond a UTC datetime, a feature
named like the id column. Each test failed before its fix (the 2026-11-27 review)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import redis
from featdata import STATS_FEATURES, T0, insert, make_cache, make_table, make_view, stats_row

from featcache import (
    ConfigError,
    Feature,
    FeatureCache,
    InvalidEntityId,
    InvalidRequest,
    SchemaError,
    Status,
)


def _str_cache(target: Any, redis_url: str, key_prefix: str, **options: Any) -> FeatureCache:
    engine = target.engine()
    table = make_table(engine, target.schema, "acct", STATS_FEATURES, entity_type="str")
    insert(engine, table, [stats_row("alice")])
    view = make_view("acct", "acct", target.schema, entity_type="str")
    return make_cache([view], redis_url, target.url, key_prefix, **options)


def _int_cache(target: Any, redis_url: str, key_prefix: str, features: Any = STATS_FEATURES,
               rows: Any = None) -> FeatureCache:
    engine = target.engine()
    table = make_table(engine, None, "stats", features)
    insert(engine, table, [stats_row(i) for i in (1, 2)] if rows is None else rows)
    view = make_view("user", "stats", None, features=features)
    return make_cache([view], redis_url, target.url, key_prefix)


def _row_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return [k for k in client.scan_iter(match=f"{prefix}:*")
            if not k.startswith(f"{prefix}:~".encode())]


# ------------------------------------------------------------- 1. lone surrogates in str input


@pytest.mark.parametrize("bad", ["\ud800", "\udc80" * 200], ids=["short", "long"])
def test_lone_surrogate_id_is_invalid_entity_id(
    sqlite_target: Any, redis_url: str, key_prefix: str, bad: str
) -> None:
    """errors.md: a bad id is InvalidEntityId before any I/O. A str with a lone surrogate
    cannot be a Redis key or a SQL parameter (not UTF-8); a raw UnicodeEncodeError escaped
    before (from redis-py packing MGET for a short id, from check_id's .encode() for a long
    one)."""
    cache = _str_cache(sqlite_target, redis_url, key_prefix)
    try:
        with pytest.raises(InvalidEntityId):
            cache.get_features([bad], ["ctr"])
    finally:
        cache.close()


def test_lone_surrogate_id_in_invalidate_is_invalid_entity_id(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    cache = _str_cache(sqlite_target, redis_url, key_prefix)
    try:
        with pytest.raises(InvalidEntityId):
            cache.invalidate("acct", ["\udc80"])
    finally:
        cache.close()


def test_put_rows_lone_surrogate_str_value_is_invalid_request_before_io(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """errors.md put_rows: a value that does not fit is InvalidRequest naming row and column,
    and 'rows are validated and encoded completely before anything is sent'. Before: a raw
    UnicodeEncodeError from msgpack in RowCodec.encode_many, after ensure_epochs had written
    the view's epoch key."""
    cache = _str_cache(sqlite_target, redis_url, key_prefix)
    try:
        with pytest.raises(InvalidRequest):
            cache.put_rows("acct", [stats_row("bob", country="x\ud800")])
        assert redis_client.exists(f"{key_prefix}:~acct:epoch") == 0, "I/O before the error"
    finally:
        cache.close()


# ------------------------------------------------ 2. a feature named entity_id in to_arrow/pandas


def test_a_feature_named_entity_id_is_refused() -> None:
    """'entity_id' was a legal feature name, and to_arrow() wrote the ids and then that
    feature's values under the same column: the ids silently became the feature's values, and
    to_pandas() indexed the frame by them. The name is reserved for the id column."""
    with pytest.raises(ConfigError, match=r"id column of FeatureResult\.to_arrow"):
        Feature("entity_id", "int", "1h", column="clicks")
    assert Feature("clicks", "int", "1h", column="entity_id").column == "entity_id"


# ------------------------------------------- 3. timestamps that leave datetime's range in UTC


def _one_sql_row(target: Any, redis_url: str, key_prefix: str, feature: str, ftype: str,
                 event_sql: str, value_sql: str) -> FeatureCache:
    """A cache over a table holding one row for entity 1, inserted as SQL text."""
    cache = _int_cache(target, redis_url, key_prefix, (Feature(feature, ftype, "1h"),), rows=[])
    with target.engine().begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO stats (entity_id, event_ts, {feature}) "
                             f"VALUES (1, {event_sql}, {value_sql})")
    return cache


def test_sql_timestamp_beyond_datetime_range_is_schema_error(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """'9999-12-31 23:00:00-02:00' is year 10000 in UTC: a SchemaError ('a SQL value that
    does not fit the declared type'); a raw OverflowError escaped get_features before."""
    cache = _one_sql_row(sqlite_target, redis_url, key_prefix, "last_seen", "timestamp",
                         "'2026-01-01 00:00:00'", "'9999-12-31 23:00:00-02:00'")
    try:
        with pytest.raises(SchemaError):
            cache.get_features([1], ["last_seen"])
    finally:
        cache.close()


def test_event_time_beyond_datetime_range_is_a_schema_error(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """An event time of year 10000 UTC was stored (int64 microseconds) and answered FILLED,
    and result.event_timestamp() then raised a raw OverflowError (us_to_timestamp). It is a
    SQL value that does not fit its declared type: a SchemaError naming the event timestamp
    and the entity."""
    cache = _one_sql_row(sqlite_target, redis_url, key_prefix, "ctr", "float",
                         "'9999-12-31 23:00:00-02:00'", "0.5")
    try:
        with pytest.raises(SchemaError, match="entity 1: event timestamp") as caught:
            cache.get_features([1], ["ctr"])
        assert caught.value.path == "views.user.event_timestamp"
    finally:
        cache.close()


def test_put_rows_aware_timestamp_near_datetime_min_is_invalid_request(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    """0001-01-01 00:00 at +02:00 is before datetime.min in UTC: InvalidRequest naming the row
    and column (a raw OverflowError from astimezone before)."""
    cache = _int_cache(sqlite_target, redis_url, key_prefix)
    early = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    try:
        with pytest.raises(InvalidRequest):
            cache.put_rows("user", [stats_row(3, ts=T0, last_seen=early)])
    finally:
        cache.close()


# ------------------------------------------------- 4. NUL in a str id on PostgreSQL


@pytest.mark.parametrize("sql_target", ["postgresql"], indirect=True)
def test_nul_in_str_id_does_not_fail_the_other_ids_on_postgres(
    sql_target: Any, redis_url: str, key_prefix: str
) -> None:
    """'a\\x00b' passed id validation (and works on SQLite), but PostgreSQL text cannot hold
    NUL: the whole chunk's query failed, so the valid 'alice' was UNAVAILABLE (on_sql_error:
    mark), or the whole call raised OfflineStoreError (raise). It is InvalidEntityId before
    any I/O, and the valid id alone is answered."""
    cache = _str_cache(sql_target, redis_url, key_prefix, on_sql_error="mark")
    try:
        with pytest.raises(InvalidEntityId, match="NUL"):
            cache.get_features(["alice", "a\x00b"], ["ctr"])
        assert cache.get_features(["alice"], ["ctr"]).status("alice", "ctr") is Status.FILLED
    finally:
        cache.close()
