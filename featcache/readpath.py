"""The read path of DESIGN section 2, steps 2 to 7: L1, Redis, freshness, SQL, fill, answer.

``FeatureCache`` validates a call and hands the plan and ids here. One call costs one Redis
read round trip for all views (the views' epochs ride in the same MGET), at most one SQL query
per view per chunk of ids, and one Redis write round trip for everything it filled, fenced
against invalidations that raced with it (``featcache.redis_store``, mode F).

On a miss, threads of one process share one SQL read (``featcache.singleflight``) and
processes share one through a lease (``featcache.leases``); rows close to expiry are refreshed
early by one reader (XFetch, ``featcache.freshness.refresh_early``) while the others keep
reading the fresh value. When Redis fails, a circuit breaker sends calls straight to SQL, under
a concurrency limit that protects SQL; when SQL fails, rows within ``stale_if_error`` are
served ``STALE`` and the rest raise or are marked ``UNAVAILABLE`` (``on_sql_error``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from operator import itemgetter
from time import perf_counter_ns
from typing import Any, NamedTuple

from featcache.access_trace import AccessTrace
from featcache.breaker import CircuitBreaker, ConcurrencyLimiter
from featcache.codec import (
    BODY_EPOCH,
    BODY_FILL_MS,
    BODY_LOADED_MS,
    KIND_ABSENT,
    KIND_ROW,
)
from featcache.config import CacheConfig
from featcache.errors import (
    CacheUnavailable,
    OfflineStoreError,
    OfflineStoreUnavailable,
)
from featcache.freshness import fresh_since, refresh_early
from featcache.keys import KeyLayout, slot_of
from featcache.l1 import InOrder, L1Cache
from featcache.leases import Leases, Taken
from featcache.offline import OfflineStore, SqlRow
from featcache.outage import OutageLog
from featcache.popularity import PopularityCounter
from featcache.redis_store import RedisStore, WriteBatch, WriteItem, fenced_write
from featcache.request import EntityId, Plan, ViewPlan, check_ids
from featcache.result import STATUS, VALUES, Answer, FeatureResult, RedisHits, hit_answers
from featcache.singleflight import BUSY, MISSING, SingleFlight
from featcache.stats import CacheStats
from featcache.steps import Pause, Steps, run_blocking
from featcache.types import Status

__all__ = ["Call", "ReadPath"]

log = logging.getLogger("featcache")

#: What L1 keeps per row: the answer it will give, ready-made ((HIT_L1, values, event_us) or
#: (ABSENT, None, None)), so an L1 hit is a lookup and two comparisons. Its soft deadline is
#: when the strictest ``max_age`` of the view (the negative TTL for ABSENT) runs out; its stamp
#: is when the row was loaded, for calls that ask only for longer-lived features. Stored as an
#: L1 record, so an L1 hit answers with L1's own entry tuple (the answer's three fields first,
#: L1's bookkeeping after them, which nothing here reads) and touches no second object.
L1Entry = Answer
L1_RECORD_WIDTH = 3
#: L1's soft deadline is brought forward by this much (seconds): the wall-clock remainder is
#: measured a moment before L1 reads its own clock, and loaded_at is truncated to the ms.
_L1_MARGIN_S = 0.001
#: A reader waiting on another process's lease polls Redis after 1 ms, then at doubling
#: intervals up to this: a fill that lands just after a poll is seen at most this late. A
#: 10 ms cap makes that lateness most of the waiters' excess over the fill (bench stampede,
#: docs/benchmarks.md); 5 ms costs under twice the polls during a wait (about 41 MGETs
#: over a full 200 ms ``lease_wait`` against 22).
_LEASE_POLL_FIRST_S = 0.001
_LEASE_POLL_MAX_S = 0.005


class Source(enum.Enum):
    """Where a shared fetch got a row from."""

    SQL = "sql"  # read from SQL: the row, or None when SQL has none
    REDIS = "redis"  # another process filled it while this one waited on its lease
    KEEP = "keep"  # someone else refreshes it early: the fresh value in hand stands
    FAILED = "failed"  # the SQL read failed: the payload is the error


class Shared(NamedTuple):
    """What a shared fetch yields per row, for every thread that joined it."""

    source: Source
    payload: Any  # SqlRow | None (SQL), an Answer (REDIS), an OfflineStoreError (FAILED)
    fill_ms: int = 0  # the SQL read's duration
    loaded_ms: int = 0  # the leader's clock before that read: the row's loaded time for all


_KEEP = Shared(Source.KEEP, None)
#: Rows from which an all-hit batch is decoded in one call (``ReadPath._all_hits``); below
#: it the per-row loop is cheaper than the batch's fixed cost.
_BATCH_DECODE_MIN = 8
_loaded_ms = itemgetter(BODY_LOADED_MS)
_epoch = itemgetter(BODY_EPOCH)
_fill_ms = itemgetter(BODY_FILL_MS)


class _PlainRows(NamedTuple):
    """One view's rows of a call when every one was a plain hit (``ReadPath._plain_rows``)."""

    bodies: list[tuple[Any, ...]]  # decoded values (``RowBatch.bodies``), in the ids' order
    events_us: list[int | None]
    loaded: list[int] | None  # each row's load time, for L1 (None without one)


class FlightKey(NamedTuple):
    """What threads share a SQL read on. The last three fields make the leader's judgement of
    a row another process filled (fresh enough? wide enough?) and its "keep your fresh value"
    hold for every thread it answers: a thread asking for a stricter feature never joins a
    laxer one's read."""

    view: str
    entity: EntityId
    seen: bytes  # what Redis held for the row before SQL
    epoch: bytes  # the view's epoch, as Redis held it
    max_age_ms: int  # the call's strictest max_age
    width: int  # how many features it needs
    early: bool  # an early refresh (XFetch), not a miss


