"""The SQL store: the latest row per entity from any SQLAlchemy database.

``featcache.offline`` is the SQL boundary: every statement the cache and its jobs run is built
and run in this package (``store``: the serving reads; ``bulk`` and ``arrow``: the warmer's bulk
reads; ``changes``: the change poll), and SQLAlchemy and driver exceptions become
``OfflineStoreError`` / ``OfflineStoreUnavailable`` in ``translate`` and nowhere else. Tables
are reflected at a view's first use (so loading a config needs no database) and every
configured column is checked then, so a typo fails with the column's name (``SchemaError``)
instead of a driver's SQL error. Ids travel as bound parameters (an expanding ``IN``, or one
array on PostgreSQL); identifiers come from the validated config and are quoted by SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
import difflib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql

from featcache.config import FeatureView, OfflineStoreConfig, find_view
from featcache.convert import (
    ConversionError,
    convert_column,
    converter,
    timestamp_to_us,
    timestamps_to_us,
    us_to_timestamp,
)
from featcache.errors import (
    ConfigError,
    InvalidRequest,
    OfflineStoreError,
    OfflineStoreUnavailable,
    SchemaError,
)
from featcache.urls import mask_url

__all__ = [
    "INSTALLED_DRIVERS",
    "BoundView",
    "EventWindow",
    "OfflineStore",
    "RowColumns",
    "SqlRow",
    "create_engine",
    "engine_url",
    "only",
    "raw_column",
    "safe_url",
    "translate",
]

EntityId = int | str


class SqlRow(NamedTuple):
    """The latest row of one entity: its event time and the feature values, declared types.
    A named tuple: the bulk paths build hundreds of thousands of them."""

    event_us: int | None
    values: tuple[Any, ...]


class RowColumns(NamedTuple):
    """The latest rows of many entities as columns: distinct ids, their event times and one
    list per feature (declared types, in the view's order). The bulk path's shape: encoded
    by ``RowCodec.encode_columns`` without a tuple per row."""

    ids: Sequence[EntityId]
    events_us: Sequence[int | None]
    columns: Sequence[Sequence[Any]]

    @classmethod
    def of(cls, rows: Mapping[EntityId, SqlRow], width: int) -> RowColumns:
        """The same rows, from ``SqlRow``s."""
        found = rows.values()
        columns = [list(column) for column in zip(*(row.values for row in found), strict=True)]
        return cls(list(rows), [row.event_us for row in found],
                   columns or [[] for _ in range(width)])

    def only(self, ids: Sequence[EntityId]) -> RowColumns:
        """The rows of ``ids`` among these (see ``only``)."""
        wanted = set(ids)
        if wanted.issuperset(self.ids):
            return self
        keep = [i for i, entity in enumerate(self.ids) if entity in wanted]
        return RowColumns([self.ids[i] for i in keep], [self.events_us[i] for i in keep],
                          [[column[i] for i in keep] for column in self.columns])


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    return mask_url(url)


#: The DBAPI driver featcache installs (pyproject.toml) for each dialect whose SQLAlchemy
#: default driver is another one (psycopg2 before SQLAlchemy 2.1; mysqlclient, imported as
#: ``MySQLdb``): a URL that names no driver gets this one.
INSTALLED_DRIVERS: Final[Mapping[str, str]] = {
    "postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql",
}
_DIALECTS: Final = ("sqlite", "postgresql", "mysql", "mariadb", "mssql", "oracle")


def engine_url(url: str) -> sa.URL:
    """``url`` as the engine is created with it: ``postgresql://``, ``mysql://`` and
    ``mariadb://`` without a driver use the one featcache installs (``INSTALLED_DRIVERS``), so
    they work rather than fail on a driver that is not a dependency; a URL that names its
    driver is kept as written. Raises what ``make_url`` raises for a URL that does not parse."""
    parsed = sa.engine.make_url(url)
    driver = INSTALLED_DRIVERS.get(parsed.drivername)
    return parsed if driver is None else parsed.set(drivername=f"{parsed.drivername}+{driver}")


def create_engine(
    url: str, path: str, source: str = "", connect_timeout: float | None = None, **options: Any
) -> sa.Engine:
    """An engine for ``engine_url(url)``; nothing connects yet. A URL that does not parse, an
    unknown dialect or a driver that is not installed is a ``ConfigError`` at ``path`` that
    says which URL works, with the password masked."""
    try:
        parsed = engine_url(url)
        if connect_timeout is not None:
            options["connect_args"] = _connect_args(parsed, connect_timeout)
        return sa.create_engine(parsed, **options)
    except (sa_exc.ArgumentError, ImportError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot use offline store URL {mask_url(url)}: {_no_secrets(exc, url)}"
            f"{_driver_hint(url, exc)}", path, source,
        ) from None


def _driver_hint(url: str, exc: BaseException) -> str:
    """What to write instead, when the dialect or the driver of ``url`` is the problem."""
    if not isinstance(exc, ImportError | sa_exc.NoSuchModuleError):
        return ""  # the URL does not parse: its own message says where
    dialect, _, driver = engine_url(url).drivername.partition("+")
    if dialect not in _DIALECTS:
        close = difflib.get_close_matches(dialect, _DIALECTS, n=1)
        return f"; unknown dialect {dialect!r}" + (
            f", did you mean {close[0]}://?" if close
            else f" (SQLAlchemy ships {', '.join(_DIALECTS)}; others come as plugins)")
    installed = INSTALLED_DRIVERS.get(dialect)
    if installed is not None:
        return (f"; the driver {driver!r} is not available: write {dialect}+{installed}:// "
                f"(or {dialect}://, which uses {installed}), the driver featcache installs")
    named = f"the {dialect} driver {driver!r}" if driver else f"SQLAlchemy's {dialect} driver"
    return f"; {named} is not available: install it, or name an installed one ({dialect}+DRIVER://)"


def _connect_args(url: sa.URL, timeout: float) -> dict[str, Any]:
    backend = url.get_backend_name()
    seconds = max(1, round(timeout))
    if backend == "sqlite":
        return {"timeout": timeout}
    if backend in ("postgresql", "mysql", "mariadb"):
        return {"connect_timeout": seconds}
    return {}


def raw_column(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The DBAPI's own value, without SQLAlchemy's result processing.

    Reflected types can lose data on the way: MySQL's reflected DOUBLE returns a Decimal rounded
    to 10 places. The drivers' raw values are exact, and ``featcache.convert`` turns every
    dialect's spelling (0/1 booleans, ISO text timestamps, JSON text arrays) into the declared
    type with one set of rules.
    """
    return sa.type_coerce(column, sa.types.NullType())


def _any_of_ids(entity: sa.Column[Any], dialect: str) -> sa.ColumnElement[bool]:
    """``entity`` is one of the bound list ``ids``.

    On PostgreSQL, ``entity = ANY(:ids)`` with the list bound as one array: the statement text
    is the same for every batch, so neither SQLAlchemy (expanding a 1,000-id ``IN`` into 1,000
    placeholders) nor psycopg (parsing them) redoes per-query work that cost more than the
    server's execution (bench materialize, docs/benchmarks.md), and the server can reuse a
    prepared plan. Elsewhere an expanding ``IN`` (SQLite and MySQL have no array parameters).
    """
    if dialect == "postgresql":
        return entity == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(entity.type)))
    return entity.in_(sa.bindparam("ids", expanding=True))


