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

The eviction policies come from maintained libraries: cachetools ``LRUCache``, ``LFUCache``
and ``TTLCache``, and theine's W-TinyLFU engine (``theine_core.TlfuCore``, the Rust core that
``theine.Cache`` wraps). See ``docs/l1-policies.md`` for the measured comparison and why the
core is used directly rather than ``theine.Cache``.

Whole-view invalidation is O(1): every view has a generation number, every entry records the
generation it was stored under, and ``invalidate_view`` only increments the number. An entry
of an older generation is a miss and is dropped when a read finds it, or evicted as the policy
sees fit. The alternative, an index view -> ids, would make ``invalidate_view`` walk (and free)
every entry of the view while holding the lock, stalling every serving thread for
milliseconds on a large view; with generations the lock is held for one dict update.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Generic, Protocol, TypeVar

import cachetools
from theine_core import TlfuCore, spread

from featcache.errors import ConfigError

__all__ = ["POLICIES", "EntityId", "L1Cache"]

POLICIES: Final = ("lru", "lfu", "ttl", "tinylfu")

EntityId = int | str
Key = tuple[str, EntityId]
#: (value, deadline on the injected clock, generation of the view when stored)
Entry = tuple[Any, float, int]
Clock = Callable[[], float]

V = TypeVar("V")
#: lets ``put_many`` take a ``dict[int, ...]`` (``Mapping`` is invariant in its key type)
IdT = TypeVar("IdT", bound=EntityId)

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

    def discard(self, key: Key) -> Entry | None:
        """Remove without counting an access; return what was there, even if past its TTL."""
        ...

    def begin_reads(self, now: float) -> None: ...

    def end_reads(self) -> None: ...

    def end_writes(self) -> None: ...

    def __len__(self) -> int: ...


# -------------------------------------------------------------------------------- cachetools


class _LRU(cachetools.LRUCache[Key, Entry]):
    """cachetools calls ``popitem`` only to make room; overriding it is its documented hook."""

    def __init__(self, maxsize: int, evicted: list[tuple[Key, Entry]]) -> None:
        super().__init__(maxsize)
        self.evicted = evicted

    def popitem(self) -> tuple[Key, Entry]:
        item = super().popitem()
        self.evicted.append(item)
        return item


class _LFU(cachetools.LFUCache[Key, Entry]):
    """See ``_LRU``."""

    def __init__(self, maxsize: int, evicted: list[tuple[Key, Entry]]) -> None:
        super().__init__(maxsize)
        self.evicted = evicted

    def popitem(self) -> tuple[Key, Entry]:
        item = super().popitem()
        self.evicted.append(item)
        return item


