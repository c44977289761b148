"""The Redis transport: moves bytes in as few round trips as possible, decides nothing.

This is the Redis boundary: redis-py exceptions are translated here and nowhere else
(``translate``): a refused password, ACL permission or database number becomes
``CacheConfigError``, everything else (refused connections, timeouts, error replies of a
server that cannot serve now) ``CacheUnavailable``.

Reads are one MGET, or several MGETs in one pipeline past ``read_chunk`` keys, so a batch is
always one network round trip. Writes go through one Lua script (``CONDITIONAL_SET``) in two
modes: a fenced fill writes only where the key still holds what the reader saw before its SQL
read, and only if the view's epoch did not move; a ``put_rows`` row writes unless a row with a
later event timestamp is there (the timestamp sits at a fixed offset, see
``featcache.codec``). A fenced write whose reader saw the key empty needs none of the
script's comparisons: it goes through ``SET_IF_ABSENT``, a plain ``SET ... NX`` per row behind
the same epoch check, which costs the server a fraction of the general script and the client
two arguments a row instead of five. All chunks of a write share one pipelined round trip.
Values are opaque bytes: nothing read is ever unpickled or evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis
from redis import exceptions as redis_exc

from featcache.config_sections import RedisConfig
from featcache.errors import CacheConfigError, CacheUnavailable, ConfigError
from featcache.urls import mask_url

__all__ = [
    "CONDITIONAL_SET",
    "ENSURE_EPOCH",
    "SET_IF_ABSENT",
    "IfAbsent",
    "LuaScript",
    "RedisStore",
    "WriteBatch",
    "WriteItem",
    "connect",
    "fenced_write",
    "row_write",
    "safe_redis_url",
    "translate",
    "translated_errors",
]

log = logging.getLogger("featcache.redis")

class LuaScript:
    """A server-side script, sent by its SHA-1 and loaded only when the server lacks it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis' script id


# KEYS[1]: the view's epoch key; KEYS[2..]: row keys of that view, then ARGV[4] lease keys
# (``featcache.leases``) deleted once the rows are written, so waiting readers move on: each
# only where it still holds the writer's token (the last ARGV when there are lease keys); a
# lease that expired and was taken by another reader meanwhile is that reader's.
# ARGV[1]: "1" when the writer read the epoch before its SQL read, and ARGV[2] is what it read
# ("" for none): if the epoch changed since, the whole view was invalidated and nothing is
# written. ARGV[3]: the write's deadline on the server's clock (microseconds, "0" for none):
# past it nothing is written, since a tombstone laid after the reader's fence may have expired
# (a write held in a stalled server's socket must not land late). Then four ARGV per row key:
# mode, ttl_ms, value, expected. "Ours" means a row ("R" in
# byte 2) of the same layout version (byte 1) as the new value.
#   Both modes: a row never replaces a row of ours with a later event timestamp (bytes 3-10,
#           big-endian int64) if that row is of the view's current epoch. One of an older
#           epoch was invalidated with its whole view (readers miss it): it gives way, or an
#           ETL that moved an event time back and invalidated the view would leave the key a
#           miss until its TTL. Tombstones, negative entries, garbage and keys of other types
#           give way to rows: the key space under the prefix is featcache's.
#   mode F  a fenced fill, also: written only where the key still holds exactly what the
#           reader saw before its SQL read (expected; "" = nothing, or a key of another type,
#           which MGET also shows as nothing). An invalidation, a newer row or another fill in
#           between changed it, so a value read before them is never written (DESIGN 4).
#   mode E  mode F where the reader saw no key (expected ""); normally sent through
#           SET_IF_ABSENT instead.
#   mode R  a row from put_rows without a fence: nothing more.
# Returns how many keys were written.
CONDITIONAL_SET = LuaScript("""
-- an unsigned msgpack int at pos: its value and the position after it, or nil
local function uint_at(s, pos)
  local b = string.byte(s, pos)
  if not b then return nil end
  if b < 128 then return b, pos + 1 end
  if b == 204 then return string.byte(s, pos + 1), pos + 2 end
  if b == 205 then return struct.unpack('>I2', s, pos + 1), pos + 3 end
  if b == 206 then return struct.unpack('>I4', s, pos + 1), pos + 5 end
  if b == 207 then return struct.unpack('>I8', s, pos + 1), pos + 9 end
  return nil
end
-- the epoch of a row (msgpack [fp, epoch, ...] after the 10-byte header), or nil
local function epoch_of(row)
  local b, pos = string.byte(row, 11), nil
  if b and b >= 146 and b <= 159 then pos = 12
  elseif b == 220 then pos = 14
  elseif b == 221 then pos = 16
  else return nil end
  local _, after = uint_at(row, pos)
  if not after then return nil end
  return (uint_at(row, after))
end
local current = false  -- the view's epoch, read when first needed
local function of_current_epoch(row)
  if current == false then current = tonumber(redis.call('GET', KEYS[1]) or '') end
  local epoch = epoch_of(row)
  return epoch ~= nil and epoch == current
end
local rows_end = #KEYS - tonumber(ARGV[4])
for i = rows_end + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[#ARGV] then redis.call('DEL', KEYS[i]) end
end
if ARGV[1] == '1' then
  local epoch = redis.call('GET', KEYS[1]) or ''
  if epoch ~= ARGV[2] then return 0 end
end
if ARGV[3] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then return 0 end
end
local written = 0
for i = 2, rows_end do
  local base = 4 + 4 * (i - 2)
  local mode, ttl, value = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local got = redis.pcall('GET', KEYS[i])
  local old = nil
  if type(got) == 'string' then old = got end
  local ok
  local ours = old and string.len(old) >= 10 and string.byte(old, 1) == string.byte(value, 1)
    and string.byte(old, 2) == 82
  ok = (not ours) or string.byte(value, 2) ~= 82
    or struct.unpack('>i8', value, 3) >= struct.unpack('>i8', old, 3)
    or not of_current_epoch(old)
  if ok and mode ~= 'R' then
    ok = (old or '') == ARGV[base + 4]
  end
  if ok then
    redis.call('SET', KEYS[i], value, 'PX', ttl)
    written = written + 1
  end
end
return written
""")

