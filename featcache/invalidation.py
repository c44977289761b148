"""The invalidation hook: ETL pipelines call it after they commit (DESIGN sections 4 and 6).

Two mechanisms, both changed in Redis before the stream entry is appended, in one atomic
script per chunk:

* **Per entity**: each row key is replaced by a tombstone (kind ``T``) holding the stream entry
  id, unique per invalidation, for ``fence_ttl``. A reader that saw the key before the
  invalidation writes its fill only where the key still holds what it saw (``featcache
  .redis_store``, mode F), so a value read from SQL before the invalidation can never land
  after it. A key that did not exist gets a tombstone too: a reader that saw nothing must not
  be able to write either.
* **Whole view**: the view's epoch (``<prefix>:~<view>:epoch``) moves to
  ``max(epoch + 1, server time in microseconds)``, O(1) whatever the view's size. Rows carry the
  epoch they were read under and are misses under any other; fills check the epoch they saw is
  still current. Taking the server time means an epoch never repeats, even if an eviction
  policy dropped the epoch key and it restarted from zero.

Then the script appends one entry to the stream ``<prefix>:~stream`` (``XADD ... MAXLEN ~``) so
every process's in-process L1 cache can drop the rows: fields ``v`` (the view, or a model
version's key space: ``featcache.keys``), ``k`` (``ids`` or
``all``), ``ids`` (msgpack list of the entity ids, per-entity only), ``e`` (the new epoch, whole
view only), ``t`` (the server's time in microseconds, per-entity only: with ``e`` it makes
every entry's content unique, so a subscriber can tell a stream recreated under it even when
the new entries repeat the ids of the old ones). Ids travel as msgpack, never pickle.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from featcache.codec import TOMBSTONE_HEAD
from featcache.config import (
    CacheConfig,
    FeatureView,
    InvalidationConfig,
    LimitsConfig,
    load_config,
)
from featcache.errors import CacheUnavailable, ConfigError, InvalidRequest
from featcache.keys import KeyLayout
from featcache.redis_store import Command, LuaScript, RedisStore, ScriptCall, open_store
from featcache.request import EntityId, check_id

__all__ = ["STREAM_FIELDS", "InvalidationReport", "Invalidator"]

STREAM_FIELDS = ("v", "k", "ids", "e", "t")

# KEYS[1]: epoch key, KEYS[2]: stream key, KEYS[3..]: row keys (none for a whole-view one).
# ARGV: kind ("ids" | "all"), fence ttl ms, view name, packed ids, stream maxlen, header bytes.
_INVALIDATE = LuaScript("""
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[1] == 'all' then
  local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  local epoch = string.format('%d', math.max(current + 1, now_us))
  redis.call('SET', KEYS[1], epoch)
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                    'v', ARGV[3], 'k', 'all', 'e', epoch)
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                      'v', ARGV[3], 'k', 'ids', 'ids', ARGV[4],
                      't', string.format('%d', now_us))
