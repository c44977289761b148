"""Bad inputs on real servers: what each one raises, and that nothing is read or written first.

Every call's arguments are validated before any I/O, so a bad call costs no Redis command and
no SQL query; that is asserted here by counting both on the cache's own connections (a counting
redis-py connection class and SQLAlchemy events), which stays exact on a shared server. Inputs
that are not errors (empty and duplicate id lists, non-ASCII ids, undecodable Redis values) get
their documented behaviour checked instead. The table in ``docs/errors.md`` lists every case.
"""

from __future__ import annotations

import datetime as dt
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import sqlalchemy as sa
from redis.connection import parse_url
from wire import command_names

from featcache import (
    AmbiguousFeature,
    BackendError,
    CacheConfig,
    CacheUnavailable,
    ConfigError,
    EmbeddedServerError,
    FeatcacheError,
    Feature,
    FeatureCache,
    FeatureView,
    InvalidEntityId,
    InvalidRequest,
    LimitsConfig,
    OfflineStoreConfig,
    OfflineStoreError,
    OfflineStoreUnavailable,
    RedisConfig,
    SchemaError,
    Status,
    UnknownFeature,
    UnknownView,
)
from featcache.codec import RowCodec

# ------------------------------------------------------------------------------------ data

#: Naive UTC, as SQLite stores it; featcache reads naive timestamps as UTC.
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
T0_UTC = T0.replace(tzinfo=dt.UTC)

USER_FEATURES = (
    Feature("ctr_7d", "float", "10m"),
    Feature("clicks", "int", "1h"),
    Feature("score", "float", "1h"),
)
ITEM_FEATURES = (Feature("clicks", "int", "1h"), Feature("price", "float", "1h"))
ACCOUNT_FEATURES = (Feature("plan", "str", "1h"),)

USER_IDS = range(1, 6)
ITEM_IDS = range(1, 4)
#: String ids that must work as given: non-ASCII, key-syntax characters, whitespace, and the
#: longest allowed (512 bytes, the default max_id_length) in 1-byte and 2-byte characters.
STR_IDS = (
    "alice", "ü", "用户", "🙂", "a:b", "{user}", "a:b:{c}", "with space", " lead", "tab\tnl\n",
    "x" * 512, "ü" * 256,
)
USER_NAMES = ["ctr_7d", "user:clicks", "score"]


def user_row(i: int) -> dict[str, Any]:
    return {"user_id": i, "event_ts": T0, "ctr_7d": i / 10, "clicks": i * 10, "score": i + 0.5}


def user_values(i: int) -> dict[str, Any]:
    return {"ctr_7d": i / 10, "user:clicks": i * 10, "score": i + 0.5}


def plan_of(account: str) -> str:
    return f"plan-{STR_IDS.index(account)}"


def make_table(
    engine: sa.Engine,
    schema: str | None,
    name: str,
    entity: str,
    entity_type: sa.types.TypeEngine[Any],
    columns: dict[str, sa.types.TypeEngine[Any]],
    rows: list[dict[str, Any]],
) -> sa.Table:
    table = sa.Table(
        name,
        sa.MetaData(schema=schema),
        sa.Column(entity, entity_type),
        sa.Column("event_ts", sa.DateTime()),
        *(sa.Column(col, col_type) for col, col_type in columns.items()),
        mysql_charset="utf8mb4",
    )
    table.create(engine)
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
    return table


def make_user_table(engine: sa.Engine, schema: str | None, name: str = "user_stats") -> sa.Table:
    return make_table(
        engine, schema, name, "user_id", sa.BigInteger(),
        {"ctr_7d": sa.Double(), "clicks": sa.BigInteger(), "score": sa.Double()},
        [user_row(i) for i in USER_IDS],
    )


def user_view(schema: str | None, features: tuple[Feature, ...] = USER_FEATURES,
              **changes: Any) -> FeatureView:
    fields: dict[str, Any] = {
        "name": "user", "table": "user_stats", "schema": schema, "entity_column": "user_id",
        "event_timestamp_column": "event_ts", "features": features,
    }
    fields.update(changes)
    return FeatureView(**fields)


# ------------------------------------------------------------------------- I/O recording


@dataclass
class IO:
    """Everything the cache sent: Redis commands and SQL statements, on its own connections."""

    redis_sends: int = 0
    redis_commands: list[str] = field(default_factory=list)
    sql_statements: list[str] = field(default_factory=list)
    sql_connects: int = 0

    def reset(self) -> None:
        self.redis_sends = self.sql_connects = 0
        self.redis_commands.clear()
        self.sql_statements.clear()

    def assert_none(self) -> None:
        assert self.redis_commands == [], "Redis commands were sent"
        assert self.redis_sends == 0, "bytes were sent to Redis"
        assert self.sql_statements == [], "SQL statements were executed"
        assert self.sql_connects == 0, "an SQL connection was opened"

    @property
    def feature_queries(self) -> list[str]:
        return [s for s in self.sql_statements if "fc_latest" in s]


def counting_redis(redis_url: str, io: IO) -> redis.Redis:
    """A real client whose connections record every command they send (health-check PINGs
    included, which only happen after 30 idle seconds)."""
    base: type[redis.Connection] = parse_url(redis_url).get("connection_class", redis.Connection)

    class Counting(base):  # type: ignore[misc, valid-type]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            # every command passes here: featcache's own packed ones and redis-py's
            io.redis_sends += 1
            packed = [command] if isinstance(command, bytes | str) else list(command)
            io.redis_commands.extend(command_names(packed))
            super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    return redis.Redis(connection_pool=pool)


