"""Bulk reads through ADBC: a view's latest rows fetched as Arrow columns.

``materialize --all`` reads a view one run of ids at a time (``featcache.offline.bulk``). Through
SQLAlchemy each run costs the driver building a tuple per row and featcache converting every
value, all of it holding the GIL that the concurrent Redis writer needs too. Through ADBC
(Apache Arrow's database connectivity, with its SQLite and libpq drivers) the query runs with
the GIL released and the rows arrive as Arrow columns; event times are converted to
microseconds in Arrow (SQLite's ISO 8601 text too, where Arrow's parser takes it), and the
feature values go through the same converters as every other read
(``OfflineStore.convert_columns``), so both paths return the same rows.

It is an accelerator only. It is used for SQLite files and PostgreSQL, with the statement
SQLAlchemy compiles for the view (``BoundView.range_query``; values are bound parameters,
never formatted in). Anything else, or any ADBC or Arrow error, makes ``open_arrow_reader``
return None or ``ArrowRangeReader.read`` raise ``ArrowReadUnavailable``, and the caller reads
through SQLAlchemy instead: a run can only get faster, never different, and errors are reported
by the SQLAlchemy path's translation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Sequence
from typing import Any, Literal

import adbc_driver_postgresql.dbapi as pg_driver
import adbc_driver_sqlite.dbapi as sqlite_driver
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from featcache.arrow_columns import arrow_micros, holds_exactly, parsed_text
from featcache.offline.store import BoundView, OfflineStore, RowColumns, SqlRow, only, raw_column
from featcache.request import EntityId

__all__ = [
    "ArrowIdStream",
    "ArrowRangeReader",
    "ArrowReadUnavailable",
    "open_arrow_reader",
    "open_id_stream",
]

log = logging.getLogger("featcache.bulk")  # with bulk.py's: one logger for the bulk reads


class ArrowReadUnavailable(Exception):
    """ADBC could not serve a read; the caller falls back to SQLAlchemy. Never escapes
    ``featcache.offline.bulk``."""


def open_arrow_reader(offline: OfflineStore, bound: BoundView) -> ArrowRangeReader | None:
    """An ADBC reader of ``bound``'s id ranges, or None where ADBC does not apply."""
    if bound.range_query is None:
        return None
    opened = _connect(offline, bound)
    if opened is None:
        return None
    return ArrowRangeReader(offline, bound, *opened)


def open_id_stream(
    offline: OfflineStore, bound: BoundView, query: sa.Select[Any]
) -> ArrowIdStream | None:
    """The one-column listing ``query`` through ADBC, or None where ADBC does not apply."""
    opened = _connect(offline, bound)
    if opened is None:
        return None
    connection, dialect = opened
    return ArrowIdStream(connection, _Statement(query, dialect))


class ArrowIdStream:
    """A view's entity ids streamed through their own ADBC connection, chunk by chunk.

    Through SQLAlchemy the listing costs a ``Row`` per id, about 1 us, on the thread that
    then fences and reads each chunk: a tenth of ``materialize --all``'s time. Here the ids
    arrive as Arrow batches (memory: one Arrow batch, at most two chunks as Python ints).
    Errors surface from ``chunks`` as they happen, possibly after some chunks (ADBC SQLite
    types a column by its first rows and stops at a value of another type);
    ``featcache.offline.bulk`` then lists the rest through SQLAlchemy.
    """

    def __init__(self, connection: Any, statement: _Statement) -> None:
        self._connection = connection
        self._statement = statement

    def chunks(self, chunk_rows: int) -> Generator[list[Any], None, None]:
        cursor = self._connection.cursor()
        try:
            cursor.execute(self._statement.sql, self._statement.bind())
            reader: pa.RecordBatchReader = cursor.fetch_record_batch()
            pending: list[Any] = []
            for batch in reader:
                column = batch.column(0)
                # sliced first: an Arrow batch may hold millions of ids (PostgreSQL's are
                # up to 16 MB), 36 bytes each as Python ints; at most a chunk is converted
                for start in range(0, len(column), chunk_rows):
                    pending += column.slice(start, chunk_rows).to_pylist()
                    while len(pending) >= chunk_rows:
                        yield pending[:chunk_rows]
                        del pending[:chunk_rows]
            if pending:
                yield pending
        finally:
            cursor.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a connection we no longer use
            self._connection.close()


