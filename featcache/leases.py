"""Short leases in Redis: across processes, one reader fills a missing row, the others wait.

Within a process ``featcache.singleflight`` already shares one SQL read among threads; a lease
extends that to every process sharing the Redis (DESIGN section 4, "No stampede"). A lease is a
``SET NX PX`` on ``<prefix>:~<view>:lease:<entity>`` holding a random token; the fill write
deletes it (``featcache.redis_store``), and ``lease_ttl`` bounds it if the holder dies. A reader
that finds the lease taken polls the row for at most ``lease_wait`` and then reads SQL itself:
a lease can make a reader wait, never fail.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from featcache.keys import KeyLayout
from featcache.redis_store import LuaScript, RedisStore
from featcache.request import EntityId

__all__ = ["Leases"]

# KEYS: lease keys. ARGV: token, ttl_ms. Returns 1 per key taken, 0 per key held elsewhere.
_ACQUIRE = LuaScript("""
local taken = {}
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    taken[i] = 1
  else
    taken[i] = 0
  end
end
return taken
""")


class Leases:
    """Takes fill leases for the rows of one view in one round trip."""

    def __init__(self, store: RedisStore, layout: KeyLayout, ttl_ms: int) -> None:
        self._store = store
        self._layout = layout
        self._ttl_ms = ttl_ms

    def keys(self, view: str, ids: Sequence[EntityId]) -> list[str]:
        head = self._layout.view_key(view, "lease:")
        return [f"{head}{e}" for e in ids]

    def acquire(
        self, wanted: dict[str, list[EntityId]]
    ) -> dict[str, tuple[list[EntityId], list[EntityId]]]:
        """Per view: (ids whose lease this caller took, ids another reader holds).

        Every view's leases in one round trip.
        """
        views = [view for view, ids in wanted.items() if ids]
        if not views:
            return {}
        token = secrets.token_hex(8)
        calls = [(self.keys(view, wanted[view]), [token, self._ttl_ms]) for view in views]
        out: dict[str, tuple[list[EntityId], list[EntityId]]] = {}
        for view, flags in zip(views, self._store.eval_many(_ACQUIRE, calls), strict=True):
            ids = wanted[view]
            won = [e for e, flag in zip(ids, flags, strict=True) if flag]
            held = [e for e, flag in zip(ids, flags, strict=True) if not flag]
            out[view] = (won, held)
        return out
