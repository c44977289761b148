"""Builders shared by the read/write path tests: a table in any dialect, a cache, a clock.

Tables use portable SQLAlchemy types (DOUBLE, BIGINT, DATETIME(6) on MySQL, JSON for
embeddings) so the same data reads back identically on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis
import sqlalchemy as sa
from asyncdriven import AsyncDriven, async_client_wanted
from sqlalchemy.dialects import mysql

from featcache import (
    CacheConfig,
    Feature,
    FeatureCache,
    FeatureView,
    OfflineStoreConfig,
    RedisConfig,
)
from featcache.keys import KeyLayout

UTC = dt.UTC
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)

TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

STATS_FEATURES = (
    Feature("ctr", "float", "10m"),
    Feature("clicks", "int", "1h"),
    Feature("country", "str", "1h"),
    Feature("vip", "bool", "1h"),
    Feature("last_seen", "timestamp", "1h"),
    Feature("emb", "list[float]", "1h"),
)

_SA_TYPES: dict[str, Any] = {
    "float": sa.Double(),
    "int": sa.BigInteger(),
    "str": sa.String(255),
    "bool": sa.Boolean(),
    "timestamp": TIMESTAMP,
    "list[float]": sa.JSON(),
}


class Clock:
    """An injected wall clock: seconds since the epoch, moved by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_table(
    engine: sa.Engine,
    schema: str | None,
    name: str,
    features: Sequence[Feature],
    entity_type: str = "int",
) -> sa.Table:
    table = sa.Table(
        name,
        sa.MetaData(schema=schema),
        sa.Column("entity_id", sa.BigInteger() if entity_type == "int" else sa.String(600)),
        sa.Column("event_ts", TIMESTAMP),
        sa.Column("updated_at", TIMESTAMP),
        *(sa.Column(f.column, _SA_TYPES[f.type.value]) for f in features),
        mysql_charset="utf8mb4",
    )
    table.create(engine)
    return table


def insert(engine: sa.Engine, table: sa.Table, rows: Iterable[Mapping[str, Any]]) -> None:
    rows = [_for_dialect(engine, dict(r)) for r in rows]
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)


def _for_dialect(engine: sa.Engine, row: dict[str, Any]) -> dict[str, Any]:
    # MySQL DATETIME and SQLite text timestamps hold no offset: store UTC wall time, as a
    # deployment on those dialects would; featcache reads naive timestamps as UTC.
    if engine.dialect.name in ("mysql", "mariadb", "sqlite"):
        for key, value in row.items():
            if isinstance(value, dt.datetime) and value.tzinfo is not None:
                row[key] = value.astimezone(UTC).replace(tzinfo=None)
    return row


def stats_table(engine: sa.Engine, view: str, ids: Iterable[int]) -> None:
    """Table ``view`` of STATS_FEATURES with one row per id, ``clicks`` equal to the id."""
    table = make_table(engine, None, view, STATS_FEATURES)
    insert(engine, table, [stats_row(i, clicks=i) for i in ids])


def stats_row(entity_id: int | str, ts: dt.datetime = T0, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "entity_id": entity_id,
        "event_ts": ts,
        "updated_at": ts,
        "ctr": 0.25,
        "clicks": 7,
        "country": "DE",
        "vip": False,
        "last_seen": ts,
        "emb": [0.5, -1.25],
    }
    row.update(values)
    return row


def make_view(
    name: str,
    table: str,
    schema: str | None,
    features: Sequence[Feature] = STATS_FEATURES,
    entity_type: str = "int",
    **options: Any,
) -> FeatureView:
    return FeatureView(
        name=name,
        table=table,
        schema=schema,
        entity_column="entity_id",
        entity_type=entity_type,  # type: ignore[arg-type]
        event_timestamp_column="event_ts",
        updated_at_column="updated_at",
        features=tuple(features),
        **options,
    )


