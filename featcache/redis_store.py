"""The Redis transport: moves bytes in as few round trips as possible, decides nothing.

This is the Redis boundary: redis-py exceptions become ``CacheUnavailable`` here and nowhere
else. Reads are one MGET, or several MGETs in one pipeline past ``read_chunk`` keys, so a batch
is always one network round trip. Writes go through one Lua script that writes a row only when
it is not older than the row already there (the event timestamp at a fixed offset, see
``featcache.codec``), and writes a negative entry only where no row exists; all chunks of a
write share one pipelined round trip. Values are opaque bytes: nothing read is ever unpickled
or evaluated.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis import exceptions as redis_exc

from featcache.errors import CacheUnavailable, ConfigError
from featcache.urls import mask_url

__all__ = [
    "RedisStore",
    "WriteItem",
    "absent_write",
    "connect",
    "repair_write",
    "row_write",
    "safe_redis_url",
]

log = logging.getLogger("featcache.redis")

# KEYS: row keys. ARGV: four per key: mode, ttl_ms, value, expected. "Ours" below means a row
# ("R" in byte 2) of the same layout version (byte 1) as the new value.
#   mode R  a row: written unless the key holds one of ours with a later event timestamp
#           (bytes 3-10, big-endian int64); garbage, other types and negative entries give way
#   mode A  a negative entry: written unless the key holds a row of ours
#   mode C  a repair: written only where the key still holds ``expected`` (the undecodable
#           bytes the reader saw) or nothing, so it never clobbers a row written meanwhile
# Returns how many keys were written.
_CONDITIONAL_SET = """
local written = 0
for i = 1, #KEYS do
  local base = 4 * (i - 1)
  local mode, ttl, value = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local got = redis.pcall('GET', KEYS[i])
  local old = nil
  local other_type = type(got) == 'table'
  if type(got) == 'string' then old = got end
  local ours = old ~= nil and string.len(old) >= 10
    and string.byte(old, 1) == string.byte(value, 1) and string.byte(old, 2) == 82
  local ok
  if mode == 'C' then
    ok = (old == nil and not other_type) or old == ARGV[base + 4]
  elseif mode == 'A' then
    ok = not ours
  else
    ok = (not ours) or struct.unpack('>i8', value, 3) >= struct.unpack('>i8', old, 3)
  end
  if ok then
    redis.call('SET', KEYS[i], value, 'PX', ttl)
    written = written + 1
  end
end
return written
"""

#: One conditional write: (mode, key, value, ttl in milliseconds, expected old bytes or b"").
WriteItem = tuple[bytes, str, bytes, int, bytes]


def row_write(key: str, value: bytes, ttl_ms: int) -> WriteItem:
    """Write a row unless Redis holds a newer one (by event timestamp)."""
    return (b"R", key, value, ttl_ms, b"")


def absent_write(key: str, value: bytes, ttl_ms: int) -> WriteItem:
    """Write a negative entry unless Redis holds a row."""
    return (b"A", key, value, ttl_ms, b"")


def repair_write(key: str, value: bytes, ttl_ms: int, expected: bytes) -> WriteItem:
    """Replace undecodable bytes, only if they are still what the key holds."""
    return (b"C", key, value, ttl_ms, expected)


_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.RedisError, OSError)


def safe_redis_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    return mask_url(url)


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` (TLS; ``ssl_*`` options in the query string),
    ``unix://`` URLs, with ACL user and password from the URL. Nothing is connected yet."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise ConfigError(f"{exc} (url {mask_url(url)})", "redis.url") from None
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"expected a redis://, rediss:// or unix:// URL, got {safe_redis_url(url)!r}",
            "redis.url",
        )
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            max_connections=max_connections,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigError(f"{exc} (url {safe_redis_url(url)})", "redis.url") from None


class RedisStore:
    """Round trips to one Redis/Valkey server (cluster support plugs in here)."""

    def __init__(self, client: redis.Redis, read_chunk: int = 1000, write_chunk: int = 500) -> None:
        self.client = client
        self.read_chunk = read_chunk
        self.write_chunk = write_chunk
        self._sha = hashlib.sha1(_CONDITIONAL_SET.encode()).hexdigest()  # noqa: S324 - Redis' id
        self.url = safe_redis_url(_describe(client))

    def close(self) -> None:
        self.client.close()

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in key order, None where absent; one network round trip."""
        try:
            if len(keys) <= self.read_chunk:
                result: list[bytes | None] = self.client.execute_command(  # type: ignore[no-untyped-call]
                    "MGET", *keys
                )
                return result
            pipe = self.client.pipeline(transaction=False)
            for start in range(0, len(keys), self.read_chunk):
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "MGET", *keys[start : start + self.read_chunk]
                )
            values: list[bytes | None] = []
            for part in pipe.execute():
                values.extend(part)
            return values
        except _ERRORS as exc:
            raise CacheUnavailable(f"Redis {self.url}: {exc}") from exc

    def write(self, items: Sequence[WriteItem]) -> int:
        """Conditionally write rows in one round trip; returns how many keys were written.

        EVALSHA by the script's own SHA-1; only when the server answers NOSCRIPT (first use,
        restart, SCRIPT FLUSH) is the script loaded and the failed chunks sent again.
        """
        if not items:
            return 0
        chunks = [items[i : i + self.write_chunk] for i in range(0, len(items), self.write_chunk)]
        written = 0
        try:
            for attempt in range(2):
                pipe = self.client.pipeline(transaction=False)
                for chunk in chunks:
                    keys = [item[1] for item in chunk]
                    args: list[Any] = []
                    for mode, _, value, ttl_ms, expected in chunk:
                        args += (mode, max(1, int(ttl_ms)), value, expected)
                    pipe.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", self._sha, len(keys), *keys, *args
                    )
                results = pipe.execute(raise_on_error=False)
                retry = []
                for chunk, result in zip(chunks, results, strict=True):
                    if isinstance(result, redis_exc.NoScriptError) and attempt == 0:
                        retry.append(chunk)
                    elif isinstance(result, Exception):
                        raise result
                    else:
                        written += int(result)
                if not retry:
                    break
                self.client.script_load(_CONDITIONAL_SET)
                chunks = retry
        except _ERRORS as exc:
            raise CacheUnavailable(f"Redis {self.url}: {exc}") from exc
        return written


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
