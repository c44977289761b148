"""Follow changes: poll a view's ``updated_at`` column (or a configured change query) and
refresh what changed (DESIGN 5).

``follow_changes`` reads, per entity, the latest ``updated_at`` among rows with ``updated_at >=
watermark - lookback``, in ascending order of that time, in chunks (the SQL store runs that
query: ``featcache.offline.changes``), and works on the entities whose change it has not
applied yet. Per chunk of changed entities:

* Every changed entity is invalidated first, as the ETL's hook would (``cache.invalidate``: a
  tombstone per key, and an entry on the invalidation stream, so the in-process L1 caches of
  the serving processes drop it). A reader that read SQL before the change and writes its
  fill after the poll would otherwise land the old value where nothing revisits it (the
  watermark has moved on); the tombstone makes that fill fail (DESIGN 4, no stale sets).
* ``rewrite="cached"`` (default): the entities whose key held a row (or a "SQL has no such
  entity" entry) of the view's current epoch before the poll are then rewritten from SQL with
  ``materialize``, fenced after the tombstones, so its rows replace them (and an invalidation
  racing with the poll is never overwritten); entities not cached are left to the next read,
  which finds the tombstone, a miss. ``rewrite="all"``: every changed entity is written.
* The chunk's changes are recorded as applied and the watermark advances (see "State in
  Redis"), after every chunk, so a stop (lease lost, SIGTERM between chunks) loses no work.

**The lookback, and the late commit it catches.** A transaction that stamps ``updated_at`` when
it writes (PostgreSQL's ``now()`` is the transaction's start) but commits after a poll has
moved the watermark past that time would be invisible to ``updated_at >= watermark``: its rows
are older than the watermark by the time anyone can read them. Each poll therefore re-reads
``lookback`` (default ``DEFAULT_LOOKBACK_S``, five minutes) behind the watermark. So that the
re-read does not apply the same changes again at every poll, the poll remembers, per entity,
the ``updated_at`` it last applied within that window, and skips an entity whose latest
``updated_at`` is not newer than it. The bound this gives: **a change is found when its
transaction commits less than ``lookback`` after the ``updated_at`` it wrote** (exactly: when
it commits before any change stamped more than ``lookback`` after it has been polled, which
with agreeing clocks cannot happen sooner). Clock skew between the writers that stamp
``updated_at`` eats into it. A transaction that commits later than that is still
missed: set ``lookback`` above your longest ETL transaction, stamp commit-time timestamps, or
call the hook after the commit. ``lookback=0`` keeps only the watermark's exact timestamp
(rows committed later with that very ``updated_at`` are still found). The cost: every poll
re-reads the (entity, time) pairs of the window, about ``change rate x lookback`` of them, and
looks them up in Redis (one ``ZMSCORE`` per chunk).

**Where the first poll starts.** With no watermark yet, ``start="now"`` (default) starts at
the warmer's clock: the first poll reads the changes of the last ``lookback`` only, and that
start is saved as the watermark, so the next polls resume from it. A large table is not read
whole, and no entity that was not cached gets a tombstone. Changes older than that reach
Redis as rows expire (each ``max_age``), or run ``featcache materialize --since`` once.
``start="all"`` reads the whole history at the first poll (every entity with an
``updated_at``), for a cache that must catch up on everything. The first window is taken on
the warmer's clock, so a database clock behind it by more than ``lookback`` misses the changes
stamped in that gap until its stamps pass the start.

**State in Redis.** ``<prefix>:~<view>:watermark`` holds ``{"v": 2, "ts_us": <the largest
updated_at processed, microseconds UTC>}`` (JSON, never pickle; no TTL, it must outlive any
pause of the warmer). ``<prefix>:~<view>:watermark:applied`` is a sorted set: member the entity
id, score the ``updated_at`` (µs) at which its change was applied; entries older than
``watermark - lookback`` are removed as the watermark moves, so it holds the changes of one
window (about 80 bytes each). A sorted set rather than a list of ids inside the JSON value:
it is written a chunk at a time rather than whole after every chunk, looked up for the
candidates only, and pruned by score in one command, whatever the size of the window. A
version-1 value (``{"v": 1, "ts_us": ..., "ids": [...]}``) is still read: its ids count as
applied at its time. A restarted warmer resumes from both.

**A change query** (``ChangeQuery``; ``warmer.follow_changes.views.<view>.change_query`` in the
config) replaces the ``updated_at`` poll when changes are recorded elsewhere (an audit or
outbox table, a join), or the view has no ``updated_at`` column. It is one ``SELECT`` that
returns the columns ``entity_id`` and ``updated_at`` (alias them: ``SELECT user_id AS
entity_id, changed_at AS updated_at FROM audit_log WHERE changed_at >= :watermark``), and takes
the watermark as the bound parameter ``:watermark`` (never formatted into the text). It must
compare with ``>=`` for the same reason as above. featcache wraps it as a subquery, keeps the
latest ``updated_at`` per entity and orders by it, so the watermark, the lookback and the
chunks work exactly as for the column. ``:watermark`` is the start of the window read (the
watermark minus the lookback), a UTC datetime bound as the column poll binds it:
timezone-aware when the view's ``updated_at`` column is (``timestamptz``), naive UTC wall time
when it is not (MySQL/MariaDB ``DATETIME``, SQLite text); for a view without ``updated_at``,
aware on PostgreSQL and naive elsewhere. A change column of the other kind needs a cast in the
query (PostgreSQL: ``changed_at >= (:watermark AT TIME ZONE 'UTC')``), or its comparison
depends on the session's time zone. At the first poll it is now minus the lookback
(``start="now"``) or 1970-01-01T00:00:00Z (``start="all"``). The query is checked when
the configuration is loaded (``featcache.config_warmer``: one statement, a ``SELECT``/``WITH``,
``:watermark`` and no other parameter) and its columns at first use: a query without
``entity_id``/``updated_at``, or whose values are not ids and timestamps, raises
``SchemaError`` naming its config path.

The poll runs under the view's leader lease (``.leader.ViewLeader``), renewed between chunks,
so several warmers do not process the same changes twice.

Limits, by construction of an ``updated_at`` poll (a change query has the same ones, on its
own change column):

* **Deletions are invisible to an ``updated_at`` poll**: a deleted row has no ``updated_at``.
  ETL code that deletes rows must call the invalidation hook (``featcache invalidate`` or
  ``featcache.invalidation.invalidate``), or use soft deletes (a flag column, with
  ``updated_at`` bumped). A change query can see them (an audit or outbox table that records
  deletions): an entity it reports whose latest row SQL no longer has is invalidated in Redis
  (a tombstone, so no reader refills it from a value read before), counted as ``deleted``.
* An entity changed again *with the same* ``updated_at`` as the one it was processed at is not
  seen again; an ETL must bump ``updated_at`` on every change.
* A transaction that commits more than ``lookback`` after the ``updated_at`` it wrote is not
  seen (above).
* The applied set holds every entity changed within the window, so a load that stamps N rows
  within ``lookback`` makes it hold N entries until the watermark moves ``lookback`` past
  them, and every poll meanwhile re-reads those N (id, time) pairs and looks them up to skip
  them: measured on SQLite with embedded Valkey, 300k rows stamped with one ``updated_at``
  made a 24 MB applied set (80 bytes an entry) and idle polls of 2.1-3.2 s (a watermark
  holding their ids in its JSON value instead: 2 MB, rewritten whole after every chunk, and
  1.4-2.1 s idle polls in the same minutes, for the re-read alone). For loads that large,
  call the hook instead, or lower ``lookback``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from featcache.codec import KIND_ABSENT, KIND_ROW, RowCodec
from featcache.config import FeatureView
from featcache.config_warmer import (
    DEFAULT_LOOKBACK_S,
    ChangeQuery,
    Rewrite,
    Start,
)
from featcache.convert import us_to_timestamp
from featcache.errors import InvalidRequest
from featcache.leader import ViewLeader
from featcache.materialize import DEFAULT_LEASE_TTL_S, materialize
from featcache.offline.changes import changed_since
from featcache.parts import Parts
from featcache.redis_store import Command
from featcache.request import EntityId

__all__ = [
    "DEFAULT_LOOKBACK_S",
    "ChangeQuery",
    "ChangesReport",
    "Rewrite",
    "Start",
    "Watermark",
    "follow_changes",
    "load_watermark",
    "save_watermark",
]

log = logging.getLogger("featcache.changes")

_WATERMARK_VERSION = 2


@dataclass(frozen=True, slots=True)
class Watermark:
    """The largest ``updated_at`` processed (microseconds UTC) and the entities processed at
    exactly that time (``load_watermark`` reads them from the applied set; the poll looks the
    set up instead, and leaves ``ids`` empty)."""

    ts_us: int
    ids: frozenset[EntityId] = field(default_factory=frozenset)

    @property
    def when(self) -> dt.datetime:
        value = us_to_timestamp(self.ts_us)
        assert value is not None
        return value


@dataclass(frozen=True, slots=True)
class ChangesReport:
    """One poll of one view. ``leader`` False: another warmer holds the lease, nothing done.
    ``changed``: entities with new rows; ``rewritten``: rows written to Redis; ``fenced_off``:
    rows not written because their key changed meanwhile; ``not_cached``: changed entities left
    for the next read to fill; ``watermark``: ISO time after the poll (None: none yet);
    ``lag_s``: now minus that watermark; ``complete`` False: the lease was lost mid-way;
    ``deleted``: rewritten entities SQL no longer had a row for, invalidated in Redis;
    ``late``: changed entities found behind the watermark the poll started from (commits the
    lookback caught), counted in ``changed`` too."""

    view: str
    leader: bool
    changed: int = 0
    rewritten: int = 0
    fenced_off: int = 0
    not_cached: int = 0
    published: int = 0
    deleted: int = 0
    late: int = 0
    watermark: str | None = None
    lag_s: float | None = None
    complete: bool = True
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- watermark


def load_watermark(cache: Parts, view: str | FeatureView) -> Watermark | None:
    """The stored watermark of ``view``, or None (never polled, or an unreadable value)."""
    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    return _read_watermark(cache, view_def, with_ids=True)[0]


def _read_watermark(
    cache: Parts, view: FeatureView, with_ids: bool
) -> tuple[Watermark | None, int]:
    """The watermark and its value's version; its ids only from a version-1 value, or with
    ``with_ids`` (the poll looks the applied set up for its candidates instead)."""
    (raw,) = cache.store.execute([Command("GET", cache.layout.watermark_key(view.name))])
    if raw is None:
        return None, _WATERMARK_VERSION
    wanted = int if view.entity_type == "int" else str
    try:
        doc = json.loads(raw)
        ts_us, version = doc["ts_us"], doc.get("v")
        if version not in (1, _WATERMARK_VERSION) or not isinstance(ts_us, int):
            raise ValueError(doc)
        ids: list[Any] = []
        if version == 1:  # the ids processed at ts_us were kept in the value itself
            ids = doc["ids"]
            if not isinstance(ids, list) or not all(type(x) is wanted for x in ids):
                raise ValueError(ids)
        elif with_ids:
            (members,) = cache.store.execute([Command(
                "ZRANGEBYSCORE", cache.layout.applied_changes_key(view.name), (ts_us, ts_us))])
            ids = [wanted(m.decode() if isinstance(m, bytes) else str(m)) for m in members]
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        log.warning("changes view=%s watermark unreadable, starting over: %r", view.name, exc)
        return None, _WATERMARK_VERSION
    return Watermark(ts_us, frozenset(ids)), version


def save_watermark(
    cache: Parts, view: str, mark: Watermark,
    applied: Iterable[tuple[EntityId, int]] = (), keep_since_us: int | None = None,
) -> None:
    """Record ``applied`` (entity, ``updated_at`` in µs) and ``mark.ids`` (at ``mark.ts_us``)
    as applied, then store the watermark, then forget the entries applied before
    ``keep_since_us``. No TTL: it must outlive any pause of the warmer.

    In that order, and no transaction is needed: the poll calls it after the work, so the
    applied set only ever names work done, and a stop after any step leaves a state the next
    poll handles (applied entries behind an older watermark are skipped when re-read; entries
    not yet forgotten are forgotten by a later save)."""
    doc = {"v": _WATERMARK_VERSION, "ts_us": mark.ts_us}
    scores: dict[EntityId, int] = {e: mark.ts_us for e in mark.ids}
    for eid, ts_us in applied:
        scores[eid] = max(ts_us, scores.get(eid, ts_us))
    key = cache.layout.applied_changes_key(view)
    if scores:
        # only ever added when newer than what the set holds (the poll's filter), so a
        # plain ZADD; the scores are µs, exact in a double until the year 2255; a round trip
        # of its own, done before the watermark moves
        cache.store.execute([Command(
            "ZADD", key, tuple(part for e, t in scores.items() for part in (t, str(e))))])
    commands = [Command("SET", cache.layout.watermark_key(view),
                        (json.dumps(doc, separators=(",", ":")),))]
    if keep_since_us is not None:
        commands.append(Command("ZREMRANGEBYSCORE", key, ("-inf", f"({keep_since_us}")))
    cache.store.execute(commands)


def _applied(cache: Parts, view: str, ids: Sequence[EntityId]) -> dict[EntityId, int]:
    """The ``updated_at`` (µs) at which each of ``ids`` was last applied, for those in the
    applied set."""
    if not ids:
        return {}
    (scores,) = cache.store.execute([Command(
        "ZMSCORE", cache.layout.applied_changes_key(view), tuple(str(e) for e in ids))])
    return {e: int(float(s)) for e, s in zip(ids, scores, strict=True) if s is not None}


# ----------------------------------------------------------------------------- the poll


def _cached(cache: Parts, view: FeatureView, ids: list[EntityId]) -> list[EntityId]:
    """Those of ``ids`` whose key holds a row or a negative entry of the current epoch."""
    store = cache.store
    keys = cache.layout.row_keys(view.name, ids)
    keys.append(cache.layout.epoch_key(view.name))
    raw = store.read(keys)
    epoch_raw = raw.pop()
    epoch = int(epoch_raw) if epoch_raw else None
    codec = RowCodec(view)
    out: list[EntityId] = []
    for eid, value in zip(ids, raw, strict=True):
        row = codec.decode(value) if value is not None else None
        if row is not None and row.kind in (KIND_ROW, KIND_ABSENT) and row.epoch == epoch:
            out.append(eid)
    return out


def follow_changes(
    cache: Parts,
    view: str | FeatureView,
    *,
    rewrite: Rewrite = "cached",
    leader: ViewLeader | None = None,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    chunk_rows: int = 10_000,
    change_query: ChangeQuery | None = None,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    start: Start = "now",
) -> ChangesReport:
    """One poll of ``view``'s changes since its watermark minus ``lookback_s``; see the module
    docstring.

    Runs only as the view's leader: with ``leader`` None a lease is taken for this poll and
    released after it; a given ``leader`` is acquired (or extended) and kept. With
    ``change_query``, it finds the changes instead of the view's ``updated_at`` column.
    ``start`` says where a view without a watermark starts: ``"now"`` (minus the lookback) or
    ``"all"`` (its whole history).
    """
    if rewrite not in ("cached", "all"):
        raise InvalidRequest(f"rewrite must be 'cached' or 'all', got {rewrite!r}")
    if start not in ("now", "all"):
        raise InvalidRequest(f"start must be 'now' or 'all', got {start!r}")
    if chunk_rows < 1:
        raise InvalidRequest(f"chunk_rows must be at least 1, got {chunk_rows}")
    if not (lookback_s >= 0 and math.isfinite(lookback_s)):
        raise InvalidRequest(f"lookback_s must be a finite number >= 0, got {lookback_s}")
    view_def = cache.config.view(view if isinstance(view, str) else view.name)
    if view_def.updated_at_column is None and change_query is None:
        raise InvalidRequest(
            f"view {view_def.name!r} has no updated_at column: following changes needs one "
            "(views.<name>.updated_at in the config) or a change query "
            "(warmer.follow_changes.views.<name>.change_query)"
        )
    started = time.perf_counter()
    own_lease = leader is None
    lease = leader or ViewLeader(cache.store, cache.layout, view_def.name, lease_ttl_s)
    if not lease.acquire():
        log.info("changes view=%s leader=false", view_def.name)
        return ChangesReport(view_def.name, leader=False)
    lookback_us = round(lookback_s * 1_000_000)
    try:
        mark, version = _read_watermark(cache, view_def, with_ids=False)
        if mark is not None and version != _WATERMARK_VERSION:
            save_watermark(cache, view_def.name, mark)  # its ids into the applied set
        if mark is None and start == "now":
            # the start is saved at once: a later poll resumes from it, not from its own now
            mark = Watermark(int(cache.clock() * 1_000_000))
            save_watermark(cache, view_def.name, mark)
        first = mark
        # None: from the beginning; rows before it were applied when the watermark passed
        # them (SQLite's comparison lets some up to 1 ms earlier through: dropped below)
        floor_us = None if mark is None else max(0, mark.ts_us - lookback_us)
        counts = {"changed": 0, "rewritten": 0, "fenced_off": 0, "not_cached": 0, "published": 0,
                  "deleted": 0, "late": 0}
        complete = True
        since = us_to_timestamp(floor_us)
        with contextlib.closing(changed_since(cache.offline, view_def, since, chunk_rows,
                                              change_query)) as chunks:
            for part in chunks:
                fresh = _not_applied(cache, view_def.name, part, floor_us)
                if not fresh:
                    continue
                if not lease.renew():
                    complete = False
                    log.warning("changes view=%s stopped: leader lease lost", view_def.name)
                    break
                ids = [e for e, _ in fresh]
                targets = ids if rewrite == "all" else _cached(cache, view_def, ids)
                counts["published"] += len(cache.invalidate(view_def, ids).stream_ids)
                if targets:
                    done = materialize(cache, view_def, ids=targets, chunk_rows=chunk_rows)
                    counts["rewritten"] += done.rows_written
                    counts["fenced_off"] += done.fenced_off
                    # changed, and SQL no longer has a row: deleted (the tombstone stays)
                    counts["deleted"] += len(done.absent_ids)
                counts["not_cached"] += len(ids) - len(targets)
                counts["changed"] += len(ids)
                if first is not None:
                    counts["late"] += sum(1 for _, t in fresh if t < first.ts_us)
                mark = _advance(mark, fresh)
                save_watermark(cache, view_def.name, mark, fresh,
                               keep_since_us=mark.ts_us - lookback_us)
        now_us = int(cache.clock() * 1_000_000)
        report = ChangesReport(
            view_def.name, True, **counts,
            watermark=mark.when.isoformat() if mark is not None else None,
            lag_s=max(0.0, (now_us - mark.ts_us) / 1e6) if mark is not None else None,
            complete=complete, seconds=time.perf_counter() - started,
        )
        log.info(
            "changes view=%s leader=true changed=%d late=%d rewritten=%d fenced_off=%d "
            "not_cached=%d watermark=%s lag_s=%s seconds=%.3f", report.view, report.changed,
            report.late, report.rewritten, report.fenced_off, report.not_cached,
            report.watermark, f"{report.lag_s:.3f}" if report.lag_s is not None else "none",
            report.seconds,
        )
        return report
    finally:
        if own_lease:
            lease.release()


def _not_applied(
    cache: Parts, view: str, part: list[tuple[EntityId, int]], floor_us: int | None,
) -> list[tuple[EntityId, int]]:
    """The changes of ``part`` not applied yet: in the window (at or after ``floor_us``), and
    newer than what the applied set says was applied."""
    inside = [(e, t) for e, t in part if floor_us is None or t >= floor_us]
    applied = _applied(cache, view, [e for e, _ in inside])
    return [(e, t) for e, t in inside if applied.get(e, -1) < t]


def _advance(mark: Watermark | None, done: list[tuple[EntityId, int]]) -> Watermark:
    """The watermark after processing ``done``: the newest time seen, never moving back
    (changes found behind it, late commits, leave it where it is). Without ids: the applied
    set holds them, and the save records ``done`` there."""
    top = max(t for _, t in done)
    return Watermark(top if mark is None else max(mark.ts_us, top))