# KEYS[1]: the view's epoch key; KEYS[2..]: row keys whose fenced reader saw them empty.
# ARGV[1], ARGV[2], ARGV[3]: the epoch check and the deadline of CONDITIONAL_SET; ARGV[4]: the
# TTL in ms of every row; ARGV[3 + i]: the value for KEYS[i]. Mode E (F where the reader saw no
# key), for less: the row is written only where the key is still empty (NX). A string there
# now (a tombstone of an invalidation, another fill, a newer row) keeps the row out; a key of
# another type, which MGET showed the reader as nothing, gives way as in CONDITIONAL_SET.
# Returns how many keys were written.
SET_IF_ABSENT = LuaScript("""
if ARGV[1] == '1' then
  local epoch = redis.call('GET', KEYS[1]) or ''
  if epoch ~= ARGV[2] then return 0 end
end
if ARGV[3] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then return 0 end
end
local written = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[i + 3], 'PX', ARGV[4], 'NX') then
    written = written + 1
  elseif redis.call('TYPE', KEYS[i]).ok ~= 'string' then
    redis.call('SET', KEYS[i], ARGV[i + 3], 'PX', ARGV[4])
    written = written + 1
  end
end
return written
""")

# KEYS[1]: a view's epoch key. The epoch, created from the server clock if it is missing, so
# that no row is ever stamped with an epoch a lost key could come back to (0).
ENSURE_EPOCH = LuaScript("""
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])), 'NX')
return redis.call('GET', KEYS[1])
""")

#: One conditional write: (mode R, F or E, key, value, ttl in milliseconds, expected old bytes
#: or b"").
WriteItem = tuple[bytes, str, bytes, int, bytes]


def row_write(key: str, value: bytes, ttl_ms: int) -> WriteItem:
    """Write a row unless Redis holds a newer one (by event timestamp): ``put_rows``."""
    return (b"R", key, value, ttl_ms, b"")


def fenced_write(key: str, value: bytes, ttl_ms: int, seen: bytes | None) -> WriteItem:
    """Write only if the key still holds ``seen`` (what the reader saw before reading SQL).

    Mode E when the reader saw no key: ``SET_IF_ABSENT``'s job. A key that held an empty
    string is not "no key" (``NX`` would refuse it): it stays mode F, expecting b"".
    """
    if seen is None:
        return (b"E", key, value, ttl_ms, b"")
    return (b"F", key, value, ttl_ms, seen)


@dataclass(frozen=True, slots=True)
class IfAbsent:
    """Rows whose fenced reader saw no key, as columns: ``fenced_write(key, value, ttl_ms,
    None)`` for each, without a ``WriteItem`` per row (the bulk writers' shape)."""

    keys: Sequence[str]
    values: Sequence[bytes]
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """The writes of one view, fenced by the view's epoch when ``epoch_seen`` is not None."""

    epoch_key: str
    epoch_seen: bytes | None
    items: Sequence[WriteItem]
    release: Sequence[str] = ()  # lease keys to delete with the last chunk...
    release_token: str = ""  # ...where they hold this token (``Leases.acquire``'s)
    #: no row is written once the server's clock (microseconds) is past this; 0: no deadline
    deadline_us: int = 0
    if_absent: IfAbsent | None = None


def _split_if_absent(batch: WriteBatch) -> tuple[list[WriteItem], list[IfAbsent]]:
    """The items that need ``CONDITIONAL_SET``, and the fenced ones whose reader saw nothing
    there, by TTL, for ``SET_IF_ABSENT``."""
    general: list[WriteItem] = []
    by_ttl: dict[int, list[WriteItem]] = {}
    for item in batch.items:
        if item[0] == b"E":
            by_ttl.setdefault(item[3], []).append(item)
        else:
            general.append(item)
    groups = [IfAbsent([i[1] for i in group], [i[2] for i in group], ttl_ms)
              for ttl_ms, group in by_ttl.items()]
    if batch.if_absent is not None and batch.if_absent.keys:
        groups.append(batch.if_absent)
    return general, groups


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, by hiredis' C packer (str, bytes, int and float arguments)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