def _connect(offline: OfflineStore, bound: BoundView) -> tuple[Any, sa.Dialect] | None:
    """A new ADBC connection to the offline store and the dialect to compile for it, or None
    where ADBC does not apply (or fails to connect: then SQLAlchemy serves)."""
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
                seconds = max(1, round(offline.config.connect_timeout))
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
    return connection, dialect


class _Statement:
    """A compiled statement and its parameters in order (positional, in ADBC's style); values
    given to ``bind`` replace the named ones (``lo``/``hi``)."""

    def __init__(self, query: sa.Select[Any], dialect: sa.Dialect) -> None:
        compiled = query.compile(dialect=dialect)
        self.sql = str(compiled)
        self._order: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._params: dict[str, Any] = dict(compiled.params)

    def bind(self, **values: Any) -> tuple[Any, ...]:
        params = dict(self._params, **values)
        return tuple(params[name] for name in self._order)


class ArrowRangeReader:
    """``bulk.latest_of_id_run`` through one ADBC connection, for the length of one run.

    Where it gives the same rows, the latest row per entity is picked here rather than by the
    database: a run's rows are fetched as they are (``entity BETWEEN lo AND hi``) and sorted in
    Arrow by exactly the order of ``BoundView.latest_query`` (event time NULLs last, event
    time descending, then ``updated_at`` NULLs last, ``updated_at`` descending).
    SQLite spends 60% less per row without the window function, PostgreSQL 30% less
    (docs/benchmarks.md, "Materialize"). "Same rows" is checked, never assumed: the ordering
    columns must be timestamps, or, on SQLite, ISO 8601 text that Arrow parses (so text
    order is SQLite's binary order and no other storage class hides among them), and no
    column of the table may declare a collation (one could make distinct ids one partition,
    or order text otherwise than bytes, in the database); a run
    holding more than ``HISTORY_BOUND`` rows per id on average (a long history per entity)
    stops the fetch early so memory stays bounded by the chunk. Either way that run and
    every later one go through ``range_query`` (the database picks).
    """

    #: rows per requested id above which a run is left to the database's window query
    HISTORY_BOUND = 4

    def __init__(
        self, offline: OfflineStore, bound: BoundView, connection: Any, dialect: sa.Dialect
    ) -> None:
        assert bound.range_query is not None
        self._offline = offline
        self._bound = bound
        self._connection = connection
        self._latest = _Statement(bound.range_query, dialect)
        self._rows: _Statement | None = None
        self._updated = bound.view.updated_at_column is not None
        if _orders_alike(bound, dialect.name) and _no_collations(connection, bound, dialect):
            self._rows = _Statement(_rows_query(bound), dialect)

    @property
    def picks_latest(self) -> bool:
        """Whether the next run's latest rows are picked here (else by the database)."""
        return self._rows is not None

    def read(self, ids: Sequence[EntityId]) -> dict[EntityId, SqlRow]:
        """The latest rows of ``ids``, a run in the database's order (see ``bulk``)."""
        if not ids:
            return {}
        values, events_us, exact = self._columns(ids)
        found: dict[EntityId, SqlRow] = {}
        self._offline.convert_columns(self._bound, values, found, events_us=events_us,
                                      exact=exact)
        return only(found, ids)

    def read_columns(self, ids: Sequence[EntityId]) -> RowColumns:
        """``read`` as columns (``RowColumns``), for ``FeatureCache.prepare_columns``."""
        if not ids:
            return RowColumns.of({}, len(self._bound.view.features))
        values, events_us, exact = self._columns(ids)
        return self._offline.convert_to_columns(
            self._bound, values, events_us=events_us, exact=exact
        ).only(ids)

    def _columns(
        self, ids: Sequence[EntityId]
    ) -> tuple[list[Sequence[Any]], list[int | None] | None, list[bool]]:
        """The run's latest rows as Python columns (entity, event, features...), the event
        times in microseconds where Arrow converted them, and which feature columns are
        exactly of their declared type already."""
        try:
            table = self._latest_here(ids) if self._rows is not None else None
            if table is None:
                table = self._fetch(self._latest, ids, None)
            assert table is not None
            columns = table.columns
            events_us = arrow_micros(columns[1])
            exact = [holds_exactly(f.type, c.type)
                     for f, c in zip(self._bound.view.features, columns[2:], strict=True)]
            values: list[Sequence[Any]] = [
                columns[0].to_pylist(),
                columns[1].to_pylist() if events_us is None else (),
                *(column.to_pylist() for column in columns[2:]),
            ]
        except Exception as exc:  # ADBC and Arrow errors alike: fall back
            raise ArrowReadUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return values, events_us, exact

    def _fetch(
        self, statement: _Statement, ids: Sequence[EntityId], limit: int | None
    ) -> pa.Table | None:
        """The statement's rows for the run ``ids``; None past ``limit`` rows (not all read)."""
        cursor = self._connection.cursor()
        try:
            cursor.execute(statement.sql, statement.bind(lo=ids[0], hi=ids[-1]))
            if limit is None:
                table: pa.Table = cursor.fetch_arrow_table()
                return table
            reader: pa.RecordBatchReader = cursor.fetch_record_batch()
            batches: list[pa.RecordBatch] = []
            rows = 0
            for batch in reader:
                rows += batch.num_rows
                if rows > limit:
                    return None
                batches.append(batch)
            return pa.Table.from_batches(batches, reader.schema)
        finally:
            cursor.close()

    def _latest_here(self, ids: Sequence[EntityId]) -> pa.Table | None:
        """The run's latest rows picked in Arrow, as ``range_query`` would return them; None
        when this run is the database's to pick (see the class docstring)."""
        assert self._rows is not None
        table = self._fetch(self._rows, ids, self.HISTORY_BOUND * len(ids))
        if table is None:
            log.info("view %s: more than %d rows per id in a run; the database picks the "
                     "latest rows from now on", self._bound.view.name, self.HISTORY_BOUND)
            self._rows = None
            return None
        arrays = [column.combine_chunks() for column in table.columns]
        entity, event = arrays[0], arrays[1]
        updated = arrays[2] if self._updated else None
        if not all(_orderable(c) for c in (event, updated) if c is not None):
            # text Arrow does not read as timestamps: the database orders this run, and the
            # later ones (same columns), instead of every run being fetched twice
            log.info("view %s: ordering columns Arrow cannot compare as the database does; "
                     "the database picks the latest rows from now on", self._bound.view.name)
            self._rows = None
            return None
        features = arrays[3 if self._updated else 2 :]
        if pc.count_distinct(entity).as_py() < len(entity):  # some entity has history
            keys: dict[str, Any] = {"e": entity, "en": pc.is_null(event), "ev": event}
            order: list[tuple[str, Literal["ascending", "descending"]]] = [
                ("e", "ascending"), ("en", "ascending"), ("ev", "descending")]
            if updated is not None:
                keys |= {"un": pc.is_null(updated), "u": updated}
                order += [("un", "ascending"), ("u", "descending")]
            ranked = pc.sort_indices(pa.table(keys), sort_keys=order)
            grouped = entity.take(ranked)
            first = pa.concat_arrays([
                pa.array([True]),
                pc.not_equal(grouped.slice(1), grouped.slice(0, len(grouped) - 1)),
            ])
            picks = ranked.filter(first)
            entity, event = entity.take(picks), event.take(picks)
            features = [column.take(picks) for column in features]
        names = ["fc_entity", "fc_event", *(f"fc_f{i}" for i in range(len(features)))]
        return pa.table([entity, event, *features], names=names)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a connection we no longer use
            self._connection.close()