def watch_sql(engine: sa.Engine, io: IO) -> None:
    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        io.sql_statements.append(statement)

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        io.sql_connects += 1

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "connect", on_connect)


@dataclass
class Bench:
    cache: FeatureCache
    io: IO
    inspect: redis.Redis  # the test's own client, for arranging and checking Redis state
    prefix: str
    engine: sa.Engine  # the test's own engine, for arranging SQL state
    url: str  # the SQL URL the cache reads
    url_redis: str  # the Redis URL it talks to

    def key(self, view: str, entity: int | str) -> str:
        return f"{self.prefix}:{view}:{entity}"

    def keys(self) -> list[bytes]:
        """Row keys; the per-view bookkeeping keys (``<prefix>:~...``: epoch, popularity,
        stream) are left out."""
        rows = self.inspect.scan_iter(match=f"{self.prefix}:*", count=1000)
        return sorted(k for k in rows if not k.startswith(f"{self.prefix}:~".encode()))

    def stats(self, view: str = "user") -> dict[str, int]:
        return self.cache.stats().get(view, {})

    def assert_nothing_happened(self) -> None:
        self.io.assert_none()
        assert self.keys() == []


def open_cache(config: CacheConfig, redis_url: str, io: IO, **kwargs: Any) -> FeatureCache:
    """A cache whose I/O ``io`` records from after its construction (one Redis read: see
    ``test_building_a_cache_reads_one_key_and_writes_nothing``)."""
    client = counting_redis(redis_url, io)
    cache = FeatureCache(config, redis_client=client, **kwargs)
    watch_sql(cache.engine, io)
    io.reset()
    return cache