#: the option names tests pass to ``make_cache`` and ``with_options``: their section and key
OPTION_KEYS: dict[str, tuple[str, str]] = {
    "redis_socket_timeout": ("redis", "socket_timeout"),
    "redis_connect_timeout": ("redis", "connect_timeout"),
    "redis_read_chunk": ("redis", "read_chunk"),
    "offline_url": ("offline_store", "url"),
    "sql_chunk_size": ("offline_store", "chunk_size"),
    "sql_connect_timeout": ("offline_store", "connect_timeout"),
    "max_id_length": ("limits", "max_id_length"),
    "fence_ttl": ("invalidation", "fence_ttl"),
    "l1_policy": ("l1", "policy"),
    "l1_max_entries": ("l1", "max_entries"),
    "l1_max_ttl": ("l1", "max_ttl"),
    "lease_ttl": ("stampede", "lease_ttl"),
    "lease_wait": ("stampede", "lease_wait"),
    "xfetch_beta": ("stampede", "xfetch_beta"),
    "breaker_failures": ("degradation", "breaker_failures"),
    "breaker_window": ("degradation", "breaker_window"),
    "breaker_open_for": ("degradation", "breaker_open_for"),
    "sql_concurrency": ("degradation", "sql_concurrency"),
    "sql_queue_timeout": ("degradation", "sql_queue_timeout"),
    "on_sql_error": ("degradation", "on_sql_error"),
    "popularity_sample_rate": ("popularity", "sample_rate"),
}


def with_options(config: CacheConfig, **options: Any) -> CacheConfig:
    """``config`` with some keys of its sections replaced, named as in ``OPTION_KEYS``
    (``lease_wait=0.05`` sets ``stampede.lease_wait``)."""
    changes: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        section, key = OPTION_KEYS[name]
        changes.setdefault(section, {})[key] = value
    return config.replace(**{
        section: replace(getattr(config, section), **keys) for section, keys in changes.items()
    })


def redis_config(redis_url: str, key_prefix: str) -> RedisConfig:
    """The ``redis`` section of a test's cache: the server at ``redis_url``, or, in a run on a
    Sentinel set, when ``redis_url`` is its primary, its sentinels (``FEATCACHE_TEST_SENTINEL``
    is ``<master>;<host:port,...>;<the primary's URL>``; a test's own server stays itself)."""
    if os.environ.get("FEATCACHE_TEST_CLUSTER") == redis_url:
        return RedisConfig(url=redis_url, key_prefix=key_prefix, mode="cluster")
    sentinel = os.environ.get("FEATCACHE_TEST_SENTINEL")
    if not sentinel:
        return RedisConfig(url=redis_url, key_prefix=key_prefix)
    master, sentinels, primary_url = sentinel.split(";")
    if redis_url != primary_url:
        return RedisConfig(url=redis_url, key_prefix=key_prefix)
    return RedisConfig(url=redis_url, key_prefix=key_prefix, mode="sentinel",
                       master_name=master, sentinels=tuple(sentinels.split(",")))


def redis_yaml(redis_url: str, key_prefix: str) -> str:
    """The ``redis`` section of a test's YAML config, as ``redis_config`` builds it."""
    config = redis_config(redis_url, key_prefix)
    extra = f", mode: {config.mode}" if config.mode == "cluster" else ""
    if config.mode == "sentinel":
        extra = (f", mode: sentinel, master_name: {config.master_name}, "
                 f"sentinels: [{', '.join(repr(a) for a in config.sentinels)}]")
    return f"redis: {{url: '{redis_url}', key_prefix: '{key_prefix}'{extra}}}\n"


def mget_all(client: redis.Redis, keys: Sequence[str]) -> list[Any]:
    """``MGET`` of keys of any slots: a ``RedisCluster`` (a cluster run's ``redis_client``)
    reads them with ``mget_nonatomic``, one MGET a slot."""
    mget = getattr(client, "mget_nonatomic", client.mget)
    values: list[Any] = mget(keys)
    return values