class BoundView:
    """A view whose table has been reflected: its latest-row queries and column converters."""

    def __init__(self, view: FeatureView, table: sa.Table, dialect: str = "") -> None:
        self.view = view
        self.table = table
        self.dialect = dialect
        # MySQL/MariaDB's default collations compare 'a', 'A' and 'a ' as equal: grouping and
        # listing ids go by their bytes there, and readers drop rows of ids they did not ask
        # for (``entity IN (...)`` still matches by collation, which keeps the index usable)
        self.exact_ids = view.entity_type == "str" and dialect in ("mysql", "mariadb")
        entity = table.c[view.entity_column]
        self.query = self.latest_query(_any_of_ids(entity, dialect))
        # a run of ids as the database orders them (``bulk.iter_entity_ids(ordered=True)``),
        # read by its ends; not where the collation makes distinct ids compare equal
        self.range_query: sa.Select[Any] | None = None if self.exact_ids else self.latest_query(
            entity.between(sa.bindparam("lo"), sa.bindparam("hi"))
        )
        self.converters: tuple[Callable[[Any], Any], ...] = tuple(
            converter(f.type) for f in view.features
        )
        self.int_ids = view.entity_type == "int"

    def latest_query(self, entities: sa.ColumnElement[bool] | None) -> sa.Select[Any]:
        """The latest row per entity by event time, for the entities ``entities`` selects
        (all of them when None): the one query every reader of the view uses."""
        view, table = self.view, self.table
        entity = table.c[view.entity_column]
        event = table.c[view.event_timestamp_column]
        order: list[sa.ColumnElement[Any]] = [
            # NULL event times sort last on every dialect (MySQL has no NULLS LAST)
            sa.case((event.is_(None), 1), else_=0),
            event.desc(),
        ]
        if view.updated_at_column is not None:  # a tie on the event: the latest correction
            updated = table.c[view.updated_at_column]
            order += [sa.case((updated.is_(None), 1), else_=0), updated.desc()]
        partition = sa.cast(entity, sa.LargeBinary) if self.exact_ids else entity
        rank = sa.func.row_number().over(partition_by=partition, order_by=order).label("fc_rank")
        ranked = sa.select(
            entity.label("fc_entity"),
            raw_column(event).label("fc_event"),
            *(raw_column(table.c[f.column]).label(f"fc_f{i}")
              for i, f in enumerate(view.features)),
            rank,
        )
        if entities is not None:
            ranked = ranked.where(entities)
        inner = ranked.subquery("fc_latest")
        return sa.select(
            inner.c.fc_entity,
            inner.c.fc_event,
            *(inner.c[f"fc_f{i}"] for i in range(len(view.features))),
        ).where(inner.c.fc_rank == 1)

    def in_window(self, window: EventWindow | None) -> sa.ColumnElement[bool] | None:
        """Rows whose event timestamp falls in ``window`` (None: no filter); compared as
        ``updated_since`` compares (SQLite by ``julianday``, a column without a time zone
        as UTC wall time)."""
        if window is None or (window.start is None and window.end is None):
            return None
        column = self.table.c[self.view.event_timestamp_column]
        parts: list[sa.ColumnElement[bool]] = []
        for given, after in ((window.start, True), (window.end, False)):
            if given is None:
                continue
            when = _utc(given)
            if self.dialect == "sqlite":
                parts.append(_sqlite_at_or_after(column, when) if after
                             else _sqlite_before(column, when))
                continue
            if not getattr(column.type, "timezone", False):
                when = when.astimezone(dt.UTC).replace(tzinfo=None)
            parts.append(column >= when if after else column < when)
        return sa.and_(*parts)

    def windowed_query(self, window: EventWindow) -> sa.Select[Any]:
        """``query`` (the latest row of each bound id) among the rows in ``window``."""
        entity = self.table.c[self.view.entity_column]
        where = self.in_window(window)
        ids = _any_of_ids(entity, self.dialect)
        return self.latest_query(ids if where is None else sa.and_(ids, where))

    def updated_since(self, since: dt.datetime | None) -> sa.ColumnElement[bool] | None:
        """Rows whose ``updated_at`` is at or after ``since`` (None: no filter). A naive
        ``since`` is UTC, as featcache reads timestamps; it is compared with a column without
        a time zone as UTC wall time."""
        if since is None:
            return None
        view = self.view
        if view.updated_at_column is None:
            raise InvalidRequest(
                f"view {view.name!r} has no updated_at column, so rows changed since a time "
                "cannot be found; configure views.<name>.updated_at or use ids or all"
            )
        column = self.table.c[view.updated_at_column]
        when = since if since.tzinfo is not None else since.replace(tzinfo=dt.UTC)
        if self.dialect == "sqlite":
            return _sqlite_at_or_after(column, when)
        if not getattr(column.type, "timezone", False):
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
        return column >= when


