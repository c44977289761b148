"""The demo's offline store: two feature tables with the untidiness of a real one.

The sample is meant to exercise what a toy table would not: some users have no activity row
(so ``ABSENT`` and negative caching show up), many users have several rows per view (older
profile versions, one activity snapshot per day, and snapshots recomputed later with the same
event timestamp and a newer ``updated_at``), so serving the latest row per entity matters, and
the values cover every feature type, nulls included. Generation is seeded, so a run can be
repeated exactly, and streamed in chunks so memory stays flat whatever ``--users`` is.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from featcache.errors import OfflineStoreError, OfflineStoreUnavailable
from featcache.offline import engine_url, safe_url

__all__ = ["ACTIVITY_TABLE", "PROFILE_TABLE", "SampleReport", "ensure_sample"]

PROFILE_TABLE = "featcache_demo_user_profile"
ACTIVITY_TABLE = "featcache_demo_user_activity"
EMBEDDING_DIM = 8
ACTIVE_SHARE = 0.85  # the other users never had a session: no user_activity row at all
_CHUNK = 10_000
_TS = sa.DateTime(timezone=True)

_COUNTRIES: tuple[tuple[str, str, float], ...] = (  # (country, main language, weight)
    ("US", "en", 30), ("IN", "hi", 12), ("BR", "pt", 9), ("DE", "de", 7), ("GB", "en", 7),
    ("FR", "fr", 6), ("JP", "ja", 5), ("MX", "es", 5), ("ES", "es", 4), ("CA", "en", 4),
    ("NG", "en", 3), ("KR", "ko", 3), ("IT", "it", 3), ("PL", "pl", 2),
)
_COUNTRY_CUM_WEIGHTS = list(itertools.accumulate(w for _, _, w in _COUNTRIES))
_SNAPSHOT_DAYS = (1, 1, 2, 2, 3, 4)  # daily activity snapshots kept per user

_Stamp = Callable[[dt.datetime], Any]  # a naive UTC datetime -> the value the driver binds
Row = tuple[Any, ...]

_metadata = sa.MetaData()
_profile = sa.Table(
    PROFILE_TABLE, _metadata,
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("event_timestamp", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("age", sa.Integer),
    sa.Column("country", sa.String(2)),
    sa.Column("signup_ts", _TS),
    sa.Column("is_premium", sa.Boolean),
    sa.Column("ltv_usd", sa.Float),
    sa.Column("embedding", sa.Text),  # a JSON array: portable to every database
    sa.Column("language", sa.String(8)),
)
_activity = sa.Table(
    ACTIVITY_TABLE, _metadata,
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("event_timestamp", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("clicks_7d", sa.Integer),
    sa.Column("clicks_30d", sa.Integer),
    sa.Column("ctr_7d", sa.Float),
    sa.Column("ctr_30d", sa.Float),
    sa.Column("sessions_30d", sa.Integer),
    sa.Column("avg_session_s", sa.Float),
    sa.Column("last_seen", _TS),
    sa.Column("churn_risk", sa.Float),
)
# Created after the bulk insert (faster than maintaining them row by row): without them every
# fill would scan the whole table.
_indexes = (
    sa.Index("featcache_demo_profile_latest", _profile.c.user_id, _profile.c.event_timestamp),
    sa.Index("featcache_demo_activity_latest", _activity.c.user_id, _activity.c.event_timestamp),
)


@dataclass(frozen=True, slots=True)
class SampleReport:
    """What ``ensure_sample`` found or built, for the demo's header."""

    users: int  # ids 1..users exist in the profile table
    profile_rows: int
    profile_versioned: int  # users with older profile rows besides the latest one
    activity_rows: int
    activity_users: int  # the others have no activity row: ABSENT
    created: bool  # False: both tables already held data and were used as they are
    seconds: float


def _profile_rows(
    rng: random.Random, users: int, now: dt.datetime, ts: _Stamp
) -> Iterator[Row]:
    """One to three versions per user; the newest (greatest event_timestamp) is the truth."""
    # Formatting 8 floats as JSON is the slowest part of a row: draw from a pool of vectors.
    embeddings = [
        json.dumps([round(rng.gauss(0.0, 1.0), 4) for _ in range(EMBEDDING_DIM)])
        for _ in range(8192)
    ]
    six_years = 6 * 365 * 86_400
    for uid in range(1, users + 1):
        signup = ts(now - dt.timedelta(seconds=86_400 + rng.random() * six_years))
        country, language = _country(rng)
        premium = rng.random() < 0.12
        ltv = round(math.exp(rng.gauss(3.0, 1.2)) * (3.0 if premium else 1.0), 2)
        age = int(rng.triangular(18, 80, 29))
        embedding = embeddings[rng.getrandbits(13)]
        event = now - dt.timedelta(seconds=3600 + rng.random() * 172_800)
        versions = 1 if rng.random() < 0.75 else 2 + int(rng.random() < 0.3)
        for version in range(versions):  # newest first; older versions are plausible ancestors
            if version:
                event -= dt.timedelta(days=5 + rng.random() * 200)
                ltv = round(ltv * (0.3 + 0.6 * rng.random()), 2)
                premium = premium and rng.random() < 0.5
                if rng.random() < 0.2:  # moved: the old row has another country
                    country, language = _country(rng)
                if rng.random() < 0.3:  # had a birthday since
                    age -= 1
            yield (
                uid, ts(event), ts(event + dt.timedelta(seconds=60 + rng.random() * 1800)),
                age, country, signup, premium, ltv, embedding,
                None if rng.random() < 0.03 else language,
            )


