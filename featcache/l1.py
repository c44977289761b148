"""The optional in-process L1 cache in front of Redis: one per ``FeatureCache``.

A row answered from process memory costs a dict lookup instead of a network round trip, but
it is a copy that an invalidation may miss (a dropped stream message, a partition), so two
bounds hold for every policy alike, whatever the library behind it does:

* ``max_entries`` bounds memory;
* ``max_ttl`` bounds staleness: an entry is served only while ``clock() < stored_at +
  max_ttl``, measured with the injected monotonic clock, so a missed invalidation is
  forgotten after at most ``max_ttl`` seconds. The deadline is stored next to the value
  instead of relying on each library's own expiry: cachetools' LRU/LFU have none, and
  theine's runs on ``time.monotonic_ns`` that a test cannot drive.

The eviction policies come from maintained libraries, cachetools ``LFUCache`` and ``TTLCache``
and theine's W-TinyLFU engine (``theine_core.TlfuCore``, the Rust core that ``theine.Cache``
wraps), except LRU: an ``OrderedDict`` in access order, read by C-level passes over a batch,
where cachetools' ``LRUCache`` spends Python calls on every key. See ``docs/l1-policies.md``
for the measured comparison and why theine's core is used directly rather than
``theine.Cache``.

A caller may also give each entry a shorter *soft* lifetime (``put_many(fresh_for=...)``): the
time it knows the value stays valid (for featcache: until the strictest ``max_age`` of the view
runs out). Before its soft deadline an entry is served with one comparison; between the soft
and the hard (``max_ttl``) deadline it is served only if the caller's ``recheck`` says so.
That keeps the hit path at one lookup and two comparisons per id, with no second pass over
the batch to check freshness.

With ``tinylfu``, recording every hit in the frequency sketch costs about 0.3 us per id (a
call into theine's core that touches scattered memory) — most of a 100-id hit. Hits are
therefore *sampled* (``access_sample_rate``, default 1/8 in ``L1Config``): a uniform sample
of accesses keeps the relative frequencies TinyLFU compares, as Caffeine's lossy read buffer
does; docs/l1-policies.md measures the hit rate with and without it. The sampled accesses are
buffered and handed to the core in batches of ``_READ_BUFFER`` (and before every write, so
admission sees them), so most reads make no call into the core at all.

Whole-view invalidation is O(1): every view has a generation number, every entry records the
generation it was stored under, and ``invalidate_view`` only increments the number. An entry
of an older generation is a miss and is dropped when a read finds it, or evicted as the policy
sees fit. The alternative, an index view -> ids, would make ``invalidate_view`` walk (and free)
every entry of the view while holding the lock, stalling every serving thread for
milliseconds on a large view; with generations the lock is held for one dict update.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from random import random as _random
from typing import Any, Final, Generic, Protocol, TypeVar

import cachetools
from theine_core import TlfuCore, spread

from featcache.config_sections import L1_POLICIES, L1Config
from featcache.errors import ConfigError

__all__ = ["POLICIES", "EntityId", "InOrder", "L1Cache"]

POLICIES: Final = L1_POLICIES

EntityId = int | str
Key = tuple[str, EntityId]
#: One flat tuple: the record's own fields (the value itself for ``record_width=N``, or the
#: value alone as a 1-tuple), then L1's bookkeeping at these offsets past them: the soft
#: deadline, the view's generation when stored, the hard deadline (max_ttl), the policy's
#: hash of the key (tinylfu; 0 otherwise), the caller's stamp for ``recheck``. Deadlines are
#: on the injected clock. A hit touches this one object: with records, not even the value
#: is a second object (see ``L1Cache``).
Entry = tuple[Any, ...]
_SOFT, _GENERATION, _HARD, _HASH, _STAMP = range(5)
Clock = Callable[[], float]
#: ``recheck(value, stamp)``: may an entry past its soft deadline still be served?
Recheck = Callable[[Any, int], bool]

V = TypeVar("V")
#: lets ``put_many`` take a ``dict[int, ...]`` (``Mapping`` is invariant in its key type)
IdT = TypeVar("IdT", bound=EntityId)

_NO_ENTRIES: Final[Mapping[EntityId, Entry]] = {}
#: tinylfu: sampled accesses are handed to theine's core once this many have gathered (before
#: any write, too), not on every read: one call per ~20 batches of 100 instead of one per batch
_READ_BUFFER: Final = 256
_SEQUENCES: Final = (list, tuple)  # built once: ``list | tuple`` is a new union per call
_value_of: Final = operator.itemgetter(0)  # of an entry that wraps its value
_peek_contains = cachetools.Cache.__contains__
_peek_getitem = cachetools.Cache.__getitem__


class _Store(Protocol):
    """What ``L1Cache`` needs from a policy; all calls happen under ``L1Cache``'s lock.

    ``evicted`` and ``expired`` collect the entries the policy dropped on its own, so the
    cache can keep its per-view counts and stats without a callback API in every library.
    """

    evicted: list[tuple[Key, Entry]]
    expired: list[tuple[Key, Entry]]

    def get(self, key: Key) -> Entry | None:
        """Look up and record the access for the policy."""
        ...

    def peek(self, key: Key) -> Entry | None:
        """Look up without counting an access (for bookkeeping, not for serving)."""
        ...

    def set(self, key: Key, entry: Entry) -> None: ...

    def key_hash(self, key: Key) -> int:
        """What the policy knows the key by (stored in the entry, so a hit need not rehash)."""
        ...

    def discard(self, key: Key) -> Entry | None:
        """Remove without counting an access; return what was there, even if past its TTL."""
        ...

    def begin_reads(self, now: float) -> None: ...

    def end_reads(self) -> None: ...

    def end_writes(self) -> None: ...

    def __len__(self) -> int: ...


# -------------------------------------------------------------------------------- lru


class _LruStore:
    """``lru``: an ``OrderedDict`` kept in access order, oldest first. cachetools'
    ``LRUCache`` is the same structure behind Python methods (a membership test, a lookup and
    a reorder per key, about 1 us a key of a 100-id hit here); a batch is looked up and
    reordered here by C-level ``map`` passes."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._max = max_entries
        self.evicted: list[tuple[Key, Entry]] = []
        self.expired: list[tuple[Key, Entry]] = []  # stays empty: no expiry of its own

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get_all(self, keys: list[Key]) -> list[Entry | None]:
        """``get`` of each key, in order."""
        entries = self._entries
        got = list(map(entries.get, keys))
        held = keys if None not in got else [
            key for key, entry in zip(keys, got, strict=True) if entry is not None]
        deque(map(entries.move_to_end, held), maxlen=0)  # most recently used last
        return got

    def peek(self, key: Key) -> Entry | None:
        return self._entries.get(key)

    def set(self, key: Key, entry: Entry) -> None:
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self._max:
            self.evicted.append(entries.popitem(last=False))

    def key_hash(self, key: Key) -> int:
        return 0

    def discard(self, key: Key) -> Entry | None:
        return self._entries.pop(key, None)

    def begin_reads(self, now: float) -> None:
        pass

    def end_reads(self) -> None:
        pass

    def end_writes(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._entries)


