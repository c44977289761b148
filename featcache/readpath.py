"""The read path of DESIGN section 2, steps 3 to 7: Redis, freshness, SQL, fill, answer.

``FeatureCache`` validates a call and hands the plan and ids here. One call costs one Redis read
round trip for all views (the views' epochs ride in the same MGET), at most one SQL query per
view per chunk of ids, and one Redis write round trip for everything it filled, fenced against
invalidations that raced with it (``featcache.redis_store``, mode F).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from featcache.codec import KIND_ABSENT, KIND_ROW
from featcache.config import CacheConfig
from featcache.errors import CacheUnavailable, OfflineStoreError
from featcache.freshness import fresh_since
from featcache.keys import KeyLayout
from featcache.offline import OfflineStore
from featcache.redis_store import RedisStore, WriteBatch, WriteItem, fenced_write
from featcache.request import EntityId, Plan, ViewPlan
from featcache.result import Answer, FeatureResult
from featcache.stats import CacheStats
from featcache.types import Status

__all__ = ["ReadPath"]

log = logging.getLogger("featcache")


class _Fill:
    """What one call will write back for one view, and the fence it was read under."""

    __slots__ = ("epoch", "epoch_raw", "items", "seen", "view")

    def __init__(self, vp: ViewPlan, epoch_raw: bytes | None) -> None:
        self.view = vp.view.name
        self.epoch_raw = epoch_raw or b""
        self.epoch = int(epoch_raw) if epoch_raw else 0
        self.seen: dict[EntityId, bytes] = {}  # what Redis held for each row before SQL
        self.items: list[WriteItem] = []

    def batch(self, layout: KeyLayout) -> WriteBatch:
        return WriteBatch(layout.view_key(self.view, "epoch"), self.epoch_raw, self.items)



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
    ) -> None:
        self.config = config
        self._layout = layout
        self._redis = redis_store
        self._offline = offline
        self._stats = stats
        self._clock = clock
        # A fill is written back only while the tombstone of an invalidation it may have raced
        # with is certainly still in Redis (half its TTL; the other half is margin).
        self._fill_deadline = config.fence_ttl / 2

    def read(self, plan: Plan, ids: list[EntityId]) -> FeatureResult:
        now_ms = int(self._clock() * 1000)
        started = time.monotonic()
        keys: list[str] = []
        for view_plan in plan.views:
            keys.extend(self._layout.row_keys(view_plan.view.name, ids))
        # the epochs ride in the same MGET: one round trip, and a consistent fence for the fill
        keys.extend(self._layout.view_key(vp.view.name, "epoch") for vp in plan.views)
        try:
            raw: list[bytes | None] = self._redis.read(keys)
        except CacheUnavailable as exc:
            log.warning("Redis read failed, answering from SQL: %s", exc)
            self._stats.add(plan.views[0].view.name, {"redis_errors": 1})
            raw = [None] * len(keys)
        answers: list[dict[EntityId, Answer]] = []
        batches: list[WriteBatch] = []
        n = len(ids)
        epochs = raw[len(plan.views) * n :]
        for v, view_plan in enumerate(plan.views):
            epoch_raw = epochs[v]
            fill = _Fill(view_plan, epoch_raw)
            answers.append(
                self._answer_view(view_plan, ids, raw[v * n : (v + 1) * n], now_ms, fill)
            )
            if fill.items:
                batches.append(fill.batch(self._layout))
        if batches:
            self._write_fills(plan.views[0].view.name, batches, started)
        return FeatureResult(ids, plan, answers)


    def _answer_view(
        self,
        vp: ViewPlan,
        ids: list[EntityId],
        raw: list[bytes | None],
        now_ms: int,
        fill: _Fill,
    ) -> dict[EntityId, Answer]:
        """Classify one view's Redis values; fill what is missing or stale from SQL.

        This loop runs once per row of every batch: it compares integers against cut-offs
        computed once (``featcache.freshness``) and builds plain tuples, nothing more.
        """
        answers: dict[EntityId, Answer] = {}
        missing: list[EntityId] = []
        stale: dict[EntityId, Answer] = {}
        seen = fill.seen
        decode = vp.codec.decode
        width = vp.width
        epoch = fill.epoch
        fresh_after = fresh_since(now_ms, vp.max_age_ms)
        negative_after = fresh_since(now_ms, vp.negative_ttl_ms)
        stale_after = fresh_since(now_ms, vp.stale_window_ms)
        hit, absent = Status.HIT_REDIS, Status.ABSENT
        negative_hits = decode_errors = 0
        for eid, blob in zip(ids, raw, strict=True):
            if blob is None:
                missing.append(eid)
                continue
            seen[eid] = blob  # the fill may only replace exactly this
            row = decode(blob)
            if row is None:
                decode_errors += 1
                missing.append(eid)
            elif row[2] != epoch:  # invalidated with its whole view (or a tombstone: epoch 0)
                missing.append(eid)
            elif row[0] == KIND_ROW:
                if len(row[5]) < width:  # written before a requested feature existed
                    missing.append(eid)
                elif row[3] >= fresh_after:
                    answers[eid] = (hit, row[5], row[1])
                    del seen[eid]
                else:
                    missing.append(eid)
                    if row[3] >= stale_after:
                        stale[eid] = (Status.STALE, row[5], row[1])
            elif row[0] == KIND_ABSENT and row[3] >= negative_after:
                answers[eid] = (absent, None, None)
                negative_hits += 1
                del seen[eid]
            else:  # a tombstone left by an invalidation, or an expired negative entry
                missing.append(eid)
        counts = {
            "hit_redis": len(answers) - negative_hits,
            "negative_hit": negative_hits,
            "decode_errors": decode_errors,
        }
        if missing:
            self._fill(vp, missing, stale, now_ms, answers, fill, counts)
            answers = {eid: answers[eid] for eid in ids}  # the caller's order
        self._stats.add(vp.view.name, counts)
        return answers

    def _fill(
        self,
        vp: ViewPlan,
        missing: list[EntityId],
        stale: dict[EntityId, Answer],
        now_ms: int,
        answers: dict[EntityId, Answer],
        fill: _Fill,
        counts: dict[str, int],
    ) -> None:
        view = vp.view
        try:
            found, seconds = self._offline.fetch_latest(view, missing)
        except OfflineStoreError as exc:
            counts["sql_errors"] = 1
            unservable = [eid for eid in missing if eid not in stale]
            if unservable:
                raise
            log.warning("SQL failed for view %s, serving %d stale rows: %s",
                        view.name, len(missing), exc)
            answers.update(stale)
            counts["stale_served"] = len(stale)
            return
        counts["sql_queries"] = -(-len(missing) // self.config.sql_chunk_size)
        counts["sql_rows"] = len(found)
        fill_ms = int(seconds * 1000)
        codec = vp.codec
        head = self._layout.row_prefix(view.name)
        seen = fill.seen
        epoch = fill.epoch
        items = fill.items
        filled = absent = 0
        for eid in missing:
            row = found.get(eid)
            if row is None:
                answers[eid] = (Status.ABSENT, None, None)
                value = codec.encode_absent(now_ms, epoch)
                ttl_ms = vp.negative_ttl_ms
                absent += 1
            else:
                answers[eid] = (Status.FILLED, row.values, row.event_us)
                value = codec.encode(row.values, row.event_us, now_ms, epoch, fill_ms)
                ttl_ms = vp.ttl_ms
                filled += 1
            items.append(fenced_write(f"{head}{eid}", value, ttl_ms, seen.get(eid)))
        counts["filled"] = filled
        counts["absent"] = absent

    def _write_fills(self, view_name: str, batches: list[WriteBatch], started: float) -> None:
        total = sum(len(b.items) for b in batches)
        if time.monotonic() - started > self._fill_deadline:
            # past the deadline a tombstone this read raced with may have expired, and the
            # fence with it: answering is still right, writing back no longer is
            self._stats.add(view_name, {"fills_abandoned": total})
            return
        try:
            written = self._redis.write(batches)
        except CacheUnavailable as exc:
            log.warning("writing %d fills to Redis failed: %s", total, exc)
            self._stats.add(view_name, {"fill_errors": 1})
            return
        self._stats.add(view_name, {"rows_written": written, "fills_fenced": total - written})
