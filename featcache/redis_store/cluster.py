"""The cluster backend of the Redis store's reads: a batch in one overlapped round trip per node.

redis-py's ``RedisCluster`` owns the topology (the slot map, its refresh, the nodes' connection
pools, TLS and ACL auth); the batch path is ours, as on one server. ``ClusterReader.read``
groups the keys by hash slot (the cluster layout of ``featcache.keys`` puts a view's rows in at
most ``CLUSTER_BUCKETS`` slots), packs one ``MGET`` per slot, sends every node its MGETs before
reading any reply, then reads each node's replies. redis-py's ``mget_nonatomic`` and
``ClusterPipeline`` read node by node and build their commands in Python per key.

Resharding is not an error: a slot answered ``MOVED`` is re-read once from its new owner (the
slot map updated as redis-py does), one answered ``ASK`` once from the importing node after
``ASKING``; a slot still moving (``TRYAGAIN``: some of its keys moved, some not) and the slots
of a node that fails mid-batch read as nothing (None: misses, read from SQL and filled only
where the key is still empty), and only a batch that no node answered raises:
``PartlyUnavailable`` when some primary of the cluster did not fail, else
``CacheUnavailable``.

A node that fails is skipped by every read while its circuit breaker (``NodeHealth``) is
open, so a dead shard costs its rows a trip to SQL, not every call a socket timeout; a failure
also has the slot map asked again (at most once per ``NodeHealth.refresh_every``), which is
how reads find a promoted replica. With ``replicas=True`` a slot is read from one of its
replicas (in turn), from its primary when none is healthy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import groupby
from operator import itemgetter, methodcaller
from typing import Any

import redis
from redis import exceptions as redis_exc
from redis.cluster import ClusterNode
from redis.crc import key_slot

from featcache.breaker import BreakerState, CircuitBreaker
from featcache.errors import PartlyUnavailable
from featcache.redis_store.base import coalesce, pack
from featcache.redis_store.errors import ERRORS, translate
from featcache.redis_store.lanes import Lanes

__all__ = ["REDIRECTS", "ClusterReader", "NodeHealth", "SlotCache"]

log = logging.getLogger("featcache.redis")

_heads = methodcaller("partition", "}")
_first = itemgetter(0)
#: a reply that a slot is elsewhere now, or moving: re-read once, or left as misses
REDIRECTS = (redis_exc.AskError, redis_exc.TryAgainError, redis_exc.ClusterDownError)
#: keys' hash slots remembered at most; past it the memo starts afresh (row keys are
#: remembered by their hash tag, so a cluster layout needs 64 entries a view)
_SLOT_MEMO_MAX = 65_536


class SlotCache(dict[str, int]):
    """The hash slot of a key, by its head: the key up to its hash tag's ``}``, or the whole
    key when it has none, so every row of one hash tag costs one CRC16 (``__missing__``).

    For featcache's keys (``featcache.keys``): a key's first ``}`` closes its hash tag, or it
    has no brace at all (prefixes and view names cannot hold one). A key of another shape
    may be looked up in the wrong slot; the node then answers MOVED with the right one, and
    ``ClusterReader`` reads it from there."""

    def __missing__(self, head: str) -> int:
        if len(self) >= _SLOT_MEMO_MAX:
            self.clear()
        tag_open = head.find("{")
        raw = (head + "}").encode() if tag_open >= 0 else head.encode()
        slot: int = key_slot(raw)
        self[head] = slot
        return slot

    def slots(self, keys: Sequence[str]) -> list[int]:
        """The slot of each key, by C-level maps (a tagged key's head is before its ``}``)."""
        return list(map(self.__getitem__, map(_first, map(_heads, keys))))


class NodeHealth:
    """A circuit breaker per cluster node (``breaker`` builds one), and whether the slot map
    should be asked again: after a node failed, at most once per ``refresh_every`` seconds.

    Shared by a cluster store's reads and writes, so a node that failed a write is skipped by
    the next read too. The closed-state checks read one attribute, as ``CircuitBreaker``'s do.
    """

    def __init__(
        self,
        breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
        refresh_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._breaker = breaker
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self.refresh_every = refresh_every
        self._stale = False
        self._refreshed_at = -refresh_every

    def of(self, node: str) -> CircuitBreaker:
        """The breaker of ``node`` (``host:port``), made on first use."""
        breaker = self._breakers.get(node)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(node, self._breaker())
        return breaker

    def failed(self, node: str) -> None:
        """``node`` failed a round trip: counted against it, and the slot map is suspect."""
        self.of(node).record_failure()
        self._stale = True

    def refresh_due(self) -> bool:
        """Whether the caller should ask the slot map again now; True once per
        ``refresh_every`` while a failure is unexplained (the caller then refreshes)."""
        if not self._stale:
            return False
        with self._lock:
            now = self._clock()
            if not self._stale or now - self._refreshed_at < self.refresh_every:
                return False
            self._stale = False
            self._refreshed_at = now
            return True

    def states(self) -> dict[str, BreakerState]:
        """Each node's breaker state, by ``host:port``."""
        return {name: breaker.state for name, breaker in sorted(self._breakers.items())}


class _Group:
    """One slot's keys in one batch: ``start:end`` of the batch's keys sorted by slot."""

    __slots__ = ("end", "slot", "start")

    def __init__(self, slot: int, start: int, end: int) -> None:
        self.slot = slot
        self.start = start
        self.end = end


class ClusterReader:
    """Batched reads from a Redis/Valkey Cluster through ``client`` (its slot map and pools)."""

    def __init__(
        self,
        client: redis.RedisCluster,
        url: str,
        health: NodeHealth | None = None,
        replicas: bool = False,
    ) -> None:
        self.client = client
        self.url = url
        self.health = health or NodeHealth()
        self.replicas = replicas
        self._slots = SlotCache()
        self._turn = 0
        #: node failures, redirects and reads skipped by an open breaker, for stats and tests
        self.node_errors = 0
        self.redirects = 0
        self.skipped = 0

    def read(self, keys: Sequence[str], slots: Sequence[int] | None = None
             ) -> list[bytes | None]:
        """Values in key order, None where absent or unreadable now (see the module).
        ``slots``: each key's hash slot, when the caller knows them (found here otherwise)."""
        health = self.health
        if health.refresh_due():
            self._refresh()
        # grouped by slot with C-level passes: the keys sorted by slot, a run per slot, each
        # MGET a slice of them and each reply a slice of the values in that order, put back
        # in the caller's order once at the end; a Python step per key would cost a batch of
        # 1000 as much as its MGETs
        if slots is None:
            slots = self._slots.slots(keys)
        slot_at = slots.__getitem__
        order = sorted(range(len(keys)), key=slot_at)
        in_order = list(map(keys.__getitem__, order))
        found: list[bytes | None] = [None] * len(keys)
        groups: list[_Group] = []
        start = 0
        for slot, run in groupby(map(slot_at, order)):
            end = start + len(list(run))
            groups.append(_Group(slot, start, end))
            start = end
        by_node: dict[str, tuple[ClusterNode, list[_Group]]] = {}
        cache = self.client.nodes_manager.slots_cache
        turn = self._turn = self._turn + 1
        for group in groups:
            owners = cache.get(group.slot)
            if not owners:
                continue  # not covered now: misses
            node = owners[0]
            if self.replicas and len(owners) > 1:
                node = self._replica(owners, turn + group.slot)
            by_node.setdefault(node.name, (node, []))[1].append(group)
        failed: set[str] = set()
        answered, retry = self._round(in_order, found, by_node, failed)
        if retry:
            self.redirects += len(retry)
            answered += self._retry(in_order, found, retry, failed)
        if by_node and not answered:
            error = translate(redis_exc.ConnectionError("no cluster node answered the read"),
                              self.url)
            primaries = {node.name for node in self.client.get_primaries()}  # type: ignore[no-untyped-call]
            if primaries - failed:  # one shard down is not the cluster down
                raise PartlyUnavailable(str(error)) from error
            raise error
        values: list[bytes | None] = [None] * len(keys)
        deque(map(values.__setitem__, order, found), maxlen=0)
        return values

    def _round(
        self,
        keys: Sequence[str],
        values: list[bytes | None],
        by_node: dict[str, tuple[ClusterNode, list[_Group]]],
        failed: set[str],
        asking: bool = False,
    ) -> tuple[int, list[tuple[_Group, Exception]]]:
        """Send every node its MGETs, then read every reply into ``values`` (``keys`` and
        ``values`` in slot order: each group a slice of them): how many nodes answered, and the
        groups answered by a redirect (with it)."""
        sent: list[tuple[Lanes, Any, str, list[_Group]]] = []
        refused: redis_exc.ResponseError | None = None
        answered = 0
        redirected: list[tuple[_Group, Exception]] = []
        health = self.health
        for node, node_groups in by_node.values():
            name = node.name
            if not health.of(name).allow():
                self.skipped += 1  # its rows are misses: SQL answers them, no timeout paid
                failed.add(name)
                continue
            packed = []
            for group in node_groups:
                if asking:
                    packed.append(_ASKING)
                packed.append(pack(("MGET", *keys[group.start:group.end])))
            # the node's idle connections, shared with its store (the writes, the leases)
            lanes = Lanes.of(self._pool(node))
            try:
                conn = lanes.take()
            except ERRORS:
                self.node_errors += 1
                health.failed(name)
                failed.add(name)
                continue
            try:
                conn.send_packed_command(coalesce(packed))
            except ERRORS:
                self.node_errors += 1
                health.failed(name)
                failed.add(name)
                lanes.discard(conn)
                continue
            sent.append((lanes, conn, name, node_groups))
        for lanes, conn, name, node_groups in sent:
            try:
                for group in node_groups:
                    if asking:
                        conn.read_response()  # ASKING's OK
                    try:
                        reply = conn.read_response()
                    except REDIRECTS as exc:
                        redirected.append((group, exc))
                        continue
                    if len(reply) != group.end - group.start:
                        raise redis_exc.ResponseError("an MGET reply of the wrong length")
                    values[group.start:group.end] = reply
                answered += 1
                health.of(name).record_success()
            except redis_exc.ResponseError as exc:
                # an error reply (ACL, OOM...) is not an outage: the caller hears it, once
                # every other node's replies are read and its connection is back
                lanes.discard(conn)
                refused = refused or exc
            except ERRORS:
                self.node_errors += 1
                health.failed(name)
                failed.add(name)
                lanes.discard(conn)
            except BaseException:
                lanes.discard(conn)
                raise
            else:
                lanes.give_back(conn)
        if refused is not None:
            raise translate(refused, self.url) from refused
        return answered, redirected

    def _retry(
        self,
        keys: Sequence[str],
        values: list[bytes | None],
        redirected: list[tuple[_Group, Exception]],
        failed: set[str],
    ) -> int:
        """Each redirected group once more: MOVED from its new owner (the slot map updated),
        ASK from the importing node after ``ASKING``; anything else stays misses."""
        manager = self.client.nodes_manager
        moved: dict[str, tuple[ClusterNode, list[_Group]]] = {}
        asked: dict[str, tuple[ClusterNode, list[_Group]]] = {}
        for group, exc in redirected:
            if isinstance(exc, redis_exc.MovedError):
                manager.move_slot(exc)
                node = manager.slots_cache[group.slot][0]
                moved.setdefault(node.name, (node, []))[1].append(group)
            elif isinstance(exc, redis_exc.AskError):
                node = manager.get_node(host=exc.host, port=exc.port) or ClusterNode(  # type: ignore[no-untyped-call]
                    exc.host, exc.port)
                asked.setdefault(node.name, (node, []))[1].append(group)
        answered = 0
        for targets, asking in ((moved, False), (asked, True)):
            if targets:
                count, _ = self._round(keys, values, targets, failed, asking=asking)
                answered += count
        return answered

    def _replica(self, owners: list[ClusterNode], turn: int) -> ClusterNode:
        """A healthy replica among a slot's ``owners`` (primary first), taken in turn; the
        primary when every replica's breaker is open."""
        count = len(owners) - 1
        for step in range(count):
            node = owners[1 + (turn + step) % count]
            if self.health.of(node.name).closed:
                return node
        return owners[0]

    def _refresh(self) -> None:
        """The slot map asked again after a node failed: a failover moves a dead primary's
        slots to its replica, which only a fresh map shows. A refresh that fails leaves the
        map as it was (the failed nodes stay skipped by their breakers)."""
        try:
            self.client.nodes_manager.initialize()
        except (*ERRORS, redis_exc.RedisClusterException) as exc:
            log.debug("cluster slot map refresh failed: %s", exc)

    def _pool(self, node: ClusterNode) -> Any:
        connection = node.redis_connection or self.client.get_redis_connection(node)
        return connection.connection_pool


_ASKING = pack(("ASKING",))