def _rows_query(bound: BoundView) -> sa.Select[Any]:
    """Every row of a run of ids, unranked: entity, event time, updated_at (if configured),
    the features; the columns of ``latest_query`` with the ordering column in between."""
    view, table = bound.view, bound.table
    entity = table.c[view.entity_column]
    ordering = [table.c[view.event_timestamp_column]]
    if view.updated_at_column is not None:
        ordering.append(table.c[view.updated_at_column])
    return sa.select(
        entity, *(raw_column(c) for c in ordering),
        *(raw_column(table.c[f.column]) for f in view.features),
    ).where(entity.between(sa.bindparam("lo"), sa.bindparam("hi")))


def _orders_alike(bound: BoundView, dialect: str) -> bool:
    """Whether Arrow can order this view's rows as the database does: timestamps on
    PostgreSQL (text compares by collation there), and on SQLite text without a declared
    collation (binary, as Arrow compares) or timestamps."""
    view, table = bound.view, bound.table
    columns = [table.c[view.event_timestamp_column]]
    if view.updated_at_column is not None:
        columns.append(table.c[view.updated_at_column])
    for column in columns:
        if isinstance(column.type, sa.String):
            if dialect != "sqlite" or column.type.collation is not None:
                return False
        elif dialect != "sqlite" and not isinstance(column.type, sa.DateTime):
            return False
    return True