@pytest.fixture
def bench(
    sqlite_target: Any, redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> Iterator[Bench]:
    """Three views on SQLite: ``user`` and ``item`` both declare ``clicks``; ``account`` has
    string ids."""
    engine = sqlite_target.engine()
    make_user_table(engine, None)
    make_table(
        engine, None, "item_stats", "item_id", sa.BigInteger(),
        {"clicks": sa.BigInteger(), "price": sa.Double()},
        [{"item_id": i, "event_ts": T0, "clicks": i, "price": i * 1.5} for i in ITEM_IDS],
    )
    make_table(
        engine, None, "account_stats", "account_id", sa.String(600), {"plan": sa.String(50)},
        [{"account_id": a, "event_ts": T0, "plan": plan_of(a)} for a in STR_IDS],
    )
    config = CacheConfig(views=(
            user_view(None),
            FeatureView(name="item", table="item_stats", entity_column="item_id",
                        event_timestamp_column="event_ts", features=ITEM_FEATURES),
            FeatureView(name="account", table="account_stats", entity_column="account_id",
                        entity_type="str", event_timestamp_column="event_ts",
                        features=ACCOUNT_FEATURES),
        ),
        redis=RedisConfig(url=redis_url, key_prefix=key_prefix),
        offline_store=OfflineStoreConfig(url=sqlite_target.url),
    )
    io = IO()
    cache = open_cache(config, redis_url, io)
    try:
        yield Bench(cache, io, redis_client, key_prefix, engine, sqlite_target.url, redis_url)
    finally:
        cache.close()
        cache.redis.close()


def test_building_a_cache_reads_one_key_and_writes_nothing(bench: Bench) -> None:
    """Construction reads one key of the cache's own (the first view's epoch), so a wrong
    password, ACL or database fails there (``CacheConfigError``); it touches SQL not at all
    and writes nothing."""
    io = IO()
    cache = FeatureCache(bench.cache.config, redis_client=counting_redis(bench.url_redis, io))
    try:
        handshake = {"HELLO", "CLIENT", "AUTH", "SELECT"}  # redis-py's, on connecting
        assert [c for c in io.redis_commands if c not in handshake] == ["MGET"]
        assert io.sql_statements == [] and io.sql_connects == 0
        assert bench.keys() == []
    finally:
        cache.close()
        cache.redis.close()


def test_io_recorder_sees_every_round_trip(bench: Bench) -> None:
    """The control for every "nothing happened" assertion below: a real call is recorded."""
    bench.cache.get_features([1, 404], USER_NAMES)
    assert "MGET" in bench.io.redis_commands
    assert any(c in ("EVALSHA", "EVAL") for c in bench.io.redis_commands)
    assert bench.io.redis_sends >= 2
    assert len(bench.io.feature_queries) == 1
    assert bench.io.sql_connects == 1
    assert len(bench.keys()) == 2
    with pytest.raises(AssertionError):
        bench.assert_nothing_happened()


# ---------------------------------------------------------------------- feature references


def test_unknown_feature_names_the_closest(bench: Bench) -> None:
    with pytest.raises(UnknownFeature) as err:
        bench.cache.get_features([1], ["ctr_7"])
    assert isinstance(err.value, KeyError)
    assert isinstance(err.value, InvalidRequest)
    assert err.value.reference == "ctr_7"
    assert "ctr_7d" in err.value.closest
    assert "unknown feature 'ctr_7'; did you mean 'ctr_7d'" in str(err.value)
    bench.assert_nothing_happened()


def test_unknown_qualified_feature_names_the_closest(bench: Bench) -> None:
    with pytest.raises(UnknownFeature) as err:
        bench.cache.get_features([1], ["user:ctr_7"])
    assert err.value.closest[0] == "user:ctr_7d"
    assert "did you mean 'user:ctr_7d'" in str(err.value)
    bench.assert_nothing_happened()


def test_unknown_feature_with_nothing_close(bench: Bench) -> None:
    with pytest.raises(UnknownFeature) as err:
        bench.cache.get_features([1], ["zzzzzz"])
    assert err.value.closest == ()
    assert str(err.value) == "unknown feature 'zzzzzz'"
    bench.assert_nothing_happened()


def test_unknown_view(bench: Bench) -> None:
    with pytest.raises(UnknownView) as err:
        bench.cache.get_features([1], ["usr:ctr_7d"])
    assert isinstance(err.value, KeyError)
    assert err.value.view == "usr"
    assert err.value.known == ("user", "item", "account")
    assert str(err.value) == "unknown feature view 'usr'; known views: user, item, account"
    bench.assert_nothing_happened()


def test_ambiguous_bare_name_lists_the_qualified_names(bench: Bench) -> None:
    with pytest.raises(AmbiguousFeature) as err:
        bench.cache.get_features([1], ["ctr_7d", "clicks"])
    assert isinstance(err.value, InvalidRequest)
    assert err.value.candidates == ("user:clicks", "item:clicks")
    assert "'user:clicks'" in str(err.value) and "'item:clicks'" in str(err.value)
    bench.assert_nothing_happened()
    result = bench.cache.get_features([1], ["item:clicks", "user:clicks"])
    assert result[1] == {"item:clicks": 1, "user:clicks": 10}


def test_feature_names_as_a_single_string(bench: Bench) -> None:
    with pytest.raises(InvalidRequest) as err:
        bench.cache.get_features([1], "ctr_7d")
    assert "not the string 'ctr_7d'" in str(err.value)
    assert "['ctr_7d']" in str(err.value)
    bench.assert_nothing_happened()


@pytest.mark.parametrize("names", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_feature_names(bench: Bench, names: Any) -> None:
    with pytest.raises(InvalidRequest, match="feature_names is empty"):
        bench.cache.get_features([1], names)
    bench.assert_nothing_happened()


@pytest.mark.parametrize("names", [[1], [None], [b"ctr_7d"], [["ctr_7d"]]])
def test_feature_names_that_are_not_strings(bench: Bench, names: Any) -> None:
    with pytest.raises(InvalidRequest):
        bench.cache.get_features([1], names)
    bench.assert_nothing_happened()


def test_features_of_views_with_different_id_types(bench: Bench) -> None:
    with pytest.raises(InvalidRequest, match="different id types") as err:
        bench.cache.get_features([1], ["ctr_7d", "plan"])
    assert "user: int" in str(err.value) and "account: str" in str(err.value)
    bench.assert_nothing_happened()


def test_bad_feature_is_reported_even_with_no_ids(bench: Bench) -> None:
    with pytest.raises(UnknownFeature):
        bench.cache.get_features([], ["ctr_7"])
    bench.assert_nothing_happened()


# ------------------------------------------------------------------------------ entity ids

BAD_INT_IDS = [
    pytest.param(1.5, "float", id="float"),
    pytest.param(1.0, "float", id="whole-float"),
    pytest.param(np.float64(2.0), "float", id="numpy-float"),
    pytest.param("1", "str", id="str"),
    pytest.param({"id": 1}, "dict", id="dict"),
    pytest.param([1], "list", id="list"),
    pytest.param(None, "None", id="None"),
    pytest.param(math.nan, "NaN", id="NaN"),
    pytest.param(b"1", "bytes", id="bytes"),
    pytest.param(True, "bool", id="True"),
    pytest.param(False, "bool", id="False"),
    pytest.param(np.bool_(True), "bool", id="numpy-bool"),
]


@pytest.mark.parametrize(("bad", "word"), BAD_INT_IDS)
@pytest.mark.parametrize("position", ["alone", "after-good-ids"])
def test_bad_id_for_int_view(bench: Bench, bad: Any, word: str, position: str) -> None:
    ids = [bad] if position == "alone" else [5, 6, bad]  # none equal to bad
    with pytest.raises(InvalidEntityId) as err:
        bench.cache.get_features(ids, ["ctr_7d"])
    assert isinstance(err.value, TypeError)
    assert isinstance(err.value, InvalidRequest)
    assert word in str(err.value)
    bench.assert_nothing_happened()


BAD_STR_IDS = [
    pytest.param(7, "int", id="int"),
    pytest.param(7.5, "float", id="float"),
    pytest.param({"id": "a"}, "dict", id="dict"),
    pytest.param(["a"], "list", id="list"),
    pytest.param(None, "None", id="None"),
    pytest.param(math.nan, "NaN", id="NaN"),
    pytest.param(b"alice", "bytes", id="bytes"),
    pytest.param(bytearray(b"alice"), "bytes", id="bytearray"),
    pytest.param(True, "bool", id="bool"),
    pytest.param("", "empty string", id="empty-string"),
]


@pytest.mark.parametrize(("bad", "word"), BAD_STR_IDS)
def test_bad_id_for_str_view(bench: Bench, bad: Any, word: str) -> None:
    with pytest.raises(InvalidEntityId) as err:
        bench.cache.get_features(["alice", bad], ["plan"])
    assert isinstance(err.value, TypeError)
    assert word in str(err.value)
    bench.assert_nothing_happened()


@pytest.mark.parametrize("ids", [[1, True], [1, 1.0], [0, False], [2, np.float64(2.0)]],
                         ids=["1-True", "1-1.0", "0-False", "2-numpy2.0"])
def test_bad_id_equal_to_an_earlier_good_id_is_still_rejected(bench: Bench, ids: list[Any]
                                                              ) -> None:
    """Ids are validated before they are de-duplicated: True == 1 and 1.0 == 1, so a bool or
    float id equal to an earlier int would otherwise vanish into it as a duplicate, and whether
    a call is rejected would depend on the order of its ids."""
    with pytest.raises(InvalidEntityId):
        bench.cache.get_features(ids, ["ctr_7d"])
    bench.assert_nothing_happened()


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 10**30], ids=["2^63", "-2^63-1", "1e30"])
def test_int_id_outside_int64_is_rejected_before_io(bench: Bench, bad: int) -> None:
    """An int id outside int64 is InvalidEntityId before any I/O: no SQL BIGINT can hold it,
    and a driver would otherwise fail on it with an error outside the featcache tree (SQLite's
    bare OverflowError)."""
    with pytest.raises(InvalidEntityId):
        bench.cache.get_features([1, bad], ["ctr_7d"])
    bench.assert_nothing_happened()


