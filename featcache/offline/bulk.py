"""Bulk reads of a view's latest rows from SQL, in bounded chunks: what the warmer writes.

``iter_latest_rows`` yields lists of row dicts keyed by the view's SQL column names (the
entity column, the event timestamp column, every feature column), ready for
``FeatureCache.put_rows``. Values go through the offline store's own converters
(``OfflineStore.convert_rows``), so they have exactly the types a read-through fill produces.
Memory is bounded by one chunk, never by the table:

- ``ids``: chunks of ``chunk_rows`` ids, each read with the offline store's latest-row query
  (an expanding ``IN``, sent in sub-chunks of ``offline_store.chunk_size`` ids);
- everything (``ids`` and ``since`` None): one latest-row query without the ``IN`` filter,
  streamed (``stream_results``: a server-side cursor on PostgreSQL; ``yield_per``);
- ``since``: like everything, restricted to entities with a row whose ``updated_at`` is at or
  after ``since``; their *latest* row is read, even when that row itself is older than
  ``since`` (a backfilled old event must not replace the current row).

``iter_entity_ids`` streams the distinct entity ids (all, or changed since) in chunks: the
warmer fences a chunk's ids before reading their rows (``featcache.writes``). Listed in the
database's order (``ordered=True``), a chunk is a run of consecutive ids, and
``latest_of_id_run`` reads it with one range query (``BETWEEN first AND last``) instead of
``IN`` lists: SQLite spends about a third as long per row on a range as on 1,000-id ``IN``
lists, and nothing has to be expanded or bound per id.

Every query is ``BoundView.latest_query`` (``featcache.offline.store``) with another entity
filter, so the bulk path and the serving path read rows identically. Every function takes the
``OfflineStore`` to read (``FeatureCache.offline``, for the cache's own engine and reflected
tables).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from operator import itemgetter
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from featcache.config import FeatureView
from featcache.convert import us_to_timestamp
from featcache.errors import InvalidRequest, SchemaError
from featcache.offline.arrow import (
    ArrowRangeReader,
    ArrowReadUnavailable,
    open_arrow_reader,
    open_id_stream,
)
from featcache.offline.store import (
    BoundView,
    EventWindow,
    OfflineStore,
    RowColumns,
    SqlRow,
    only,
    translate,
)
from featcache.request import EntityId

T = TypeVar("T")

__all__ = [
    "IdRunReader",
    "Rows",
    "count_entity_ids",
    "iter_entity_ids",
    "iter_latest_by_id",
    "iter_latest_rows",
    "latest_of_id_run",
    "reads_id_runs",
]

log = logging.getLogger("featcache.bulk")  # arrow.py logs here too: one logger for the bulk reads

_FIRST = itemgetter(0)

#: One chunk of rows: dicts keyed by the view's SQL column names.
Rows = list[dict[str, Any]]


def iter_latest_rows(
    offline: OfflineStore,
    view: str | FeatureView,
    *,
    ids: Sequence[EntityId] | None = None,
    since: dt.datetime | None = None,
    chunk_rows: int = 10_000,
) -> Iterator[Rows]:
    """The latest row per entity of ``view``, in chunks of at most ``chunk_rows`` rows.

    Ids that SQL has no row for are left out. Close the iterator (or exhaust it) to release
    the connection a streamed read holds.
    """
    if chunk_rows < 1:
        raise InvalidRequest(f"chunk_rows must be at least 1, got {chunk_rows}")
    if ids is not None and since is not None:
        raise InvalidRequest("pass ids or since, not both")
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    if ids is not None:
        for found in _by_ids(offline, bound, list(dict.fromkeys(ids)), chunk_rows, bound.query):
            yield _as_dicts(view_def, found)
        return
    where = bound.updated_since(since)
    entity = bound.table.c[view_def.entity_column]
    changed = None if where is None else entity.in_(sa.select(entity).where(where).distinct())
    yield from _streamed(offline, bound, bound.latest_query(changed), chunk_rows)


def iter_latest_by_id(
    offline: OfflineStore,
    view: str | FeatureView,
    ids: Sequence[EntityId],
    *,
    chunk_rows: int = 10_000,
    window: EventWindow | None = None,
) -> Iterator[dict[EntityId, SqlRow]]:
    """The latest rows of ``ids`` (among those whose event time falls in ``window``) as the
    offline store returns them (already converted), for ``FeatureCache.put_latest``: nothing
    is converted twice or rebuilt as dicts."""
    if chunk_rows < 1:
        raise InvalidRequest(f"chunk_rows must be at least 1, got {chunk_rows}")
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    query = bound.query if window is None else bound.windowed_query(window)
    yield from _by_ids(offline, bound, list(dict.fromkeys(ids)), chunk_rows, query)


def iter_entity_ids(
    offline: OfflineStore,
    view: str | FeatureView,
    *,
    since: dt.datetime | None = None,
    chunk_rows: int = 10_000,
    ordered: bool = False,
    window: EventWindow | None = None,
) -> Generator[list[EntityId], None, None]:
    """The distinct entity ids of ``view`` (with a row updated at or after ``since``, or with
    a row whose event time falls in ``window``), in chunks of at most ``chunk_rows``,
    streamed like ``iter_latest_rows``; ascending in the database's own order with
    ``ordered`` (for ``latest_of_id_run``)."""
    if chunk_rows < 1:
        raise InvalidRequest(f"chunk_rows must be at least 1, got {chunk_rows}")
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    entity = bound.table.c[view_def.entity_column]
    # by their bytes where a collation would fold 'a', 'A' and 'a ' into one (see BoundView)
    listed = sa.cast(entity, sa.LargeBinary) if bound.exact_ids else entity
    # a row without an id has no entity to cache (and NULL sorts first: as the id "None" it
    # would become the lower bound of a string view's first id range)
    query = sa.select(listed).where(entity.is_not(None)).distinct()
    for where in (bound.updated_since(since), bound.in_window(window)):
        if where is not None:
            query = query.where(where)
    if ordered:
        query = query.order_by(listed)
    kind: type[int] | type[str] = int if bound.int_ids else str
    if ordered and since is None and window is None and not bound.exact_ids:
        # through ADBC where it applies; from where it failed on, if it did, through
        # SQLAlchemy: the listing is ordered, so "after the last id listed" is the rest
        # (bound parameters other than these ids, like ``since``'s time, are left to
        # SQLAlchemy's bind processing, which ADBC would not apply)
        complete, last = yield from _listed_through_adbc(offline, bound, query, chunk_rows,
                                                         kind)
        if complete:
            return
        if last:
            query = query.where(listed > last[0])
    try:
        with offline.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(
                query
            )
            for part in result.partitions(chunk_rows):
                listed_ids = list(map(_FIRST, part))
                if bound.exact_ids:
                    yield [bytes(x).decode() for x in listed_ids]
                else:
                    yield _as_kind(listed_ids, kind, view_def.name)
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, f"listing the ids of view {view_def.name!r}") from exc


def count_entity_ids(
    offline: OfflineStore, view: str | FeatureView, *, since: dt.datetime | None = None,
    window: EventWindow | None = None,
) -> int:
    """How many ids ``iter_entity_ids`` lists (with a row updated at or after ``since``, or
    with one in ``window``), by one ``COUNT(DISTINCT)``: the total of a progress bar."""
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    entity = bound.table.c[view_def.entity_column]
    listed = sa.cast(entity, sa.LargeBinary) if bound.exact_ids else entity
    query = sa.select(sa.func.count(sa.distinct(listed))).where(entity.is_not(None))
    for where in (bound.updated_since(since), bound.in_window(window)):
        if where is not None:
            query = query.where(where)
    try:
        with offline.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, f"counting the ids of view {view_def.name!r}") from exc


def _as_kind(listed_ids: list[Any], kind: type[int] | type[str], view: str) -> list[EntityId]:
    """The ids as the view's id type: as the driver gave them when they already are (no step
    per id), else converted one by one; an id that is not one (text in an int view) is the
    table's fault, said as such rather than as a bare ``int()`` error."""
    if set(map(type, listed_ids)) == {kind}:
        return listed_ids
    out: list[EntityId] = []
    for value in listed_ids:
        try:
            out.append(kind(value))
        except (TypeError, ValueError):
            raise SchemaError(f"view {view!r}: the entity column holds {value!r}, which is not "
                              f"an id of the view's type ({kind.__name__})") from None
    return out


