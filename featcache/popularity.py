"""Read popularity per (view, entity), counted by every serving process, for the warmer.

Counting must cost the serving path nothing measurable (the target: <= 5% of get_features p50
at 100 ids), so a call is *sampled* (one ``random()`` per call; a sampled call appends a
reference to its id list to a buffer, no copy, no I/O) and the buffer is *flushed in the
background* every ``flush_interval``: a script call per ``_COUNT_CHUNK`` distinct ids, one
round trip each, adding each id's reads (``ZINCRBY``) weighted ``1 / sample_rate`` so counts
estimate real reads.

A sampled call of more than ``IDS_PER_SAMPLE`` ids is counted by a random ``IDS_PER_SAMPLE`` of
them, each weighted ``len(ids) / IDS_PER_SAMPLE`` more (chosen at flush, off the serving
thread): every id's expected count is unchanged, and what a flush writes is bounded per call.

Counts live in time buckets, ``<prefix>:~<view>:pop:<bucket start, epoch seconds>`` (sorted
sets, member = entity id as text, TTL = the history kept). ``top_k`` merges the buckets with
weights ``0.5 ** (age / half_life)`` in one Lua call on the server (``ZUNIONSTORE`` into a
temporary key, ``ZREVRANGE``, ``DEL``), so reads decay smoothly and a popular-yesterday entity
fades instead of being forgotten at a bucket edge.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from operator import mul
from typing import Any

from featcache.config_sections import PopularityConfig
from featcache.errors import FeatcacheError, InvalidRequest
from featcache.keys import KeyLayout
from featcache.outage import OutageLog
from featcache.redis_store import LuaScript, RedisStore
from featcache.request import EntityId

__all__ = ["IDS_PER_SAMPLE", "PopularityCounter", "bucket_weights"]

log = logging.getLogger("featcache.popularity")

#: Ids of one sampled call that are counted (a random subset of a bigger call, weighted up).
#: Counting every id, at 1,000 ids a call and 5% of calls, is 20-30k increments a second per
#: serving process, whose flush on a thread beside the calls puts batch-1000 reads' p99 at
#: 2-3.4x their p50 (docs/benchmarks.md, "The tail at batch 1000").
IDS_PER_SAMPLE = 100

# KEYS[1]: a time bucket's sorted set. ARGV[1]: its TTL (seconds); ARGV[2..]: member,
# increment pairs.
_COUNT = LuaScript("""
for i = 2, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
""")
#: Members per ``_COUNT`` call, and per round trip. A flush runs on a thread of the serving
#: process, beside its calls, and a serving thread waits up to the interpreter's switch
#: interval (5 ms) for the GIL it holds: a chunk is packed in C and answered once (a command
#: per id, packed and read back in Python, costs about 2 us an id), and sent on its own, so the
#: GIL changes hands between chunks; it is one script, which the server runs without serving
#: anyone else: 500 members keep both stretches under a millisecond.
_COUNT_CHUNK = 500

# KEYS[1]: a temporary key; KEYS[2..]: bucket keys. ARGV[1]: k; ARGV[2..]: weights per bucket.
_TOP_K = LuaScript("""
local n = #KEYS - 1
local args = {'ZUNIONSTORE', KEYS[1], n}
for i = 2, #KEYS do args[#args + 1] = KEYS[i] end
args[#args + 1] = 'WEIGHTS'
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
local top = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
redis.call('DEL', KEYS[1])
return top
""")


def bucket_weights(
    now: float, bucket_seconds: int, buckets: int, half_life: float
) -> list[tuple[int, float]]:
    """(bucket start, weight) for the ``buckets`` most recent buckets; pure, for tests."""
    current = int(now // bucket_seconds) * bucket_seconds
    out = []
    for i in range(buckets):
        start = current - i * bucket_seconds
        age = now - (start + bucket_seconds / 2)  # a bucket's reads are, on average, mid-way
        out.append((start, 0.5 ** (max(age, 0.0) / half_life)))
    return out


class PopularityCounter:
    """Samples reads, flushes counts in the background, answers top-K per view."""

    def __init__(
        self,
        store: RedisStore,
        layout: KeyLayout,
        config: PopularityConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._layout = layout
        sample_rate = config.sample_rate
        self.sample_rate = sample_rate
        self._weight = 1.0 / sample_rate if sample_rate > 0 else 0.0
        self._bucket_seconds = max(1, int(config.bucket))  # bucket keys are whole seconds
        self._buckets = config.buckets
        self._half_life = config.half_life
        self._flush_interval = config.flush_interval
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Sequence[EntityId]]] = []
        self._pick = random.Random()  # the flush thread's: subsets of big calls
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushed_reads = 0
        self.flush_errors = 0
        self._outage = OutageLog(log, f"Redis {store.url}")

    # ------------------------------------------------------------------ serving side

    def record(self, view: str, ids: Sequence[EntityId]) -> None:
        """Called once per view per get_features call: one random draw, rarely an append."""
        if self._rng() >= self.sample_rate:
            return
        with self._lock:
            self._pending.append((view, ids))
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="featcache-popularity", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            self.flush()
        self.flush()  # what was sampled before close() still counts

    def flush(self) -> int:
        """Write the buffered samples; returns how many sampled reads were flushed."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return 0
        per_view: dict[str, dict[EntityId, float]] = {}
        for view, ids in pending:
            if not ids:
                continue
            counts = per_view.setdefault(view, {})
            picked = (ids if len(ids) <= IDS_PER_SAMPLE
                      else self._pick.sample(ids, IDS_PER_SAMPLE))
            weight = len(ids) / len(picked)  # each id's chance to be picked, inverted
            for entity in picked:
                counts[entity] = counts.get(entity, 0.0) + weight
        now = self._clock()
        start = int(now // self._bucket_seconds) * self._bucket_seconds
        ttl = self._bucket_seconds * (self._buckets + 1)
        reads = sum(len(ids) for _, ids in pending)
        calls: list[tuple[list[str], list[Any]]] = []
        for view, counts in per_view.items():
            key = self._layout.popularity_key(view, start)
            entities, times = list(counts), list(counts.values())
            for at in range(0, len(entities), _COUNT_CHUNK):
                # (id, weighted reads) pairs, flattened by C-level passes; hiredis writes an
                # int id as its decimal text, the member ``top_k`` reads back
                pairs = zip(entities[at : at + _COUNT_CHUNK],
                            map(mul, times[at : at + _COUNT_CHUNK], repeat(self._weight)),
                            strict=True)
                calls.append(([key], [ttl, *chain.from_iterable(pairs)]))
        try:
            for call in calls:
                self._store.eval_many(_COUNT, [call])
        except FeatcacheError as exc:
            self.flush_errors += 1
            self._outage.failed("popularity counts not flushed", exc)
            return 0
        self._outage.ok()
        self.flushed_reads += reads
        return reads

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ warmer side

    def top_k(self, view: str, k: int, entity_type: str = "int") -> list[tuple[EntityId, float]]:
        """The ``k`` most read entities of a view, with their decayed read estimates."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidRequest(f"top_k: k must be an integer >= 0, got {k!r}")
        if k == 0:  # ZREVRANGE 0 -1 would be every entity
            return []
        weights = bucket_weights(self._clock(), self._bucket_seconds, self._buckets,
                                 self._half_life)
        keys = [self._layout.popularity_key(view, start) for start, _ in weights]
        scratch = self._layout.popularity_scratch_key(view, f"{random.getrandbits(64):x}")
        args: list[Any] = [k, *(repr(w) for _, w in weights)]
        (flat,) = self._store.eval_many(_TOP_K, [([scratch, *keys], args)])
        out: list[tuple[EntityId, float]] = []
        for i in range(0, len(flat), 2):
            member = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
            entity: EntityId = int(member) if entity_type == "int" else member
            out.append((entity, float(flat[i + 1])))
        return out
