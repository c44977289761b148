"""The connections a store keeps between its round trips: taken from redis-py's pool once, not
checked out and back for every command.

redis-py's ``ConnectionPool.get_connection`` and ``release`` cost 13-17 us a round trip here
(a lock each, connection-state metrics, a poll for unread bytes): on a one-key read that is a
tenth of the call, and on a 100-key ``MGET`` as much as Valkey takes to answer it. The stores
on a pool keep its idle connections in one list (``of``); a round trip pops one (an atomic
operation under the GIL, so threads never share one) and pushes it back. What the checkout
guarded is kept:

* a connection the server closed, or one holding bytes nobody read, is reopened before use
  (``can_read``: one poll), and refused when it has bytes again, as redis-py does;
* a connection the pool no longer owns (the Sentinel pool's check that it goes to the primary
  the sentinels name now, or one opened by the parent of a forked process) goes back to the
  pool, which closes it, and another is taken;
* a forked child starts with none of the parent's: their sockets are the parent's;
* a round trip that failed closes its connection and gives it back to the pool;
* redis-py's pool still opens every connection (TLS, ACL auth, database, Sentinel discovery),
  bounds how many there are (``max_connections``), and closes them all with the client; it
  counts the idle ones kept here as in use, so at most a quarter of its ``max_connections``
  are kept, the rest given back to it for whoever takes connections from it directly.

``Lanes`` serves the synchronous stores, ``AsyncLanes`` the asyncio reader
(``featcache.redis_store.aio``), where the pool's checkout costs 10-15 us a read.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Self

from redis import exceptions as redis_exc

__all__ = ["AsyncLanes", "Lanes"]

#: each pool's idle connections (``_Idle.of``), for as long as the pool lives
_REGISTRY: weakref.WeakKeyDictionary[Any, _Idle] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


class _Idle:
    """The idle connections of one pool, this process's only."""

    __slots__ = ("_idle", "_keep", "_pid", "_pool_ref")

    def __init__(self, pool: Any) -> None:
        self._pool_ref = weakref.ref(pool)  # the registry's value must not keep its key alive
        self._idle: list[Any] = []
        self._pid = os.getpid()
        # the pool counts these as in use: the rest stays free for its other users
        self._keep = max(1, int(getattr(pool, "max_connections", 64)) // 4)

    @classmethod
    def of(cls, pool: Any) -> Self:
        """The idle connections of ``pool``, one list for every store on it, as the pool's
        own idle connections are: stores sharing a client (a cluster node's store and its
        ``ASKING`` store, caches built on one application client) reuse each other's, and a
        store dropped leaves its connections to the next instead of holding them out of the
        pool for good. The cluster reader asks per node and read: the lock is taken only to
        add a pool."""
        found = _REGISTRY.get(pool)
        if isinstance(found, cls):
            return found
        with _REGISTRY_LOCK:
            found = _REGISTRY.get(pool)
            if not isinstance(found, cls):
                found = _REGISTRY[pool] = cls(pool)
        return found

    @property
    def _pool(self) -> Any:
        pool = self._pool_ref()
        if pool is None:  # not reached: a store holds its client, which holds the pool
            raise redis_exc.ConnectionError("the connection pool is gone")
        return pool

    def _pop(self) -> Any | None:
        """An idle connection, now no other thread's or task's; None when there is none."""
        if self._pid != os.getpid():
            self._idle = []  # the parent's: its pool is reset by redis-py on first use
            self._pid = os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            return None

    def _kept(self, conn: Any) -> bool:
        """``conn``, after a round trip that read every reply it asked for, kept here; False
        when a quarter of the pool's connections are idle here already: it then goes back to
        the pool, for whoever takes connections from the pool itself (redis-py's own
        commands, a command run on the client directly)."""
        idle = self._idle
        if len(idle) < self._keep:
            idle.append(conn)
            return True
        return False


class Lanes(_Idle):
    """A store's idle connections, from one redis-py pool."""

    __slots__ = ()

    def take(self) -> Any:
        """A connected connection no other thread holds: an idle one, or a new one."""
        pool = self._pool
        while True:
            conn = self._pop()
            if conn is None:
                return pool.get_connection()  # checked by the pool itself
            if pool.owns_connection(conn):
                break
            pool.release(conn)  # closed by the pool: it is no longer the pool's kind
        try:
            try:
                stale = conn.can_read()  # unread bytes; EOF raises
            except (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError):
                stale = True  # closed by the server (a restart, CLIENT KILL, its timeout)
            if stale:
                conn.disconnect()
                conn.connect()
                if conn.can_read():
                    raise redis_exc.ConnectionError("Connection not ready")
        except BaseException:
            self.discard(conn)
            raise
        return conn

    def give_back(self, conn: Any) -> None:
        """``conn`` after a round trip that read every reply it asked for."""
        if not self._kept(conn):
            self._pool.release(conn)

    def discard(self, conn: Any) -> None:
        """``conn`` after a failure: its socket may hold replies nobody will read."""
        conn.disconnect()
        self._pool.release(conn)


class AsyncLanes(_Idle):
    """``Lanes`` for a ``redis.asyncio`` pool, with one difference: an idle connection is not
    polled before use (on the event loop that check costs 5 us a read, a third of what the
    lanes save); a read that finds it closed by the server is sent again, once, on a new
    connection (``fresh``), which a read of values may be.

    redis.asyncio's pool has no ownership check of its own (its Sentinel pool closes idle
    connections when the primary changes, and ours are not idle to it), so a connection to
    an address other than the primary the Sentinel pool names now goes back to the pool,
    closed, and another is taken."""

    __slots__ = ()

    async def take(self) -> tuple[Any, bool]:
        """A connection no other task holds, and whether it was idle here (else it is new
        from the pool, which checked it)."""
        pool = self._pool
        while True:
            conn = self._pop()
            if conn is None:
                return await pool.get_connection(), False
            primary = getattr(pool, "master_address", None) if getattr(
                pool, "is_master", False) else None
            if primary is None or primary == (conn.host, conn.port):
                return conn, True
            await self.discard(conn)

    async def give_back(self, conn: Any) -> None:
        """``conn`` after a read that read every reply it asked for."""
        if not self._kept(conn):
            await self._pool.release(conn)

    async def fresh(self) -> Any:
        """A connection from the pool, checked by it."""
        return await self._pool.get_connection()

    async def discard(self, conn: Any) -> None:
        try:
            await conn.disconnect()
        finally:
            await self._pool.release(conn)