local tombstone = ARGV[6] .. id
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], tombstone, 'PX', ARGV[2])
end
return id
""")

# On a cluster (where the epoch, the stream and each slot's rows are on different nodes) the
# same steps, in an order that keeps the fence: the tombstones of each slot first, then the
# stream entry, so that no L1 drops a row before Redis is fenced.
# _TOMBSTONES: KEYS: row keys of one slot; ARGV[1]: fence ttl ms, ARGV[2]: the tombstone (the
# head, then a token unique to the invalidation). Returns the server's time in microseconds.
_TOMBSTONES = LuaScript("""
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[1])
end
local t = redis.call('TIME')
return string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
""")
# _MOVE_EPOCH: KEYS[1]: the view's epoch key. Moves it as _INVALIDATE does; returns it.
_MOVE_EPOCH = LuaScript("""
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local epoch = string.format('%d', math.max(current + 1, now_us))
redis.call('SET', KEYS[1], epoch)
return epoch
""")


@dataclass(frozen=True, slots=True)
class InvalidationReport:
    """What one ``invalidate`` call did: rows fenced (0 for a whole view) and stream entry ids."""

    view: str
    entities: int
    whole_view: bool
    stream_ids: tuple[str, ...]
    ids: tuple[EntityId, ...] = ()  # the entities fenced, normalized


class Invalidator:
    """Runs invalidations for one key layout; used by ``FeatureCache.invalidate`` and the CLI."""

    def __init__(
        self,
        store: RedisStore,
        layout: KeyLayout,
        config: InvalidationConfig,
        limits: LimitsConfig,
        chunk: int = 1000,
    ) -> None:
        """``config``: the tombstones' TTL and the stream's length; ``limits``: the ids it
        accepts; ``chunk``: row keys per script call."""
        self._store = store
        self._layout = layout
        self._fence_ttl_ms = int(config.fence_ttl * 1000)
        self._maxlen = config.stream_maxlen
        self._chunk = chunk
        self._max_id_length = limits.max_id_length
        self._replicas = config.replicas
        self._replica_timeout_ms = max(1, int(config.replica_timeout * 1000))

    def invalidate(
        self, view: FeatureView, entity_ids: Iterable[Any] | None = None
    ) -> InvalidationReport:
        """Fence and announce; 100k ids are chunked into one pipelined round trip."""
        if entity_ids is None:
            return self.fence_all(view.name)
        if isinstance(entity_ids, str | bytes | bytearray | memoryview):
            # iterating it would fence its characters (or byte values) and leave the entity
            raise InvalidRequest(
                f"entity_ids must be a list of ids, not the {type(entity_ids).__name__} "
                f"{entity_ids!r:.60}; write [{entity_ids!r:.60}]"
            )
        ids = list(
            dict.fromkeys(check_id(x, view.entity_type, self._max_id_length) for x in entity_ids)
        )
        return self.fence_ids(view.name, ids)

    def fence_all(self, space: str) -> InvalidationReport:
        """Move the epoch of a view (or of a model version's key space, ``featcache.keys``)
        and announce it: every row of it is a miss from now on, in O(1)."""
        epoch_key = self._layout.epoch_key(space)
        if self._layout.buckets:
            (epoch,) = self._run([ScriptCall(_MOVE_EPOCH, [epoch_key], [])])
            announced = self._announce(space, [("k", "all", "e", epoch)])
            return InvalidationReport(space, 0, True, announced)
        args = ["all", self._fence_ttl_ms, space, b"", self._maxlen, TOMBSTONE_HEAD]
        (entry,) = self._run([ScriptCall(_INVALIDATE, [epoch_key, self._layout.stream_key()],
                                         args)])
        return InvalidationReport(space, 0, True, (_text(entry),))

    def fence_ids(self, space: str, ids: list[EntityId]) -> InvalidationReport:
        """Tombstone these keys of a view (or of a model version's key space) and announce
        them; ``ids`` checked and distinct."""
        if self._layout.buckets:
            return self._invalidate_on_cluster(space, ids)
        epoch_key = self._layout.epoch_key(space)
        stream_key = self._layout.stream_key()
        calls: list[ScriptCall] = []
        for start in range(0, len(ids), self._chunk):
            chunk: list[EntityId] = ids[start : start + self._chunk]
            keys = [epoch_key, stream_key, *self._layout.row_keys(space, chunk)]
            packed = msgpack.packb(chunk)
            calls.append(ScriptCall(_INVALIDATE, keys, ["ids", self._fence_ttl_ms, space,
                                                        packed, self._maxlen,
                                                        TOMBSTONE_HEAD]))
        entries = self._run(calls) if calls else []
        return InvalidationReport(
            space, len(ids), False, tuple(_text(e) for e in entries), tuple(ids)
        )

    def _invalidate_on_cluster(self, space: str, ids: list[EntityId]) -> InvalidationReport:
        """The tombstones, one script call per slot and chunk, then one stream entry per
        chunk of ids (as on one server)."""
        tombstone = TOMBSTONE_HEAD + b"c" + secrets.token_hex(8).encode()
        calls = [
            ScriptCall(_TOMBSTONES, self._layout.row_keys(space, group[start : start
                                                          + self._chunk]),
                       [self._fence_ttl_ms, tombstone])
            for group in self._layout.slot_groups(ids)
            for start in range(0, len(group), self._chunk)
        ]
        times = self._run(calls) if calls else []
        now_us = max((int(t) for t in times), default=0)
        entries = self._announce(space, [
            ("k", "ids", "ids", msgpack.packb(ids[start : start + self._chunk]), "t", now_us)
            for start in range(0, len(ids), self._chunk)])
        return InvalidationReport(space, len(ids), False, entries, tuple(ids))

    def _announce(self, view: str, entries: list[tuple[Any, ...]]) -> tuple[str, ...]:
        """The stream entries, one round trip (on a cluster, after the fences they announce
        are in place)."""
        head = ("MAXLEN", "~", self._maxlen, "*", "v", view)
        replies = self._store.execute([
            Command("XADD", self._layout.stream_key(), (*head, *fields)) for fields in entries])
        return tuple(map(_text, replies))

    def _run(self, calls: list[ScriptCall]) -> list[Any]:
        """The invalidation's scripts, acknowledged by ``invalidation.replicas`` replicas when
        that is set: ``CacheUnavailable`` when fewer held it in time (retry the hook; twice is
        harmless), since a primary that fails over before replicating it would come back
        without the tombstones; and by every replica that answers reads, when replicas do
        (``redis.read_from_replicas``), or a read there could find the row it fences."""
        if not self._replicas and not self._store.replica_reads:
            return self._store.eval_scripts(calls)
        results, acked = self._store.eval_replicated(calls, self._replicas,
                                                     self._replica_timeout_ms)
        if acked < self._replicas:
            raise CacheUnavailable(
                f"Redis {self._store.url}: the invalidation reached {acked} of "
                f"{self._replicas} replicas within {self._replica_timeout_ms} ms "
                f"(invalidation.replicas); retry it")
        return results


def _text(entry: Any) -> str:
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def invalidate(
    view: str,
    entity_ids: Iterable[Any] | None = None,
    *,
    config: str | os.PathLike[str] | CacheConfig | None = None,
) -> InvalidationReport:
    """The hook for ETL code that holds no ``FeatureCache``: load the config (a path, a
    ``CacheConfig``, or ``$FEATCACHE_CONFIG``), invalidate, close. Call it after committing.

    Built from what invalidating needs alone: a Redis store and the key layout (no read path,
    no SQL, no L1 and no stream tail to start for one call)."""
    if config is None:
        config = os.environ.get("FEATCACHE_CONFIG")
        if not config:
            raise ConfigError("pass config= (a path or a CacheConfig) or set FEATCACHE_CONFIG")
    loaded = config if isinstance(config, CacheConfig) else load_config(config)
    view_def = loaded.view(view)
    store = open_store(loaded.redis, degradation=loaded.degradation)
    try:
        invalidator = Invalidator(store, KeyLayout.for_mode(loaded.redis.key_prefix,
                                                            loaded.redis.mode),
                                  loaded.invalidation, loaded.limits)
        return invalidator.invalidate(view_def, entity_ids)
    finally:
        store.close()
