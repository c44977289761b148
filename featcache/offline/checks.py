"""What ``featcache validate`` asks the SQL store about each view: the table, every configured
column, their types against the declared ones, a sample of rows converted as a read converts
them, and whether the database finds an entity's rows by an index.

A missing table or column, or a sampled value a read could not convert, is an error (the
``SchemaError`` the view's first read would raise); a column type that differs from the
declared one is a warning (drivers and ``featcache.convert`` bridge several: 0/1 integers for
a bool, ISO text for a timestamp, JSON text for a ``list[float]``), and so is a lookup by
entity id that would scan the table: every read of the view runs one.

How the index is judged: on SQLite by ``EXPLAIN QUERY PLAN`` of a lookup by id (its planner
uses an index for an equality whenever one serves it, and says ``SCAN`` otherwise; a database
view is judged through its tables). Elsewhere by the reflected primary key and indexes (on
PostgreSQL from ``pg_index``): one whose first column is the entity column serves the lookup,
one that holds it further back does not. A PostgreSQL view has no indexes of its own: it is
judged by ``EXPLAIN`` of the lookup with sequential scans disabled for that transaction (a
small table is always cheaper to scan, so a plain ``EXPLAIN`` would say little; with scans
disabled the plan still scans only when no index can serve). Other dialects' views are not
judged (a note says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from featcache.config import FeatureView
from featcache.errors import FeatcacheError, SchemaError
from featcache.offline.store import EntityId, OfflineStore, SqlRow, raw_column, translate

__all__ = ["SAMPLE_ROWS", "ViewCheck", "check_view", "type_family"]

#: rows read and converted per view
SAMPLE_ROWS: Final = 100

#: the column type families (``type_family``) that hold each declared type as a read expects;
#: another known family is a warning, an unknown one (``NullType``, a plugin's) is not judged
_FITS: Final[dict[str, frozenset[str]]] = {
    "int": frozenset({"int"}),
    "float": frozenset({"float", "decimal", "int"}),
    "bool": frozenset({"bool", "int"}),  # SQLite and MySQL keep booleans as 0/1
    "str": frozenset({"text"}),
    "timestamp": frozenset({"timestamp"}),
    "list[float]": frozenset({"json", "array", "text"}),  # JSON text converts
}


@dataclass(slots=True)
class ViewCheck:
    """What was found about one view. ``errors``: what would fail the view's reads;
    ``warnings``: what works but costs or risks something; ``notes``: what was found."""

    view: str
    table: str
    errors: list[FeatcacheError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def type_family(column_type: sa.types.TypeEngine[Any]) -> str:
    """The family of a reflected column type: int, float, decimal, bool, text, timestamp,
    date, time, json, array, binary, uuid, interval, or unknown."""
    checks: tuple[tuple[type[Any], str], ...] = (
        (sa.Boolean, "bool"), (sa.Integer, "int"), (sa.Float, "float"),
        (sa.DateTime, "timestamp"), (sa.Date, "date"), (sa.Time, "time"),
        (sa.Interval, "interval"), (sa.JSON, "json"), (sa.ARRAY, "array"),
        (sa.String, "text"), (sa.LargeBinary, "binary"), (sa.Uuid, "uuid"),
    )
    for kind, family in checks:
        if isinstance(column_type, kind):
            return family
    if isinstance(column_type, sa.Numeric):  # after Float and Integer, which subclass it
        return "int" if column_type.scale == 0 else "decimal"
    return "unknown"


def check_view(offline: OfflineStore, view: FeatureView,
               sample_rows: int = SAMPLE_ROWS) -> ViewCheck:
    """Everything ``featcache validate`` checks of ``view`` on ``offline``'s database.

    A database that cannot be reached or refuses a statement is an error of the check
    (``OfflineStoreUnavailable``, ``OfflineStoreError``), never an exception."""
    qualified = f"{view.schema}.{view.table}" if view.schema else view.table
    check = ViewCheck(view.name, qualified)
    try:
        table = offline.reflect_table(view)
    except FeatcacheError as exc:
        check.errors.append(exc)
        return check
    missing = offline.column_errors(view, table)
    check.errors.extend(missing)
    _check_types(view, table, check)
    if not missing:
        try:
            _sample(offline, view, sample_rows, check)
        except FeatcacheError as exc:
            check.errors.append(exc)
    if view.entity_column in table.c:
        _check_index(offline, view, table, check)
    return check


def _declared(view: FeatureView) -> list[tuple[str, str, str]]:
    """(config key, column, declared type) of every configured column."""
    path = f"views.{view.name}"
    out = [(f"{path}.entity.column", view.entity_column, view.entity_type),
           (f"{path}.event_timestamp", view.event_timestamp_column, "timestamp")]
    if view.updated_at_column is not None:
        out.append((f"{path}.updated_at", view.updated_at_column, "timestamp"))
    out += [(f"{path}.features.{f.name}.type", f.column, f.type.value) for f in view.features]
    return out


def _check_types(view: FeatureView, table: sa.Table, check: ViewCheck) -> None:
    unjudged = []
    for key, column, declared in _declared(view):
        if column not in table.c:
            continue  # an error already
        column_type = table.c[column].type
        family = type_family(column_type)
        if family == "unknown":
            unjudged.append(column)
        elif family not in _FITS[declared]:
            check.warnings.append(
                f"{key}: column {column!r} is {_spelled(column_type)} in the database, "
                f"declared {declared}: a value that does not convert to {declared} fails the "
                f"view's reads (SchemaError)")
    if unjudged:
        check.notes.append(f"type not checked (unknown to SQLAlchemy): {', '.join(unjudged)}")


def _spelled(column_type: sa.types.TypeEngine[Any]) -> str:
    try:
        return str(column_type)
    except Exception:  # a type some dialects cannot render on their own
        return type(column_type).__name__


def _sample(offline: OfflineStore, view: FeatureView, limit: int, check: ViewCheck) -> None:
    """The first ``limit`` rows with an id, converted as a read converts them: a value of
    another type is the ``SchemaError`` a read of that entity would raise."""
    bound = offline.bind(view)
    table = bound.table
    entity = table.c[view.entity_column]
    query = (sa.select(entity, raw_column(table.c[view.event_timestamp_column]),
                       *(raw_column(table.c[f.column]) for f in view.features))
             .where(entity.is_not(None)).limit(limit))
    try:
        with offline.engine.connect() as conn:
            rows: Sequence[Any] = conn.execute(query).fetchall()
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, f"reading view {view.name!r}") from exc
    found: dict[EntityId, SqlRow] = {}
    try:
        offline.convert_rows(bound, rows, found)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(f"the entity column {view.entity_column!r} holds a value that is "
                          f"not an id of the view's type ({view.entity_type}): {exc}",
                          f"views.{view.name}.entity.type") from None
    check.notes.append(f"{len(rows)} row(s) read and converted" if rows
                       else "the table has no rows: no value checked")


def _check_index(offline: OfflineStore, view: FeatureView, table: sa.Table,
                 check: ViewCheck) -> None:
    dialect = offline.engine.dialect.name
    try:
        if dialect == "sqlite":
            verdict = _sqlite_plan(offline, view, table)
        else:
            verdict = _declared_indexes(offline, view, table)
            if verdict[0] is None and dialect == "postgresql":  # a database view
                verdict = _postgresql_plan(offline, view, table)
    except sa_exc.SQLAlchemyError as exc:
        error = translate(exc, offline.url, f"checking the indexes of {check.table!r}")
        check.warnings.append(f"the index on {view.entity_column!r} could not be checked: "
                              f"{error}")
        return
    indexed, detail = verdict
    if indexed is None:
        check.notes.append(detail)
    elif indexed:
        check.notes.append(f"lookup by {view.entity_column!r}: {detail}")
    else:
        check.warnings.append(
            f"views.{view.name}.entity.column: no index on {view.entity_column!r} in "
            f"{check.table!r}: every read of the view scans the table ({detail}); create one "
            f"whose first column is {view.entity_column!r}, e.g. ({view.entity_column}, "
            f"{view.event_timestamp_column})")


def _lookup(view: FeatureView, table: sa.Table) -> tuple[sa.Select[Any], EntityId]:
    entity = table.c[view.entity_column]
    sample: EntityId = 1 if view.entity_type == "int" else "x"
    return sa.select(entity).where(entity == sa.bindparam("fc_id")), sample


def _sqlite_plan(offline: OfflineStore, view: FeatureView,
                 table: sa.Table) -> tuple[bool | None, str]:
    query, sample = _lookup(view, table)
    compiled = query.compile(dialect=offline.engine.dialect)
    with offline.engine.connect() as conn:
        plan = [str(row[-1]) for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}", (sample,))]
    scans = [step for step in plan if step.startswith("SCAN ")]
    if scans:
        return False, f"EXPLAIN QUERY PLAN: {'; '.join(scans)}"
    return True, "; ".join(plan)


def _postgresql_plan(offline: OfflineStore, view: FeatureView,
                     table: sa.Table) -> tuple[bool | None, str]:
    query, sample = _lookup(view, table)
    compiled = query.compile(dialect=offline.engine.dialect)
    with offline.engine.connect() as conn, conn.begin() as transaction:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = [str(row[0]).strip() for row in conn.exec_driver_sql(
            f"EXPLAIN {compiled}", {"fc_id": sample})]
        transaction.rollback()
    scans = [step.removeprefix("-> ").strip() for step in plan if "Seq Scan" in step]
    if scans:
        return False, f"EXPLAIN with enable_seqscan off: {'; '.join(scans)}"
    used = [step.removeprefix("-> ").strip() for step in plan if " using " in step]
    return True, "; ".join(used or plan[:1])


def _declared_indexes(offline: OfflineStore, view: FeatureView,
                      table: sa.Table) -> tuple[bool | None, str]:
    inspector = sa.inspect(offline.engine)
    name, schema = table.name, table.schema
    if name in inspector.get_view_names(schema=schema):
        return None, (f"{table.fullname} is a database view: the indexes of its tables are "
                      "not checked on this database")
    column = view.entity_column
    key = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    if key[:1] == [column]:
        return True, "the primary key"
    behind = []
    for index in inspector.get_indexes(name, schema=schema):
        columns = [c for c in index.get("column_names") or [] if c is not None]
        if columns[:1] == [column]:
            return True, f"index {index['name']}"
        if column in columns:
            behind.append(str(index["name"]))
    if column in key:
        behind.append("the primary key")
    if behind:
        return False, f"{column!r} is not the first column of {', '.join(behind)}"
    return False, "no index holds it"