def _country(rng: random.Random) -> tuple[str, str]:
    country, language, _ = rng.choices(_COUNTRIES, cum_weights=_COUNTRY_CUM_WEIGHTS)[0]
    return country, language


def _activity_rows(
    rng: random.Random, users: int, now: dt.datetime, ts: _Stamp
) -> Iterator[Row]:
    """Daily snapshots for the active users; some days recomputed with a later updated_at."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)

    @functools.cache
    def stamp(day: int, minutes: int) -> Any:
        # Few distinct values (snapshot day x minute): formatting each once saves seconds.
        return ts(midnight - dt.timedelta(days=day, minutes=minutes))

    for uid in range(1, users + 1):
        if rng.random() >= ACTIVE_SHARE:
            continue
        engagement = math.exp(rng.gauss(0.0, 1.0))
        for day in range(rng.choice(_SNAPSHOT_DAYS)):
            recomputed = day == 0 and rng.random() < 0.05
            for run in range(2 if recomputed else 1):
                sessions = max(0, round(rng.gauss(12.0, 5.0) * engagement))
                clicks_30 = round(sessions * (1 + 5 * rng.random()))
                clicks_7 = round(clicks_30 * (0.1 + 0.3 * rng.random()))
                ctr_30 = round(0.002 + 0.1 * rng.random() ** 3, 5)
                yield (
                    uid, stamp(day, 0), stamp(day, -60 - 300 * run - rng.randrange(60)),
                    clicks_7, clicks_30, round(ctr_30 * (0.5 + rng.random()), 5), ctr_30,
                    sessions, round(30 + 600 * rng.random() ** 2, 1) if sessions else 0.0,
                    stamp(day, rng.randrange(7 * 1440)),
                    None if rng.random() < 0.02 else round(rng.random() ** 2, 4),
                )


def _timestamps(dialect: str) -> _Stamp:
    """How to bind a naive UTC datetime on this dialect, bypassing SQLAlchemy's processing.

    SQLite has no timestamp type: SQLAlchemy stores fixed-width ISO text, so text order is
    time order, and so do we. PostgreSQL gets aware datetimes for its timestamptz columns,
    others (MySQL DATETIME) naive UTC ones.
    """
    if dialect == "sqlite":
        return lambda value: value.isoformat(" ", "microseconds")
    if dialect == "postgresql":
        return lambda value: value.replace(tzinfo=dt.UTC)
    return lambda value: value


def _insert(conn: sa.Connection, table: sa.Table, rows: Iterable[Row]) -> None:
    """Plain DBAPI executemany in chunks: one call per chunk, memory bounded by the chunk.

    Bypassing SQLAlchemy's per-row parameter processing makes loading 100k users take a few
    seconds instead of many; the rows are already in the types the driver binds.
    """
    quote = conn.dialect.identifier_preparer.quote
    mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(conn.dialect.paramstyle)
    names = [c.name for c in table.c]
    sql = (  # identifiers are our constants, quoted; every value is a bound parameter
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "  # noqa: S608
        f"VALUES ({', '.join([mark or ''] * len(names))})"
    )
    chunk: list[Row] = []
    for row in itertools.chain(rows, [()]):
        if row:
            chunk.append(row)
        if chunk and (len(chunk) == _CHUNK or not row):
            if mark is None:  # an unusual paramstyle: let SQLAlchemy bind, slower but correct
                conn.execute(table.insert(), [dict(zip(names, r, strict=True)) for r in chunk])
            else:
                conn.exec_driver_sql(sql, chunk)
            chunk = []


def _count(conn: sa.Connection, query: sa.Select[Any]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(query.subquery()))
               .scalar_one())


def ensure_sample(url: str, users: int, seed: int) -> SampleReport:
    """Create the demo tables where missing and fill each one that is empty; keep the rest.

    A database the user pointed us at may already hold the sample from an earlier run: it is
    reused as it is (then its user count wins over ``users``), never appended to or dropped.
    """
    started = time.perf_counter()
    engine: sa.Engine | None = None
    try:
        engine = sa.create_engine(engine_url(url))
        with engine.begin() as conn:
            _metadata.create_all(conn, checkfirst=True)
            now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
            created = False
            builders = ((_profile, _profile_rows), (_activity, _activity_rows))
            stamp = _timestamps(conn.dialect.name)
            existing = conn.execute(sa.select(sa.func.max(_profile.c.user_id))).scalar()
            if existing:
                users = int(existing)
            for offset, (table, build) in enumerate(builders):
                if conn.execute(sa.select(table.c.user_id).limit(1)).first() is None:
                    rng = random.Random(seed * 1000 + offset)
                    _insert(conn, table, build(rng, users, now, stamp))
                    created = True
            for index in _indexes:
                index.create(conn, checkfirst=True)
            versioned = sa.select(_profile.c.user_id).group_by(_profile.c.user_id).having(
                sa.func.count() > 1
            )
            report = SampleReport(
                users=users,
                profile_rows=_count(conn, sa.select(_profile.c.user_id)),
                profile_versioned=_count(conn, versioned),
                activity_rows=_count(conn, sa.select(_activity.c.user_id)),
                activity_users=_count(conn, sa.select(_activity.c.user_id).distinct()),
                created=created,
                seconds=time.perf_counter() - started,
            )
    except sa_exc.OperationalError as exc:
        raise OfflineStoreUnavailable(
            f"cannot build the demo tables in {safe_url(url)}: {_reason(exc)}"
        ) from exc
    except (sa_exc.SQLAlchemyError, ImportError) as exc:
        raise OfflineStoreError(
            f"cannot build the demo tables in {safe_url(url)}: {_reason(exc)}"
        ) from exc
    finally:
        if engine is not None:
            engine.dispose()
    return report


def _reason(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
