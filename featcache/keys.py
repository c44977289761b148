"""The Redis key layout, version 1. This module is the one place that spells a key.

    <prefix>:<view>:<entity>               one row: every feature of one view for one entity
                                           (string value, format in ``featcache.codec``; TTL:
                                           the view's ttl, its negative_ttl for "SQL has no
                                           such entity", or fence_ttl for an invalidation's
                                           tombstone)
    <prefix>:~<view>:epoch                 the view's epoch (decimal string, no TTL): moved by
                                           a whole-view invalidation; rows of another epoch are
                                           misses
    <prefix>:~<view>:lease:<entity>        a fill lease (``featcache.leases``): lease_ttl
    <prefix>:~<view>:pop:<bucket start>    sampled read counts of one time bucket (a sorted
                                           set, ``featcache.popularity``); pop:tmp:<hex> is a
                                           scratch key of one top-k query
    <prefix>:~<view>:leader                the warmer's leader lease of the view
    <prefix>:~<view>:watermark             the latest change followed (``jobs/changes.py``);
                                           watermark:applied the changes applied within the
                                           lookback window (a sorted set)
    <prefix>:~<view>:trace                 the view's sampled read trace (a stream,
                                           ``featcache.access_trace``; trimmed by age)
    <prefix>:~<view>:warmer:health         the view leader's last outcome per job (a hash);
                                           warmer:instances the warmers running the view (a
                                           sorted set), warmer:instance:<id> each one's own
    <prefix>:~stream                       the invalidation stream (XADD MAXLEN ~ stream_maxlen)
    <prefix>:~:stats:<minute start>        every process's counts published in that minute (a
                                           hash, ``featcache.stats_publish``; TTL: retention)
    <prefix>:~:stats:procs                 the processes that published, scored by when
                                           (``~:``: no view name is empty, so no view's
                                           bookkeeping keys can reach them)

**Model outputs** (``featcache.models``) live in a key space per model version, named
``:m:<model>:<version>`` and used as a view name is above: its outputs at
``<prefix>::m:<model>:<version>:<digest>`` (``digest``: 32 hex characters,
``featcache.model_inputs``), its epoch at ``<prefix>:~:m:<model>:<version>:epoch`` and its
compute leases at ``<prefix>:~:m:<model>:<version>:lease:<digest>``. A view name is never empty
and never holds ``:``, so no view's key reaches a model's, and model and version names hold
only ``[A-Za-z0-9_.-]``, so no model's key reaches another's.

``prefix`` is ``redis.key_prefix`` (default ``fc``), ``view`` the view name, ``entity`` the id:
a decimal integer or the UTF-8 string as given. A view has exactly one entity type, so ``7`` and
``"7"`` never meet in one view.

Per-view bookkeeping keys live under ``<prefix>:~<view>:<name>``; a view name cannot start with
``~``, so no row key can ever collide with them, whatever its entity id.

**On a Redis Cluster** (``KeyLayout(prefix, buckets=CLUSTER_BUCKETS)``) a row and its lease
carry a hash tag, one of ``buckets`` per view, so that a write script's row and lease keys
share a slot and a batch's keys fall in at most ``buckets`` slots per view (one MGET each)::

    <prefix>:{<view>:<bb>}:<entity>        one row (bb: the entity's bucket, two digits)
    <prefix>:~{<view>:<bb>}:lease:<entity> its fill lease

    <prefix>:~{<view>}:<name>              the view's bookkeeping keys: one tag a view, so a
                                           script over several of them (the popularity
                                           top-k) has them in one slot

An entity's bucket is ``id % buckets`` for an int id and ``crc32(utf-8) % buckets`` for a str
one; ``slot_groups`` splits a view's ids by it, for the scripts that touch a row and its lease
together. The stream keeps its name. Without buckets (standalone, Sentinel) no key has a hash
tag and ``slot_groups`` is one group.
"""

from __future__ import annotations

import binascii
import re
import zlib
from collections.abc import Iterable, Sequence

__all__ = ["CLUSTER_BUCKETS", "CLUSTER_SLOTS", "LAYOUT_VERSION", "MODEL_SPACE_HEAD", "KeyLayout",
           "bucket_of", "is_model_space", "model_of_space", "model_space", "slot_of"]

LAYOUT_VERSION = 1
EntityKey = int | str
#: hash tags per view on a cluster: a batch of 1000 ids touches at most this many slots per
#: view, and a view's rows still spread over every shard (docs/architecture.md)
CLUSTER_BUCKETS = 64


CLUSTER_SLOTS = 16384

