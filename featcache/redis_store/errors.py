"""redis-py's exceptions as featcache's: the Redis side of the one translation boundary.

Wrong credentials, an ACL that forbids a command or key, a database number the server does not
have, a server older than Redis 7.0: ``CacheConfigError``, raised and never degraded.
Everything else says the server cannot serve now (refused, timed out, an error reply such as
``OOM`` or ``BUSY``): ``CacheUnavailable``, which callers degrade.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis import exceptions as redis_exc
from redis.sentinel import MasterNotFoundError

from featcache.errors import CacheConfigError, CacheUnavailable
from featcache.urls import mask_url

__all__ = ["ERRORS", "translate", "translated_errors"]

#: what redis-py (and the socket under it) raises
ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.RedisError, OSError)


def translate(exc: BaseException, url: str) -> CacheConfigError | CacheUnavailable:
    """The featcache error for a redis-py exception or error reply (``url`` masked already).

    Wrong credentials, an ACL that forbids a command or key, a database number the server
    does not have, a server of another kind than ``redis.mode`` says (a Sentinel, a cluster
    node), a server too old for featcache's write scripts: the configuration is wrong, and no
    retry or fallback will fix it. Everything else says the server cannot serve now: an
    outage, which callers degrade.
    """
    if isinstance(exc, redis_exc.AuthenticationError | redis_exc.NoPermissionError):
        return CacheConfigError(f"Redis {url} refused the configured access: {exc} ({_ACCESS})")
    if isinstance(exc, MasterNotFoundError) and "UNKNOWN COMMAND" in str(exc).upper():
        return CacheConfigError(f"Redis {url}: {exc} (an address in redis.sentinels is a data "
                                f"server, not a Sentinel)")
    if isinstance(exc, redis_exc.AskError | redis_exc.ClusterCrossSlotError):
        # redis-py gives these replies classes of their own, without their MOVED/ASK/CROSSSLOT
        # code in the text
        return CacheConfigError(f"Redis {url} refused the configured access: {exc} "
                                f"({_CONFIG_REPLIES[-1][1]})")
    if isinstance(exc, redis_exc.ResponseError):
        text = str(exc).upper()
        if _TOO_OLD in text:  # the write scripts' reply (redis_store/scripts.py)
            return CacheConfigError(f"Redis {url}: {exc}; upgrade it, or point redis.url at "
                                    "a server that is")
        for marks, hint in _CONFIG_REPLIES:
            if any(mark in text for mark in marks):
                return CacheConfigError(f"Redis {url} refused the configured access: {exc} "
                                        f"({hint})")
    return CacheUnavailable(f"Redis {url}: {exc}")


_TOO_OLD = "FEATCACHE NEEDS REDIS >= 7.0"
_ACCESS = ("check the user, password and database number of redis.url, and the ACL rules of "
           "that user")
#: Error replies that mean the configuration is wrong (redis-py raises ``ResponseError`` for
#: every error reply and gives these no class of their own), with what to check: a database
#: number out of range (selected while connecting), authentication refused by a server older
#: than the ACL classes, an ACL denial spelled by a proxy; a Sentinel (it knows none of the
#: data commands) or a cluster node (it redirects keys of other slots) where redis.mode says
#: otherwise.
_CONFIG_REPLIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("DB INDEX IS OUT OF RANGE", "INVALID DB INDEX", "WRONGPASS", "NOAUTH", "NOPERM",
      "INVALID PASSWORD"), _ACCESS),
    (("UNKNOWN COMMAND",), "the server does not know featcache's commands: a Sentinel is "
     "reached with redis.mode: sentinel (its address in redis.sentinels), a data server with "
     "mode standalone; a renamed or disabled command is refused too"),
    (("MOVED ", "ASK ", "CROSSSLOT"), "the server is a cluster node: reach a cluster with "
     "redis.mode: cluster; featcache talks to one server with mode standalone, to the primary "
     "a Sentinel names with mode sentinel"),
)


@contextlib.contextmanager
def translated_errors(url: str) -> Iterator[None]:
    """redis-py's errors translated by ``translate`` (URL masked), for the few callers that
    use the redis-py client directly (the warmer's watermark and health) instead of
    ``RedisStore``."""
    try:
        yield
    except ERRORS as exc:
        raise translate(exc, mask_url(url)) from exc