def _no_collations(connection: Any, bound: BoundView, dialect: sa.Dialect) -> bool:
    """Whether the view's table declares no collation where it matters: none at all in the
    SQLite table's DDL (reflection does not report SQLite collations), none other than the
    default on the PostgreSQL entity, event time and updated_at columns. Any doubt (the
    question itself failing) is a no: the database then picks the latest rows, as always."""
    table, view = bound.table, bound.view
    names = [view.entity_column, view.event_timestamp_column]
    if view.updated_at_column is not None:
        names.append(view.updated_at_column)
    query: sa.Select[Any]
    if dialect.name == "sqlite":
        master = sa.table("sqlite_master", sa.column("sql"), sa.column("type"),
                          sa.column("name"), schema=table.schema or "main")
        query = sa.select(master.c.sql).where(master.c.type == "table",
                                              master.c.name == table.name)
    else:
        info = sa.table("columns", sa.column("table_schema"), sa.column("table_name"),
                        sa.column("column_name"), sa.column("collation_name"),
                        schema="information_schema")
        schema: Any = table.schema if table.schema else sa.func.current_schema()
        query = sa.select(sa.func.count()).select_from(info).where(
            info.c.table_schema == schema,
            info.c.table_name == table.name,
            sa.or_(*(info.c.column_name == name for name in names)),
            info.c.collation_name.is_not(None),
        )
    try:
        statement = _Statement(query, dialect)
        cursor = connection.cursor()
        try:
            cursor.execute(statement.sql, statement.bind())
            found = cursor.fetchone()
        finally:
            cursor.close()
    except Exception as exc:  # any driver error: leave the choice to the database
        log.info("view %s: collations not checked (%s); the database picks the latest rows",
                 view.name, type(exc).__name__)
        return False
    if found is None:
        return False
    if dialect.name == "sqlite":
        return "collate" not in str(found[0]).lower()
    return int(found[0]) == 0


def _orderable(column: pa.Array[Any]) -> bool:
    """A fetched ordering column Arrow compares as the database does: timestamps, or text
    that is all ISO 8601 (an integer SQLite stored among text arrives as its digits, and
    would sort as text here but as a number there). Anything else (numbers, an all-NULL
    column Arrow types as null) is left to the database."""
    if pa.types.is_timestamp(column.type):
        return True
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return parsed_text(pa.chunked_array([column])) is not None
    return False
