"""The benchmark data set: view ``user_stats`` (10 features of one view) in a SQLite file.

4 floats (full-precision doubles), 4 ints of realistic magnitudes, 2 short strings; entity
column ``user_id`` (8-digit ints), event timestamp ``event_ts`` (microseconds, within the last
30 days). The SQL table keeps history, as feature tables do: some users have one or two older
rows besides the latest, so the offline store's latest-row query has real work to do.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from featcache import (
    CacheConfig,
    Feature,
    FeatureCache,
    FeatureView,
    OfflineStoreConfig,
    RedisConfig,
)

VIEW_NAME = "user_stats"
ENTITY_COLUMN = "user_id"
EVENT_COLUMN = "event_ts"
ID_BASE = 10_000_000  # user ids are ID_BASE + i: 8 digits, as real ids tend to be

FEATURES: tuple[Feature, ...] = (
    Feature("ctr_7d", "float", "1h"),
    Feature("ctr_30d", "float", "1h"),
    Feature("avg_basket", "float", "1h"),
    Feature("score", "float", "1h"),
    Feature("clicks_7d", "int", "1h"),
    Feature("clicks_30d", "int", "1h"),
    Feature("orders_90d", "int", "1h"),
    Feature("days_active", "int", "1h"),
    Feature("country", "str", "1h"),
    Feature("device", "str", "1h"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)

_COUNTRIES = ("US", "IN", "BR", "DE", "GB", "FR", "JP", "MX", "ID", "TR", "ES", "IT", "CA", "PL",
              "NL", "KR", "AU", "SE", "NG", "ZA")
_COUNTRY_WEIGHTS = tuple(1.0 / (i + 1) for i in range(len(_COUNTRIES)))  # Zipf-like
_DEVICES = ("android", "ios", "web")
_DEVICE_WEIGHTS = (0.5, 0.3, 0.2)

_SA_TYPES: dict[str, Any] = {"float": sa.Double(), "int": sa.BigInteger(), "str": sa.String(16)}

Row = dict[str, Any]


def view() -> FeatureView:
    return FeatureView(
        name=VIEW_NAME,
        table=VIEW_NAME,
        entity_column=ENTITY_COLUMN,
        event_timestamp_column=EVENT_COLUMN,
        features=FEATURES,
    )


def user_ids(n: int, start: int = 0) -> range:
    return range(ID_BASE + start, ID_BASE + start + n)


def make_row(user_id: int, rng: random.Random, now: dt.datetime) -> Row:
    """One user's feature row, with the view's SQL column names."""
    clicks_30d = int(rng.lognormvariate(3.0, 1.2))  # median ~20, long tail into the thousands
    return {
        ENTITY_COLUMN: user_id,
        EVENT_COLUMN: now - dt.timedelta(microseconds=rng.randrange(30 * 86_400 * 10**6)),
        "ctr_7d": rng.betavariate(2, 40),
        "ctr_30d": rng.betavariate(2, 40),
        "avg_basket": rng.lognormvariate(3.6, 0.7),
        "score": rng.random(),
        "clicks_7d": int(clicks_30d * rng.uniform(0.1, 0.5)),
        "clicks_30d": clicks_30d,
        "orders_90d": int(rng.lognormvariate(0.8, 1.0)),
        "days_active": rng.randint(1, 365),
        "country": rng.choices(_COUNTRIES, _COUNTRY_WEIGHTS)[0],
        "device": rng.choices(_DEVICES, _DEVICE_WEIGHTS)[0],
    }


def make_rows(ids: Sequence[int], rng: random.Random, now: dt.datetime | None = None) -> list[Row]:
    now = now or dt.datetime.now(dt.UTC)
    return [make_row(uid, rng, now) for uid in ids]


def feature_dict(row: Row) -> dict[str, Any]:
    return {name: row[name] for name in FEATURE_NAMES}


def build_offline_store(path: Path, latest: Sequence[Row], rng: random.Random) -> str:
    """Write the SQLite table (latest rows plus older history) and return its URL."""
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table(
        VIEW_NAME,
        metadata,
        sa.Column(ENTITY_COLUMN, sa.BigInteger(), nullable=False),
        sa.Column(EVENT_COLUMN, sa.DateTime(), nullable=False),
        *(sa.Column(f.column, _SA_TYPES[f.type.value]) for f in FEATURES),
        sa.Index(f"ix_{VIEW_NAME}_entity_ts", ENTITY_COLUMN, EVENT_COLUMN),
    )
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), list(_with_history(latest, rng)))
    finally:
        engine.dispose()
    return url


def _with_history(latest: Sequence[Row], rng: random.Random) -> Iterator[Row]:
    for row in latest:
        # SQLite keeps no offset: store UTC wall time, which featcache reads back as UTC
        naive = {**row, EVENT_COLUMN: row[EVENT_COLUMN].astimezone(dt.UTC).replace(tzinfo=None)}
        yield naive
        for age in range(1, rng.choice((0, 0, 1, 2)) + 1):
            older = make_row(row[ENTITY_COLUMN], rng, naive[EVENT_COLUMN])
            older[EVENT_COLUMN] -= dt.timedelta(days=7 * age)
            yield older


def make_cache(redis_url: str, offline_url: str, prefix: str) -> FeatureCache:
    return FeatureCache(
        CacheConfig(views=(view(),), redis=RedisConfig(url=redis_url, key_prefix=prefix),
                    offline_store=OfflineStoreConfig(url=offline_url))
    )
