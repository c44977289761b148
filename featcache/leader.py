"""One leader per view: a lease in Redis, renewed while the work runs.

The lease is one key, ``<prefix>:~<view>:leader`` (``KeyLayout.leader_key``), holding the
owner's token with a TTL (the warmer uses its own id, ``host:pid:random``, as the token of
every lease it takes, so ``lease_holder`` names the warmer whose health entry to look at).
``acquire`` sets it only if it is free (``SET NX PX``) or already ours; ``renew`` extends it
and ``release`` deletes it only while it still holds our token, each in one small Lua script
so check and act are atomic. A leader that stops renewing (crashed,
stalled) loses the lease when it expires, and another warmer takes over; the old one learns it
from ``renew`` returning False and must stop writing.

Running several warmers is therefore safe *and* cheap: the ones that are not leader of a view
do nothing for it. (Writes stay correct even without the lease: they are fenced.)
"""

from __future__ import annotations

import os
import secrets
import socket
from types import TracebackType

from featcache.keys import KeyLayout
from featcache.redis_store import Command, LuaScript, RedisStore

__all__ = ["ViewLeader", "default_owner", "lease_holder"]

# KEYS[1]: the lease key. ARGV[1]: owner token; ARGV[2]: ttl in ms. 1 if we hold it now.
_ACQUIRE = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
""")

# Extend the lease only while it is still ours.
_RENEW = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""")

# Delete the lease only while it is still ours (never someone else's after a takeover).
_RELEASE = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


def default_owner() -> str:
    """A token unique to this process and object: host, pid, random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


def lease_holder(store: RedisStore, layout: KeyLayout, view: str) -> str | None:
    """The owner token of ``view``'s lease now (None: nobody leads it), for health reports."""
    (raw,) = store.execute([Command("GET", layout.leader_key(view))])
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


class ViewLeader:
    """The leader lease of one view. ``acquire`` / ``renew`` / ``release``, or ``with``:

        with ViewLeader(store, layout, "user", ttl_s=30) as leader:
            if leader.held:
                ...  # do the view's work, calling leader.renew() between steps
    """

    def __init__(
        self,
        store: RedisStore,
        layout: KeyLayout,
        view: str,
        ttl_s: float,
        owner: str | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._store = store
        self.view = view
        self.key = layout.leader_key(view)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = owner or default_owner()
        self.held = False

    def _call(self, script: LuaScript) -> bool:
        (result,) = self._store.eval_many(script, [([self.key], [self.owner, self.ttl_ms])])
        return bool(int(result))

    def acquire(self) -> bool:
        """Take the lease if it is free (or extend it if ours); True when we hold it."""
        self.held = self._call(_ACQUIRE)
        return self.held

    def renew(self) -> bool:
        """Extend the lease; False (and ``held`` False) when another owner took it over."""
        self.held = self._call(_RENEW)
        return self.held

    def release(self) -> None:
        """Give the lease up, if it is still ours."""
        self._call(_RELEASE)
        self.held = False

    def __enter__(self) -> ViewLeader:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.held:
            self.release()