class _Waited(NamedTuple):
    """How a wait on other readers' leases ended, per row."""

    arrived: dict[EntityId, Answer]  # their fill landed and answers this call
    taken_over: list[EntityId]  # their fill will not land: this call took the lease, reads SQL
    timed_out: list[EntityId]  # still being filled at lease_wait: this call reads SQL


class _ViewRead:
    """One view's share of one call: answers so far and what to fetch, fill and fence."""

    __slots__ = (
        "answers", "counts", "deadline_us", "early", "epoch", "epoch_raw", "items", "loaded",
        "missing", "release", "release_token", "seen", "stale", "vp",
    )

    def __init__(self, vp: ViewPlan, epoch_raw: bytes | None) -> None:
        self.vp = vp
        self.epoch_raw = epoch_raw or b""
        self.epoch = int(epoch_raw) if epoch_raw else 0
        self.answers: dict[EntityId, Answer] = {}
        self.missing: list[EntityId] = []
        self.stale: dict[EntityId, Answer] = {}  # servable only if SQL fails
        self.early: dict[EntityId, Answer] = {}  # fresh, but due for an XFetch refresh
        self.seen: dict[EntityId, bytes] = {}  # what Redis held for each row before SQL
        self.items: list[WriteItem] = []
        self.release: list[str] = []  # leases this call took, under release_token
        self.release_token = ""
        self.deadline_us = 0  # fills land only before this, on the server's clock (0: none)
        self.counts: dict[str, int] = {}
        self.loaded: dict[EntityId, int] = {}  # loaded_at of answered rows, for L1 only

    def batch(self, layout: KeyLayout) -> WriteBatch:
        return WriteBatch(layout.epoch_key(self.vp.view.name), self.epoch_raw,
                          self.items, self.release, self.release_token,
                          deadline_us=self.deadline_us)


def _flight_key(vr: _ViewRead, eid: EntityId, early: bool) -> FlightKey:
    vp = vr.vp
    return FlightKey(vp.view.name, eid, vr.seen.get(eid, b""), vr.epoch_raw, vp.max_age_ms,
                     vp.width, early)


class Call(NamedTuple):
    """A call between its L1 step and its Redis read (``ReadPath.begin``): what to read and
    what ``settle`` and ``finish`` need after it."""

    plan: Plan
    ids: list[EntityId]
    pending: list[list[EntityId]]  # per view: the ids L1 did not answer
    l1_hits: list[Mapping[EntityId, Answer]]  # per view: what L1 answered
    some_from_l1: bool
    keys: list[str]  # the rows of every view, then each view's epoch
    slots: list[int] | None  # each key's hash slot, on a cluster
    reads_redis: bool  # False: L1 answered every row after all (a recheck)
    l1_token: int  # L1 refuses this call's rows if an invalidation landed since
    now_ms: int
    started: float  # monotonic, before the read: the fills' deadlines count from here
    began_ns: int  # perf_counter_ns at the start, or 0 when calls are not timed


