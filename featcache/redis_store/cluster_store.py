"""The cluster backend of the Redis store: every ``RedisStore`` round trip on a Redis/Valkey
Cluster.

Reads are ``ClusterReader``'s (``featcache.redis_store.cluster``). Everything else is sent to
the node that owns each command's or script call's slot by a ``StandaloneStore`` of that node
(its packing, its NOSCRIPT handling, its error translation): every node is sent its share
before any reply is read, so a write to three shards costs one round trip, not three. A node
whose slot moved has its share retried once after the slot map is refreshed; a node that
fails is counted against its circuit breaker (``NodeHealth``, shared with the reads), skipped
while that is open, and retried only when the slot map was due to be asked again (a failover
may have moved its slots). Every script featcache runs is safe to run twice (a conditional
write compares again, a tombstone is laid again, an epoch is ensured again), a popularity
count may count twice. A call that fails on some nodes, not on every primary, raises
``PartlyUnavailable``: what the healthy shards wrote stands.

Write scripts on a cluster: a script may only touch keys of one slot, and a view's epoch key
is not in its rows' slots, so each view's writes are split by slot (the layout of
``featcache.keys`` puts a row and its lease in one) and ``CONDITIONAL_SET``/``SET_IF_ABSENT``
run in their cluster mode (``"2"``): the epoch the writer read is passed in, not read and
compared on the server. A fill stamped with an epoch that moved since is still written, and
is a miss for every reader, since a row of another epoch is never served
(docs/consistency.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis import exceptions as redis_exc
from redis.cluster import ClusterNode, LoadBalancingStrategy

from featcache.config_sections import RedisConfig
from featcache.errors import CacheConfigError, CacheUnavailable, PartlyUnavailable
from featcache.redis_store.base import (
    Command,
    LuaScript,
    ScriptCall,
    StreamTail,
    TimedRead,
    WriteBatch,
    split_if_absent,
)
from featcache.redis_store.cluster import REDIRECTS, ClusterReader, NodeHealth, SlotCache
from featcache.redis_store.errors import ERRORS, translate
from featcache.redis_store.scripts import CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT
from featcache.redis_store.standalone import StandaloneStore, StandaloneTail

__all__ = ["ClusterStore", "ClusterTail", "connect_cluster"]

T = TypeVar("T")


def connect_cluster(config: RedisConfig) -> redis.RedisCluster:
    """A client of the cluster ``config.url`` is a node of (``redis://`` or ``rediss://``,
    user and password from the URL), with the section's timeouts and pool size per node;
    ``config.cluster_nodes`` are asked for the slot map when that node does not answer.
    redis-py asks that node for the slot map at once: call it where a failure can be
    translated (``ClusterStore.client``)."""
    seeds = [ClusterNode(host, int(port))  # type: ignore[no-untyped-call]
             for host, _, port in
             (node.rpartition(":") for node in config.cluster_nodes)]
    client: redis.RedisCluster = redis.RedisCluster.from_url(
        config.url, startup_nodes=seeds, socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.connect_timeout, max_connections=config.max_connections,
        # any strategy has redis-py send READONLY on every connection, which a replica needs
        # to answer reads of its primary's slots; which node reads is ClusterReader's choice
        load_balancing_strategy=(LoadBalancingStrategy.ROUND_ROBIN
                                 if config.read_from_replicas else None))
    return client


class ClusterStore:
    """The ``RedisStore`` of a Redis/Valkey Cluster: ``client`` is a ``RedisCluster``, or what
    builds one (``connect_cluster``), called on first use, so that a cluster down at start-up
    is an outage (calls degrade to SQL) rather than a constructor that fails."""

    def __init__(
        self,
        client: redis.RedisCluster | Callable[[], redis.RedisCluster],
        url: str,
        write_chunk: int = 500,
        *,
        health: NodeHealth | None = None,
        replica_reads: bool = False,
    ) -> None:
        """``health``: the nodes' breakers (``open_store`` makes them of the ``degradation``
        section's settings; ``CircuitBreaker``'s defaults otherwise); ``replica_reads``: read
        each slot from a replica (the client must send ``READONLY``: ``connect_cluster``'s
        does)."""
        self.url = url
        self.write_chunk = write_chunk
        self.health = health or NodeHealth()
        self.replica_reads = replica_reads
        self._client = client if isinstance(client, redis.RedisCluster) else None
        self._connect = None if isinstance(client, redis.RedisCluster) else client
        self._reader: ClusterReader | None = None
        self._slots = SlotCache()
        self._stores: dict[str, StandaloneStore] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.RedisCluster:
        """The redis-py cluster client (built on first use)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    assert self._connect is not None
                    self._client = self._connected(self._connect)
                client = self._client
        return client

    def _connected(self, connect: Callable[[], redis.RedisCluster]) -> redis.RedisCluster:
        try:
            client = connect()
        except redis_exc.RedisClusterException as exc:
            if "cluster mode is not enabled" in str(exc).lower():
                raise CacheConfigError(
                    f"Redis {self.url} is not a cluster node: reach one server with "
                    "redis.mode: standalone, a Sentinel's primary with mode sentinel"
                ) from exc
            raise CacheUnavailable(f"Redis {self.url}: {exc}") from exc
        except ERRORS as exc:
            raise translate(exc, self.url) from exc
        if self.replica_reads and not (client.read_from_replicas
                                       or client.load_balancing_strategy):
            client.close()
            raise CacheConfigError(
                "redis.read_from_replicas needs a client that sends READONLY: build it with "
                "a load_balancing_strategy (connect_cluster does)")
        return client

    @property
    def reader(self) -> ClusterReader:
        """The batched reader (its ``node_errors`` and ``redirects`` counters)."""
        reader = self._reader
        if reader is None:
            reader = self._reader = ClusterReader(self.client, self.url, self.health,
                                                  replicas=self.replica_reads)
        return reader

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ reads

    def read(self, keys: Sequence[str], slots: Sequence[int] | None = None
             ) -> list[bytes | None]:
        return self.reader.read(keys, slots)

    def read_timed(self, keys: Sequence[str]) -> tuple[list[bytes | None], int]:
        """``read``, and the clock (microseconds) of the node that owns the first key: the
        write scripts judge a fence's deadline on their own node's clock, so the nodes'
        clocks must agree to well within ``invalidation.fill_window`` (NTP does)."""
        values = self.reader.read(keys)
        node = self._owner(self._slots.slots(keys[:1])[0]) if keys else self._any_primary()
        return values, self._store_of(node).read_timed([])[1]

    def timed_read(self, keys: Sequence[str]) -> TimedRead:
        """``read_timed``, read when sent: each node's share is a round trip of its own."""
        return _LaterRead(self, keys)

    # ------------------------------------------------------------------ by node

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Each command on the node of its key, one pipelined round trip per node."""
        return self._per_node(commands, [c.key for c in commands],
                              lambda store, part: store.start_commands(part))

    def eval_scripts(
        self, calls: Sequence[ScriptCall | tuple[LuaScript, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Each call on the node of its keys (which share one slot)."""
        return self._per_node(list(calls), [c[1][0] if c[1] else "" for c in calls],
                              lambda store, part: store.start_scripts(part))

    def eval_many(
        self, script: LuaScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        return self.eval_scripts([ScriptCall(script, keys, args) for keys, args in calls])

    def ensure_epochs(self, epoch_keys: Sequence[str]) -> list[bytes]:
        return [bytes(e) for e in self.eval_many(ENSURE_EPOCH, [([k], []) for k in epoch_keys])]

    def eval_replicated(
        self, calls: Sequence[ScriptCall], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        """``eval_scripts``, then ``WAIT`` on every node written: the fewest replicas any of
        them reached. With replica reads, each node waits for all of its replicas too, and a
        node that heard from fewer in time is ``CacheUnavailable``: a reader there could
        still find what the calls fenced off."""
        acked: list[int] = []
        short: list[str] = []

        def start(store: StandaloneStore, part: list[ScriptCall]) -> Callable[[], list[Any]]:
            serving = self._replicas_of(part[0].keys[0]) if self.replica_reads else 0
            finish = store.start_replicated(part, max(replicas, serving), timeout_ms)

            def done() -> list[Any]:
                results, count = finish()
                acked.append(count)
                if count < serving:
                    short.append(f"{count} of {serving} on {store.url}")
                return results

            return done

        results = self._per_node(list(calls), [c.keys[0] for c in calls], start)
        if short:
            raise CacheUnavailable(
                f"Redis {self.url}: replicas that answer reads (redis.read_from_replicas) "
                f"did not all hold the write within {timeout_ms} ms ({', '.join(short)}); "
                "retry it")
        return results, min(acked, default=replicas)

    def _replicas_of(self, key: str) -> int:
        """How many replicas the slot map lists for the owner of ``key``'s slot."""
        owners = self.client.nodes_manager.slots_cache.get(self._slots.slots([key])[0], ())
        return max(0, len(owners) - 1)

    def write(self, batches: Sequence[WriteBatch]) -> int:
        """Each view's writes split by slot, in the scripts' cluster mode (the epoch the
        writer read passed in); one pipelined round trip per node."""
        calls: list[ScriptCall] = []
        for batch in batches:
            calls.extend(self._write_calls(batch))
        if not calls:
            return 0
        return sum(int(n) for n in self.eval_scripts(calls))

    def _write_calls(self, batch: WriteBatch) -> list[ScriptCall]:
        epoch = batch.epoch_seen if batch.epoch_seen is not None else batch.rows_epoch
        if epoch is None and (batch.items or batch.if_absent):
            # rows whose epoch the writer did not say: the current one, for the comparison
            (epoch,) = self.ensure_epochs([batch.epoch_key])
        head: list[Any] = ["2", epoch or b"", batch.deadline_us]
        items, if_absent = split_if_absent(batch)
        calls: list[ScriptCall] = []
        for group in if_absent:
            ttl_ms = max(1, int(group.ttl_ms))
            by_slot: dict[int, tuple[list[str], list[bytes]]] = {}
            for key, value, slot in zip(group.keys, group.values,
                                        self._slots.slots(group.keys), strict=True):
                keys, values = by_slot.setdefault(slot, ([], []))
                keys.append(key)
                values.append(value)
            for keys, values in by_slot.values():
                for start in range(0, len(keys), self.write_chunk):
                    end = start + self.write_chunk
                    # KEYS[1] is unread in mode 2: a key of the same slot holds its place
                    calls.append(ScriptCall(SET_IF_ABSENT, [keys[start], *keys[start:end]],
                                            [*head, ttl_ms, *values[start:end]]))
        item_slots = self._slots.slots([item[1] for item in items])
        release_slots = self._slots.slots(list(batch.release))
        by_slot_items: dict[int, list[Any]] = {}
        for item, slot in zip(items, item_slots, strict=True):
            by_slot_items.setdefault(slot, []).append(item)
        by_slot_release: dict[int, list[str]] = {}
        for key, slot in zip(batch.release, release_slots, strict=True):
            by_slot_release.setdefault(slot, []).append(key)
        for slot in {*by_slot_items, *by_slot_release}:
            chunked = by_slot_items.get(slot, [])
            release_all = by_slot_release.get(slot, [])
            for start in range(0, max(len(chunked), 1), self.write_chunk):
                chunk = chunked[start : start + self.write_chunk]
                release = release_all if start + self.write_chunk >= len(chunked) else []
                keys = [*(item[1] for item in chunk), *release]
                args: list[Any] = [*head, len(release)]
                for mode, _, value, ttl_ms, expected in chunk:
                    args += (mode, max(1, int(ttl_ms)), value, expected)
                if release:
                    args.append(batch.release_token)
                calls.append(ScriptCall(CONDITIONAL_SET, [keys[0], *keys], args))
        return calls

    def open_tail(self, socket_timeout: float) -> StreamTail:
        return ClusterTail(self, socket_timeout)

    # ------------------------------------------------------------------ internals

    def _per_node(
        self,
        items: Sequence[T],
        keys: Sequence[str],
        start: Callable[[StandaloneStore, list[T]], Callable[[], list[Any]]],
    ) -> list[Any]:
        """``start`` each node's share of ``items`` (by the slot of each item's key) on that
        node's store, every node before any is finished; results in ``items``' order.

        A share answered by a redirect is retried once after the slot map is refreshed; a
        failed node's share too, when the map was due to be asked again. A share still
        failing raises: ``PartlyUnavailable`` when some primary of the cluster did not
        fail, else ``CacheUnavailable``."""
        results: list[Any] = [None] * len(items)
        positions = list(range(len(items)))
        health = self.health
        error: Exception | None = None
        failed_nodes: set[str] = set()
        for attempt in range(2):
            by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i, slot in zip(positions, self._slots.slots([keys[i] for i in positions]),
                               strict=True):
                node = self._owner(slot) if keys[i] else self._any_primary()
                by_node.setdefault(node.name, (node, []))[1].append(i)
            failures = _Failures()
            started: list[tuple[str, list[int], Callable[[], list[Any]]]] = []
            for name, (node, share) in by_node.items():
                if not health.of(name).allow():
                    failures.skipped(name, share)
                    continue
                try:
                    started.append((name, share,
                                    start(self._store_of(node), [items[i] for i in share])))
                except (CacheUnavailable, CacheConfigError) as exc:
                    failures.add(name, share, exc, health)
            for name, share, finish in started:  # every one read: no unread replies left
                try:
                    out = finish()
                except (CacheUnavailable, CacheConfigError) as exc:
                    failures.add(name, share, exc, health)
                    continue
                health.of(name).record_success()
                for i, value in zip(share, out, strict=True):
                    results[i] = value
            if failures.fatal is not None:
                raise failures.fatal
            for (host, port), share in failures.asked.items():  # a slot being migrated
                try:
                    out = start(self._asking_store(host, port), [items[i] for i in share])()
                except (CacheUnavailable, CacheConfigError) as exc:
                    failures.failed.extend(share)
                    failures.error = exc
                    continue
                for i, value in zip(share, out, strict=True):
                    results[i] = value
            if not failures.failed:
                return results
            error = failures.error
            failed_nodes |= failures.nodes
            if attempt == 1 or not (failures.moved or health.refresh_due()):
                break
            self._refresh()
            positions = failures.failed
        # still moving (TRYAGAIN: some of the slot's keys moved, some not) or still down:
        # an outage for now, which callers degrade or retry
        raise self._unavailable(failed_nodes, error) from error

    def _unavailable(self, nodes: set[str], error: Exception | None) -> CacheUnavailable:
        """The error of a call that ``nodes`` failed: ``PartlyUnavailable`` unless they are
        every primary the slot map knows."""
        primaries = {node.name for node in self.client.get_primaries()}  # type: ignore[no-untyped-call]
        kind = PartlyUnavailable if primaries - nodes else CacheUnavailable
        return kind(f"Redis {self.url}: {error}")

    def _asking_store(self, host: str, port: int) -> StandaloneStore:
        """A store of the node importing a slot, sending ``ASKING`` before each command."""
        name = f"{host}:{port}\x00asking"
        store = self._stores.get(name)
        if store is None:
            node = self.client.nodes_manager.get_node(host=host, port=port) or ClusterNode(  # type: ignore[no-untyped-call]
                host, port)
            connection = node.redis_connection or self.client.get_redis_connection(node)
            store = self._stores[name] = StandaloneStore(connection, write_chunk=self.write_chunk,
                                                         asking=True)
        return store

    def _owner(self, slot: int) -> ClusterNode:
        owners = self.client.nodes_manager.slots_cache.get(slot)
        if not owners:
            self._refresh()
            owners = self.client.nodes_manager.slots_cache.get(slot)
            if not owners:
                raise CacheUnavailable(f"Redis {self.url}: slot {slot} has no owner")
        node: ClusterNode = owners[0]
        return node

    def _any_primary(self) -> ClusterNode:
        primaries = self.client.get_primaries()  # type: ignore[no-untyped-call]
        if not primaries:
            raise CacheUnavailable(f"Redis {self.url}: no primary known")
        node: ClusterNode = primaries[0]
        return node

    def _store_of(self, node: ClusterNode) -> StandaloneStore:
        store = self._stores.get(node.name)
        if store is None:
            connection = node.redis_connection or self.client.get_redis_connection(node)
            store = self._stores[node.name] = StandaloneStore(connection,
                                                              write_chunk=self.write_chunk)
        return store

    def _refresh(self) -> None:
        """The slot map asked again (a failover, a migrated slot, a node gone)."""
        with self._lock:
            try:
                self.client.nodes_manager.initialize()
            except ERRORS as exc:
                raise translate(exc, self.url) from exc


class _Failures:
    """The shares of one ``_per_node`` attempt that failed, and how."""

    def __init__(self) -> None:
        self.failed: list[int] = []
        self.asked: dict[tuple[str, int], list[int]] = {}
        self.moved = False  # a redirect: the slot map is out of date for certain
        self.error: Exception | None = None
        self.fatal: CacheConfigError | None = None
        self.nodes: set[str] = set()  # the nodes that failed (or were skipped)

    def skipped(self, node: str, share: list[int]) -> None:
        self.nodes.add(node)
        self.failed.extend(share)
        self.error = CacheUnavailable(f"node {node} skipped while its circuit is open")

    def add(self, node: str, share: list[int], exc: CacheUnavailable | CacheConfigError,
            health: NodeHealth) -> None:
        cause = exc.__cause__
        if isinstance(cause, REDIRECTS):
            # a node's store reads a redirect as a config error (one server must never
            # redirect); on a cluster it means the slot map is out of date
            if isinstance(cause, redis_exc.AskError) and not isinstance(
                    cause, redis_exc.MovedError):
                self.asked.setdefault((cause.host, cause.port), []).extend(share)
                return
            self.moved = True
        elif isinstance(exc, CacheConfigError):
            self.fatal = exc
            return
        else:
            health.failed(node)
            self.nodes.add(node)
        self.failed.extend(share)
        self.error = exc


class ClusterTail:
    """A ``StreamTail`` on a cluster: a connection of its own to the node that owns the
    stream's slot, opened anew on that slot's owner after an error."""

    def __init__(self, store: ClusterStore, socket_timeout: float) -> None:
        self._store = store
        self._socket_timeout = socket_timeout
        self._tail: StandaloneTail | None = None
        self._node = ""
        self._stale = False
        self.description = store.url

    def _for(self, key: str) -> StandaloneTail:
        if self._stale:
            self._stale = False
            self._store._refresh()
        node = self._store._owner(self._store._slots.slots([key])[0])
        if self._tail is None or node.name != self._node:
            if self._tail is not None:
                self._tail.close()
            pool = (node.redis_connection or self._store.client.get_redis_connection(node)
                    ).connection_pool
            kwargs = dict(pool.connection_kwargs)
            kwargs["socket_timeout"] = self._socket_timeout
            client = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **kwargs))
            self._tail = StandaloneTail(client, f"{self.description} node {node.name}")
            self._node = node.name
        return self._tail

    def _guarded(self, key: str, call: Callable[[StandaloneTail], T]) -> T:
        try:
            return call(self._for(key))
        except CacheUnavailable:
            self._stale = True  # the next call asks the cluster where the stream is
            raise

    def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._guarded(keys[0], lambda tail: tail.run_script(script, keys, args))

    def block(self, stream: str, after_id: str, block_ms: int) -> None:
        self._guarded(stream, lambda tail: tail.block(stream, after_id, block_ms))

    def interrupt(self) -> None:
        tail = self._tail
        if tail is not None:
            tail.interrupt()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._tail is not None:
                self._tail.close()


class _LaterRead:
    """The cluster's ``TimedRead``: ``send()`` reads (a round trip per node), so the read
    happens where a standalone server's would; ``result()`` hands it over."""

    def __init__(self, store: ClusterStore, keys: Sequence[str]) -> None:
        self._store, self._keys = store, keys
        self._done: tuple[list[bytes | None], int] | None = None

    def send(self) -> None:
        if self._done is None:
            self._done = self._store.read_timed(self._keys)

    def result(self) -> tuple[list[bytes | None], int]:
        self.send()
        assert self._done is not None
        return self._done
