"""Bulk materialization and one warming pass (DESIGN section 5): SQL rows copied into Redis
through the fenced write path, by the warmer, ``featcache materialize`` and the demo.

``materialize`` copies the latest rows of a view (all of them, some ids, or those changed
since a time) from SQL into Redis. ``warm_once`` refreshes the most read entities whose cached
rows are missing or about to expire, under the view's leader lease (``featcache.leader``).

Every write is fenced like a read-through fill (``featcache.writes``): for each chunk,
``cache.fence(view, ids)`` is taken *before* that chunk's rows are read from SQL, then
``cache.put_rows(view, rows, fence=...)`` writes a row only where nothing changed since, so
an invalidation that lands between the read and the write is never overwritten with the value
read before it. A fence needs the chunk's ids before the read, so "all" and "since" first
stream the distinct entity ids (``featcache.offline.bulk.iter_entity_ids``, a cheap
``SELECT DISTINCT`` on a server-side cursor), then, per chunk of ids: fence, read the latest
rows of exactly those ids, write. That is one extra, narrow scan instead of reading every row
twice.

Both need only ``Parts`` (the stores and the writer), so any process can run them: the
command line's progress bars and JSON lines are ``featcache.jobs.warm``'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Collection, Generator, Iterable, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from featcache.codec import (
    KIND_ABSENT,
    KIND_ROW,
    NO_EVENT,
    RowCodec,
    held_event_us,
    is_tombstone,
)
from featcache.config import FeatureView
from featcache.convert import timestamp_to_us, us_to_timestamp
from featcache.errors import InvalidRequest
from featcache.keys import KeyLayout
from featcache.leader import ViewLeader
from featcache.offline import EventWindow, RowColumns, SqlRow
from featcache.offline.bulk import (
    IdRunReader,
    iter_entity_ids,
    iter_latest_by_id,
    reads_id_runs,
)
from featcache.parts import Parts
from featcache.redis_store import Command, LuaScript, RedisStore
from featcache.request import EntityId
from featcache.writes import Fence, PendingWrite, PutReport

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "CHUNK_ROWS",
    "DEFAULT_LEASE_TTL_S",
    "WRITE_COUNTS",
    "IncrementalReport",
    "MaterializeReport",
    "Progress",
    "WarmReport",
    "WriteReport",
    "load_epoch",
    "materialize",
    "materialize_incremental",
    "warm_once",
    "write_batches",
]

log = logging.getLogger("featcache.warm")

T = TypeVar("T")

DEFAULT_LEASE_TTL_S = 30.0
#: entities per chunk of a bulk load (one fence, one SQL read, one write each): the fewer
#: chunks, the fewer times the pipeline of reading, encoding and writing drains; 20,000 loads
#: PostgreSQL 5-10% faster than 10,000 for about 30 MB more memory (docs/benchmarks.md)
CHUNK_ROWS = 20_000


@dataclass(frozen=True, slots=True)
class MaterializeReport:
    """Totals of one materialization (also passed, running, to ``progress`` per chunk).

    ``entities``: ids considered; ``rows_read``: latest rows SQL had for them;
    ``rows_written``: rows written to Redis; ``fenced_off``: rows not written because their key
    changed since the fence (an invalidation, a newer fill); ``complete``: False when the
    leader lease was lost and the run stopped early; ``absent_ids``: ids considered that SQL
    has no row for (deleted upstream, or never there), for the caller to invalidate (none
    are reported for a run over an event-time window).
    """

    view: str
    rows_read: int = 0
    rows_written: int = 0
    fenced_off: int = 0
    seconds: float = 0.0
    entities: int = 0
    chunks: int = 0
    complete: bool = True
    absent_ids: tuple[EntityId, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmReport:
    """One warming pass of one view. ``leader`` False: another warmer held the view's lease
    and this one did nothing. ``candidates``: top-K entities found; ``missing``: of those, not
    in Redis (absent, invalidated, of an old epoch, undecodable); ``expiring``: cached but due
    within the horizon; ``materialized``: what writing those did."""

    view: str
    leader: bool
    candidates: int = 0
    missing: int = 0
    expiring: int = 0
    materialized: MaterializeReport | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_written"] = self.materialized.rows_written if self.materialized else 0
        return out


Progress = Callable[[MaterializeReport], None]


# ----------------------------------------------------------------------------- materialize


class _Pipeline(Generic[T]):
    """The one way bulk rows reach Redis: ``Parts.prepare_*`` (checked, encoded, fenced)
    then ``PendingWrite.send`` (the fenced write scripts), one write in flight in a thread
    while the caller prepares the next. A write's round trip is mostly the server running
    the scripts, with the GIL released; at most two chunks are held, and a chunk's write
    still follows its own fence (docs/benchmarks.md). ``landed`` gets each write's result,
    in order, in the caller's thread; on exit, an error included, the write in flight is
    finished first."""

    def __init__(self, landed: Callable[[T], None], name: str) -> None:
        self._landed = landed
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._in_flight: Future[T] | None = None

    def wait(self) -> None:
        """The write in flight finished and handed to ``landed`` (its error raised)."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            self._landed(in_flight.result())

    def submit(self, send: Callable[..., T], *args: Any) -> None:
        """``send(*args)`` in the writer thread, after the write before it landed."""
        self.wait()
        self._in_flight = self._pool.submit(send, *args)

    def __enter__(self) -> _Pipeline[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def materialize(
    cache: Parts,
    view: str | FeatureView,
    *,
    all: bool = False,
    ids: Sequence[EntityId] | None = None,
    since: dt.datetime | None = None,
    window: EventWindow | None = None,
    chunk_rows: int = CHUNK_ROWS,
    progress: Progress | None = None,
    keep_going: Callable[[], bool] | None = None,
) -> MaterializeReport:
    """Copy the latest SQL rows of ``view`` into Redis, fenced, chunk by chunk.

    Exactly one of ``all``, ``ids``, ``since`` (rows of entities with a row updated at or
    after it). ``window``, with ``all`` or ``ids``: only rows whose event time falls in it
    count (the latest of them per entity; entities with none are left alone), as a feature
    store's ``materialize(start, end)`` loads them. ``keep_going`` is asked before every
    chunk (the warmer renews its lease there); False stops the run with ``complete=False``.
    """
    chosen = sum((bool(all), ids is not None, since is not None))
    if chosen != 1:
        raise InvalidRequest("materialize: pass exactly one of all=True, ids=..., since=...")
    if window is not None and since is not None:
        raise InvalidRequest("materialize: a window goes with all=True or ids=..., not since")
    if window is not None and window.start is not None and window.end is not None and (
            window.start >= window.end):
        raise InvalidRequest(f"materialize: the window's start ({window.start.isoformat()}) "
                             f"is not before its end ({window.end.isoformat()})")
    if chunk_rows < 1:
        raise InvalidRequest(f"chunk_rows must be at least 1, got {chunk_rows}")
    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    if since is not None and view_def.updated_at_column is None:
        raise InvalidRequest(
            f"view {view_def.name!r} has no updated_at column: --since needs one "
            "(views.<name>.updated_at in the config)"
        )
    offline = cache.offline
    id_chunks: Generator[Sequence[EntityId], None, None]
    # the whole view: ids listed in the database's order, each chunk read as one id range
    by_range = all and window is None and reads_id_runs(offline, view_def)
    if ids is not None:
        unique = list(dict.fromkeys(ids))
        id_chunks = (unique[i : i + chunk_rows] for i in range(0, len(unique), chunk_rows))
    else:
        id_chunks = iter_entity_ids(offline, view_def, since=since, chunk_rows=chunk_rows,
                                    ordered=by_range, window=window)
    started = time.perf_counter()
    report = MaterializeReport(view_def.name)

    def written(result: tuple[int, Sequence[EntityId], int, PutReport]) -> None:
        nonlocal report
        entities, absent, rows_read, put = result
        report = replace(
            report,
            absent_ids=report.absent_ids + tuple(absent),
            rows_read=report.rows_read + rows_read,
            rows_written=report.rows_written + put.written,
            fenced_off=report.fenced_off + put.fenced_off,
            entities=report.entities + entities,
            chunks=report.chunks + 1,
            seconds=time.perf_counter() - started,
        )
        if progress is not None:
            progress(report)

    def write(
        chunk: Sequence[EntityId], read: Collection[EntityId], pending: PendingWrite
    ) -> tuple[int, Sequence[EntityId], int, PutReport]:
        put = pending.send()
        # in a window, an id without a row there is not absent from SQL
        if len(read) < len(chunk) and window is None:
            found = read if isinstance(read, Set) else set(read)
            absent: Sequence[EntityId] = [e for e in chunk if e not in found]
        else:
            absent = ()
        return len(chunk), absent, len(read), put

    with _Pipeline(written, "featcache-materialize") as pipeline, \
            contextlib.closing(id_chunks) as chunks, \
            (IdRunReader(offline, view_def) if by_range else contextlib.nullcontext()) as runs, \
            ThreadPoolExecutor(1, thread_name_prefix="featcache-read") as reader:

        def read_rows(ids: Sequence[EntityId]) -> RowColumns | dict[EntityId, SqlRow]:
            # by ADBC, rows come as columns and are encoded from them (no tuple per row)
            return runs.read_columns(ids) if runs is not None else _latest_rows(
                cache, view_def, ids, window)

        listed = (chunk for chunk in chunks if chunk)
        # Each fence is taken BEFORE the SQL read of its rows. Three chunks move at once: one
        # is written (the pipeline's thread, Redis), the next is encoded (this thread) while
        # the one after it is read from SQL (the reader thread, mostly waiting on the
        # database or in its driver, without the GIL). The fence of the chunk after that is
        # prepared meanwhile, sent the moment the write lands and the next write right
        # behind it: Redis reads the fence, then writes, never idle in between and the fence
        # never queued behind a write's scripts (docs/benchmarks.md).
        chunk = next(listed, None)
        fence = cache.fence(view_def, chunk) if chunk is not None else None
        reading = reader.submit(read_rows, chunk) if chunk is not None else None
        following = next(listed, None) if chunk is not None else None
        following_fence = cache.fence(view_def, following) if following is not None else None
        while chunk is not None and fence is not None and reading is not None:
            if keep_going is not None and not keep_going():
                report = replace(report, complete=False)
                log.warning("materialize view=%s stopped: leader lease lost", view_def.name)
                break
            rows = reading.result()
            reading = reader.submit(read_rows, following) if following is not None else None
            if isinstance(rows, RowColumns):
                read: Collection[EntityId] = rows.ids
                pending = cache.prepare_columns(view_def, rows, fence=fence)
            else:
                read = rows.keys()
                pending = cache.prepare_latest(view_def, rows, fence=fence)
            after = next(listed, None) if following is not None else None
            fencing = cache.start_fence(view_def, after) if after is not None else None
            pipeline.wait()
            if fencing is not None:
                fencing.send()
            try:
                pipeline.submit(write, chunk, read, pending)
            finally:  # a fence sent is always answered: its connection goes back to the pool
                after_fence = fencing.result() if fencing is not None else None
            chunk, fence = following, following_fence
            following, following_fence = after, after_fence
    return replace(report, seconds=time.perf_counter() - started)


# KEYS[1]: the view's incremental watermark; ARGV[1]: the end of a complete run (microseconds).
# Moved forward only: a run over an older window that ends after a newer one must not send the
# next run back over rows it already loaded.
_ADVANCE = LuaScript("""
local held = tonumber(redis.call('GET', KEYS[1]) or '')
if held and held >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
""")


@dataclass(frozen=True, slots=True)
class IncrementalReport:
    """One incremental run of one view: the window it loaded (``start`` None: from the
    beginning) and what loading it did; ``advanced``: the watermark moved to ``end``."""

    view: str
    start: dt.datetime | None
    end: dt.datetime
    advanced: bool
    materialized: MaterializeReport


def materialize_incremental(
    cache: Parts,
    view: str | FeatureView,
    *,
    end: dt.datetime,
    chunk_rows: int = CHUNK_ROWS,
    progress: Progress | None = None,
) -> IncrementalReport:
    """Load the rows whose event time is at or after where the view's last complete run
    ended (the watermark in Redis, ``KeyLayout.materialized_key``; the beginning when there
    is none) and before ``end``, then move the watermark to ``end``. A run that dies before
    its end leaves the watermark where it was, so the next run loads its window again (the
    rows it had written are rewritten with the same values, harmlessly): a cron job needs no
    state of its own. A watermark lost to eviction makes the next run load from the
    beginning, which is slow but correct."""
    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    end = end if end.tzinfo is not None else end.replace(tzinfo=dt.UTC)
    key = cache.layout.materialized_key(view_def.name)
    (raw,) = cache.store.execute([Command("GET", key)])
    start = us_to_timestamp(int(raw)) if raw else None
    if start is not None and start >= end:
        return IncrementalReport(view_def.name, start, end, False,
                                 MaterializeReport(view_def.name))
    done = materialize(cache, view_def, all=True, window=EventWindow(start, end),
                       chunk_rows=chunk_rows, progress=progress)
    advanced = False
    if done.complete:
        (moved,) = cache.store.eval_many(_ADVANCE, [([key], [timestamp_to_us(end)])])
        advanced = bool(int(moved))
    log.info("materialize-incremental view=%s start=%s end=%s rows_written=%d advanced=%s",
             view_def.name, start.isoformat() if start else "-", end.isoformat(),
             done.rows_written, advanced)
    return IncrementalReport(view_def.name, start, end, advanced, done)


def _latest_rows(
    cache: Parts, view: FeatureView, chunk: Sequence[EntityId], window: EventWindow | None
) -> dict[EntityId, SqlRow]:
    rows: dict[EntityId, SqlRow] = {}
    for part in iter_latest_by_id(cache.offline, view, chunk, chunk_rows=len(chunk),
                                  window=window):
        if rows:  # never: one chunk is one part; the rows are not copied again
            rows.update(part)
        else:
            rows = part
    return rows


# ----------------------------------------------------------------------------- Arrow batches


@dataclass(frozen=True, slots=True)
class WriteReport:
    """Totals of ``write_batches`` (also passed, running, to ``progress`` per batch):
    ``rows_received`` rows in the batches, ``rows_written`` written to Redis, ``skipped_older``
    not written because a row of the same id with a later event time was in Redis or in the
    same batch, ``fenced_off`` not written because the key changed between the batch's fence
    and its write (an invalidation, a serving fill, another writer of the same rows),
    ``invalidated`` not written because the row was invalidated since the load began (a
    tombstone at its fence, or the whole view since ``load_epoch``): left to the next read,
    which reads SQL."""

    view: str
    batches: int = 0
    rows_received: int = 0
    rows_written: int = 0
    skipped_older: int = 0
    fenced_off: int = 0
    invalidated: int = 0
    seconds: float = 0.0

    def __add__(self, other: WriteReport) -> WriteReport:
        """Two reports of one view summed (the partitions of one load)."""
        counts = {name: getattr(self, name) + getattr(other, name) for name in WRITE_COUNTS}
        return WriteReport(self.view, seconds=max(self.seconds, other.seconds), **counts)


#: ``WriteReport``'s counts: what partitions of one load add up
WRITE_COUNTS = ("batches", "rows_received", "rows_written", "skipped_older", "fenced_off",
                "invalidated")


def load_epoch(store: RedisStore, layout: KeyLayout, view: str) -> bytes:
    """The view's epoch now (created if missing): taken once where a load starts (an engine's
    driver) and given to every ``write_batches`` of the load, so that a whole-view
    invalidation during the load keeps every batch written after it out."""
    (epoch,) = store.ensure_epochs([layout.epoch_key(view)])
    return bytes(epoch)


def write_batches(
    cache: Parts,
    view: str | FeatureView,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    progress: Callable[[WriteReport], None] | None = None,
    since_epoch: bytes | None = None,
) -> WriteReport:
    """Write Arrow batches of a view's rows (its SQL column names, as ``put_rows`` takes
    them) through the fenced write path: the engine-agnostic writer of Spark partitions, Ray
    blocks and Parquet files.

    Per batch: the rows are checked and converted (``featcache.batches``), a fence is taken
    over their ids, and they are written where nothing changed since and no later event time
    is held. So an older row never replaces a newer one; the same batch written twice, by a
    retried or a speculative task, writes nothing new the second time; and an invalidation or
    a fill that lands between a batch's fence and its write keeps its key.

    An invalidation that lands during the load, before a batch's fence, is kept too: a row
    whose key holds a tombstone at its fence (they last ``invalidation.fence_ttl``) is not
    written, and with ``since_epoch`` (``load_epoch`` taken where the load began) a batch
    fenced after a whole-view invalidation writes nothing. Those rows count as
    ``invalidated``; the next read of each reads SQL. One batch is written (a Redis round
    trip, in a thread) while the next is converted.
    """
    from featcache.batches import batch_rows  # noqa: PLC0415 - pyarrow, for this path only

    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    max_len = cache.config.limits.max_id_length
    started = time.perf_counter()
    report = WriteReport(view_def.name)

    def landed(result: tuple[int, int, int, PutReport]) -> None:
        nonlocal report
        received, older, invalidated, put = result
        report = replace(
            report, batches=report.batches + 1,
            rows_received=report.rows_received + received,
            rows_written=report.rows_written + put.written,
            skipped_older=report.skipped_older + older + put.skipped_older,
            fenced_off=report.fenced_off + put.fenced_off,
            invalidated=report.invalidated + invalidated,
            seconds=time.perf_counter() - started)
        if progress is not None:
            progress(report)

    def send(received: int, older: int, invalidated: int, pending: PendingWrite | None
             ) -> tuple[int, int, int, PutReport]:
        return received, older, invalidated, (pending.send() if pending is not None
                                              else PutReport(0, 0))

    with _Pipeline(landed, "featcache-write") as pipeline:
        for batch in batches:
            found = batch_rows(view_def, batch, max_len)
            if not found.received:
                continue
            rows, older, invalidated, pending = found.rows, found.older, 0, None
            if rows.ids:
                fence = cache.fence(view_def, rows.ids)
                if since_epoch is not None and fence.epoch_raw != since_epoch:
                    invalidated, rows = len(rows.ids), rows.only([])
                else:
                    kept = _not_invalidated(rows, fence)
                    invalidated = len(rows.ids) - len(kept.ids)
                    rows = _not_older(kept, fence)
                    older += len(kept.ids) - len(rows.ids)
            if rows.ids:
                pending = cache.prepare_columns(view_def, rows, fence=fence)
            pipeline.submit(send, found.received, older, invalidated, pending)
    return replace(report, seconds=time.perf_counter() - started)


def _not_invalidated(rows: RowColumns, fence: Fence) -> RowColumns:
    """``rows`` less those whose key held a tombstone at the fence: invalidated within the
    last ``fence_ttl``, after the load's input was read, so not to be written over."""
    seen = fence.seen
    keep = [entity for entity in rows.ids if not is_tombstone(seen.get(entity))]
    return rows if len(keep) == len(rows.ids) else rows.only(keep)


def _not_older(rows: RowColumns, fence: Fence) -> RowColumns:
    """``rows`` less those older than the row Redis held at the fence (of the fence's epoch):
    the write scripts would refuse them anyway, and under a fence a refusal cannot say why,
    so they are counted as older here rather than as fenced off."""
    epoch = int(fence.epoch_raw) if fence.epoch_raw else 0
    seen = fence.seen
    keep = [entity for entity, event in zip(rows.ids, rows.events_us, strict=True)
            if (held := held_event_us(seen.get(entity), epoch)) is None
            or held <= (event if event is not None else NO_EVENT)]
    return rows if len(keep) == len(rows.ids) else rows.only(keep)


# ----------------------------------------------------------------------------- warm


def warm_once(
    cache: Parts,
    view: str | FeatureView,
    *,
    k: int,
    horizon_s: float,
    leader: ViewLeader | None = None,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    chunk_rows: int = 10_000,
    progress: Progress | None = None,
) -> WarmReport:
    """Refresh the top ``k`` entities of ``view`` whose cached rows are missing or expire
    (``loaded_at + the view's shortest max_age``) before now + ``horizon_s``.

    Runs only as the view's leader: with ``leader`` None a lease is taken for this pass and
    released after it; a given ``leader`` is acquired (or extended) and kept. Not leader: the
    report says ``leader=False`` and nothing is read or written.
    """
    if k < 1:
        raise InvalidRequest(f"k must be at least 1, got {k}")
    if horizon_s < 0:
        raise InvalidRequest(f"horizon_s must be >= 0, got {horizon_s}")
    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    store = cache.store
    own_lease = leader is None
    lease = leader or ViewLeader(store, cache.layout, view_def.name, lease_ttl_s)
    if not lease.acquire():
        log.info("warm view=%s leader=false", view_def.name)
        return WarmReport(view_def.name, leader=False)
    try:
        top = [entity for entity, _ in cache.top_k(view_def, k)]
        missing, expiring = _due(cache, store, view_def, top, horizon_s)
        due = missing + expiring
        done = (
            materialize(cache, view_def, ids=due, chunk_rows=chunk_rows, progress=progress,
                        keep_going=lease.renew)
            if due else MaterializeReport(view_def.name)
        )
        report = WarmReport(view_def.name, True, len(top), len(missing), len(expiring), done)
        log.info(
            "warm view=%s leader=true candidates=%d missing=%d expiring=%d rows_written=%d "
            "fenced_off=%d seconds=%.3f", view_def.name, report.candidates, report.missing,
            report.expiring, done.rows_written, done.fenced_off, done.seconds,
        )
        return report
    finally:
        if own_lease:
            lease.release()


def _due(
    cache: Parts,
    store: RedisStore,
    view: FeatureView,
    ids: list[EntityId],
    horizon_s: float,
) -> tuple[list[EntityId], list[EntityId]]:
    """(missing, expiring) among ``ids``, from one MGET of their rows and the view's epoch."""
    if not ids:
        return [], []
    keys = cache.layout.row_keys(view.name, ids)
    keys.append(cache.layout.epoch_key(view.name))
    raw = store.read(keys)
    epoch_raw = raw.pop()
    epoch = int(epoch_raw) if epoch_raw else None
    codec = RowCodec(view)
    clock: Callable[[], float] = cache.clock  # the cache's clock stamps what put_rows writes
    deadline_ms = int((clock() + horizon_s) * 1000)
    max_age_ms = int(min(f.max_age for f in view.features) * 1000)
    missing: list[EntityId] = []
    expiring: list[EntityId] = []
    for entity, value in zip(ids, raw, strict=True):
        row = codec.decode(value) if value is not None else None
        if row is None or row.kind not in (KIND_ROW, KIND_ABSENT) or row.epoch != epoch:
            missing.append(entity)
        elif row.kind == KIND_ROW and row.loaded_ms + max_age_ms < deadline_ms:
            expiring.append(entity)
        # a fresh negative entry ("SQL has no such entity") has nothing to warm
    return missing, expiring