#: how a model version's key space starts (``model_space``): no view name can
MODEL_SPACE_HEAD = ":m:"
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def model_space(model: str, version: str) -> str:
    """The key space of one model version, used where ``KeyLayout`` takes a view name.
    ``ValueError`` for a name or version that is not 1-64 of ``[A-Za-z0-9_.-]``."""
    for what, text in (("model name", model), ("model version", version)):
        if not isinstance(text, str) or not _MODEL_NAME_RE.match(text):
            raise ValueError(f"{what} must be 1 to 64 of the characters A-Z a-z 0-9 _ . -, "
                             f"got {text!r}")
    return f"{MODEL_SPACE_HEAD}{model}:{version}"


def model_of_space(space: str) -> tuple[str, str]:
    """The model name and version of a ``model_space`` (neither holds a ``:``)."""
    model, _, version = space[len(MODEL_SPACE_HEAD):].partition(":")
    return model, version


def is_model_space(name: str) -> bool:
    """Whether a name from the invalidation stream is a model version's, not a view's."""
    return name.startswith(MODEL_SPACE_HEAD)


def slot_of(key: str) -> int:
    """The Redis Cluster hash slot of a key: CRC16 (XMODEM, ``binascii.crc_hqx``) of its
    hash tag, or of the whole key when it has none, modulo 16384 (the cluster spec)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % CLUSTER_SLOTS


def bucket_of(entity: int | str, buckets: int) -> int:
    """The hash-tag bucket of an entity id: stable across processes and versions."""
    if type(entity) is int:
        return entity % buckets
    return zlib.crc32(str(entity).encode()) % buckets


class KeyLayout:
    """Builds keys for one key prefix; cheap enough for the read path (one format per key)."""

    __slots__ = ("_bucket_heads", "_bucket_slots", "_heads", "buckets", "prefix")

    def __init__(self, prefix: str, buckets: int = 0) -> None:
        if buckets < 0 or buckets > 100:
            raise ValueError(f"buckets: 0 (no hash tags) to 100, got {buckets}")
        self.prefix = prefix
        self.buckets = buckets
        self._heads: dict[str, str] = {}  # view -> what its row keys start with
        #: view -> what its row keys start with, per bucket (a cluster's layout)
        self._bucket_heads: dict[str, tuple[str, ...]] = {}
        #: view -> the hash slot of its row keys, per bucket
        self._bucket_slots: dict[str, list[int]] = {}

    @classmethod
    def for_mode(cls, prefix: str, mode: str) -> KeyLayout:
        """The layout of a deployment (``redis.mode``): hash-tag buckets on a cluster only."""
        return cls(prefix, CLUSTER_BUCKETS if mode == "cluster" else 0)

    # ------------------------------------------------------------------ rows

    def row_key(self, view: str, entity: int | str) -> str:
        return self.row_keys(view, (entity,))[0]

    def row_keys(self, view: str, entities: Iterable[int | str]) -> list[str]:
        # an f-string per key in a comprehension: cheaper than map() of a %-template, or
        # str() and a concatenation (12.4 / 9.5 us per 100 int ids; the read path and the
        # bulk writers build every key of every call)
        if self.buckets:
            return self._tagged(self._tag_heads(view, ""), entities)
        head = self._heads.get(view)
        if head is None:
            head = self._heads[view] = f"{self.prefix}:{view}:"
        return [f"{head}{entity}" for entity in entities]

    def _tag_heads(self, view: str, kind: str) -> tuple[str, ...]:
        """What the keys of ``kind`` ("" rows, "lease") start with, per bucket."""
        name = f"{view}\x00{kind}"
        heads = self._bucket_heads.get(name)
        if heads is None:
            if kind:
                heads = tuple(f"{self.prefix}:~{{{view}:{b:02d}}}:{kind}:"
                              for b in range(self.buckets))
            else:
                heads = tuple(f"{self.prefix}:{{{view}:{b:02d}}}:" for b in range(self.buckets))
            self._bucket_heads[name] = heads
        return heads

    def row_slots(self, view: str, entities: Sequence[EntityKey]) -> list[int] | None:
        """The hash slot of each of ``row_keys(view, entities)`` on a cluster (None without
        buckets), by the bucket table: C-level maps for int ids, so a cluster store need not
        find each key's hash tag again."""
        if not self.buckets:
            return None
        table = self._bucket_slots.get(view)
        if table is None:
            table = self._bucket_slots[view] = [
                slot_of(head) for head in self._tag_heads(view, "")]
        n = self.buckets
        if [*map(type, entities)].count(int) == len(entities):
            return list(map(table.__getitem__, map(n.__rmod__, entities)))  # type: ignore[arg-type]
        return [table[bucket_of(e, n)] for e in entities]

    def slot_groups(self, entities: Sequence[EntityKey]) -> list[list[EntityKey]]:
        """``entities`` split so that each group's row and lease keys share one slot: by
        bucket on a cluster (in first-seen order), all of them otherwise."""
        if not self.buckets or not entities:
            return [list(entities)]
        groups: dict[int, list[EntityKey]] = {}
        n = self.buckets
        for e in entities:
            groups.setdefault(e % n if type(e) is int else bucket_of(e, n), []).append(e)
        return list(groups.values())

    def _tagged(self, heads: tuple[str, ...], entities: Iterable[int | str]) -> list[str]:
        n = self.buckets
        return [f"{heads[e % n]}{e}" if type(e) is int else f"{heads[bucket_of(e, n)]}{e}"
                for e in entities]

    # ------------------------------------------------------------------ per view

    def epoch_key(self, view: str) -> str:
        """The view's epoch (``featcache.invalidation``)."""
        return self._view_key(view, "epoch")

    def lease_keys(self, view: str, entities: Iterable[int | str]) -> list[str]:
        """The fill leases of these rows (``featcache.leases``), in their rows' slots on a
        cluster."""
        if self.buckets:
            return self._tagged(self._tag_heads(view, "lease"), entities)
        head = self._view_key(view, "lease:")
        return [f"{head}{entity}" for entity in entities]

    def popularity_key(self, view: str, bucket_start: int) -> str:
        """The sampled read counts of one time bucket (``featcache.popularity``)."""
        return self._view_key(view, f"pop:{bucket_start}")

    def popularity_scratch_key(self, view: str, token: str) -> str:
        """A scratch key of one top-k query, deleted by it."""
        return self._view_key(view, f"pop:tmp:{token}")

    def leader_key(self, view: str) -> str:
        """The warmer's leader lease of the view (``featcache.leader``)."""
        return self._view_key(view, "leader")

    def watermark_key(self, view: str) -> str:
        """The latest upstream change followed (``featcache.jobs.changes``)."""
        return self._view_key(view, "watermark")

    def materialized_key(self, view: str) -> str:
        """Where the last complete incremental materialization of the view ended
        (``featcache.materialize.materialize_incremental``)."""
        return self._view_key(view, "materialized")

    def applied_changes_key(self, view: str) -> str:
        """The changes applied within the lookback window, by ``updated_at``."""
        return self._view_key(view, "watermark:applied")

    def health_key(self, view: str) -> str:
        """The view leader's last outcome per job (``featcache.jobs.warmer``)."""
        return self._view_key(view, "warmer:health")

    def warmers_key(self, view: str) -> str:
        """The warmers that run the view, scored by when their entry expires."""
        return self._view_key(view, "warmer:instances")

    def warmer_key(self, view: str, warmer_id: str) -> str:
        """One warmer's own health entry for the view."""
        return self._view_key(view, f"warmer:instance:{warmer_id}")

    def scan_patterns(self, view: str | None = None) -> list[str]:
        """``SCAN MATCH`` patterns of every key of ``view`` (rows, leases, bookkeeping), or
        without a view of every key under the prefix (``featcache purge``). Prefixes and view
        names hold no glob character and no ``:``, so a view's patterns reach no key of
        another view or prefix."""
        if view is None:
            return [f"{self.prefix}:*"]
        if self.buckets:
            tag = f"{view}:[0-9][0-9]"  # the buckets' two digits (at most 100 buckets)
            return [f"{self.prefix}:{{{tag}}}:*", f"{self.prefix}:~{{{tag}}}:*",
                    f"{self.prefix}:~{{{view}}}:*"]
        return [f"{self.prefix}:{view}:*", f"{self.prefix}:~{view}:*"]

    def stream_key(self) -> str:
        """The invalidation stream of this prefix (``featcache.invalidation``)."""
        return f"{self.prefix}:~stream"

    def trace_key(self, view: str) -> str:
        """The view's sampled read trace (a stream, ``featcache.access_trace``)."""
        return self._view_key(view, "trace")

    def stats_key(self, minute_start: int) -> str:
        """The counts every process published in one minute (``featcache.stats_publish``)."""
        return f"{self.prefix}:~:stats:{minute_start}"

    def stats_processes_key(self) -> str:
        """The processes that published stats, scored by when they last did."""
        return f"{self.prefix}:~:stats:procs"

    def _view_key(self, view: str, name: str) -> str:
        """A per-view bookkeeping key, in a space no row key can reach (views never start '~');
        on a cluster under the view's own hash tag."""
        if self.buckets:
            return f"{self.prefix}:~{{{view}}}:{name}"
        return f"{self.prefix}:~{view}:{name}"