class EventWindow(NamedTuple):
    """Rows whose event timestamp is at or after ``start`` and before ``end`` (either may be
    None: no bound). Naive times are UTC, as featcache reads timestamps."""

    start: dt.datetime | None
    end: dt.datetime | None


def _utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _sqlite_before(column: sa.Column[Any], when: dt.datetime) -> sa.ColumnElement[bool]:
    """``column < when`` for SQLite's text times, by ``julianday()`` as
    ``_sqlite_at_or_after`` compares them (a row up to 1 ms before ``when`` may be judged at
    it)."""
    utc = when.astimezone(dt.UTC).replace(tzinfo=None)
    instant = sa.bindparam("fc_before", utc.isoformat(sep=" "), type_=sa.String())
    return sa.func.julianday(column) < sa.func.julianday(instant)


def _sqlite_at_or_after(column: sa.Column[Any], when: dt.datetime) -> sa.ColumnElement[bool]:
    """``column >= when`` for SQLite, where a DATETIME is text and compares as text: the row
    '2026-01-01 01:00:00' (CURRENT_TIMESTAMP's form, or Python's for a whole second) sorts
    before the bound '2026-01-01 01:00:00.000000', and 'T' after ' '. ``julianday()``
    compares the instants (to the millisecond, never reordering them, so a row at ``when`` or
    later is always in; one up to 1 ms earlier may be too). The text bound two days earlier
    is implied by it for ISO text (offsets are at most 14 h) and lets an index on the column
    narrow the scan."""
    utc = when.astimezone(dt.UTC).replace(tzinfo=None)
    floor = sa.bindparam("fc_since_floor", (utc - dt.timedelta(days=2)).date().isoformat(),
                         type_=sa.String())
    instant = sa.bindparam("fc_since", utc.isoformat(sep=" "), type_=sa.String())
    return sa.and_(column >= floor, sa.func.julianday(column) >= sa.func.julianday(instant))