def key_layout(key_prefix: str) -> KeyLayout:
    """The key layout of the run's caches: hash-tagged on a cluster run
    (FEATCACHE_TEST_TOPOLOGY=cluster), plain otherwise."""
    mode = "cluster" if os.environ.get("FEATCACHE_TEST_CLUSTER") else "standalone"
    return KeyLayout.for_mode(key_prefix, mode)


def row_key(key_prefix: str, view: str, entity: int | str) -> str:
    """A row's key in the run's layout."""
    return key_layout(key_prefix).row_key(view, entity)


def make_cache(
    views: Sequence[FeatureView],
    redis_url: str,
    offline_url: str,
    key_prefix: str,
    clock: Clock | None = None,
    redis_client: redis.Redis | None = None,
    **options: Any,
) -> FeatureCache:
    """A cache on these servers; ``options`` as ``with_options`` takes them. In a run on a
    Sentinel set (FEATCACHE_TEST_TOPOLOGY=sentinel, conftest), the cache asks its sentinels
    for the primary ``redis_url`` names; with FEATCACHE_TEST_CLIENT=async it is the async
    client behind the synchronous one's methods (``asyncdriven``)."""
    config = with_options(CacheConfig(
        views=tuple(views),
        redis=redis_config(redis_url, key_prefix),
        offline_store=OfflineStoreConfig(url=offline_url),
    ), **options)
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs["clock"] = clock
    if redis_client is not None:
        kwargs["redis_client"] = redis_client
    return client_for(config, **kwargs)


def client_for(config: CacheConfig, **kwargs: Any) -> FeatureCache:
    """``FeatureCache(config, **kwargs)``, or with FEATCACHE_TEST_CLIENT=async the async
    client behind its methods (``asyncdriven``): the same tests, on the async client."""
    if async_client_wanted():
        return AsyncDriven(config, **kwargs)  # type: ignore[return-value]
    return FeatureCache(config, **kwargs)


class SqlCounter:
    """Counts the feature queries featcache sends (not reflection), with a SQLAlchemy event."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[str] = []
        self._engine = engine
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "fc_latest" in statement:
            self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)

    def reset(self) -> None:
        self.statements.clear()

    def close(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._on_execute)


class CountingConnection(redis.Connection):
    """A real redis-py connection that counts network round trips (one per packed send)."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


def counting_client(redis_url: str) -> tuple[redis.Redis, type[CountingConnection]]:
    """A client whose connections count sends; the returned class holds the counters."""
    counter = type("Counter", (CountingConnection,), {"sends": 0})
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=counter)
    return redis.Redis(connection_pool=pool), counter


class ReadLoad:
    """``threads`` threads calling ``cache.get_features`` on batches of ``batch`` of ``ids``
    (``clicks`` only) until stopped; each value read must satisfy ``acceptable(id, clicks)``.
    Use as a context manager; then ``failures`` (exceptions raised by calls), ``wrong``
    ((id, value) read that was not acceptable) and ``calls``."""

    def __init__(self, cache: FeatureCache, ids: Sequence[int], batch: int,
                 acceptable: Callable[[int, Any], bool], threads: int = 4) -> None:
        self._cache, self._ids, self._batch, self._ok = cache, list(ids), batch, acceptable
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,)) for s in range(threads)]
        self.failures: list[BaseException] = []
        self.wrong: list[tuple[int, Any]] = []
        self.calls = 0

    def _run(self, seed: int) -> None:
        ids, i = self._ids, seed * 50
        while not self._stop.is_set():
            chosen = [ids[(i + k) % len(ids)] for k in range(self._batch)]
            i += 7
            try:
                result = self._cache.get_features(chosen, ["clicks"])
            except BaseException as exc:
                self.failures.append(exc)
                return
            self.calls += 1
            self.wrong.extend((e, result[e]["clicks"]) for e in chosen
                              if not self._ok(e, result[e]["clicks"]))

    def __enter__(self) -> ReadLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait for a background thread (a stream's tail, a publisher) to catch up: a
    synchronisation, not a speed check; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
