"""The standalone backend of the Redis store: one Redis/Valkey server.

Reads are one MGET, or several MGETs in one pipeline past ``read_chunk`` keys, so a batch is
always one network round trip; writes are the scripts of ``featcache.redis_store.scripts``,
all chunks in one pipelined round trip. Commands are packed by hiredis (C) and sent by the
store itself on a connection it keeps between round trips (``featcache.redis_store.lanes``);
redis-py opens and bounds the connections (TLS, ACL auth, Sentinel) and parses replies.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import redis
import redis.sentinel
from redis import exceptions as redis_exc
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from featcache.config_sections import RedisConfig
from featcache.errors import ConfigError
from featcache.redis_store.base import (
    Command,
    LuaScript,
    Packing,
    ScriptCall,
    StreamTail,
    TimedRead,
    WriteBatch,
    coalesce,
    pack,
    split_if_absent,
)
from featcache.redis_store.errors import ERRORS, translate
from featcache.redis_store.lanes import Lanes
from featcache.redis_store.scripts import CONDITIONAL_SET, ENSURE_EPOCH, SET_IF_ABSENT
from featcache.urls import mask_url

__all__ = ["SentinelSetup", "StandaloneStore", "StandaloneTail", "check_url", "connect",
           "describe", "open_tail", "safe_redis_url", "sentinel_setup"]

log = logging.getLogger("featcache.redis")


_TIME = pack(("TIME",))
_ASKING = pack(("ASKING",))


def safe_redis_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    return mask_url(url)


def check_url(config: RedisConfig) -> None:
    """``config.url`` is a URL featcache connects with (``ConfigError`` naming
    ``redis.url`` if not): a scheme of ``redis``, ``rediss`` or ``unix``, and a numeric
    database."""
    url = config.url
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
    except ValueError as exc:
        raise ConfigError(f"{exc} (url {mask_url(url)})", "redis.url") from None
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"expected a redis://, rediss:// or unix:// URL, got {safe_redis_url(url)!r}",
            "redis.url",
        )
    if scheme != "unix" and not _DB_PATH.match(parts.path):
        # redis-py ignores a path that is not a number and uses database 0: a typo would
        # silently read and write another application's database
        raise ConfigError(
            f"the path of a Redis URL is the database number (redis://host:6379/0), got "
            f"{parts.path!r} in {safe_redis_url(url)!r}", "redis.url",
        )


def connect(config: RedisConfig, socket_timeout: float | None = None) -> redis.Redis:
    """A client for ``config.url``: ``redis://``, ``rediss://`` (TLS; ``ssl_*`` options in the
    query string), ``unix://`` URLs, with ACL user and password from the URL, and the section's
    timeouts and pool size; with ``mode: sentinel``, a client of the primary the sentinels
    name, which asks them again after a failover (redis-py's ``SentinelConnectionPool``: a
    refused connection, or a demoted primary answering READONLY, closes the connection, and the
    next one is opened to the primary the sentinels name then). Nothing is connected yet."""
    check_url(config)
    timeout = config.socket_timeout if socket_timeout is None else socket_timeout
    try:
        if config.mode == "sentinel":
            return _primary_of(config, timeout)
        return redis.Redis.from_url(
            config.url,
            socket_timeout=timeout,
            socket_connect_timeout=config.connect_timeout,
            max_connections=config.max_connections,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigError(f"{exc} (url {safe_redis_url(config.url)})", "redis.url") from None


class SentinelSetup(NamedTuple):
    """What a client of the primary the sentinels name is built from: the sentinels'
    addresses, and the user, password, database and TLS of ``redis.url`` (its host and port
    are not used)."""

    sentinels: list[tuple[str, int]]
    options: dict[str, Any]
    ssl: bool


def sentinel_setup(config: RedisConfig) -> SentinelSetup:
    options: dict[str, Any] = parse_url(config.url)  # type: ignore[no-untyped-call]
    ssl = options.pop("connection_class", None) is redis.SSLConnection
    for unused in ("host", "port", "path"):
        options.pop(unused, None)
    sentinels = [(host, int(port)) for host, _, port in
                 (address.rpartition(":") for address in config.sentinels)]
    return SentinelSetup(sentinels, options, ssl)


def _primary_of(config: RedisConfig, socket_timeout: float) -> redis.Redis:
    """A client of the primary the sentinels name for ``config.master_name``."""
    where = sentinel_setup(config)
    timeouts: dict[str, Any] = {"socket_timeout": socket_timeout,
                                "socket_connect_timeout": config.connect_timeout}
    sentinel = redis.sentinel.Sentinel(where.sentinels, sentinel_kwargs=dict(timeouts),
                                       **timeouts)
    client: redis.Redis = sentinel.master_for(
        config.master_name, max_connections=config.max_connections, health_check_interval=30,
        ssl=where.ssl, **where.options, **timeouts,
    )
    return client


def describe(config: RedisConfig) -> str:
    """Where ``config`` points, with any password masked: for messages and logs."""
    if config.mode == "sentinel":
        return f"sentinel {config.master_name}@{','.join(config.sentinels)}"
    if config.mode == "cluster":
        return f"cluster {safe_redis_url(config.url)}"
    return safe_redis_url(config.url)


_DB_PATH = re.compile(r"^/?(?:\d{1,5}/?)?$")


class StandaloneStore:
    """The ``RedisStore`` of one Redis/Valkey server."""

    def __init__(
        self,
        client: redis.Redis,
        read_chunk: int = 1000,
        write_chunk: int = 500,
        *,
        config: RedisConfig | None = None,
        asking: bool = False,
    ) -> None:
        """``config``: what ``client`` was built from, when it was (``open_store``), so a
        stream tail is built the same way (a new client of the same primary, for Sentinel).
        ``asking``: send ``ASKING`` before every command, as a cluster's node importing a
        slot must be told for each command on a key that slot's owner redirected (ASK)."""
        self.client = client
        self.read_chunk = read_chunk
        self.write_chunk = write_chunk
        self._config = config
        self._asking = asking
        self.url = describe(config) if config is not None else safe_redis_url(_describe(client))
        self.replica_reads = False
        self._lanes = Lanes.of(client.connection_pool)

    def close(self) -> None:
        self.client.close()

    def read(self, keys: Sequence[str], slots: Sequence[int] | None = None
             ) -> list[bytes | None]:
        """Values in key order, None where absent; one network round trip (``slots`` is a
        cluster's concern)."""
        if len(keys) <= self.read_chunk:  # one MGET: every call's round trip, kept short
            reply = self._round_trip((pack(("MGET", *keys)),))[0]
            if isinstance(reply, Exception):  # an error reply (ACL, OOM...): no values at all
                raise translate(reply, self.url) from reply
            values: list[bytes | None] = reply
            return values
        return self._read(keys, False)[0]

    def read_timed(self, keys: Sequence[str]) -> tuple[list[bytes | None], int]:
        """``read``, and the server's clock (microseconds) when it ran, in the same round
        trip: a fence's writes are judged against it by the write scripts (``deadline_us``)."""
        return self._read(keys, True)

    def timed_read(self, keys: Sequence[str]) -> TimedRead:
        """``read_timed`` packed now; ``send()`` sends it on a pooled connection of its own
        (a write in flight on another queues behind it in the server), ``result()`` reads
        the answer."""
        return _TimedRead(self, self._read_commands(keys, True))

    def _read_commands(self, keys: Sequence[str], timed: bool) -> list[bytes]:
        step = self.read_chunk
        packed = [
            pack(("MGET", *keys[start : start + step]))
            for start in range(0, len(keys), step)
        ]
        if timed:
            packed.append(_TIME)
        return packed

    def _read(self, keys: Sequence[str], timed: bool) -> tuple[list[bytes | None], int]:
        return self._read_replies(self._round_trip(self._read_commands(keys, timed)), timed)

    def _read_replies(self, replies: list[Any], timed: bool) -> tuple[list[bytes | None], int]:
        for part in replies:
            if isinstance(part, Exception):  # an error reply (ACL, OOM...): no values at all
                raise translate(part, self.url) from part
        server_us = 0
        if timed:
            seconds, micros = replies.pop()
            server_us = int(seconds) * 1_000_000 + int(micros)
        if len(replies) == 1:
            return replies[0], server_us
        values: list[bytes | None] = []
        for part in replies:
            values.extend(part)
        return values, server_us

    def _round_trip(self, packed: Sequence[bytes]) -> list[Any]:
        """Send commands already in RESP form (``hiredis.pack_command``) in one write and read
        every reply, in order; an error reply is returned in its place, as an exception.

        A pipeline without redis-py's per-argument pass (a type check and a copy of every key
        and value before hiredis packs them): on the bulk write path that pass cost as much
        as encoding the rows. Any failure to send or read closes the connection, so a socket
        with unread replies never goes back to the pool.
        """
        return self._receive(self._send(packed))

    def _send(self, packed: Sequence[bytes] | Packing) -> _Sent:
        """The first half of ``_round_trip``: the commands written, their replies not read
        (a cluster sends every node its share before reading any). A ``Packing`` is packed
        as it is sent."""
        lanes = self._lanes
        count = packed.count if isinstance(packed, Packing) else len(packed)
        if self._asking:
            commands = packed
            packed = Packing(lambda: (part for command in _commands_of(commands)
                                      for part in (_ASKING, command)), 2 * count)
            count *= 2
        try:
            conn = lanes.take()
            try:
                conn.send_packed_command(
                    packed if isinstance(packed, Packing) else coalesce(packed))
            except BaseException:
                lanes.discard(conn)
                raise
        except ERRORS as exc:
            raise translate(exc, self.url) from exc
        return _Sent(lanes, conn, count)

    def _receive(self, sent: _Sent) -> list[Any]:
        """The second half of ``_round_trip``: every reply of ``sent``, the connection back
        to the store's idle ones (closed and given back to redis-py's pool if anything
        failed)."""
        conn = sent.conn
        try:
            try:
                replies: list[Any] = []
                for position in range(sent.replies):
                    if self._asking and not position % 2:
                        conn.read_response()  # ASKING's OK
                        continue
                    try:
                        replies.append(conn.read_response())
                    except redis_exc.ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                sent.lanes.discard(conn)
                raise
        except ERRORS as exc:
            raise translate(exc, self.url) from exc
        sent.lanes.give_back(conn)
        return replies

    def write(self, batches: Sequence[WriteBatch]) -> int:
        """Conditionally write rows of several views in one round trip; returns how many keys
        were written (the rest were fenced off or older than what Redis holds)."""
        absent_calls: list[tuple[list[str], list[Any]]] = []
        calls: list[tuple[list[str], list[Any]]] = []
        for batch in batches:
            head: list[Any] = (
                ["1", batch.epoch_seen] if batch.epoch_seen is not None else ["0", ""]
            )
            head.append(batch.deadline_us)
            items, if_absent = split_if_absent(batch)
            for group in if_absent:
                ttl_ms = max(1, int(group.ttl_ms))
                for start in range(0, len(group.keys), self.write_chunk):
                    end = start + self.write_chunk
                    absent_calls.append((
                        [batch.epoch_key, *group.keys[start:end]],
                        [*head, ttl_ms, *group.values[start:end]],
                    ))
            if not items and not batch.release:
                continue
            for start in range(0, max(len(items), 1), self.write_chunk):  # >= 1: releases
                chunk = items[start : start + self.write_chunk]
                last = start + self.write_chunk >= len(items)
                release = list(batch.release) if last else []
                keys = [batch.epoch_key, *(item[1] for item in chunk), *release]
                args = [*head, len(release)]
                for mode, _, value, ttl_ms, expected in chunk:
                    args += (mode, max(1, int(ttl_ms)), value, expected)
                if release:
                    args.append(batch.release_token)
                calls.append((keys, args))
        # the rows first, in one pipeline: leases go (with the last CONDITIONAL_SET call) only
        # once every row is there, so readers waiting on a lease find them
        scripted = [(SET_IF_ABSENT, *call) for call in absent_calls]
        scripted += [(CONDITIONAL_SET, *call) for call in calls]
        return sum(int(n) for n in self.eval_scripts(scripted))

    def ensure_epochs(self, epoch_keys: Sequence[str]) -> list[bytes]:
        """The epochs of these views, creating missing ones; one round trip."""
        return [bytes(e) for e in self.eval_many(ENSURE_EPOCH, [([k], []) for k in epoch_keys])]

    def eval_many(
        self, script: LuaScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run ``script`` once per (keys, args) in one pipelined round trip; results in order."""
        return self.eval_scripts([(script, keys, args) for keys, args in calls])

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Run each command in one pipelined round trip; replies in order, as redis-py parses
        them (an error reply raises, translated)."""
        return self.start_commands(commands)()

    def eval_replicated(
        self, calls: Sequence[ScriptCall], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        """Each script once (``EVALSHA``, loaded first when the server lacks one), then one
        ``WAIT`` in the same round trip on the same connection, which is what WAIT counts."""
        return self.start_replicated(calls, replicas, timeout_ms)()

    def start_replicated(
        self, calls: Sequence[ScriptCall], replicas: int, timeout_ms: int
    ) -> Callable[[], tuple[list[Any], int]]:
        """``eval_replicated`` in two halves. The scripts are loaded in the same pipeline,
        ahead of the calls (a server runs a connection's commands in order)."""
        loads = [pack(("SCRIPT", "LOAD", script.text))
                 for script in {call[0].sha: call[0] for call in calls}.values()]
        packed = [pack(("EVALSHA", call[0].sha, len(call[1]), *call[1], *call[2]))
                  for call in calls]
        sent = self._send([*loads, *packed, pack(("WAIT", replicas, timeout_ms))])

        def finish() -> tuple[list[Any], int]:
            replies = self._checked(self._receive(sent))[len(loads):]
            return replies[:-1], int(replies[-1])

        return finish

    def _round_trip_checked(self, packed: Sequence[bytes]) -> list[Any]:
        return self._checked(self._round_trip(packed))

    def _checked(self, replies: list[Any]) -> list[Any]:
        for reply in replies:
            if isinstance(reply, Exception):
                raise translate(reply, self.url) from reply
        return replies

    def open_tail(self, socket_timeout: float) -> StreamTail:
        """A connection of its own, built like the store's, with ``socket_timeout`` (longer
        than a blocked read)."""
        if self._config is not None and self._config.mode == "sentinel":
            return StandaloneTail(connect(self._config, socket_timeout), self.url)
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = socket_timeout
        return StandaloneTail(redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                 **kwargs)
        ), self.url)

    def eval_scripts(
        self, calls: Sequence[ScriptCall | tuple[LuaScript, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run each (script, keys, args) in one pipelined round trip; results in order.

        EVALSHA by the script's SHA-1; only when the server answers NOSCRIPT (first use,
        restart, SCRIPT FLUSH) is the script loaded and the failed calls sent again.
        """
        return self.start_scripts(calls)()

    def start_scripts(
        self, calls: Sequence[ScriptCall | tuple[LuaScript, Sequence[str], Sequence[Any]]]
    ) -> Callable[[], list[Any]]:
        """``eval_scripts`` in two halves: the calls sent now, and what reads their results
        (with NOSCRIPT's load and resend) when called."""
        # packed as sent: a bulk write's first script runs while the others are packed
        sent = self._send(Packing(lambda: (pack(("EVALSHA", script.sha, len(keys), *keys,
                                                 *args)) for script, keys, args in calls),
                                  len(calls)))
        return lambda: self._script_results(calls, self._receive(sent))

    def start_commands(self, commands: Sequence[Command]) -> Callable[[], list[Any]]:
        """``execute`` in two halves: sent now, replies read (and checked) when called."""
        sent = self._send([pack((c.name, c.key, *c.args)) for c in commands])
        return lambda: self._checked(self._receive(sent))

    def _script_results(
        self,
        calls: Sequence[ScriptCall | tuple[LuaScript, Sequence[str], Sequence[Any]]],
        replies: list[Any],
    ) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        retry = []
        for i, result in enumerate(replies):
            if isinstance(result, redis_exc.NoScriptError):
                retry.append(i)
            elif isinstance(result, Exception):
                raise translate(result, self.url) from result
            else:
                results[i] = result
        if retry:
            scripts = {calls[i][0].sha: calls[i][0] for i in retry}.values()
            self._round_trip_checked(
                [pack(("SCRIPT", "LOAD", script.text)) for script in scripts])
            resent = self._round_trip_checked(
                [pack(("EVALSHA", calls[i][0].sha, len(calls[i][1]), *calls[i][1],
                       *calls[i][2])) for i in retry])
            for i, result in zip(retry, resent, strict=True):
                results[i] = result
        return results


def _commands_of(packed: Sequence[bytes] | Packing) -> Iterable[bytes]:
    """The commands themselves, one by one: a ``Packing``'s packed as they come."""
    return packed.commands() if isinstance(packed, Packing) else packed


class _TimedRead:
    """``StandaloneStore.timed_read``'s answer: packed commands, sent once."""

    def __init__(self, store: StandaloneStore, packed: list[bytes]) -> None:
        self._store = store
        self._packed = packed
        self._sent: _Sent | None = None

    def send(self) -> None:
        if self._sent is None:
            self._sent = self._store._send(self._packed)

    def result(self) -> tuple[list[bytes | None], int]:
        self.send()
        assert self._sent is not None
        sent, self._sent = self._sent, None
        return self._store._read_replies(self._store._receive(sent), True)


class _Sent(NamedTuple):
    """Commands written to a connection whose replies are still to be read."""

    lanes: Lanes
    conn: Any
    replies: int


class StandaloneTail:
    """A ``StreamTail`` on a dedicated redis-py client: no retries (the subscriber does its
    own backoff; redis-py's, up to 10 s apart, would hold ``stop()`` far beyond a blocked
    read), interrupted by disconnecting its pool from another thread."""

    def __init__(self, client: redis.Redis, description: str) -> None:
        client.set_retry(Retry(NoBackoff(), 0))
        self.client = client
        self.description = description

    def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self.client
        try:
            try:
                return client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, len(keys), *keys, *args)
            except redis_exc.NoScriptError:
                client.script_load(script.text)
                return client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, len(keys), *keys, *args)
        except ERRORS as exc:
            raise translate(exc, self.description) from exc

    def block(self, stream: str, after_id: str, block_ms: int) -> None:
        try:
            self.client.execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "BLOCK", block_ms, "COUNT", 1, "STREAMS", stream, after_id)
        except ERRORS as exc:
            raise translate(exc, self.description) from exc

    def interrupt(self) -> None:
        with contextlib.suppress(Exception):  # shut the socket down under a blocked read
            self.client.connection_pool.disconnect()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def open_tail(source: str | Mapping[str, Any] | Any, *, socket_timeout: float,
              connect_timeout: float, block_ms: int) -> StreamTail:
    """A ``StreamTail`` from a URL, a mapping of ``redis.Redis`` keyword arguments, or a
    factory returning a new, dedicated ``redis.Redis`` (which must keep binary replies and
    have a ``socket_timeout`` longer than ``block_ms``: checked here, ``ConfigError``)."""
    if isinstance(source, str):
        client = connect(RedisConfig(url=source, socket_timeout=socket_timeout,
                                     connect_timeout=connect_timeout, max_connections=4))
        return StandaloneTail(client, safe_redis_url(source))
    if isinstance(source, Mapping):
        client = redis.Redis(**{"socket_timeout": socket_timeout,
                                "socket_connect_timeout": connect_timeout, **source})
    else:
        client = source()
        if not isinstance(client, redis.Redis):
            raise ConfigError(
                f"the connection factory returned {type(client).__name__}, "
                "expected a redis.Redis", "connection")
    kwargs: Mapping[str, Any] = getattr(client.connection_pool, "connection_kwargs", {})
    problem = ""
    if kwargs.get("decode_responses"):
        problem = ("the subscriber's client must have decode_responses=False: ids are binary "
                   "msgpack")
    elif (timeout := kwargs.get("socket_timeout")) is None or timeout <= block_ms / 1000:
        problem = (f"the subscriber's client needs a socket_timeout longer than block_ms "
                   f"({block_ms} ms), got {timeout!r}: None would never notice a hung "
                   "server, a shorter one times out every idle XREAD BLOCK")
    if problem:
        client.close()
        raise ConfigError(problem, "connection")
    return StandaloneTail(client, "a dedicated client")


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
