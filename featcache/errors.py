"""The one exception tree of featcache.

Every error featcache raises is a ``FeatcacheError``, so a caller can guard a whole call with
one ``except``; third-party errors (redis-py, SQLAlchemy) are translated at the two transport
boundaries (``featcache.redis_store`` and ``featcache.offline``) and never leak past them.
Input errors also subclass the builtin a Python programmer would expect (``ValueError``,
``TypeError``, ``KeyError``), so existing handlers keep working::

    FeatcacheError
    ├── ConfigError (ValueError)          bad file, bad env override, bad constructor argument
    │   ├── SchemaError                   the SQL table or a configured column does not exist
    │   └── CacheConfigError              Redis refused the credentials, permissions or database
    ├── InvalidRequest (ValueError)       a call's arguments are wrong; raised before any I/O
    │   ├── UnknownView (KeyError)
    │   ├── UnknownFeature (KeyError)     carries the closest known names
    │   ├── AmbiguousFeature              a bare name that several views declare
    │   └── InvalidEntityId (TypeError)   None, NaN, bytes, bool, wrong type, too long, NUL
    │                                     or not UTF-8 (str)
    ├── ModelOutputError (TypeError)      a model's compute returned what cannot be cached: an
    │                                     unsupported type, or not one output per input
    ├── BackendError                      a server failed; carries the original as __cause__
    │   ├── CacheUnavailable              Redis/Valkey: connection refused, timeout, failover
    │   │   └── PartlyUnavailable         some cluster nodes failed; the others did their part
    │   └── OfflineStoreError             SQL: a query failed
    │       └── OfflineStoreUnavailable   SQL: the database cannot be reached
    └── EmbeddedServerError               no valkey-server/redis-server binary, or it did not start
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AmbiguousFeature",
    "BackendError",
    "CacheConfigError",
    "CacheUnavailable",
    "ConfigError",
    "EmbeddedServerError",
    "FeatcacheError",
    "InvalidEntityId",
    "InvalidRequest",
    "ModelOutputError",
    "OfflineStoreError",
    "OfflineStoreUnavailable",
    "PartlyUnavailable",
    "SchemaError",
    "UnknownFeature",
    "UnknownView",
]


class FeatcacheError(Exception):
    """Root of every error featcache raises."""


class ConfigError(FeatcacheError, ValueError):
    """A configuration value is wrong; ``path`` names the key (``views.user.features.ctr``)."""

    def __init__(self, message: str, path: str = "", source: str = "") -> None:
        self.message = message
        self.path = path
        self.source = source
        where = f"{source}: " if source else ""
        at = f"{path}: " if path else ""
        super().__init__(f"{where}{at}{message}")


class SchemaError(ConfigError):
    """The offline store does not have the table or a column the configuration names.

    Raised at the first use of the view, not at load, because loading a config must not need
    a database connection.
    """


class CacheConfigError(ConfigError):
    """Redis/Valkey answered, and refused what the configuration asks of it: a wrong password
    or ACL user, a command or key pattern the ACL user may not use (``NOPERM``), a database
    number the server does not have, a server older than Redis 7.0 (the write scripts' ``SET
    ... NX GET``).

    Not an outage: retrying or answering from SQL would hide it for the process's whole life,
    so it is raised at construction and by every later call that meets it, never degraded.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "redis.url")


class InvalidRequest(FeatcacheError, ValueError):
    """The arguments of a call are wrong. Raised before any I/O, so nothing was read or written."""


class UnknownView(InvalidRequest, KeyError):
    """A view name that the configuration does not declare."""

    def __init__(self, view: str, known: Sequence[str]) -> None:
        self.view = view
        self.known = tuple(known)
        super().__init__(f"unknown feature view {view!r}; known views: {', '.join(known) or '-'}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class UnknownFeature(InvalidRequest, KeyError):
    """A feature reference that no view declares; ``closest`` lists the nearest known ones."""

    def __init__(self, reference: str, closest: Sequence[str]) -> None:
        self.reference = reference
        self.closest = tuple(closest)
        hint = f"; did you mean {' or '.join(repr(c) for c in closest)}?" if closest else ""
        super().__init__(f"unknown feature {reference!r}{hint}")

    def __str__(self) -> str:
        return str(self.args[0])


class AmbiguousFeature(InvalidRequest):
    """A bare feature name declared by several views; ``candidates`` are the qualified names."""

    def __init__(self, reference: str, candidates: Sequence[str]) -> None:
        self.reference = reference
        self.candidates = tuple(candidates)
        super().__init__(
            f"feature {reference!r} is declared by several views; "
            f"write one of {', '.join(repr(c) for c in candidates)}"
        )


class InvalidEntityId(InvalidRequest, TypeError):
    """An entity id that is None, NaN, bytes, a bool, of the wrong type, too long, or a str that
    holds a NUL or is not UTF-8 text."""


class ModelOutputError(FeatcacheError, TypeError):
    """A model's ``compute`` returned something the prediction cache cannot store: an output of
    a type it does not encode (``docs/predictions.md``), or not exactly one output per input.
    Nothing of that call was written."""


class BackendError(FeatcacheError):
    """A server featcache talks to failed. The original exception is the ``__cause__``."""


class CacheUnavailable(BackendError):
    """Redis/Valkey could not be reached or could not run the command now (refused
    connection, timeout, out of memory, a replica that is read-only during a failover)."""


class PartlyUnavailable(CacheUnavailable):
    """Some nodes of a Redis/Valkey Cluster failed (not all of its primaries): what the call
    sent to the others was done, so a ``put_rows`` wrote the rows of the healthy shards and
    an invalidation fenced the ids there (retry it: twice is harmless). One shard down is
    not Redis down, so the read path's circuit breaker does not count it (each node has its
    own)."""


class OfflineStoreError(BackendError):
    """A query against the offline store failed."""


class OfflineStoreUnavailable(OfflineStoreError):
    """The offline store cannot be reached at all (connection refused, timed out)."""


class EmbeddedServerError(FeatcacheError):
    """A private Valkey/Redis server, cluster or Sentinel set (the demo's, the tests') could not
    be started, or did not reach the state it was waited for."""