class OfflineStore:
    """Latest-row reads for every configured view, on one pooled SQLAlchemy engine."""

    def __init__(
        self,
        config: OfflineStoreConfig,
        views: Iterable[FeatureView],
        engine: sa.Engine | None = None,
        *,
        source: str = "",
    ) -> None:
        """``views``: the views it may be asked for (``view``); ``source``: the config file,
        named by its errors."""
        self.config = config
        self.views = tuple(views)
        self._source = source
        self.url = safe_url(config.url)
        if engine is None:
            engine = create_engine(
                config.url, "offline_store.url", source,
                connect_timeout=config.connect_timeout,
                pool_pre_ping=True, pool_size=config.pool_size,
            )
        self.engine = engine
        self._bound: dict[str, BoundView] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """One ``SELECT 1``: the database answers (readiness checks); raises
        ``OfflineStoreUnavailable`` or ``OfflineStoreError`` as a read would."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).scalar_one()
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, self.url, "checking the connection") from exc

    def view(self, view: str | FeatureView) -> FeatureView:
        """The configured view of that name (``UnknownView`` if there is none)."""
        return find_view(self.views, view if isinstance(view, str) else view.name)

    # ------------------------------------------------------------------ schema, at first use

    def bind(self, view: FeatureView) -> BoundView:
        bound = self._bound.get(view.name)
        if bound is not None:
            return bound
        with self._lock:
            bound = self._bound.get(view.name)
            if bound is None:
                bound = BoundView(view, self._reflect(view), self.engine.dialect.name)
                self._bound[view.name] = bound
        return bound

    def _reflect(self, view: FeatureView) -> sa.Table:
        table = self.reflect_table(view)
        missing = self.column_errors(view, table)
        if missing:
            raise missing[0]
        return table

    def reflect_table(self, view: FeatureView) -> sa.Table:
        """The view's table as the database describes it; ``SchemaError`` when there is none.
        Its configured columns are not checked here (``column_errors``)."""
        path = f"views.{view.name}"
        qualified = f"{view.schema}.{view.table}" if view.schema else view.table
        try:
            table = sa.Table(
                view.table, sa.MetaData(), schema=view.schema, autoload_with=self.engine
            )
        except sa_exc.NoSuchTableError:
            raise SchemaError(
                f"table {qualified!r} does not exist in the offline store {self.url}",
                f"{path}.table",
                self._source,
            ) from None
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, self.url, f"reflecting table {qualified!r}") from exc
        return table

    def column_errors(self, view: FeatureView, table: sa.Table) -> list[SchemaError]:
        """A ``SchemaError`` for each configured column of ``view`` that ``table`` lacks, in
        the configuration's order (a read raises the first; ``featcache validate`` shows all)."""
        path = f"views.{view.name}"
        qualified = f"{view.schema}.{view.table}" if view.schema else view.table
        columns = list(table.c.keys())
        errors: list[SchemaError] = []
        wanted = [
            (f"{path}.entity.column", view.entity_column),
            (f"{path}.event_timestamp", view.event_timestamp_column),
            *([(f"{path}.updated_at", view.updated_at_column)] if view.updated_at_column else []),
            *((f"{path}.features.{f.name}", f.column) for f in view.features),
        ]
        for key_path, column in wanted:
            if column not in table.c:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                errors.append(SchemaError(
                    f"column {column!r} does not exist in table {qualified!r}{hint} "
                    f"(columns: {', '.join(columns)})",
                    key_path,
                    self._source,
                ))
        return errors

    # ------------------------------------------------------------------ reads

    def fetch_latest(
        self, view: FeatureView, ids: Sequence[EntityId]
    ) -> tuple[dict[EntityId, SqlRow], float]:
        """The latest row per id that SQL has (one query per chunk), and the seconds it took."""
        bound = self.bind(view)
        found: dict[EntityId, SqlRow] = {}
        started = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                for chunk in _chunks(ids, self.config.chunk_size):
                    rows = conn.execute(bound.query, {"ids": list(chunk)}).fetchall()
                    self.convert_rows(bound, rows, found)
            if bound.exact_ids:
                found = only(found, ids)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, self.url, f"reading view {view.name!r}") from exc
        return found, time.perf_counter() - started

    def convert_rows(
        self, bound: BoundView, rows: Sequence[Sequence[Any]], out: dict[EntityId, SqlRow]
    ) -> None:
        """``_convert`` for many rows (entity, event, features...), a column at a time: the
        bulk readers' path. A value that does not convert sends the batch through ``_convert``
        row by row, for the error that names the entity and the column."""
        if not rows:
            return
        self.convert_columns(bound, list(zip(*rows, strict=True)), out)

    def convert_columns(
        self,
        bound: BoundView,
        columns: Sequence[Sequence[Any]],
        out: dict[EntityId, SqlRow],
        *,
        events_us: Sequence[int | None] | None = None,
        exact: Sequence[bool] = (),
    ) -> None:
        """``convert_rows`` of rows given as columns (entity, event, features...).
        ``events_us``: the event times already in microseconds (an Arrow timestamp column),
        instead of converting ``columns[1]``. ``exact[i]``: feature column i is known to
        hold the declared type already (from its Arrow type), so its values are kept as
        they are, which is what converting them would give."""
        if not columns or not columns[0]:
            return
        converted = self._converted(bound, columns, events_us, exact)
        if converted is None:
            if events_us is not None:
                columns = [columns[0], [us_to_timestamp(u) for u in events_us], *columns[2:]]
            for row in zip(*columns, strict=True):
                self._convert(bound, row[0], row, out)
            return
        keys, events, values = converted
        # tuple.__new__(SqlRow, (event, values)) builds each row in C (SqlRow(...) would run
        # the named tuple's Python __new__ once per row)
        pairs = zip(events, zip(*values, strict=True), strict=True)
        rows_out = map(tuple.__new__, repeat(SqlRow), pairs)
        out.update(zip(keys, rows_out, strict=True))

    def convert_to_columns(
        self,
        bound: BoundView,
        columns: Sequence[Sequence[Any]],
        *,
        events_us: Sequence[int | None] | None = None,
        exact: Sequence[bool] = (),
    ) -> RowColumns:
        """``convert_columns`` answering ``RowColumns``: the bulk writer encodes them with no
        tuple per row. Rows needing the per-row path (a value to convert one by one, an id
        twice) go through ``convert_columns`` and come back transposed."""
        if not columns or not columns[0]:
            return RowColumns.of({}, len(bound.view.features))
        converted = self._converted(bound, columns, events_us, exact)
        if converted is not None and len(set(converted[0])) == len(converted[0]):
            return RowColumns(*converted)
        out: dict[EntityId, SqlRow] = {}
        self.convert_columns(bound, columns, out, events_us=events_us, exact=exact)
        return RowColumns.of(out, len(bound.view.features))

    def _converted(
        self,
        bound: BoundView,
        columns: Sequence[Sequence[Any]],
        events_us: Sequence[int | None] | None,
        exact: Sequence[bool],
    ) -> tuple[Sequence[EntityId], Sequence[int | None], list[Sequence[Any]]] | None:
        """The columns in the declared types by column-wise passes, or None where some value
        needs the per-row path (which names the entity of a bad one)."""
        ids = columns[0]
        try:
            kind: type[int] | type[str] = int if bound.int_ids else str
            keys: Sequence[EntityId] = ids if set(map(type, ids)) == {kind} else [
                kind(x) for x in ids
            ]
            events = timestamps_to_us(columns[1]) if events_us is None else events_us
            values = [
                columns[2 + i] if i < len(exact) and exact[i]
                else convert_column(f.type, columns[2 + i])
                for i, f in enumerate(bound.view.features)
            ]
        except (ConversionError, ValueError, TypeError):
            return None
        return keys, events, values

    def _convert(
        self, bound: BoundView, entity: Any, row: Sequence[Any], out: dict[EntityId, SqlRow]
    ) -> None:
        view = bound.view
        key: EntityId = int(entity) if bound.int_ids else str(entity)
        try:
            event_us = timestamp_to_us(row[1])
        except ConversionError as exc:
            raise SchemaError(
                f"entity {key!r}: event timestamp: {exc}", f"views.{view.name}.event_timestamp",
                self._source,
            ) from None
        values = []
        for i, convert in enumerate(bound.converters):
            try:
                values.append(convert(row[2 + i]))
            except ConversionError as exc:
                feature = view.features[i]
                raise SchemaError(
                    f"entity {key!r}: column {feature.column!r} holds a value that is not "
                    f"{feature.type.value}: {exc}",
                    f"views.{view.name}.features.{feature.name}.type",
                    self._source,
                ) from None
        out[key] = SqlRow(event_us, tuple(values))