# -------------------------------------------------------------------------------- cachetools


class _LFU(cachetools.LFUCache[Key, Entry]):
    """cachetools calls ``popitem`` only to make room; overriding it is its documented hook."""

    def __init__(self, maxsize: int, evicted: list[tuple[Key, Entry]]) -> None:
        super().__init__(maxsize)
        self.evicted = evicted

    def popitem(self) -> tuple[Key, Entry]:
        item = super().popitem()
        self.evicted.append(item)
        return item


class _TTL(cachetools.TTLCache[Key, Entry, float]):
    """``expire`` is where TTLCache drops aged entries (on every write and in ``popitem``);
    ``popitem`` as for ``_LFU``."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Clock,
        evicted: list[tuple[Key, Entry]],
        expired: list[tuple[Key, Entry]],
    ) -> None:
        super().__init__(maxsize, ttl, timer)
        self.evicted = evicted
        self.expired = expired

    def popitem(self) -> tuple[Key, Entry]:
        item = super().popitem()
        self.evicted.append(item)
        return item

    def expire(self, time: float | None = None) -> list[tuple[Key, Entry]]:
        dropped = super().expire(time)
        if dropped:
            self.expired.extend(dropped)
        return dropped


class _CachetoolsStore:
    """Adapts a cachetools cache (``lfu``, ``ttl``); reads go straight to its bound ``get``."""

    get: Callable[[Key], Entry | None]
    set: Callable[[Key, Entry], None]

    def __init__(self, policy: str, max_entries: int, max_ttl: float, clock: Clock) -> None:
        self.evicted: list[tuple[Key, Entry]] = []
        self.expired: list[tuple[Key, Entry]] = []
        inner: cachetools.Cache[Key, Entry]
        self._ttl: _TTL | None = None
        if policy == "lfu":
            inner = _LFU(max_entries, self.evicted)
        else:
            inner = self._ttl = _TTL(max_entries, max_ttl, clock, self.evicted, self.expired)
        self._inner = inner
        # instance attributes: one Python call less per key on the hot paths
        self.get = inner.get
        self.set = inner.__setitem__

    def key_hash(self, key: Key) -> int:
        return 0

    def peek(self, key: Key) -> Entry | None:
        # the base class methods read the dict without moving the key in LRU order, bumping
        # its LFU count, or hiding an entry TTLCache considers expired
        inner = self._inner
        return _peek_getitem(inner, key) if _peek_contains(inner, key) else None

    def discard(self, key: Key) -> Entry | None:
        entry = self.peek(key)
        if entry is not None:
            # TTLCache removes an expired key, then raises KeyError
            with contextlib.suppress(KeyError):
                del self._inner[key]
        return entry

    def begin_reads(self, now: float) -> None:
        if self._ttl is not None:
            # sweep first, so entries that aged out count as expired rather than as misses
            self._ttl.expire(now)

    def end_reads(self) -> None:
        pass

    def end_writes(self) -> None:
        pass

    def __len__(self) -> int:
        # the base __len__: TTLCache's own would sweep, a side effect ``len()`` should not have
        return cachetools.Cache.__len__(self._inner)


# -------------------------------------------------------------------------------- answers


class InOrder(Mapping[IdT, V]):
    """An all-hit answer of ``get_many(distinct=True)``: the ids as asked and their values in
    the same order, indexed by id on the first lookup by id.

    Building that dict (a hundred inserts) costs a sixth of a 100-id L1 hit, and a caller that
    reads the answers in order (``FeatureResult.to_arrow``, iteration) never needs it. Read-
    only; safe to share between threads (two first lookups may both build the index; either
    one is kept).
    """

    __slots__ = ("_ids", "_index", "_values")

    def __init__(self, ids: Sequence[IdT], values: Sequence[V]) -> None:
        self._ids = ids  # distinct, as the caller vouched
        self._values = values
        self._index: dict[IdT, V] | None = None

    def __getitem__(self, entity: IdT) -> V:
        return self.index()[entity]

    def index(self) -> dict[IdT, V]:
        """The values by id: built on the first call, the same dict after it (read-only). A
        caller looking up many ids takes it once and looks them up at C speed."""
        index = self._index
        if index is None:
            index = self._index = dict(zip(self._ids, self.in_order(), strict=True))
        return index

    def __iter__(self) -> Iterator[IdT]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def in_order(self) -> Sequence[V]:
        """The values, in the order of the ids."""
        return self._values


# -------------------------------------------------------------------------------- theine


class _TinyLfuStore:
    """W-TinyLFU from theine's Rust core, with the key -> value map that ``theine.Cache`` keeps.

    ``TlfuCore`` decides admission and eviction on 64-bit key hashes and is documented as not
    thread-safe, to be driven under the caller's lock: exactly how ``L1Cache`` already works.
    Driving it directly (rather than through ``theine.Cache``) gives: evicted keys back from
    every ``set`` (counted, and the bound is exact, where ``theine.Cache`` buffers up to 16
    writes before evicting), one core call per batch instead of per key, no background
    maintenance task that keeps each cache alive until ``close()``, and no second layer of
    locks. Importing ``theine_core`` (unlike ``theine``) starts no thread.

    Two keys with the same hash are one slot to the policy, as in ``theine.Cache``: storing
    one drops the other (a miss later, never a wrong value: values are looked up by the key).
    In CPython ``hash(-1) == hash(-2)``, so entity ids -1 and -2 of one view are such a pair.
    """

    def __init__(self, max_entries: int, hash_at: int) -> None:
        self._core = TlfuCore(max_entries)
        self._hash_at = hash_at  # where entries keep the key's hash
        # view -> entity -> entry: a hit is one lookup by the caller's own id, no key tuple
        self.tables: dict[str, dict[EntityId, Entry]] = {}
        self._by_hash: dict[int, Key] = {}
        self._size = 0
        self.accessed: list[int] = []
        self._written: list[tuple[int, int]] = []  # (key hash, theine ttl: 0 = none)
        self.evicted: list[tuple[Key, Entry]] = []
        self.expired: list[tuple[Key, Entry]] = []

    def key_hash(self, key: Key) -> int:
        return spread(hash(key))

    def get(self, key: Key) -> Entry | None:
        entry = self.peek(key)
        if entry is not None:
            self.accessed.append(entry[self._hash_at])
        return entry

    def peek(self, key: Key) -> Entry | None:
        table = self.tables.get(key[0])
        return None if table is None else table.get(key[1])

    def set(self, key: Key, entry: Entry) -> None:
        h = entry[self._hash_at]
        other = self._by_hash.get(h)
        if other is not None and other != key:
            self.evicted.append((other, self._pop(other)))
        table = self.tables.get(key[0])
        if table is None:
            table = self.tables[key[0]] = {}
        if key[1] not in table:
            self._size += 1
        table[key[1]] = entry
        self._by_hash[h] = key
        self._written.append((h, 0))

    def _pop(self, key: Key) -> Entry:
        self._size -= 1
        return self.tables[key[0]].pop(key[1])

    def discard(self, key: Key) -> Entry | None:
        table = self.tables.get(key[0])
        entry = None if table is None else table.pop(key[1], None)
        if entry is None:
            return None
        self._size -= 1
        h = entry[self._hash_at]
        del self._by_hash[h]
        self._core.remove(h)
        return entry

    def begin_reads(self, now: float) -> None:
        pass

    def end_reads(self) -> None:
        # a read buffer, as Caffeine's: recorded accesses reach the sketch in batches
        if len(self.accessed) >= _READ_BUFFER:
            self._core.access(self.accessed)
            self.accessed = []

    def end_writes(self) -> None:
        if not self._written:
            return
        if self.accessed:  # the frequencies are up to date before admission is decided
            self._core.access(self.accessed)
            self.accessed = []
        victims = self._core.set(self._written)
        self._written = []
        for h in victims:
            key = self._by_hash.pop(h, None)
            if key is not None:
                self.evicted.append((key, self._pop(key)))

    def __len__(self) -> int:
        return self._size


# -------------------------------------------------------------------------------- L1Cache


class L1Cache(Generic[V]):
    """A bounded, thread-safe, in-process cache of rows keyed by ``(view, entity_id)``.

    Batch-oriented because the client works on batches: one lock acquisition and one clock
    read per call, not per row. One lock guards everything, since the libraries behind it are
    not thread-safe (cachetools) or expect the caller's lock (``TlfuCore``), and the per-view
    generations and counts must move with the entries. Key tuples and the clock reading are
    prepared before taking it; inside is only the policy's work and the bookkeeping, O(batch),
    never I/O, logging or a call back into the caller.

    ``clock`` must be monotonic (seconds); tests inject a fake one to step across ``max_ttl``.

    ``record_width=N`` makes every value a tuple of exactly N items (a *record*), stored flat
    with L1's bookkeeping appended, and ``get_many`` then answers with the stored tuple itself:
    its first N items are the record, the rest is L1's (read it by index, do not unpack it).
    That saves a hit the step from the entry to a separate value object, a cache miss per id
    once the batch's entries have left the CPU caches; the read path stores its answers this
    way. Without it, any value is stored and answered as given.
    """

    def __init__(
        self,
        config: L1Config,
        *,
        clock: Clock = time.monotonic,
        record_width: int | None = None,
    ) -> None:
        """``config``: the policy and the two bounds (validated by ``L1Config``)."""
        policy = config.policy
        if policy is None:
            raise ConfigError(
                f"an L1 needs a policy, one of {', '.join(POLICIES)}; got None", "l1.policy"
            )
        if record_width is not None and (
            isinstance(record_width, bool) or not isinstance(record_width, int) or record_width < 1
        ):
            raise ConfigError(f"L1 record_width must be a positive integer, got {record_width!r}")
        self.record_width: Final = record_width
        # the entry layout (see ``Entry``): the record's fields, then L1's at these indexes
        base = 1 if record_width is None else record_width
        self._soft_at = base + _SOFT
        self._generation_at = base + _GENERATION
        self._hard_at = base + _HARD
        self._hash_at = base + _HASH
        self._stamp_at = base + _STAMP
        self._flat = record_width is not None
        self._soft_of = operator.itemgetter(self._soft_at)
        self._generation_of = operator.itemgetter(self._generation_at)
        self._hash_of = operator.itemgetter(self._hash_at)
        self.policy: Final = policy
        self.access_sample_rate: Final = float(config.access_sample_rate)
        # every ``_stride``-th requested id (from a random offset) is recorded: a uniform sample
        self._stride = max(1, round(1 / config.access_sample_rate))
        self.max_entries: Final = config.max_entries
        self.max_ttl: Final = float(config.max_ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._store = self._new_store()
        self._generation: dict[str, int] = {}
        # entries of each view stored under its current generation, so invalidate_view can
        # say how many it dropped without looking at them
        self._live: dict[str, int] = {}
        # fencing of fills (see fill_token): a sequence number per invalidation event, and the
        # last one that touched each view
        self._sequence = 0
        self._view_fenced_at: dict[str, int] = {}
        self._cleared_at = 0
        self._hits = 0
        self._misses = 0
        self._refused = 0
        self._evictions = 0
        self._expired = 0
        self._invalidated = 0
        self._cleared = 0

    def _new_store(self) -> _Store:
        if self.policy == "tinylfu":
            return _TinyLfuStore(self.max_entries, self._hash_at)
        if self.policy == "lru":
            return _LruStore(self.max_entries)
        return _CachetoolsStore(self.policy, self.max_entries, self.max_ttl, self._clock)

    # ------------------------------------------------------------------ reads and writes

    def get_many(
        self,
        view: str,
        ids: Iterable[IdT],
        *,
        recheck: Recheck | None = None,
        distinct: bool = False,
    ) -> Mapping[IdT, V]:
        """The ids L1 can answer, in the order asked; absent ones are for the caller to fetch
        and ``put_many``.

        An entry past its soft deadline (see ``put_many``'s ``fresh_for``) but within
        ``max_ttl`` is answered only if ``recheck(value, stamp)`` is true; it is called after
        the lock is released. Without ``recheck`` such entries are misses (and kept).

        ``distinct``: the caller knows no id repeats. An answer for every id then comes as an
        ``InOrder`` mapping (indexed by id only when first asked by id); otherwise, a dict.
        """
        if not isinstance(ids, _SEQUENCES):
            ids = list(ids)
        now = self._clock()
        found: dict[IdT, Any] = {}  # V: the value, or the entry that starts with the record
        later: list[tuple[IdT, Entry]] = []  # not servable on the fast path
        missed = 0  # requests (not ids: duplicates count) without an entry
        soft_at, generation_at, flat = self._soft_at, self._generation_at, self._flat
        with self._lock:
            store = self._store
            generation = self._generation.get(view, 0)
            store.begin_reads(now)
            got: list[Entry | None]
            tinylfu = store if isinstance(store, _TinyLfuStore) else None
            if tinylfu is not None:  # the default policy: lookups by the id alone
                table = tinylfu.tables.get(view, _NO_ENTRIES)
                got = list(map(table.get, ids))
                # no entry of an older generation in the view (its entries all count as live):
                # nothing to compare the generations of
                current = len(table) == self._live.get(view, 0)
            else:
                keys = [(view, entity) for entity in ids]
                got = (store.get_all(keys) if isinstance(store, _LruStore)
                       else list(map(store.get, keys)))
                current = False
            # The usual batch: every id held and servable. Checked by C-level passes (the
            # earliest soft deadline, the oldest generation); an absent id is a None, which
            # the getters reject with TypeError, so ``held`` is what ``every`` says.
            held: list[Entry] = got  # type: ignore[assignment]  # see above
            try:
                every = bool(held) and min(map(self._soft_of, held)) > now and (
                    current or min(map(self._generation_of, held)) == generation
                )
            except TypeError:
                every = False
            if every:
                if tinylfu is not None:
                    self._sample_accesses(tinylfu, held)
                store.end_reads()
                self._hits += len(ids)
                if store.expired:
                    self._settle(store)
                values: list[V] = held if flat else [*map(_value_of, held)]  # type: ignore[assignment]
                if distinct:
                    return InOrder(ids, values)
                return dict(zip(ids, values, strict=True))
            for entity, entry in zip(ids, got, strict=True):
                if entry is None:
                    missed += 1
                    continue
                if now < entry[soft_at] and entry[generation_at] == generation:
                    found[entity] = entry if flat else entry[0]
                else:
                    later.append((entity, entry))
            if tinylfu is not None:
                self._sample_accesses(tinylfu, [entry for entry in got if entry is not None])
            maybe = self._sort_out(view, later, now, generation) if later else ()
            store.end_reads()
            self._hits += len(ids) - missed - len(later)
            self._misses += missed + len(later)
            if store.expired:
                self._settle(store)
        if maybe and recheck is not None:
            return self._rechecked(found, maybe, ids, recheck)
        return found

    def _sample_accesses(self, store: _TinyLfuStore, held: list[Entry]) -> None:
        """A uniform sample of the requests for keys L1 holds goes to the policy (see the
        module doc): every ``_stride``-th one from a random offset. Called under the lock."""
        stride = self._stride
        sample = held[int(_random() * stride) :: stride] if stride > 1 else held
        store.accessed.extend(map(self._hash_of, sample))

    def _sort_out(
        self, view: str, later: list[tuple[IdT, Entry]], now: float, generation: int
    ) -> list[tuple[IdT, Any, int]]:
        """Entries the fast path did not serve: dropped if dead, else candidates for recheck.
        Called under the lock."""
        store = self._store
        generation_at = self._generation_at
        maybe: list[tuple[IdT, Any, int]] = []
        for entity, entry in dict(later).items():  # an id asked twice is dropped once
            if entry[generation_at] == generation and now < entry[self._hard_at]:
                maybe.append((entity, entry if self._flat else entry[0], entry[self._stamp_at]))
                continue
            # dropped now so a dead entry does not hold a slot until the policy evicts it
            store.discard((view, entity))
            if entry[generation_at] == generation:  # older ones were counted when invalidated
                self._expired += 1
                self._live[view] -= 1
        return maybe

    def _rechecked(
        self,
        found: dict[IdT, V],
        maybe: Sequence[tuple[IdT, Any, int]],
        ids: Sequence[IdT],
        recheck: Recheck,
    ) -> dict[IdT, V]:
        passed = {entity: value for entity, value, stamp in maybe if recheck(value, stamp)}
        if not passed:
            return found
        with self._lock:
            self._hits += len(passed)
            self._misses -= len(passed)
        found.update(passed)
        return {entity: found[entity] for entity in ids if entity in found}

    def fill_token(self) -> int:
        """Take before reading the rows that will be ``put_many``'d; pass it as ``token``.

        Closes the stale-set race of DESIGN section 4 at the L1 level: a thread misses, reads
        v0 from Redis, the ETL commits v1 and the invalidation reaches L1, then the thread
        stores v0, which would be served until ``max_ttl``. With the token, ``put_many``
        stores nothing if the view saw any invalidation (or the cache a ``clear``) since.
        Per view, not per id, so the check is O(1); a refused fill is only a later L1 miss.
        """
        with self._lock:
            return self._sequence

    def put_many(
        self,
        view: str,
        items: Mapping[IdT, V],
        *,
        token: int | None = None,
        fresh_for: Mapping[IdT, float] | None = None,
        stamps: Mapping[IdT, int] | None = None,
    ) -> None:
        """Store rows just read from Redis or SQL; each lives at most ``max_ttl`` from now.

        ``token`` (from ``fill_token``, taken before the read) makes the fill conditional.
        ``fresh_for`` gives entries a shorter soft lifetime in seconds (see ``get_many``);
        ``stamps`` an int per entry handed back to ``recheck``.
        """
        if not items:
            return
        now = self._clock()
        deadline = now + self.max_ttl
        if fresh_for is None:
            soft = dict.fromkeys(items, deadline)
        else:
            # Equal deadlines share one float object (rows loaded together have the same):
            # a hit reads its entry's deadline, and a shared one is already in the CPU cache
            # instead of a cache miss of its own per entry.
            shared: dict[float, float] = {}
            soft = {}
            for entity in items:
                until = min(deadline, now + fresh_for[entity])
                soft[entity] = shared.setdefault(until, until)
        no_stamps: Mapping[IdT, int] = {}
        stamp_of = (stamps if stamps is not None else no_stamps).get
        records = self._records(items)
        with self._lock:
            if token is not None and (
                self._view_fenced_at.get(view, 0) > token or self._cleared_at > token
            ):
                self._refused += len(items)
                return
            store = self._store
            generation = self._generation.get(view, 0)
            peek, put, key_hash = store.peek, store.set, store.key_hash
            generation_at = self._generation_at
            added = 0
            for entity, record in records.items():
                key = (view, entity)
                old = peek(key)
                if old is None or old[generation_at] != generation:
                    added += 1
                put(key, (*record, soft[entity], generation, deadline, key_hash(key),
                          stamp_of(entity, 0)))
            store.end_writes()
            self._live[view] = self._live.get(view, 0) + added
            if store.evicted or store.expired:
                self._settle(store)

    def _records(self, items: Mapping[IdT, V]) -> Mapping[IdT, tuple[Any, ...]]:
        """The values as the tuples entries start with; checked before the lock is taken."""
        width = self.record_width
        if width is None:
            return {entity: (value,) for entity, value in items.items()}
        for entity, value in items.items():
            if not isinstance(value, tuple) or len(value) != width:
                raise TypeError(
                    f"L1 record for {entity!r} must be a tuple of {width} items "
                    f"(record_width), got {value!r:.80}"
                )
        return items  # type: ignore[return-value]  # checked: tuples of the declared width

    def _settle(self, store: _Store) -> None:
        """Account for the entries the policy dropped on its own (evicted or aged out)."""
        generation, live, generation_at = self._generation, self._live, self._generation_at
        for key, entry in store.evicted:
            self._evictions += 1
            if entry[generation_at] == generation.get(key[0], 0):
                live[key[0]] -= 1
        for key, entry in store.expired:
            self._expired += 1
            if entry[generation_at] == generation.get(key[0], 0):
                live[key[0]] -= 1
        store.evicted.clear()
        store.expired.clear()

    # ------------------------------------------------------------------ invalidation

    def invalidate(self, view: str, ids: Iterable[EntityId]) -> int:
        """Drop these rows (an invalidation message arrived); returns how many L1 held."""
        keys = [(view, entity) for entity in ids]
        dropped = 0
        with self._lock:
            if keys:  # fences fills of these ids even when L1 does not hold them (yet)
                self._sequence += 1
                self._view_fenced_at[view] = self._sequence
            store = self._store
            generation = self._generation.get(view, 0)
            for key in keys:
                entry = store.discard(key)
                if entry is not None and entry[self._generation_at] == generation:
                    dropped += 1
            if dropped:
                self._live[view] -= dropped
                self._invalidated += dropped
        return dropped

    def invalidate_view(self, view: str) -> int:
        """Drop every row of a view in O(1); returns how many L1 held.

        The entries stay in memory until read (then dropped) or evicted, which is what makes
        this O(1); the count includes entries already past ``max_ttl`` but not yet dropped.
        """
        with self._lock:
            self._sequence += 1
            self._view_fenced_at[view] = self._sequence
            self._generation[view] = self._generation.get(view, 0) + 1
            dropped = self._live.pop(view, 0)
            self._invalidated += dropped
        return dropped

    def clear(self) -> None:
        """Forget everything, e.g. when the invalidation stream shows a gap.

        A fresh store is swapped in under the lock; the old one is freed after it is released,
        so serving threads do not wait for a large cache to be deallocated.
        """
        fresh = self._new_store()
        with self._lock:
            old, self._store = self._store, fresh
            self._live.clear()
            self._sequence += 1
            self._cleared_at = self._sequence
            self._cleared += 1
        del old

    # ------------------------------------------------------------------ introspection

    def __len__(self) -> int:
        """Entries held, including any past ``max_ttl`` that no read has dropped yet."""
        with self._lock:
            return len(self._store)

    def stats(self) -> dict[str, int]:
        """Counters since creation (``clear`` does not reset them) and the current size.

        ``expired``: entries dropped for age: found by a read for lru/lfu/tinylfu, swept by
        TTLCache for ttl. ``invalidated``: rows of the current generation that
        ``invalidate``/``invalidate_view`` dropped. ``evictions``: dropped to make room.
        ``refused``: rows ``put_many`` did not store because its ``token`` was fenced.
        """
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "expired": self._expired,
                "invalidated": self._invalidated,
                "cleared": self._cleared,
                "refused": self._refused,
                "entries": len(self._store),
                "max_entries": self.max_entries,
            }

    def __repr__(self) -> str:
        return (
            f"L1Cache(policy={self.policy!r}, max_entries={self.max_entries}, "
            f"max_ttl={self.max_ttl})"
        )