class ReadPath:
    """Answers validated calls; holds the stores and the policy knobs of the read path."""

    def __init__(
        self,
        config: CacheConfig,
        layout: KeyLayout,
        redis_store: RedisStore,
        offline: OfflineStore,
        stats: CacheStats,
        clock: Callable[[], float],
        l1: L1Cache[L1Entry] | None = None,
        popularity: PopularityCounter | None = None,
        trace: AccessTrace | None = None,
    ) -> None:
        self.config = config
        self.trace = trace
        self._layout = layout
        self._redis = redis_store
        self._offline = offline
        self._stats = stats
        self._clock = clock
        self.l1 = l1
        self.popularity = popularity
        self._leases = Leases(redis_store, layout, int(config.stampede.lease_ttl * 1000))
        self._flights: SingleFlight[FlightKey, Shared] = SingleFlight()
        self.breaker = CircuitBreaker.from_config(config.degradation)
        self._timed = config.stats.publish_interval > 0  # calls timed only for publishing
        self.sql_limiter = ConcurrencyLimiter.from_config(config.degradation)
        #: the log of Redis outages, shared with the prediction cache (``featcache.models``)
        self.redis_outage = OutageLog(log, f"Redis {redis_store.url}")
        self._epoch_keys = {view.name: layout.epoch_key(view.name) for view in config.views}
        #: on a cluster, the hash slot of each view's epoch key (a read passes every key's)
        self._epoch_slots = {name: slot_of(key) for name, key in self._epoch_keys.items()
                             } if layout.buckets else {}
        self._sql_outage = OutageLog(log, f"offline store {offline.url}")
        self._beta = config.stampede.xfetch_beta
        self._lease_wait = config.stampede.lease_wait
        # A fill is written back only while the tombstone of an invalidation it may have raced
        # with is certainly still in Redis (half its TTL; the other half is margin).
        self._fill_window = config.invalidation.fill_window
        self._fill_window_us = int(config.invalidation.fill_window * 1_000_000)

    # ------------------------------------------------------------------ the call

    def read(self, plan: Plan, ids: list[EntityId], checked: bool = True) -> FeatureResult:
        """``ids``: distinct, from ``normalize_ids``; or, with ``checked=False``, from
        ``distinct_ids``, checked here against the limits only if L1 does not answer them all.

        The call's steps, each public for a driver that awaits the Redis read instead
        (``featcache.async_client``): ``begin``, the read, ``settle``, ``finish``."""
        call = self.begin(plan, ids, checked)
        if type(call) is not Call:
            return call  # type: ignore[return-value]  # every row from L1
        raw, redis_ok = self.read_redis(call)
        return self.settle(call, raw, redis_ok) or self.finish(call, raw, redis_ok)

    def begin(self, plan: Plan, ids: list[EntityId], checked: bool = True
              ) -> Call | FeatureResult:
        """The call up to its Redis read: the answer when L1 holds every row, else the
        ``Call`` with the keys to read."""
        # the call's latency, counted per tier when stats are published (0: not counted)
        began_ns = perf_counter_ns() if self._timed else 0
        n_views = len(plan.views)
        l1_token = 0
        pending: list[list[EntityId]]  # per view: ids L1 did not answer
        l1_hits: list[Mapping[EntityId, Answer]] = [{}] * n_views
        some_from_l1 = False
        if self.l1 is None:
            pending = [ids] * n_views
        else:
            l1_hits = [self._from_l1(vp, ids) for vp in plan.views]
            if [*map(type, l1_hits)].count(InOrder) == n_views:  # every id of every view
                return self._all_from_l1(plan, ids, l1_hits, began_ns)
            pending = []
            for hits in l1_hits:
                if not hits:
                    pending.append(ids)
                elif len(hits) == len(ids):
                    pending.append([])
                else:
                    pending.append([e for e in ids if e not in hits])
            if not any(pending):  # all from L1 after a recheck: complete, in ids' order
                return self._all_from_l1(plan, ids, l1_hits, began_ns)
            some_from_l1 = any(l1_hits)
        if not checked:
            check_ids(ids, plan.entity_type, self.config.limits.max_id_length)
        now_ms = int(self._clock() * 1000)
        started = time.monotonic()  # before the MGET: the fills' deadlines count from here
        for vp in plan.views:
            self._count_read(vp, ids)
        if self.l1 is not None:
            # taken before Redis is read: L1 refuses our rows if an invalidation lands meanwhile
            l1_token = self.l1.fill_token()
        row_keys, epoch_keys = self._layout.row_keys, self._epoch_keys
        slots: list[int] | None = None  # each key's hash slot, on a cluster
        if n_views == 1:
            name = plan.views[0].view.name
            keys = row_keys(name, pending[0])
            # the epochs ride in the same MGET: one round trip, and a consistent fence for fills
            keys.append(epoch_keys[name])
            if self._epoch_slots:
                slots = self._layout.row_slots(name, pending[0])
                assert slots is not None
                slots.append(self._epoch_slots[name])
        else:
            keys = []
            for vp, todo in zip(plan.views, pending, strict=True):
                keys.extend(row_keys(vp.view.name, todo))
            keys.extend([epoch_keys[vp.view.name] for vp in plan.views])
            if self._epoch_slots:
                slots = []
                for vp, todo in zip(plan.views, pending, strict=True):
                    slots.extend(self._layout.row_slots(vp.view.name, todo) or ())
                slots.extend([self._epoch_slots[vp.view.name] for vp in plan.views])
        return Call(plan, ids, pending, l1_hits, some_from_l1, keys, slots, any(pending),
                    l1_token, now_ms, started, began_ns)

    def read_redis(self, call: Call) -> tuple[list[bytes | None], bool]:
        """The call's one Redis read, through the breaker: the values (all None when Redis
        failed or was not asked) and whether Redis answered."""
        if not call.reads_redis:
            return self.nothing_read(call)
        if not self.breaker.allow():
            return self.redis_failed(
                call, CacheUnavailable("Redis circuit open: read skipped"), count=False)
        try:
            raw: list[bytes | None] = self._redis.read(call.keys, call.slots)
        except CacheUnavailable as exc:
            return self.redis_failed(call, exc)
        self.redis_succeeded()
        return raw, True

    def nothing_read(self, call: Call) -> tuple[list[bytes | None], bool]:
        """``read_redis``'s answer when L1 left no row to read (an L1 recheck)."""
        return [None] * len(call.keys), True

    def redis_succeeded(self) -> None:
        self.breaker.record_success()
        self.redis_outage.ok()

    def redis_failed(self, call: Call, exc: CacheUnavailable, *, count: bool = True
                     ) -> tuple[list[bytes | None], bool]:
        """The read failed (``count``: against the breaker; not when the breaker skipped
        it): every row goes to SQL."""
        if count:
            self.breaker.redis_failed(exc)
        self.redis_outage.failed("answering from SQL", exc)
        self._stats.add(call.plan.views[0].view.name, {"redis_errors": 1})
        return [None] * len(call.keys), False

    def settle(self, call: Call, raw: list[bytes | None], redis_ok: bool
               ) -> FeatureResult | None:
        """The answer when every row of every view was a plain hit in ``raw``; None when any
        row needs ``finish`` (a miss, a stale row, a row due for an early refresh, a row L1
        answered, Redis down)."""
        n_views = len(call.plan.views)
        epochs = raw[len(raw) - n_views :]
        if not redis_ok or call.some_from_l1 or None in epochs:
            return None
        # the common call: every row of every view a plain hit, answered without a
        # _ViewRead; anything else takes ``finish``, from the same MGET
        plain = self._plain_hits(call.plan, call.ids, raw, epochs, call.now_ms)
        if plain is None:
            return None
        return self._answer_plain(call.plan, call.ids, plain, call.l1_token, call.began_ns)

    def finish(self, call: Call, raw: list[bytes | None], redis_ok: bool) -> FeatureResult:
        """Everything after the read for a call ``settle`` did not answer: epochs, the per-row
        judgement, fills (single flight, leases, SQL) and their fenced write, the answer."""
        return run_blocking(self.finish_steps(call, raw, redis_ok))

    def finish_steps(self, call: Call, raw: list[bytes | None], redis_ok: bool
                     ) -> Steps[FeatureResult]:
        """``finish`` as steps (``featcache.steps``): it yields where the call waits for rows
        another caller of this process is reading from SQL, and each pause between polls for
        rows another process is filling, for a driver that waits without a thread (the
        asyncio client)."""
        plan, ids, pending, l1_hits = call.plan, call.ids, call.pending, call.l1_hits
        now_ms, started, began_ns = call.now_ms, call.started, call.began_ns
        n_views = len(plan.views)
        reads: list[_ViewRead] = []
        epochs = raw[len(raw) - n_views :]
        if redis_ok and None in epochs and any(pending):
            # a view never used, or its epoch key was evicted: rows must never be stamped
            # with an epoch a lost key could read as again, so create it (server clock) first;
            # a missing table or column fails before that first write
            try:
                for vp in plan.views:
                    self._offline.bind(vp.view)
            except OfflineStoreError:
                pass  # SQL is down: nothing will be filled, and _fill_all answers for it
            else:
                epochs = self._ensure_epochs(plan, epochs)
        offset = 0
        for v, vp in enumerate(plan.views):
            todo = pending[v]
            vr = _ViewRead(vp, epochs[v])
            if l1_hits[v]:
                vr.answers.update(l1_hits[v])
            vr.counts["hit_l1"] = len(l1_hits[v])
            if todo:
                self._classify(vr, todo, raw[offset : offset + len(todo)], now_ms)
                offset += len(todo)
            reads.append(vr)
        try:
            if any(vr.missing or vr.early for vr in reads):
                yield from self._fill_all(reads, now_ms, started, redis_ok)
        except BaseException:  # the call will not reach its fill write: give leases back now
            for vr in reads:
                self._release_now(vr)
                # what the call did before it failed (SQL errors and refusals among it) is
                # counted like any call's: an outage with a cold cache must show in stats
                self._stats.add(vr.vp.view.name, vr.counts)
            raise
        if redis_ok and any(vr.items or vr.release for vr in reads):
            self._write_fills(plan, reads, started)
        answers: list[dict[EntityId, Answer]] = []
        took_ns = perf_counter_ns() - began_ns
        for vr in reads:
            if len(vr.answers) != len(ids) or (vr.counts["hit_l1"] and pending[len(answers)]):
                vr.answers = {eid: vr.answers[eid] for eid in ids}  # the caller's order
            answers.append(vr.answers)
            if began_ns:
                self._stats.add_call(vr.vp.view.name, vr.counts,
                                     "sql" if vr.missing else "redis", took_ns)
            else:
                self._stats.add(vr.vp.view.name, vr.counts)
        if self.l1 is not None:
            for vr in reads:
                self._to_l1(vr.vp, vr.answers, vr.loaded, call.l1_token)
        return FeatureResult(ids, plan, answers)

    def _ensure_epochs(self, plan: Plan, epochs: list[bytes | None]) -> list[bytes | None]:
        missing = [i for i, e in enumerate(epochs) if e is None]
        keys = [self._layout.epoch_key(plan.views[i].view.name) for i in missing]
        try:
            created = self.breaker.redis_call("epoch", lambda: self._redis.ensure_epochs(keys))
        except CacheUnavailable:
            # the fills then carry epoch 0, which no reader ever matches (epochs come from
            # the server clock): written for nothing, never served
            return epochs
        out = list(epochs)
        for i, value in zip(missing, created, strict=True):
            out[i] = value
        return out

    def _all_from_l1(
        self, plan: Plan, ids: list[EntityId], l1_hits: list[Mapping[EntityId, Answer]],
        began_ns: int,
    ) -> FeatureResult:
        took_ns = perf_counter_ns() - began_ns
        for vp in plan.views:
            self._count_read(vp, ids)
            if began_ns:
                self._stats.call(vp.view.name, "hit_l1", len(ids), "l1", took_ns)
            else:
                self._stats.add_one(vp.view.name, "hit_l1", len(ids))
        return FeatureResult(ids, plan, l1_hits)

    def _count_read(self, vp: ViewPlan, ids: list[EntityId]) -> None:
        if self.popularity is not None:  # sampled: almost always one random() and out
            self.popularity.record(vp.view.name, ids)
        if self.trace is not None:  # one append; the sampling runs in its own thread
            self.trace.record(vp.view.name, ids)

    # ------------------------------------------------------------------ L1

    def _from_l1(self, vp: ViewPlan, ids: list[EntityId]) -> Mapping[EntityId, Answer]:
        assert self.l1 is not None
        if vp.max_age_ms == vp.view_max_age_ms and vp.width == vp.view_width:
            # the soft deadline is this call's own freshness bound: nothing to recheck
            return self.l1.get_many(vp.view.name, ids, distinct=True)
        now_ms = int(self._clock() * 1000)
        fresh_after = fresh_since(now_ms, vp.max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        width = vp.width

        def recheck(answer: Answer, loaded_ms: int) -> bool:
            """Past the view's strictest max_age: still fresh for the features asked for?"""
            values = answer[VALUES]
            if values is None:
                return loaded_ms >= negative_after
            return loaded_ms >= fresh_after and len(values) >= width

        return self.l1.get_many(vp.view.name, ids, recheck=recheck, distinct=True)

    def _to_l1(
        self,
        vp: ViewPlan,
        answers: Mapping[EntityId, Answer],
        loaded: Mapping[EntityId, int],
        token: int,
    ) -> None:
        """Store the rows this call got from Redis or SQL (``loaded``: their load times),
        never L1's own."""
        assert self.l1 is not None
        if not loaded:
            return
        now_ms = int(self._clock() * 1000)
        # seconds each row stays fresh for every feature of the view: its soft deadline
        row_end = vp.view_max_age_ms - now_ms
        absent_end = vp.negative_ttl_ms - now_ms
        entries: dict[EntityId, L1Entry] = {}
        fresh_for: dict[EntityId, float] = {}
        hit_l1, absent = Status.HIT_L1, Status.ABSENT
        full = vp.view_width
        for eid, loaded_ms in loaded.items():
            status, values, event_us = answers[eid]
            if status is absent:
                entries[eid] = (absent, None, None)
                fresh_for[eid] = (loaded_ms + absent_end) / 1000 - _L1_MARGIN_S
            elif values is not None and (status is Status.HIT_REDIS or status is Status.FILLED):
                entries[eid] = (hit_l1, values, event_us)
                # a row without every feature of the view is always rechecked
                fresh_for[eid] = (
                    (loaded_ms + row_end) / 1000 - _L1_MARGIN_S if len(values) >= full else 0.0
                )
        self.l1.put_many(vp.view.name, entries, token=token, fresh_for=fresh_for,
                         stamps=loaded)

    # ------------------------------------------------------------------ Redis values

    def _classify(
        self, vr: _ViewRead, ids: list[EntityId], raw: list[bytes | None], now_ms: int
    ) -> None:
        """Sort one view's Redis values into answers, misses, stale and early-refresh rows.

        This loop runs once per row of every batch: it compares integers against cut-offs
        computed once (``featcache.freshness``) and builds plain tuples, nothing more.
        """
        vp = vr.vp
        answers, missing, seen = vr.answers, vr.missing, vr.seen
        loaded = vr.loaded if self.l1 is not None else None
        decode = vp.codec.decode
        width, epoch, max_age_ms, beta = vp.width, vr.epoch, vp.max_age_ms, self._beta
        fresh_after = fresh_since(now_ms, max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        stale_after = fresh_since(now_ms, vp.stale_window_ms)
        # XFetch draws only for rows within 10 deltas of expiry (the chance it misses one
        # further out is e^-10): with the floor as delta that is "loaded before early_after";
        # rows whose own fill time exceeds the floor get their wider window tested as well
        delta_floor = vp.delta_floor_ms
        early_after = now_ms - max_age_ms + 10 * beta * delta_floor
        hit, absent = Status.HIT_REDIS, Status.ABSENT
        if len(raw) >= _BATCH_DECODE_MIN and self._all_hits(vr, ids, raw, now_ms):
            return
        hits = negative_hits = decode_errors = 0
        for eid, blob in zip(ids, raw, strict=True):
            if blob is None:
                missing.append(eid)
                continue
            row = decode(blob)
            if row is None:
                decode_errors += 1
            elif row.epoch != epoch:  # invalidated with its whole view
                pass
            elif row.kind == KIND_ROW:
                if len(row.values) < width:  # written before a requested feature existed
                    pass
                elif row.loaded_ms >= fresh_after:
                    answer = (hit, row.values, row.event_us)
                    if beta and (
                        row.loaded_ms < early_after
                        or (row.fill_ms > delta_floor
                            and row.loaded_ms + max_age_ms - now_ms < 10 * beta * row.fill_ms)
                    ) and refresh_early(row.loaded_ms, now_ms, max_age_ms, row.fill_ms, beta,
                                        1.0 - random.random()):
                        seen[eid] = blob
                        vr.early[eid] = answer
                        continue
                    answers[eid] = answer
                    hits += 1
                    if loaded is not None:
                        loaded[eid] = row.loaded_ms
                    continue
                elif row.loaded_ms >= stale_after:
                    vr.stale[eid] = (Status.STALE, row.values, row.event_us)
            elif row.kind == KIND_ABSENT and row.loaded_ms >= negative_after:
                answers[eid] = (absent, None, None)
                negative_hits += 1
                if loaded is not None:
                    loaded[eid] = row.loaded_ms
                continue
            # a miss (or a tombstone left by an invalidation, an expired negative entry): a
            # fill may only replace exactly what Redis held
            seen[eid] = blob
            missing.append(eid)
        counts = vr.counts
        counts["hit_redis"] = hits
        counts["negative_hit"] = negative_hits
        counts["decode_errors"] = decode_errors

    def _all_hits(
        self,
        vr: _ViewRead,
        ids: list[EntityId],
        raw: list[bytes | None],
        now_ms: int,
    ) -> bool:
        """``_classify``'s batch: answer ``ids`` at once when every row is a plain hit
        (``_plain_rows``); False (nothing done) when any row needs a per-row judgement."""
        plain = self._plain_rows(vr.vp, raw, vr.epoch, now_ms)
        if plain is None:
            return False
        vr.answers.update(zip(ids, hit_answers(plain.bodies, plain.events_us), strict=True))
        if plain.loaded is not None:
            vr.loaded.update(zip(ids, plain.loaded, strict=True))
        counts = vr.counts
        counts["hit_redis"] = len(ids)
        counts["negative_hit"] = counts["decode_errors"] = 0
        return True

    def _plain_rows(
        self, vp: ViewPlan, raw: list[bytes | None], epoch: int, now_ms: int
    ) -> _PlainRows | None:
        """The decoded rows of ``raw`` when every value is a plain hit, else None.

        A plain hit is a row of the full schema (``RowCodec.decode_rows``) and of the view's
        ``epoch``, loaded recently enough to be fresh and, with XFetch on, too far from expiry
        to draw an early refresh (rows within 10 deltas of it, the floor as delta), with a
        fill time under that floor. The all-hit batch is the common one: decoded in one call
        and judged by C-level maps, with no Python step per row.
        """
        if None in raw:
            return None
        batch = vp.codec.decode_rows(raw)  # type: ignore[arg-type]  # no None: checked
        if batch is None:
            return None
        bodies = batch.bodies
        beta = self._beta
        delta_floor = vp.delta_floor_ms
        plain_after = fresh_since(now_ms, vp.max_age_ms) + 10 * beta * delta_floor
        # the load times are kept only for L1's entries
        loaded = list(map(_loaded_ms, bodies)) if self.l1 is not None else None
        if (
            min(loaded if loaded is not None else map(_loaded_ms, bodies)) < plain_after
            or {*map(_epoch, bodies)} != {epoch}
            or (beta and max(map(_fill_ms, bodies)) > delta_floor)
        ):
            return None
        return _PlainRows(bodies, batch.events_us, loaded)

    def _plain_hits(
        self,
        plan: Plan,
        ids: list[EntityId],
        raw: list[bytes | None],
        epochs: list[bytes | None],
        now_ms: int,
    ) -> list[_PlainRows] | None:
        """``_plain_rows`` of every view of the call (its rows in ``raw`` one view after
        the other, as the MGET read them), or None when any view has another row."""
        n = len(ids)
        if len(plan.views) == 1:
            rows = self._plain_rows(plan.views[0], raw[:n], int(epochs[0]), now_ms)  # type: ignore[arg-type]
            return None if rows is None else [rows]
        out = []
        for v, vp in enumerate(plan.views):
            rows = self._plain_rows(vp, raw[v * n : (v + 1) * n], int(epochs[v]),  # type: ignore[arg-type]
                                    now_ms)
            if rows is None:
                return None
            out.append(rows)
        return out

    def _answer_plain(
        self,
        plan: Plan,
        ids: list[EntityId],
        hits: list[_PlainRows],
        l1_token: int,
        began_ns: int,
    ) -> FeatureResult:
        """The result of a call whose every row was a plain hit (``_plain_hits``): each view's
        rows as read (``RedisHits``), their answers built only when the caller asks."""
        answers: list[Mapping[EntityId, Answer]] = []
        stats = self._stats
        took_ns = perf_counter_ns() - began_ns
        for vp, rows in zip(plan.views, hits, strict=True):
            hit = RedisHits(ids, rows.bodies, rows.events_us)
            answers.append(hit)
            if began_ns:
                stats.call(vp.view.name, "hit_redis", len(ids), "redis", took_ns)
            else:
                stats.add_one(vp.view.name, "hit_redis", len(ids))
            if rows.loaded is not None:
                self._to_l1(vp, hit.index(), dict(zip(ids, rows.loaded, strict=True)),
                            l1_token)
        return FeatureResult(ids, plan, answers)

    # ------------------------------------------------------------------ misses

    def _fill_all(
        self, reads: list[_ViewRead], now_ms: int, started: float, redis_ok: bool
    ) -> Steps[None]:
        """Fetch every view's misses (and early refreshes) once per process and per Redis."""
        todo = {vr.vp.view.name: vr for vr in reads if vr.missing or vr.early}
        if not todo:
            return
        for view, vr in list(todo.items()):
            try:  # a missing table or column fails before any lease (SchemaError)
                self._offline.bind(vr.vp.view)
            except OfflineStoreError as exc:  # SQL down before this process ever reflected it
                del todo[view]
                self._sql_failed(vr, exc, [*vr.missing, *vr.early])
        if not todo:
            return
        # A thread may only join a read that saw the same Redis state it saw: a call that starts
        # after an invalidation returned sees its tombstone (or the new epoch), so it can never
        # share a SQL read that started before the invalidation.
        wanted = [
            _flight_key(vr, eid, early)
            for vr in todo.values()
            for ids, early in ((vr.missing, False), (vr.early, True))
            for eid in ids
        ]
        led: set[FlightKey] = set()  # rows whose SQL read this call did itself

        def fetch(keys: list[FlightKey]) -> Steps[dict[FlightKey, Shared]]:
            grouped: dict[str, list[EntityId]] = {}
            for key in keys:
                grouped.setdefault(key.view, []).append(key.entity)
            got = yield from self._fetch_shared(todo, grouped, now_ms, started, redis_ok)
            out = {key: got[(key.view, key.entity)] for key in keys}
            led.update(key for key, shared in out.items() if shared.source is Source.SQL)
            return out

        # An early refresh another thread is already doing is not waited for: the fresh value
        # this call holds stands (as it does when another process holds the lease).
        refreshing = {_flight_key(vr, eid, True) for vr in todo.values() for eid in vr.early}
        results = yield from self._flights.do_many_steps(wanted, fetch, no_wait=refreshing)
        by_row = {(key.view, key.entity): value for key, value in results.items()}
        mine = {(key.view, key.entity) for key in led}
        for vr in todo.values():
            self._apply(vr, by_row, mine, now_ms, redis_ok)

    def _apply(
        self,
        vr: _ViewRead,
        results: dict[tuple[str, EntityId], Any],
        led: set[tuple[str, EntityId]],
        now_ms: int,
        redis_ok: bool,
    ) -> None:
        view = vr.vp.view.name
        wanted = [*vr.missing, *vr.early]
        counts = vr.counts
        filled = absent = early = joined = from_redis = negative = 0
        failed: list[EntityId] = []
        error: OfflineStoreError | None = None
        for eid in wanted:
            result = results[(view, eid)]
            if result is BUSY:  # an early refresh another thread is doing
                vr.answers[eid] = vr.early[eid]
                continue
            if result is MISSING:  # pragma: no cover - fetch answers every key it is given
                raise RuntimeError(f"no answer for {view}:{eid}")
            source, payload, fill_ms, loaded_ms = result
            if source is Source.FAILED:
                failed.append(eid)
                error = payload
                continue
            if source is Source.KEEP:
                vr.answers[eid] = vr.early[eid]
                continue
            if source is Source.REDIS:  # another process filled it while we waited
                vr.answers[eid] = payload
                if payload[STATUS] is Status.ABSENT:
                    negative += 1
                else:
                    from_redis += 1
                continue
            row: SqlRow | None = payload
            if eid in vr.early:
                early += 1
            if row is None:
                vr.answers[eid] = (Status.ABSENT, None, None)
                absent += 1
            else:
                vr.answers[eid] = (Status.FILLED, row.values, row.event_us)
                filled += 1
            # as old as the SQL read's start, also when another thread's call started it
            vr.loaded[eid] = min(now_ms, loaded_ms)
            if (view, eid) in led:
                if redis_ok:
                    self._queue_fill(vr, eid, row, now_ms, fill_ms)
            else:
                joined += 1
        counts["filled"] = filled
        counts["absent"] = absent
        counts["early_refreshes"] = early
        counts["singleflight_joined"] = joined
        counts["hit_redis"] = counts.get("hit_redis", 0) + from_redis
        counts["negative_hit"] = counts.get("negative_hit", 0) + negative
        if error is not None:
            self._sql_failed(vr, error, failed)

    def _queue_fill(
        self, vr: _ViewRead, eid: EntityId, row: SqlRow | None, now_ms: int, fill_ms: int
    ) -> None:
        vp = vr.vp
        key = self._layout.row_key(vp.view.name, eid)
        if row is None:
            value, ttl_ms = vp.codec.encode_absent(now_ms, vr.epoch), vp.negative_ttl_ms
        else:
            value = vp.codec.encode(row.values, row.event_us, now_ms, vr.epoch, fill_ms)
            ttl_ms = vp.ttl_ms
        vr.items.append(fenced_write(key, value, ttl_ms, vr.seen.get(eid)))

    def _fetch_shared(
        self,
        reads: dict[str, _ViewRead],
        grouped: dict[str, list[EntityId]],
        now_ms: int,
        started: float,
        redis_ok: bool,
    ) -> Steps[dict[tuple[str, EntityId], Shared]]:
        """The process leader's fetch: leases for every view in one round trip, a bounded wait
        for rows other processes are filling, then one SQL read per view for the rest.

        A row another process filled is judged fresh at the moment it is found, not at this
        call's start: threads that joined this fetch started later than this call, but none
        later than that moment, so the judgement holds for each of them."""
        got: dict[tuple[str, EntityId], Shared] = {}
        to_read = dict(grouped)
        if redis_ok:
            seen = {view: reads[view].seen for view in grouped}
            token = self._leases.new_token()
            taken = True
            try:
                leases, server_us = self.breaker.redis_call(
                    "lease", lambda: self._leases.acquire(grouped, seen, token))
            except CacheUnavailable:  # read as if we held them; none to give back
                leases, server_us = {view: Taken(ids, {}, {}) for view, ids in grouped.items()}, 0
                taken = False
            # The fills' deadline on the server's clock: the MGET (the fence) ran at most the
            # time since this call started before the leases' TIME, so that time back from it,
            # plus the fill window, is never later than the client's own deadline
            since_start_us = int((time.monotonic() - started) * 1e6)
            for view, (won, held_elsewhere, changed) in leases.items():
                vr = reads[view]
                if server_us:
                    vr.deadline_us = server_us - since_start_us + self._fill_window_us
                if taken:
                    vr.release.extend(self._leases.keys(view, won))
                    vr.release_token = token
                held: dict[EntityId, bytes | None] = dict(held_elsewhere)
                if changed:  # filled (or invalidated) since our MGET: use it, or wait
                    usable = self._usable(vr, changed, int(self._clock() * 1000))
                    for eid, answer in usable.items():
                        got[(view, eid)] = Shared(Source.REDIS, answer)
                    for eid in changed.keys() - usable.keys():
                        vr.seen[eid] = changed[eid]  # seen before our SQL read: a valid fence
                        held[eid] = None  # whoever changed it may be filling it: wait
                waiting: dict[EntityId, bytes | None] = {}
                for eid, holder in held.items():
                    if eid in vr.early:  # someone else refreshes it: the fresh value stands
                        got[(view, eid)] = _KEEP
                    else:
                        waiting[eid] = holder
                to_read[view] = won
                if waiting:
                    wait = yield from self._wait_for_fills(vr, waiting, token)
                    for eid, answer in wait.arrived.items():
                        got[(view, eid)] = Shared(Source.REDIS, answer)
                    vr.counts["lease_waits"] = len(waiting)
                    vr.counts["lease_takeovers"] = len(wait.taken_over)
                    vr.counts["lease_timeouts"] = len(wait.timed_out)
                    to_read[view] = [*won, *wait.taken_over, *wait.timed_out]
        for view, ids in to_read.items():
            if not ids:
                continue
            vr = reads[view]
            try:
                found, seconds = self._read_sql(vr, ids)
            except OfflineStoreError as exc:  # this view's rows fail; other views go on
                for eid in ids:
                    got[(view, eid)] = Shared(Source.FAILED, exc)
                continue
            fill_ms = int(seconds * 1000)
            for eid in ids:
                got[(view, eid)] = Shared(Source.SQL, found.get(eid), fill_ms, now_ms)
        return got

    def _release_now(self, vr: _ViewRead) -> None:
        """Give leases back at once when the call will not reach its fill write."""
        if vr.release:
            keys, vr.release = vr.release, []
            batch = WriteBatch(self._layout.epoch_key(vr.vp.view.name), None, (), keys,
                               vr.release_token)
            with contextlib.suppress(CacheUnavailable):  # else lease_ttl bounds them
                self.breaker.redis_call("release", lambda: self._redis.write([batch]))

    def _wait_for_fills(
        self, vr: _ViewRead, holders: dict[EntityId, bytes | None], token: str
    ) -> Steps[_Waited]:
        """Poll Redis for rows other readers hold the leases of (``holders``: id -> the
        holder's token, None when not known yet), up to ``lease_wait``; the pause before each
        poll is a step (``Pause``).

        Each poll reads the rows and their leases in one MGET. A row whose lease is gone while
        no usable row is there will not be filled by that holder (its fill was fenced out by
        an invalidation, or abandoned, or the holder died): this call takes the lease over at
        once, with what it just read as the fence of its own fill, instead of sleeping out
        the wait; another waiter that took it first becomes the holder waited on.
        """
        vp = vr.vp
        view = vp.view.name
        deadline = time.monotonic() + self._lease_wait
        pause = _LEASE_POLL_FIRST_S
        waited = _Waited({}, [], [])
        holders = dict(holders)
        while holders:
            yield Pause(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LEASE_POLL_MAX_S)
            ids = list(holders)
            try:
                values = self._redis.read([*self._layout.row_keys(view, ids),
                                           *self._leases.keys(view, ids)])
            except CacheUnavailable as exc:
                self.breaker.redis_failed(exc)
                break
            rows, leases = values[: len(ids)], values[len(ids) :]
            blobs = {eid: blob for eid, blob in zip(ids, rows, strict=True) if blob}
            arrived = self._usable(vr, blobs, int(self._clock() * 1000))
            waited.arrived.update(arrived)
            released: dict[EntityId, bytes | None] = {}
            for eid, row, lease in zip(ids, rows, leases, strict=True):
                if eid in arrived:
                    del holders[eid]
                elif lease is None:  # the fill waited for will not land
                    released[eid] = row
                elif holders[eid] != lease:  # a new holder (or the first one seen): wait on it
                    holders[eid] = lease
            if released:
                for eid, row in released.items():
                    del holders[eid]
                    if row is None:
                        vr.seen.pop(eid, None)
                    else:
                        vr.seen[eid] = row
                self._take_over(vr, list(released), token, holders, waited)
            if time.monotonic() >= deadline:
                break
        waited.timed_out.extend(holders)
        return waited

    def _take_over(
        self,
        vr: _ViewRead,
        ids: list[EntityId],
        token: str,
        holders: dict[EntityId, bytes | None],
        waited: _Waited,
    ) -> None:
        """Take the leases of rows whose holder's fill will not land; the rows won are read
        from SQL by this call, the others waited on (a new holder) or taken as they are."""
        view = vr.vp.view.name
        try:
            leases, _ = self.breaker.redis_call(
                "lease", lambda: self._leases.acquire({view: ids}, {view: vr.seen}, token))
        except CacheUnavailable:
            waited.taken_over.extend(ids)  # read SQL ourselves, as when leases fail at first
            return
        won, held, changed = leases[view]
        vr.release.extend(self._leases.keys(view, won))
        vr.release_token = token
        waited.taken_over.extend(won)
        holders.update(held)
        usable = self._usable(vr, changed, int(self._clock() * 1000))
        waited.arrived.update(usable)
        for eid in changed.keys() - usable.keys():
            vr.seen[eid] = changed[eid]
            holders[eid] = None

    def _usable(
        self, vr: _ViewRead, blobs: dict[EntityId, bytes], now_ms: int
    ) -> dict[EntityId, Answer]:
        """The rows among ``blobs`` that answer this call: fresh, of the current epoch."""
        vp = vr.vp
        fresh_after = fresh_since(now_ms, vp.max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        out: dict[EntityId, Answer] = {}
        for eid, blob in blobs.items():
            row = vp.codec.decode(blob)
            if row is None or row.epoch != vr.epoch:
                continue
            if (row.kind == KIND_ROW and len(row.values) >= vp.width
                    and row.loaded_ms >= fresh_after):
                out[eid] = (Status.HIT_REDIS, row.values, row.event_us)
            elif row.kind == KIND_ABSENT and row.loaded_ms >= negative_after:
                out[eid] = (Status.ABSENT, None, None)
        return out

    def _read_sql(
        self, vr: _ViewRead, ids: list[EntityId]
    ) -> tuple[dict[EntityId, SqlRow], float]:
        """One query per chunk, admitted by the limiter that protects SQL from a Redis outage."""
        if not self.sql_limiter.acquire():
            vr.counts["sql_rejected"] = vr.counts.get("sql_rejected", 0) + len(ids)
            raise OfflineStoreUnavailable(
                f"more than {self.config.degradation.sql_concurrency} SQL reads in flight for "
                f"over {self.config.degradation.sql_queue_timeout:g} s "
                "(degradation.sql_concurrency)"
            )
        try:
            found, seconds = self._offline.fetch_latest(vr.vp.view, ids)
        finally:
            self.sql_limiter.release()
        self._sql_outage.ok()
        vr.counts["sql_queries"] = vr.counts.get("sql_queries", 0) + -(
            -len(ids) // self.config.offline_store.chunk_size
        )
        vr.counts["sql_rows"] = vr.counts.get("sql_rows", 0) + len(found)
        return found, seconds

    def _sql_failed(
        self, vr: _ViewRead, exc: OfflineStoreError, failed: list[EntityId]
    ) -> None:
        """SQL failed for ``failed``: early refreshes keep their fresh value, STALE within
        stale_if_error, then ``on_sql_error`` decides between raising and marking the rest
        UNAVAILABLE. Rows of the view that did arrive (other threads, other processes) stand."""
        vr.counts["sql_errors"] = 1
        served = unservable = 0
        answers = vr.answers
        marked = []
        for eid in failed:
            if eid in vr.early:
                answers[eid] = vr.early[eid]
            elif eid in vr.stale:
                answers[eid] = vr.stale[eid]
                served += 1
            else:
                marked.append(eid)
        unservable = len(marked)
        raising = bool(marked) and self.config.degradation.on_sql_error == "raise"
        if raising:
            consequence = f"view {vr.vp.view.name}: raising for {unservable} rows"
        else:
            consequence = (f"view {vr.vp.view.name}: {served} stale rows served, "
                           f"{unservable} unavailable")
        self._sql_outage.failed(consequence, exc)
        if raising:
            raise exc
        for eid in marked:
            answers[eid] = (Status.UNAVAILABLE, None, None)
        vr.counts["stale_served"] = served
        vr.counts["unavailable"] = unservable

    # ------------------------------------------------------------------ fills

    def _write_fills(self, plan: Plan, reads: list[_ViewRead], started: float) -> None:
        batches = [vr.batch(self._layout) for vr in reads if vr.items or vr.release]
        if not batches:
            return
        view_name = plan.views[0].view.name
        total = sum(len(b.items) for b in batches)
        if time.monotonic() - started > self._fill_window:
            # past the deadline a tombstone this read raced with may have expired, and the
            # fence with it: answering is still right, writing back no longer is
            self._stats.add(view_name, {"fills_abandoned": total})
            batches = [replace(b, items=(), if_absent=None) for b in batches]
        try:
            written = self.breaker.redis_call("fill", lambda: self._redis.write(batches))
        except CacheUnavailable as exc:
            self.redis_outage.failed(f"{total} fills not written", exc)
            self._stats.add(view_name, {"fill_errors": 1})
            return
        if batches[0].items or total == 0:
            self._stats.add(view_name, {"rows_written": written, "fills_fenced": total - written})