def _no_secrets(exc: BaseException, url: str) -> str:
    text = str(exc).replace(url, mask_url(url))
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        password = sa.engine.make_url(url).password
        return None if password is None else str(password)
    except Exception:  # an unparsable URL has no password we could mask
        return None


def translate(exc: sa_exc.SQLAlchemyError, url: str, doing: str) -> Exception:
    """The featcache error for a SQLAlchemy (or driver) error met while ``doing`` on the
    offline store at ``url`` (masked): the one place SQL errors are translated. The caller
    raises it ``from exc``, which keeps the original as ``__cause__``."""
    # OperationalError/InterfaceError/TimeoutError are what drivers and the pool raise when
    # the server is unreachable; everything else is a failed query.
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return OfflineStoreUnavailable(f"offline store {url} unavailable while {doing}: "
                                       f"{_short(exc)}")
    if isinstance(exc, sa_exc.DisconnectionError):
        return OfflineStoreUnavailable(f"offline store {url} disconnected while {doing}")
    return OfflineStoreError(f"offline store {url} failed while {doing}: {_short(exc)}")


def _short(exc: sa_exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def only(found: dict[EntityId, SqlRow], ids: Sequence[EntityId]) -> dict[EntityId, SqlRow]:
    """The rows of ``ids`` among ``found``: drops rows of ids a collation matched to them."""
    wanted = set(ids)
    if found.keys() <= wanted:
        return found
    return {entity: row for entity, row in found.items() if entity in wanted}


def _chunks(seq: Sequence[EntityId], size: int) -> Iterator[Sequence[EntityId]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
