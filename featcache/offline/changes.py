"""The change poll's SQL: which entities changed at or after a time, and when.

``featcache.jobs.changes`` holds the policy (the watermark, the lookback window, the set of
changes already applied, what to rewrite); this module runs the one query it needs, in
ascending order of change time, in chunks. The changes are found by the view's ``updated_at``
column, or by a configured change query (``featcache.config_warmer.ChangeQuery``), which is
wrapped, not trusted for order: it becomes the subquery ``fc_changes``, with ``:watermark``
bound (never formatted in), and the ``MAX(updated_at) ... GROUP BY entity ORDER BY`` is done
here, so both sources give the same rows in the same order.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from featcache.config import FeatureView
from featcache.config_warmer import CHANGE_COLUMNS, WATERMARK_PARAM, ChangeQuery
from featcache.convert import timestamp_to_us
from featcache.offline.store import BoundView, OfflineStore, translate
from featcache.request import EntityId

__all__ = ["changed_since"]

_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # :watermark of a first poll from the start


def changed_since(
    offline: OfflineStore, view: str | FeatureView, since: dt.datetime | None, chunk_rows: int,
    change_query: ChangeQuery | None = None,
) -> Generator[list[tuple[EntityId, int]], None, None]:
    """(entity, its latest change time in µs) for the entities changed at or after ``since``
    (None: every change), ascending by time, then id, in chunks of at most ``chunk_rows``;
    found by ``change_query`` when given, else by the view's ``updated_at`` column.

    A change query that fails for want of its columns is a ``SchemaError`` at its config
    path, and so is a row of it that is not an id and a timestamp; any other SQL failure is
    translated (``OfflineStoreError``/``OfflineStoreUnavailable``)."""
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    doing = f"polling view {view_def.name!r} for changes"
    try:
        query = _changes_query(bound, since, change_query)
        with contextlib.ExitStack() as open_read:
            conn = open_read.enter_context(offline.engine.connect())
            try:
                result = conn.execution_options(
                    stream_results=True, yield_per=chunk_rows).execute(query)
            except sa_exc.SQLAlchemyError:
                if change_query is not None:  # most likely its columns: say which key to fix
                    _check_columns(offline.engine, change_query)
                raise
            parts: Iterable[Sequence[Any]] = result.partitions(chunk_rows)
            if bound.dialect == "sqlite":
                # An open statement holds SQLite's shared lock, and no ETL could commit until
                # the poll's last chunk was written (rollback journal): the list of changes
                # (ids and times, ~100 bytes each) is read whole, the read closed, then worked.
                listed = result.fetchall()
                open_read.close()
                parts = (listed[i : i + chunk_rows] for i in range(0, len(listed), chunk_rows))
            for part in parts:
                out: list[tuple[EntityId, int]] = []
                for raw_id, raw_ts in part:
                    if raw_id is None:
                        continue
                    try:
                        ts_us = timestamp_to_us(raw_ts)
                        eid: EntityId = int(raw_id) if bound.int_ids else str(raw_id)
                    except (ValueError, TypeError) as exc:  # ConversionError is a ValueError
                        if change_query is None:
                            raise
                        raise change_query.error(
                            f"row ({raw_id!r}, {raw_ts!r}): expected an entity id "
                            f"({view_def.entity_type}) and a timestamp: {exc}") from None
                    if ts_us is not None:
                        out.append((eid, ts_us))
                yield out
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, doing) from exc


def _changes_query(
    bound: BoundView, since: dt.datetime | None, change_query: ChangeQuery | None,
) -> sa.Select[Any]:
    """(entity, its latest change time) at or after ``since`` (None: all), ascending by time,
    then id."""
    view, table = bound.view, bound.table
    entity: sa.ColumnElement[Any]
    changed_at: sa.ColumnElement[Any]
    if change_query is None:
        assert view.updated_at_column is not None
        entity, changed_at = table.c[view.entity_column], table.c[view.updated_at_column]
        where = bound.updated_since(since)
    else:
        if view.updated_at_column is not None:  # bound as the column poll binds it
            aware = bool(getattr(table.c[view.updated_at_column].type, "timezone", False))
        else:  # timestamptz is PostgreSQL's usual kind; elsewhere times carry no offset
            aware = bound.dialect == "postgresql"
        sub = _subquery(change_query, since if since is not None else _START, aware)
        entity, changed_at = sub.c.entity_id, sub.c.updated_at
        where = None
    latest = sa.func.max(changed_at).label("fc_changed_at")
    query = sa.select(entity, latest).where(changed_at.is_not(None))
    if where is not None:
        query = query.where(where)
    groups: list[sa.ColumnElement[Any]] = [entity]
    if bound.exact_ids:
        # MySQL/MariaDB's default collations compare case- and trailing-space-insensitively:
        # 'a', 'A' and 'a ' would be one group, and two of three changed entities never
        # refreshed.
        groups.append(sa.cast(entity, sa.LargeBinary))
    return query.group_by(*groups).order_by(latest, entity)


def _subquery(change_query: ChangeQuery, watermark: dt.datetime, aware: bool) -> sa.Subquery:
    """The query with ``watermark`` bound, as the subquery ``fc_changes``."""
    value = watermark if aware else watermark.astimezone(dt.UTC).replace(tzinfo=None)
    bound = sa.text(change_query.sql).bindparams(
        sa.bindparam(WATERMARK_PARAM, value, type_=sa.DateTime(timezone=aware))
    )
    return bound.columns(*(sa.column(c) for c in CHANGE_COLUMNS)).subquery("fc_changes")


def _check_columns(engine: sa.Engine, change_query: ChangeQuery) -> None:
    """Raise ``SchemaError`` when the query does not return the columns it must; return
    quietly when it does, or cannot tell (the failure was something else)."""
    probe: sa.Select[Any] = sa.select(sa.literal_column("*")).select_from(
        _subquery(change_query, _START, aware=False)).where(sa.false())
    try:
        with engine.connect() as conn:  # a fresh one: the failed transaction may be aborted
            names = conn.execute(probe).keys()  # a Result's columns, not a dict's keys
        keys = [str(k).lower() for k in names]
    except sa_exc.SQLAlchemyError:
        return
    missing = [c for c in CHANGE_COLUMNS if c not in keys]
    if missing:
        raise change_query.error(
            f"it returns the columns {', '.join(keys) or 'none'}; it must return "
            f"{' and '.join(CHANGE_COLUMNS)} (alias them: SELECT user_id AS entity_id, ...)")
