"""The Redis key layout, version 1. This module is the one place that spells a key.

    <prefix>:<view>:<entity>        one row: every feature of one view for one entity
                                    (string value, format in ``featcache.codec``; TTL: the view's
                                    ttl, its negative_ttl for "SQL has no such entity", or
                                    fence_ttl for an invalidation's tombstone)
    <prefix>:~<view>:epoch          the view's epoch (decimal string, no TTL): moved by a
                                    whole-view invalidation; rows of another epoch are misses
    <prefix>:~stream                the invalidation stream (XADD MAXLEN ~ stream_maxlen)

``prefix`` is ``redis.key_prefix`` (default ``fc``), ``view`` the view name, ``entity`` the id:
a decimal integer or the UTF-8 string as given. A view has exactly one entity type, so ``7`` and
``"7"`` never meet in one view.

There is no hash tag: in a cluster, rows spread over every shard by entity, and no view lands on
one shard. Per-view bookkeeping keys (the whole-view epoch, popularity, the invalidation stream,
added by later features) live under ``<prefix>:~<view>:<name>``; a view name cannot start with
``~``, so no row key can ever collide with them, whatever its entity id.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LAYOUT_VERSION", "KeyLayout"]

LAYOUT_VERSION = 1


class KeyLayout:
    """Builds keys for one key prefix; cheap enough for the read path (one f-string per key)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def row_prefix(self, view: str) -> str:
        return f"{self.prefix}:{view}:"

    def row_key(self, view: str, entity: int | str) -> str:
        return f"{self.prefix}:{view}:{entity}"

    def row_keys(self, view: str, entities: Iterable[int | str]) -> list[str]:
        # map() alone, no Python step per key (the bulk writers build 10k keys a chunk), and
        # one %-format per key, cheaper than str() and a concatenation (docs/benchmarks.md,
        # "Materialize")
        template = self.row_prefix(view).replace("%", "%%") + "%s"
        return list(map(template.__mod__, entities))

    def stream_key(self) -> str:
        """The invalidation stream of this prefix (``featcache.invalidation``)."""
        return f"{self.prefix}:~stream"

    def view_key(self, view: str, name: str) -> str:
        """A per-view bookkeeping key, in a space no row key can reach (views never start '~')."""
        return f"{self.prefix}:~{view}:{name}"