_TIME = hiredis.pack_command(("TIME",))

_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.RedisError, OSError)


def safe_redis_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    return mask_url(url)


def connect(config: RedisConfig) -> redis.Redis:
    """A client for ``config.url``: ``redis://``, ``rediss://`` (TLS; ``ssl_*`` options in the
    query string), ``unix://`` URLs, with ACL user and password from the URL, and the section's
    timeouts and pool size. Nothing is connected yet."""
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
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.connect_timeout,
            max_connections=config.max_connections,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigError(f"{exc} (url {safe_redis_url(url)})", "redis.url") from None


_DB_PATH = re.compile(r"^/?(?:\d{1,5}/?)?$")


class RedisStore:
    """Round trips to one Redis/Valkey server (cluster support plugs in here)."""

    def __init__(self, client: redis.Redis, read_chunk: int = 1000, write_chunk: int = 500) -> None:
        self.client = client
        self.read_chunk = read_chunk
        self.write_chunk = write_chunk
        self.url = safe_redis_url(_describe(client))

    def close(self) -> None:
        self.client.close()

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in key order, None where absent; one network round trip."""
        return self._read(keys, False)[0]

    def read_timed(self, keys: Sequence[str]) -> tuple[list[bytes | None], int]:
        """``read``, and the server's clock (microseconds) when it ran, in the same round
        trip: a fence's writes are judged against it by the write scripts (``deadline_us``)."""
        return self._read(keys, True)

    def _read(self, keys: Sequence[str], timed: bool) -> tuple[list[bytes | None], int]:
        step = self.read_chunk
        packed = [
            _pack(("MGET", *keys[start : start + step]))
            for start in range(0, len(keys), step)
        ]
        if timed:
            packed.append(_TIME)
        replies = self._round_trip(packed)
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
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
            try:
                conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
                replies: list[Any] = []
                for _ in packed:
                    try:
                        replies.append(conn.read_response())
                    except redis_exc.ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                conn.disconnect()  # type: ignore[no-untyped-call]
                raise
            finally:
                pool.release(conn)
        except _ERRORS as exc:
            raise translate(exc, self.url) from exc
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
            items, if_absent = _split_if_absent(batch)
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

    def eval_scripts(
        self, calls: Sequence[tuple[LuaScript, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run each (script, keys, args) in one pipelined round trip; results in order.

        EVALSHA by the script's SHA-1; only when the server answers NOSCRIPT (first use,
        restart, SCRIPT FLUSH) is the script loaded and the failed calls sent again.
        """
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            packed = []
            for i in pending:
                script, keys, args = calls[i]
                packed.append(
                    _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
                )
            retry = []
            for i, result in zip(pending, self._round_trip(packed), strict=True):
                if isinstance(result, redis_exc.NoScriptError) and attempt == 0:
                    retry.append(i)
                elif isinstance(result, Exception):
                    raise translate(result, self.url) from result
                else:
                    results[i] = result
            if not retry:
                break
            scripts = {calls[i][0].sha: calls[i][0] for i in retry}.values()
            for loaded in self._round_trip(
                [_pack(("SCRIPT", "LOAD", script.text)) for script in scripts]
            ):
                if isinstance(loaded, Exception):
                    raise translate(loaded, self.url) from loaded
            pending = retry
        return results


def translate(exc: BaseException, url: str) -> CacheConfigError | CacheUnavailable:
    """The featcache error for a redis-py exception or error reply (``url`` masked already).

    Wrong credentials, an ACL that forbids a command or key, a database number the server
    does not have: the configuration is wrong, and no retry or fallback will fix it.
    Everything else says the server cannot serve now: an outage, which callers degrade.
    """
    if isinstance(exc, redis_exc.AuthenticationError | redis_exc.NoPermissionError) or (
        isinstance(exc, redis_exc.ResponseError) and _misconfigured(str(exc))
    ):
        return CacheConfigError(
            f"Redis {url} refused the configured access: {exc} (check the user, password "
            f"and database number of redis.url, and the ACL rules of that user)"
        )
    return CacheUnavailable(f"Redis {url}: {exc}")


def _misconfigured(reply: str) -> bool:
    """Error replies that mean the configuration is wrong (``ResponseError`` is raised for
    every error reply; redis-py gives these no class of their own)."""
    text = reply.upper()
    return any(mark in text for mark in _CONFIG_REPLIES)


#: A database number out of range (redis-py selects it while connecting), authentication
#: refused by a server older than the ACL classes, an ACL denial spelled by a proxy.
_CONFIG_REPLIES = ("DB INDEX IS OUT OF RANGE", "INVALID DB INDEX", "WRONGPASS", "NOAUTH",
                   "NOPERM", "INVALID PASSWORD")


@contextlib.contextmanager
def translated_errors(url: str) -> Iterator[None]:
    """redis-py's errors translated by ``translate`` (URL masked), for the few callers that
    use the redis-py client directly (the warmer's watermark and health) instead of
    ``RedisStore``."""
    try:
        yield
    except _ERRORS as exc:
        raise translate(exc, safe_redis_url(url)) from exc


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