def test_int64_extremes_are_valid_ids(bench: Bench) -> None:
    ids = [2**63 - 1, -(2**63)]
    result = bench.cache.get_features(ids, ["ctr_7d"])
    assert [result.status(i, "ctr_7d") for i in ids] == [Status.ABSENT, Status.ABSENT]


@pytest.mark.parametrize("entity_ids", ["1", b"1", 1, None, 1.5],
                         ids=["str", "bytes", "int", "None", "float"])
def test_entity_ids_not_a_list(bench: Bench, entity_ids: Any) -> None:
    with pytest.raises(InvalidRequest, match="entity_ids must be"):
        bench.cache.get_features(entity_ids, ["ctr_7d"])
    bench.assert_nothing_happened()


@pytest.mark.parametrize(
    "make_ids",
    [
        lambda: [np.int64(3), np.int64(1)],
        lambda: [np.int32(3), np.uint8(1)],
        lambda: np.array([3, 1], dtype=np.int64),
        lambda: [3, np.int64(1)],
    ],
    ids=["int64-list", "int32-uint8", "ndarray", "mixed"],
)
def test_numpy_integer_ids_are_accepted(bench: Bench, make_ids: Callable[[], Any]) -> None:
    result = bench.cache.get_features(make_ids(), USER_NAMES)
    assert list(result) == [3, 1]
    assert all(type(k) is int for k in result)
    assert result[3] == user_values(3)
    assert result[np.int64(1)] == user_values(1)
    assert result.status(3, "ctr_7d") is Status.FILLED
    assert bench.inspect.exists(bench.key("user", 3), bench.key("user", 1)) == 2
    again = bench.cache.get_features(make_ids(), USER_NAMES)
    assert again.status(1, "score") is Status.HIT_REDIS


def test_numpy_str_ids_are_accepted(bench: Bench) -> None:
    result = bench.cache.get_features([np.str_("alice")], ["plan"])
    assert list(result) == ["alice"] and type(next(iter(result))) is str
    assert result["alice"] == {"plan": plan_of("alice")}


@pytest.mark.parametrize("ids", [[], (), iter([]), np.array([], dtype=np.int64)],
                         ids=["list", "tuple", "iterator", "ndarray"])
def test_empty_entity_list_does_no_io(bench: Bench, ids: Any) -> None:
    result = bench.cache.get_features(ids, USER_NAMES)
    assert len(result) == 0
    assert list(result) == [] and dict(result) == {}
    assert result.feature_names == tuple(USER_NAMES)
    assert result.to_arrow().num_rows == 0
    assert result.to_arrow().column_names == ["entity_id", *USER_NAMES]
    assert sum(result.status_counts().values()) == 0
    bench.assert_nothing_happened()


def test_duplicate_ids_are_answered_once_in_first_seen_order(bench: Bench) -> None:
    result = bench.cache.get_features([3, 1, 3, 999, 2, 1, 999, 3], USER_NAMES)
    assert list(result) == [3, 1, 999, 2]
    assert len(result) == 4
    assert result[3] == user_values(3) and result[2] == user_values(2)
    assert result.status(999, "ctr_7d") is Status.ABSENT
    stats = bench.stats()
    assert (stats["filled"], stats["absent"], stats["sql_rows"]) == (3, 1, 3)
    assert stats["rows_written"] == 4
    assert len(bench.io.feature_queries) == 1
    table = result.to_arrow()
    assert table.column("entity_id").to_pylist() == [3, 1, 999, 2]


def test_duplicate_str_ids(bench: Bench) -> None:
    result = bench.cache.get_features(["ü", "alice", "ü", "alice", "🙂"], ["plan"])
    assert list(result) == ["ü", "alice", "🙂"]
    assert bench.stats("account")["filled"] == 3