def _listed_through_adbc(
    offline: OfflineStore,
    bound: BoundView,
    query: sa.Select[Any],
    chunk_rows: int,
    kind: type[int] | type[str],
) -> Generator[list[EntityId], None, tuple[bool, list[EntityId]]]:
    """Chunks of ids listed through ADBC; returns whether the listing is complete, and the
    last id yielded (none, or one) for the caller to go on from when it is not."""
    stream = open_id_stream(offline, bound, query)
    if stream is None:
        return False, []
    last: list[EntityId] = []
    with contextlib.closing(stream), contextlib.closing(stream.chunks(chunk_rows)) as chunks:
        while True:
            try:
                listed_ids = next(chunks)
            except StopIteration:
                return True, last
            except Exception as exc:  # any ADBC or Arrow error: SQLAlchemy lists the rest
                log.warning("ADBC listing of view %s failed after %s (%s: %s); listing the "
                            "rest through SQLAlchemy", bound.view.name,
                            f"id {last[0]!r}" if last else "no id", type(exc).__name__, exc)
                return False, last
            ids = _as_kind(listed_ids, kind, bound.view.name)
            yield ids
            last = ids[-1:]


def reads_id_runs(offline: OfflineStore, view: str | FeatureView) -> bool:
    """Whether ``latest_of_id_run`` serves ``view``: everywhere but string ids on
    MySQL/MariaDB, whose collations make distinct ids compare equal."""
    view_def = offline.view(view)
    return offline.bind(view_def).range_query is not None


