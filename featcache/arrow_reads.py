"""Bulk reads through ADBC: a view's latest rows fetched as Arrow columns.

``materialize --all`` reads a view one run of ids at a time (``featcache.bulk``). Through
SQLAlchemy each run costs the driver building a tuple per row and featcache converting every
value, all of it holding the GIL that the concurrent Redis writer needs too. Through ADBC
(Apache Arrow's database connectivity, with its SQLite and libpq drivers) the query runs with
the GIL released and the rows arrive as Arrow columns; event times are converted to
microseconds in Arrow (SQLite's ISO 8601 text too, where Arrow's parser takes it), and the
feature values go through the same converters as every other read
(``OfflineStore.convert_columns``), so both paths return the same rows.

It is an accelerator only. It is used for SQLite files and PostgreSQL, with the statement
SQLAlchemy compiles for the view (``_BoundView.range_query``; values are bound parameters,
never formatted in). Anything else, or any ADBC or Arrow error, makes ``open_arrow_reader``
return None or ``ArrowRangeReader.read`` raise ``ArrowReadUnavailable``, and the caller reads
through SQLAlchemy instead: a run can only get faster, never different, and errors are reported
by the SQLAlchemy path's translation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import adbc_driver_postgresql.dbapi as pg_driver
import adbc_driver_sqlite.dbapi as sqlite_driver
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from featcache.offline import OfflineStore, SqlRow, _BoundView, only
from featcache.request import EntityId

__all__ = ["ArrowRangeReader", "ArrowReadUnavailable", "open_arrow_reader"]

log = logging.getLogger("featcache.bulk")


class ArrowReadUnavailable(Exception):
    """ADBC could not serve a read; the caller falls back to SQLAlchemy. Never escapes
    ``featcache.bulk``."""


def open_arrow_reader(offline: OfflineStore, bound: _BoundView) -> ArrowRangeReader | None:
    """An ADBC reader of ``bound``'s id ranges, or None where ADBC does not apply."""
    if bound.range_query is None:
        return None
    url = offline.engine.url
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            path = url.database
            if not path or path == ":memory:" or url.query:  # in-memory, or URI options
                return None
            # autocommit: every statement in its own transaction, so no read transaction is
            # held between chunks (in rollback-journal mode it would block writers)
            connection = sqlite_driver.connect(path, autocommit=True)
            dialect: sa.Dialect = offline.engine.dialect  # qmark, as ADBC SQLite binds
        elif backend == "postgresql":
            pg_url = url.set(drivername="postgresql")
            if "connect_timeout" not in pg_url.query:  # as the SQLAlchemy engine connects
                seconds = max(1, round(offline._config.sql_connect_timeout))
                pg_url = pg_url.update_query_dict({"connect_timeout": str(seconds)})
            uri = pg_url.render_as_string(hide_password=False)
            connection = pg_driver.connect(uri, autocommit=True)
            # $1, $2 ... as libpq binds
            dialect = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
        else:
            return None
    except Exception as exc:  # any driver failure means "use SQLAlchemy"
        log.warning("ADBC unavailable for view %s, reading through SQLAlchemy: %s",
                    bound.view.name, type(exc).__name__)
        return None
    return ArrowRangeReader(offline, bound, connection, dialect)


class ArrowRangeReader:
    """``bulk.latest_of_id_run`` through one ADBC connection, for the length of one run."""

    def __init__(
        self, offline: OfflineStore, bound: _BoundView, connection: Any, dialect: sa.Dialect
    ) -> None:
        assert bound.range_query is not None
        compiled = bound.range_query.compile(dialect=dialect)
        self._offline = offline
        self._bound = bound
        self._connection = connection
        self._sql = str(compiled)
        self._order: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._params: dict[str, Any] = dict(compiled.params)

    def read(self, ids: Sequence[EntityId]) -> dict[EntityId, SqlRow]:
        """The latest rows of ``ids``, a run in the database's order (see ``bulk``)."""
        if not ids:
            return {}
        params = dict(self._params, lo=ids[0], hi=ids[-1])
        try:
            cursor = self._connection.cursor()
            try:
                cursor.execute(self._sql, tuple(params[name] for name in self._order))
                table: pa.Table = cursor.fetch_arrow_table()
            finally:
                cursor.close()
            columns = table.columns
            events_us = _micros(columns[1])
            values: list[Sequence[Any]] = [
                columns[0].to_pylist(),
                columns[1].to_pylist() if events_us is None else (),
                *(column.to_pylist() for column in columns[2:]),
            ]
        except Exception as exc:  # ADBC and Arrow errors alike: fall back
            raise ArrowReadUnavailable(f"{type(exc).__name__}: {exc}") from exc
        found: dict[EntityId, SqlRow] = {}
        self._offline.convert_columns(self._bound, values, found, events_us=events_us)
        return only(found, ids)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a connection we no longer use
            self._connection.close()


def _micros(column: pa.ChunkedArray[Any]) -> list[int | None] | None:
    """Microseconds since the epoch of an Arrow timestamp column (naive ones read as UTC,
    like every featcache read), or of SQLite's ISO 8601 text, parsed by Arrow; None when
    Arrow cannot (then ``OfflineStore.convert_columns`` parses the text in Python).

    Arrow's parser takes a subset of what ``datetime.fromisoformat`` takes (it refuses more
    than six fractional digits, for one) and gives the same instant wherever it parses: text
    without an offset as naive (UTC, as featcache reads it), text with offsets as aware. A
    column that mixes the two, or anything else it refuses, goes to Python whole.
    """
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        for target in _TEXT_TARGETS:
            try:
                parsed: list[int | None] = column.cast(target).cast(pa.int64()).to_pylist()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            return parsed
        return None
    if not pa.types.is_timestamp(column.type):
        return None
    micros: list[int | None] = column.cast(pa.timestamp("us", column.type.tz)).cast(
        pa.int64()
    ).to_pylist()
    return micros


#: naive text first (what SQLite columns hold), then text with offsets
_TEXT_TARGETS = (pa.timestamp("us"), pa.timestamp("us", "UTC"))