@pytest.mark.slow
def test_100k_ids(bench: Bench) -> None:
    present = [i for i in range(6, 100_000) if i % 3 == 0]
    with bench.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM user_stats"))
        conn.execute(sa.table("user_stats", *(sa.column(c) for c in user_row(0))).insert(),
                     [user_row(i) for i in present])
    ids = list(range(100_000))
    asked = ids + ids[:500][::-1]  # duplicates must not change anything
    result = bench.cache.get_features(asked, ["ctr_7d", "user:clicks"])
    assert len(result) == 100_000
    assert list(result) == ids
    present_set = set(present)
    counts = result.status_counts()
    assert counts[Status.FILLED] == 2 * len(present)
    assert counts[Status.ABSENT] == 2 * (100_000 - len(present))
    for i in (0, 1, 6, 7, 99_999, 99_998, 50_001):
        expected = Status.FILLED if i in present_set else Status.ABSENT
        assert result.status(i, "ctr_7d") is expected, i
        if i in present_set:
            assert result[i] == {"ctr_7d": i / 10, "user:clicks": i * 10}
        else:
            assert result[i] == {"ctr_7d": None, "user:clicks": None}
    assert len(bench.io.feature_queries) == 100  # chunks of sql_chunk_size=1000
    table = result.to_arrow(with_status=True)
    assert table.num_rows == 100_000
    assert table.column("ctr_7d").null_count == 100_000 - len(present)

    bench.io.reset()
    again = bench.cache.get_features(ids, ["ctr_7d"])
    assert again.status_counts() == {
        Status.HIT_REDIS: len(present), Status.ABSENT: 100_000 - len(present)}
    assert bench.io.sql_statements == []
    assert bench.stats()["negative_hit"] == 100_000 - len(present)


def test_string_id_over_max_id_length(bench: Bench) -> None:
    for bad, size in (("x" * 513, 513), ("ü" * 257, 514), ("🙂" * 129, 516)):
        with pytest.raises(InvalidEntityId) as err:
            bench.cache.get_features(["alice", bad], ["plan"])
        assert f"{size} bytes" in str(err.value)
        assert "limit of 512 bytes" in str(err.value)
        assert "max_id_length" in str(err.value)
    bench.assert_nothing_happened()


def test_max_id_length_is_configurable(
    sqlite_target: Any, redis_url: str, key_prefix: str
) -> None:
    make_table(sqlite_target.engine(), None, "account_stats", "account_id", sa.String(600),
               {"plan": sa.String(50)}, [])
    config = CacheConfig(
        views=(FeatureView(name="account", table="account_stats", entity_column="account_id",
                           entity_type="str", event_timestamp_column="event_ts",
                           features=ACCOUNT_FEATURES),),
        redis=RedisConfig(url=redis_url, key_prefix=key_prefix),
        offline_store=OfflineStoreConfig(url=sqlite_target.url),
        limits=LimitsConfig(max_id_length=8),
    )
    io = IO()
    with open_cache(config, redis_url, io) as cache:
        with pytest.raises(InvalidEntityId, match="limit of 8 bytes"):
            cache.get_features(["123456789"], ["plan"])
        with pytest.raises(InvalidEntityId, match="10 bytes"):
            cache.get_features(["üüüüü"], ["plan"])  # 5 characters, 10 bytes
        io.assert_none()
        result = cache.get_features(["12345678", "üüüü"], ["plan"])
        assert result.status("12345678", "plan") is Status.ABSENT
        cache.redis.close()


def test_non_ascii_and_key_syntax_ids_round_trip(bench: Bench) -> None:
    missing = "not there 🙂"
    ids = [*STR_IDS, missing]
    first = bench.cache.get_features(ids, ["plan"])
    assert list(first) == ids
    for account in STR_IDS:
        assert first[account] == {"plan": plan_of(account)}, account
        assert first.status(account, "plan") is Status.FILLED
        assert first.event_timestamp(account, "plan") == T0_UTC
    assert first.status(missing, "plan") is Status.ABSENT
    # each id is stored under exactly its own UTF-8 key: no escaping, no collisions
    expected_keys = sorted(bench.key("account", a).encode() for a in ids)
    assert bench.keys() == expected_keys

    second = bench.cache.get_features(ids, ["plan"])
    assert dict(second) == dict(first)
    assert {second.status(a, "plan") for a in STR_IDS} == {Status.HIT_REDIS}
    assert second.status(missing, "plan") is Status.ABSENT
    assert second.to_arrow().column("entity_id").to_pylist() == ids


def test_string_ids_are_case_and_space_sensitive(bench: Bench) -> None:
    result = bench.cache.get_features(["alice", "Alice", "alice "], ["plan"])
    assert [result.status(a, "plan") for a in result] == [
        Status.FILLED, Status.ABSENT, Status.ABSENT]


# -------------------------------------------------------------------- undecodable values


def _other_schema_value(real: bytes) -> bytes:
    """A well-formed row of a different feature list (as after an incompatible change)."""
    other = user_view(None, features=(Feature("ctr_7d", "str", "10m"), *USER_FEATURES[1:]))
    return RowCodec(other).encode(["x", 10, 1.5], 1, 1)


CORRUPTIONS = [
    pytest.param(lambda real: b"\x00\xffnot a featcache row", id="garbage"),
    pytest.param(lambda real: b"", id="empty-string"),
    pytest.param(lambda real: pickle.dumps({"ctr_7d": 99.0}), id="pickle"),
    pytest.param(lambda real: real[:1] + bytes([3]) + real[2:], id="layout-version-3"),
    pytest.param(lambda real: real[:1] + bytes([1]) + real[2:], id="layout-version-1"),
    pytest.param(lambda real: b"\x01R" + real[3:], id="layout-1-head"),
    pytest.param(lambda real: b"\x97" + real[1:], id="array-of-7"),
    pytest.param(lambda real: real[:2] + b"Z" + real[3:], id="unknown-kind"),
    pytest.param(lambda real: real[:-3], id="truncated-body"),
    pytest.param(lambda real: real[:12], id="head-only"),
    pytest.param(lambda real: real[:5], id="truncated-head"),
    pytest.param(lambda real: real + b"\x00", id="trailing-byte"),
    pytest.param(_other_schema_value, id="other-schema"),
    # well-formed rows of this very schema and epoch whose values are of another type than
    # declared (as a foreign or buggy writer leaves them): never a hit to_arrow() rejects
    pytest.param(lambda real: _retyped(real, 1, "x"), id="int-holds-str"),
    pytest.param(lambda real: _retyped(real, 1, 1.5), id="int-holds-float"),
    pytest.param(lambda real: _retyped(real, 1, [1, 2]), id="int-holds-list"),
    pytest.param(lambda real: _retyped(real, 1, True), id="int-holds-bool"),
    pytest.param(lambda real: _retyped(real, 1, 2**63), id="int-beyond-int64"),
    pytest.param(lambda real: _retyped(real, 0, b"\x00" * 8), id="float-holds-bytes"),
    pytest.param(lambda real: _retyped(real, 2, {"a": 1.0}), id="float-holds-map"),
    pytest.param(lambda real: _rebooked(real, 5, "1"), id="loaded-at-holds-str"),
]


