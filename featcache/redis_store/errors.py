"""redis-py's exceptions as featcache's: the Redis side of the one translation boundary.

Wrong credentials, an ACL that forbids a command or key, a database number the server does not
have: ``CacheConfigError``, raised and never degraded. Everything else says the server cannot
serve now (refused, timed out, an error reply such as ``OOM`` or ``BUSY``): ``CacheUnavailable``,
which callers degrade.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis import exceptions as redis_exc

from featcache.errors import CacheConfigError, CacheUnavailable
from featcache.urls import mask_url

__all__ = ["ERRORS", "translate", "translated_errors"]

#: what redis-py (and the socket under it) raises
ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.RedisError, OSError)


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
    except ERRORS as exc:
        raise translate(exc, mask_url(url)) from exc
