"""Short leases in Redis: across processes, one reader fills a missing row, the others wait.

Within a process ``featcache.singleflight`` already shares one SQL read among threads; a lease
extends that to every process sharing the Redis (DESIGN section 4, "No stampede"). A lease is a
``SET NX PX`` on ``<prefix>:~<view>:lease:<entity>`` holding a random token; the fill write
deletes it where it still holds that token (``featcache.redis_store``: a lease that expired
during a slow call and was taken by another reader is that reader's), and ``lease_ttl`` bounds
it if the holder dies. A reader
that finds the lease taken polls the row and the lease together for at most ``lease_wait``:
it takes the row once it lands, and takes the lease over as soon as the lease is gone while
the row is not there (the holder's fill was fenced out by an invalidation, abandoned, or the
holder died), so no reader sleeps out its wait for a fill that will never come. Past
``lease_wait`` it reads SQL itself: a lease can make a reader wait, never fail.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import NamedTuple

from featcache.keys import KeyLayout
from featcache.redis_store import LuaScript, RedisStore
from featcache.request import EntityId

__all__ = ["Leases", "Taken"]

# KEYS: n lease keys, then the n row keys. ARGV: token, ttl_ms, then per row what the reader
# saw ("" for nothing). Per row: the row's current bytes when they changed since the reader
# saw them (another reader's fill landed meanwhile: no lease, nothing to read), else 1 when
# the lease was taken, else {holder's token} (a one-element array) when another reader holds
# it; then the server's TIME (seconds, microseconds): the clock the fill's deadline is set on
# (``featcache.redis_store``).
_ACQUIRE = LuaScript("""
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local current = redis.pcall('GET', KEYS[n + i])
  if type(current) ~= 'string' then current = '' end
  if current ~= ARGV[2 + i] then
    out[i] = current
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    local holder = redis.pcall('GET', KEYS[i])
    if type(holder) ~= 'string' then holder = '' end
    out[i] = {holder}
  end
end
local t = redis.call('TIME')
out[n + 1] = t[1]
out[n + 2] = t[2]
return out
""")


class Taken(NamedTuple):
    """What one view's ``Leases.acquire`` found."""

    won: list[EntityId]  # leases this caller took, under its token
    held: dict[EntityId, bytes]  # leases another reader holds: id -> the holder's token
    changed: dict[EntityId, bytes]  # rows that changed since the caller saw them: id -> bytes


class Leases:
    """Takes fill leases for the rows of one view in one round trip."""

    def __init__(self, store: RedisStore, layout: KeyLayout, ttl_ms: int) -> None:
        self._store = store
        self._layout = layout
        self._ttl_ms = ttl_ms

    def keys(self, view: str, ids: Sequence[EntityId]) -> list[str]:
        return self._layout.lease_keys(view, ids)

    @staticmethod
    def new_token() -> str:
        """A caller's token: its leases hold it, and only writes that carry it release them."""
        return secrets.token_hex(8)

    def acquire(
        self,
        wanted: dict[str, list[EntityId]],
        seen: dict[str, dict[EntityId, bytes]],
        token: str,
    ) -> tuple[dict[str, Taken], int]:
        """Per view, what the caller took, what others hold and what changed (``Taken``); and
        the server's clock (microseconds) when the leases were taken. One round trip.

        Checking the row with the lease closes a gap: a reader whose MGET ran just before
        another reader's fill landed would otherwise take the lease that reader had just
        released and read SQL again.
        """
        views = [view for view, ids in wanted.items() if ids]
        if not views:
            return {}, 0
        calls = []
        groups: list[tuple[str, list[EntityId]]] = []  # one script call each: one slot
        for view in views:
            saw = seen.get(view, {})
            for ids in self._layout.slot_groups(wanted[view]):
                rows = self._layout.row_keys(view, ids)
                calls.append(([*self.keys(view, ids), *rows],
                              [token, self._ttl_ms, *(saw.get(e, b"") for e in ids)]))
                groups.append((view, ids))
        out: dict[str, Taken] = {view: Taken([], {}, {}) for view in views}
        times: list[int] = []
        for (view, ids), reply in zip(groups, self._store.eval_many(_ACQUIRE, calls),
                                      strict=True):
            *flags, seconds, micros = reply
            times.append(int(seconds) * 1_000_000 + int(micros))
            taken = out[view]
            for eid, flag in zip(ids, flags, strict=True):
                if isinstance(flag, bytes):
                    taken.changed[eid] = flag
                elif isinstance(flag, list):
                    taken.held[eid] = bytes(flag[0])
                else:
                    taken.won.append(eid)
        # the earliest of the servers' times: the safe one for the fills' deadline
        return out, min(times)