def _retyped(real: bytes, index: int, value: object) -> bytes:
    """``real`` with feature ``index`` replaced by ``value``: head, schema fingerprint,
    epoch and timestamps untouched, so only the value's type is wrong."""
    body = msgpack.unpackb(real, timestamp=3)
    body[7][index] = value
    return _repacked(real, body)


def _rebooked(real: bytes, index: int, value: object) -> bytes:
    """``real`` with element ``index`` of its msgpack array (after the 12 fixed bytes: the
    event time is element 2) replaced by ``value``."""
    body = msgpack.unpackb(real, timestamp=3)
    body[index] = value
    return _repacked(real, body)


def _repacked(real: bytes, body: list[object]) -> bytes:
    """The 12 fixed bytes of ``real``, then the elements of ``body`` after them."""
    return real[:12] + msgpack.packb(body[3:], datetime=True)[1:]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_undecodable_value_is_a_miss(bench: Bench, corrupt: Callable[[bytes], bytes]) -> None:
    key = bench.key("user", 1)
    bench.cache.get_features([1], USER_NAMES)
    real = bench.inspect.get(key)
    assert real is not None
    bench.inspect.set(key, corrupt(real))
    before = bench.stats()

    result = bench.cache.get_features([1, 2], USER_NAMES)

    assert result[1] == user_values(1)
    assert result.status(1, "ctr_7d") is Status.FILLED
    assert result.event_timestamp(1, "ctr_7d") == T0_UTC
    assert result.status(2, "ctr_7d") is Status.FILLED
    after = bench.stats()
    assert after["decode_errors"] == before["decode_errors"] + 1
    assert after["filled"] == before["filled"] + 2
    # the fill replaced the bad value: the next read is a hit again
    assert bench.cache.get_features([1], USER_NAMES).status(1, "score") is Status.HIT_REDIS
    assert bench.stats()["decode_errors"] == after["decode_errors"]


def test_undecodable_value_of_an_absent_entity(bench: Bench) -> None:
    bench.inspect.set(bench.key("user", 404), b"garbage")
    result = bench.cache.get_features([404, 1], USER_NAMES)
    assert result.status(404, "ctr_7d") is Status.ABSENT
    assert result[404] == dict.fromkeys(USER_NAMES)
    assert result.status(1, "ctr_7d") is Status.FILLED
    assert bench.stats()["decode_errors"] == 1


def test_undecodable_value_of_an_absent_entity_is_repaired(bench: Bench) -> None:
    """Undecodable bytes at the key of an entity SQL does not have are replaced by the negative
    entry, as a present entity's are by its row (test_undecodable_value_is_a_miss): the next
    read is a negative hit, not another decode error and another SQL query on every read
    (forever, when the garbage has no TTL)."""
    bench.inspect.set(bench.key("user", 404), b"garbage")
    bench.cache.get_features([404], USER_NAMES)
    bench.io.reset()
    again = bench.cache.get_features([404], USER_NAMES)
    assert again.status(404, "ctr_7d") is Status.ABSENT
    assert bench.stats()["decode_errors"] == 1
    assert bench.stats()["negative_hit"] == 1
    assert bench.io.feature_queries == []


def test_key_of_another_redis_type_is_a_miss(bench: Bench) -> None:
    key = bench.key("user", 1)
    bench.inspect.hset(key, "field", "value")
    result = bench.cache.get_features([1, 2], USER_NAMES)
    assert result[1] == user_values(1)
    assert result.status(1, "ctr_7d") is Status.FILLED
    # the key space under the prefix is featcache's ("The Redis key space" in docs/errors.md):
    # the fill replaces the foreign value instead of failing its whole chunk with WRONGTYPE
    assert bench.inspect.type(key) == b"string"
    assert bench.stats()["fill_errors"] == 0
    assert bench.cache.get_features([1], USER_NAMES).status(1, "ctr_7d") is Status.HIT_REDIS


# --------------------------------------------------------------------- schema at first use