class _TTL(cachetools.TTLCache[Key, Entry, float]):
    """``expire`` is where TTLCache drops aged entries (on every write and in ``popitem``)."""

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
    """Adapts a cachetools cache; reads go straight to its bound ``get``."""

    get: Callable[[Key], Entry | None]
    set: Callable[[Key, Entry], None]

    def __init__(self, policy: str, max_entries: int, max_ttl: float, clock: Clock) -> None:
        self.evicted: list[tuple[Key, Entry]] = []
        self.expired: list[tuple[Key, Entry]] = []
        inner: cachetools.Cache[Key, Entry]
        self._ttl: _TTL | None = None
        if policy == "lru":
            inner = _LRU(max_entries, self.evicted)
        elif policy == "lfu":
            inner = _LFU(max_entries, self.evicted)
        else:
            inner = self._ttl = _TTL(max_entries, max_ttl, clock, self.evicted, self.expired)
        self._inner = inner
        # instance attributes: one Python call less per key on the hot paths
        self.get = inner.get
        self.set = inner.__setitem__

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

    def __init__(self, max_entries: int) -> None:
        self._core = TlfuCore(max_entries)
        self._data: dict[Key, tuple[Entry, int]] = {}  # key -> (entry, key hash)
        self._by_hash: dict[int, Key] = {}
        self._accessed: list[int] = []
        self._written: list[tuple[int, int]] = []  # (key hash, theine ttl: 0 = none)
        self.evicted: list[tuple[Key, Entry]] = []
        self.expired: list[tuple[Key, Entry]] = []

    def get(self, key: Key) -> Entry | None:
        item = self._data.get(key)
        if item is None:
            return None
        self._accessed.append(item[1])
        return item[0]

    def peek(self, key: Key) -> Entry | None:
        item = self._data.get(key)
        return None if item is None else item[0]

    def set(self, key: Key, entry: Entry) -> None:
        h = spread(hash(key))
        other = self._by_hash.get(h)
        if other is not None and other != key:
            self.evicted.append((other, self._data.pop(other)[0]))
        self._by_hash[h] = key
        self._data[key] = (entry, h)
        self._written.append((h, 0))

    def discard(self, key: Key) -> Entry | None:
        item = self._data.pop(key, None)
        if item is None:
            return None
        del self._by_hash[item[1]]
        self._core.remove(item[1])
        return item[0]

    def begin_reads(self, now: float) -> None:
        pass

    def end_reads(self) -> None:
        if self._accessed:
            self._core.access(self._accessed)
            self._accessed = []

    def end_writes(self) -> None:
        if not self._written:
            return
        victims = self._core.set(self._written)
        self._written = []
        for h in victims:
            key = self._by_hash.pop(h, None)
            if key is not None:
                self.evicted.append((key, self._data.pop(key)[0]))

    def __len__(self) -> int:
        return len(self._data)


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
    """

    def __init__(
        self,
        policy: str,
        max_entries: int,
        max_ttl: float,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(
                f"unknown L1 policy {policy!r}; valid policies: {', '.join(POLICIES)}"
            )
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"L1 max_entries must be a positive integer, got {max_entries!r}")
        if (
            isinstance(max_ttl, bool)
            or not isinstance(max_ttl, int | float)
            or not math.isfinite(max_ttl)
            or max_ttl <= 0
        ):
            raise ConfigError(
                f"L1 max_ttl must be a positive, finite number of seconds, got {max_ttl!r}"
            )
        self.policy: Final = policy
        self.max_entries: Final = max_entries
        self.max_ttl: Final = float(max_ttl)
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
            return _TinyLfuStore(self.max_entries)
        return _CachetoolsStore(self.policy, self.max_entries, self.max_ttl, self._clock)

    # ------------------------------------------------------------------ reads and writes

    def get_many(self, view: str, ids: Iterable[IdT]) -> dict[IdT, V]:
        """The ids L1 can answer; absent ones are for the caller to fetch and ``put_many``."""
        keys = [(view, entity) for entity in ids]
        asked = len(keys)
        now = self._clock()
        found: dict[IdT, V] = {}
        hits = 0
        with self._lock:
            store = self._store
            generation = self._generation.get(view, 0)
            store.begin_reads(now)
            if isinstance(store, _TinyLfuStore):  # the default policy: its get(), inlined
                data, accessed = store._data, store._accessed
                for key in keys:
                    item = data.get(key)
                    if item is None:
                        continue
                    held = item[0]
                    if held[2] == generation and now < held[1]:
                        accessed.append(item[1])
                        found[key[1]] = held[0]
                        hits += 1
                        continue
                    store.discard(key)
                    if held[2] == generation:
                        self._expired += 1
                        self._live[view] -= 1
                keys = []  # handled
            get = store.get
            for key in keys:
                entry = get(key)
                if entry is None:
                    continue
                if entry[2] == generation and now < entry[1]:
                    found[key[1]] = entry[0]
                    hits += 1
                    continue
                # dropped now so a dead entry does not hold a slot until the policy evicts it
                store.discard(key)
                if entry[2] == generation:  # older generations were counted when invalidated
                    self._expired += 1
                    self._live[view] -= 1
            store.end_reads()
            self._hits += hits
            self._misses += asked - hits
            if store.expired:
                self._settle(store)
        return found

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

    def put_many(self, view: str, items: Mapping[IdT, V], *, token: int | None = None) -> None:
        """Store rows just read from Redis or SQL; each lives at most ``max_ttl`` from now.

        ``token`` (from ``fill_token``, taken before the read) makes the fill conditional.
        """
        if not items:
            return
        keyed = [((view, entity), value) for entity, value in items.items()]
        deadline = self._clock() + self.max_ttl
        with self._lock:
            if token is not None and (
                self._view_fenced_at.get(view, 0) > token or self._cleared_at > token
            ):
                self._refused += len(keyed)
                return
            store = self._store
            generation = self._generation.get(view, 0)
            peek, put = store.peek, store.set
            added = 0
            for key, value in keyed:
                old = peek(key)
                if old is None or old[2] != generation:
                    added += 1
                put(key, (value, deadline, generation))
            store.end_writes()
            self._live[view] = self._live.get(view, 0) + added
            if store.evicted or store.expired:
                self._settle(store)

    def _settle(self, store: _Store) -> None:
        """Account for the entries the policy dropped on its own (evicted or aged out)."""
        generation, live = self._generation, self._live
        for key, entry in store.evicted:
            self._evictions += 1
            if entry[2] == generation.get(key[0], 0):
                live[key[0]] -= 1
        for key, entry in store.expired:
            self._expired += 1
            if entry[2] == generation.get(key[0], 0):
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
                if entry is not None and entry[2] == generation:
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