def latest_of_id_run(
    offline: OfflineStore, view: str | FeatureView, ids: Sequence[EntityId]
) -> dict[EntityId, SqlRow]:
    """The latest rows of ``ids``, a run of consecutive ids in the order
    ``iter_entity_ids(ordered=True)`` lists them, read with one query for the range
    ``ids[0]..ids[-1]``. Rows of ids inside the range but not in ``ids`` (inserted since the
    listing, hence not fenced by a caller that fenced ``ids``) are left out."""
    view_def = offline.view(view)
    bound = offline.bind(view_def)
    if bound.range_query is None:
        raise InvalidRequest(
            f"view {view_def.name!r}: string ids on this database are not read by range "
            "(check reads_id_runs first)"
        )
    if not ids:
        return {}
    found: dict[EntityId, SqlRow] = {}
    try:
        with offline.engine.connect() as conn:
            rows = conn.execute(bound.range_query, {"lo": ids[0], "hi": ids[-1]}).fetchall()
        offline.convert_rows(bound, rows, found)
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, f"reading view {view_def.name!r}") from exc
    return only(found, ids)


class IdRunReader:
    """Reads runs of ids (``latest_of_id_run``) for the length of one materialization:
    through ADBC where it applies (``featcache.offline.arrow``: faster, same rows), else, or
    after any ADBC failure (one warning, then for the rest of the run), through SQLAlchemy.
    A context manager: the ADBC connection is closed at the end."""

    def __init__(self, offline: OfflineStore, view: str | FeatureView) -> None:
        self._offline, self._view = offline, offline.view(view)
        bound = self._offline.bind(self._view)
        self._arrow: ArrowRangeReader | None = open_arrow_reader(self._offline, bound)

    @property
    def via(self) -> str:
        """``"adbc"`` or ``"sqlalchemy"``: what the next read goes through."""
        return "sqlalchemy" if self._arrow is None else "adbc"

    def read(self, ids: Sequence[EntityId]) -> dict[EntityId, SqlRow]:
        rows = self._by_arrow(ArrowRangeReader.read, ids)
        return rows if rows is not None else latest_of_id_run(self._offline, self._view, ids)

    def read_columns(self, ids: Sequence[EntityId]) -> RowColumns | dict[EntityId, SqlRow]:
        """``read``, as ``RowColumns`` where ADBC reads them (no tuple per row, for
        ``FeatureCache.prepare_columns``); through SQLAlchemy the rows come as they are read,
        a dict for ``prepare_latest``, rather than be transposed."""
        rows = self._by_arrow(ArrowRangeReader.read_columns, ids)
        return rows if rows is not None else latest_of_id_run(self._offline, self._view, ids)

    def _by_arrow(
        self, read: Callable[[ArrowRangeReader, Sequence[EntityId]], T], ids: Sequence[EntityId]
    ) -> T | None:
        """``read`` through ADBC; None when there is no ADBC reader, or it just failed (one
        warning, and SQLAlchemy reads the rest of the run)."""
        if self._arrow is None:
            return None
        try:
            return read(self._arrow, ids)
        except ArrowReadUnavailable as exc:
            log.warning("ADBC read of view %s failed (%s); reading through SQLAlchemy",
                        self._view.name, exc)
            self.close()
            return None

    def close(self) -> None:
        if self._arrow is not None:
            self._arrow.close()
            self._arrow = None

    def __enter__(self) -> IdRunReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- internals


def _by_ids(
    offline: OfflineStore, bound: BoundView, ids: list[EntityId], chunk_rows: int,
    query: sa.Select[Any],
) -> Iterator[dict[EntityId, SqlRow]]:
    sub = max(1, min(chunk_rows, offline.config.chunk_size))
    for start in range(0, len(ids), chunk_rows):
        chunk = ids[start : start + chunk_rows]
        found: dict[EntityId, SqlRow] = {}
        try:
            with offline.engine.connect() as conn:
                for s in range(0, len(chunk), sub):
                    rows = conn.execute(query, {"ids": chunk[s : s + sub]}).fetchall()
                    offline.convert_rows(bound, rows, found)
            if bound.exact_ids:
                found = only(found, chunk)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, offline.url, f"reading view {bound.view.name!r}") from exc
        if found:
            yield found


def _streamed(
    offline: OfflineStore, bound: BoundView, query: sa.Select[Any], chunk_rows: int
) -> Iterator[Rows]:
    try:
        with offline.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(
                query
            )
            for part in result.partitions(chunk_rows):
                found: dict[EntityId, SqlRow] = {}
                offline.convert_rows(bound, part, found)
                yield _as_dicts(bound.view, found)
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, offline.url, f"reading view {bound.view.name!r}") from exc


def _as_dicts(view: FeatureView, found: dict[EntityId, SqlRow]) -> Rows:
    names = [f.column for f in view.features]
    out: Rows = []
    for entity, row in found.items():
        item: dict[str, Any] = {
            view.entity_column: entity,
            view.event_timestamp_column: us_to_timestamp(row.event_us),
        }
        item.update(zip(names, row.values, strict=True))
        out.append(item)
    return out