def test_missing_column_is_a_schema_error_at_first_use(
    sql_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    make_user_table(sql_target.engine(), sql_target.schema)
    features = (Feature("ctr", "float", "10m", column="ctr_7"), *USER_FEATURES[1:])
    config = CacheConfig(
        views=(user_view(sql_target.schema, features),),
        redis=RedisConfig(url=redis_url, key_prefix=key_prefix),
        offline_store=OfflineStoreConfig(url=sql_target.url),
    )
    io = IO()
    with open_cache(config, redis_url, io) as cache:
        io.assert_none()  # constructing the cache needs no database
        for _ in range(2):  # and the error does not go away on the next call
            with pytest.raises(SchemaError) as err:
                cache.get_features([1, 2], ["ctr", "clicks"])
            error = err.value
            assert isinstance(error, ConfigError)
            assert error.path == "views.user.features.ctr"
            message = str(error)
            assert "column 'ctr_7' does not exist" in message
            assert "did you mean 'ctr_7d'?" in message
            table = f"{sql_target.schema}.user_stats" if sql_target.schema else "user_stats"
            assert f"table '{table}'" in message
        assert io.feature_queries == []
        assert "SET" not in io.redis_commands and "EVALSHA" not in io.redis_commands
        assert list(redis_client.scan_iter(match=f"{key_prefix}:*")) == []
        cache.redis.close()


@pytest.mark.parametrize(
    ("changes", "path", "column"),
    [
        ({"entity_column": "userid"}, "views.user.entity.column", "userid"),
        ({"event_timestamp_column": "event_time"}, "views.user.event_timestamp", "event_time"),
        ({"updated_at_column": "updated"}, "views.user.updated_at", "updated"),
    ],
)
def test_missing_key_column_is_a_schema_error(
    bench: Bench, changes: dict[str, str], path: str, column: str
) -> None:
    config = CacheConfig(views=(user_view(None, **changes),),
                         redis=RedisConfig(url="redis://unused", key_prefix=bench.prefix),
                         offline_store=OfflineStoreConfig(url=bench.url))
    with (
        FeatureCache(config, redis_client=bench.cache.redis) as cache,
        pytest.raises(SchemaError) as err,
    ):
        cache.get_features([1], ["ctr_7d"])
    assert err.value.path == path
    assert f"column '{column}' does not exist in table 'user_stats'" in str(err.value)


def test_missing_table_is_a_schema_error(bench: Bench) -> None:
    config = CacheConfig(views=(user_view(None, table="user_stat"),),
                         redis=RedisConfig(url="redis://unused", key_prefix=bench.prefix),
                         offline_store=OfflineStoreConfig(url=bench.url))
    with (
        FeatureCache(config, redis_client=bench.cache.redis) as cache,
        pytest.raises(SchemaError) as err,
    ):
        cache.get_features([1], ["ctr_7d"])
    assert err.value.path == "views.user.table"
    assert "table 'user_stat' does not exist" in str(err.value)
    assert bench.keys() == []


def test_missing_table_in_a_schema(sql_target: Any, redis_url: str, key_prefix: str) -> None:
    config = CacheConfig(views=(user_view(sql_target.schema, table="nope"),),
                         redis=RedisConfig(url=redis_url, key_prefix=key_prefix),
                         offline_store=OfflineStoreConfig(url=sql_target.url))
    with FeatureCache(config) as cache, pytest.raises(SchemaError) as err:
        cache.get_features([1], ["ctr_7d"])
    qualified = f"{sql_target.schema}.nope" if sql_target.schema else "nope"
    assert f"table '{qualified}' does not exist" in str(err.value)
    assert err.value.path == "views.user.table"


def test_schema_error_names_the_config_file(
    sqlite_target: Any, redis_url: str, key_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_user_table(sqlite_target.engine(), None)
    path = tmp_path / "featcache.yaml"
    path.write_text(
        "views:\n"
        "  user:\n"
        "    table: user_stats\n"
        "    entity: user_id\n"
        "    event_timestamp: event_ts\n"
        "    features:\n"
        "      ctr_7d: float, 10m\n"
        "      clicks: {type: int, max_age: 1h, column: click}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("FEATCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("FEATCACHE_OFFLINE_URL", sqlite_target.url)
    monkeypatch.setenv("FEATCACHE_KEY_PREFIX", key_prefix)
    with FeatureCache.from_config(path) as cache, pytest.raises(SchemaError) as err:
        cache.get_features([1], ["ctr_7d"])
    assert err.value.source == str(path)
    assert err.value.path == "views.user.features.clicks"
    assert str(err.value).startswith(f"{path}: views.user.features.clicks: column 'click'")
    assert "did you mean 'clicks'?" in str(err.value)


# ---------------------------------------------------------------------------- put_rows


def test_put_rows_unknown_view(bench: Bench) -> None:
    with pytest.raises(UnknownView) as err:
        bench.cache.put_rows("usr", [user_row(1)])
    assert "known views: user, item, account" in str(err.value)
    stranger = user_view(None, name="stranger")
    with pytest.raises(UnknownView, match="'stranger'"):
        bench.cache.put_rows(stranger, [user_row(1)])
    bench.assert_nothing_happened()


def test_put_rows_lacking_a_feature_column(bench: Bench) -> None:
    rows = [{k: v for k, v in user_row(i).items() if k != "score"} for i in (1, 2)]
    with pytest.raises(InvalidRequest) as err:
        bench.cache.put_rows("user", rows)
    assert "lack the column(s) score" in str(err.value)
    bench.assert_nothing_happened()


def test_put_rows_lacking_the_entity_and_timestamp_columns(bench: Bench) -> None:
    rows = [{"ctr_7d": 0.1, "clicks": 1, "score": 1.0}]
    with pytest.raises(InvalidRequest, match="lack the column\\(s\\) user_id, event_ts"):
        bench.cache.put_rows("user", rows)
    bench.assert_nothing_happened()


def test_put_rows_one_row_lacking_a_column(bench: Bench) -> None:
    """In a list of dicts every row must have the same keys: a row without ``score`` is
    rejected, naming the row and the key, like a table lacking the column, rather than being
    written with score=None (a real cached null)."""
    partial = {k: v for k, v in user_row(2).items() if k != "score"}
    with pytest.raises(InvalidRequest) as err:
        bench.cache.put_rows("user", [user_row(1), partial])
    assert "row 1" in str(err.value) and "score" in str(err.value)
    bench.assert_nothing_happened()


@pytest.mark.parametrize(
    ("column", "value", "fragment"),
    [
        ("clicks", "abc", "expected an int"),
        ("clicks", 1.5, "expected an int"),
        ("clicks", 2**63, "64-bit"),
        ("clicks", -(2**63) - 1, "64-bit"),
        ("ctr_7d", "0.5", "expected a float"),
        ("event_ts", "yesterday", "ISO 8601"),
    ],
    ids=["str-for-int", "float-for-int", "int-over-int64", "int-under-int64", "str-for-float",
         "bad-timestamp"],
)
def test_put_rows_value_of_the_wrong_type_names_row_and_column(
    bench: Bench, column: str, value: Any, fragment: str
) -> None:
    """The row index, the entity id, the column and the reason are in the message, so the user
    does not have to guess which of several int features held 'abc'."""
    rows = [user_row(1), {**user_row(2), column: value}]
    with pytest.raises(InvalidRequest) as err:
        bench.cache.put_rows("user", rows)
    message = str(err.value)
    assert "put_rows('user'), row 1 (id 2)" in message
    assert fragment in message
    bench.assert_nothing_happened()
    assert column in message


@pytest.mark.parametrize("bad", [None, "1", 1.5, True, b"1"],
                         ids=["None", "str", "float", "bool", "bytes"])
def test_put_rows_bad_entity_id(bench: Bench, bad: Any) -> None:
    with pytest.raises(InvalidEntityId):
        bench.cache.put_rows("user", [user_row(1), {**user_row(2), "user_id": bad}])
    bench.assert_nothing_happened()


def test_put_rows_entity_id_outside_int64(bench: Bench) -> None:
    """put_rows range-checks int ids like get_features: 2**64 is InvalidEntityId and nothing
    is written, never a row under ``<prefix>:user:18446744073709551616``, an id no SQL BIGINT
    column can hold."""
    with pytest.raises(InvalidEntityId):
        bench.cache.put_rows("user", [{**user_row(1), "user_id": 2**64}])
    bench.assert_nothing_happened()


def test_put_rows_too_long_string_id(bench: Bench) -> None:
    row = {"account_id": "x" * 513, "event_ts": T0, "plan": "p"}
    with pytest.raises(InvalidEntityId, match="513 bytes"):
        bench.cache.put_rows("account", [row])
    bench.assert_nothing_happened()


@pytest.mark.parametrize("rows", ["abc", b"abc", 5, [1, 2], [user_row(1), "row"]],
                         ids=["str", "bytes", "int", "list-of-ints", "one-non-dict"])
def test_put_rows_not_rows(bench: Bench, rows: Any) -> None:
    with pytest.raises(InvalidRequest):
        bench.cache.put_rows("user", rows)
    bench.assert_nothing_happened()


def test_put_rows_empty_writes_nothing(bench: Bench) -> None:
    assert bench.cache.put_rows("user", []).written == 0
    bench.assert_nothing_happened()


def test_put_rows_good_rows_after_the_bad_cases(bench: Bench) -> None:
    """The control: the same rows, complete and well typed, are written and read back."""
    report = bench.cache.put_rows("user", [user_row(1), user_row(2)])
    assert (report.written, report.skipped_older) == (2, 0)
    result = bench.cache.get_features([1, 2], USER_NAMES)
    assert result[2] == user_values(2)
    assert result.status(2, "ctr_7d") is Status.HIT_REDIS


def test_sql_value_that_does_not_fit_its_declared_type(bench: Bench) -> None:
    """SQLite stores what it is given: text in a DOUBLE column is a SchemaError naming the
    entity, the column and the feature's type key, not a silent cast or a wrong answer."""
    with bench.engine.begin() as conn:
        conn.execute(sa.text("UPDATE user_stats SET score = 'high' WHERE user_id = 2"))
    with pytest.raises(SchemaError) as err:
        bench.cache.get_features([1, 2], USER_NAMES)
    assert err.value.path == "views.user.features.score.type"
    assert "entity 2" in str(err.value) and "'score'" in str(err.value)
    assert "not float" in str(err.value)
    assert bench.keys() == []  # the good row of the same batch is not written either


# ------------------------------------------------------------------------ exception tree


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (ConfigError, (FeatcacheError, ValueError)),
        (SchemaError, (ConfigError,)),
        (InvalidRequest, (FeatcacheError, ValueError)),
        (UnknownView, (InvalidRequest, KeyError)),
        (UnknownFeature, (InvalidRequest, KeyError)),
        (AmbiguousFeature, (InvalidRequest,)),
        (InvalidEntityId, (InvalidRequest, TypeError)),
        (BackendError, (FeatcacheError,)),
        (CacheUnavailable, (BackendError,)),
        (OfflineStoreError, (BackendError,)),
        (OfflineStoreUnavailable, (OfflineStoreError,)),
        (EmbeddedServerError, (FeatcacheError,)),
    ],
)
def test_exception_tree_as_documented(error: type[Exception], bases: tuple[type, ...]) -> None:
    assert all(issubclass(error, base) for base in bases)
    if not issubclass(error, InvalidRequest | ConfigError):
        assert not issubclass(error, ValueError)
