"""The sections of the configuration: one small frozen dataclass per section of the file.

Each part of the cache is given the section it runs on (``connect`` a ``RedisConfig``,
``L1Cache`` an ``L1Config``...), so a part never sees settings that are not its own, and each
section is validated once, when it is built, with errors at the key's path in the file
(``redis.socket_timeout``), whether it was read from a file or built in Python.

A field says what it holds through the helpers below (``duration_field``, ``integer_field``,
``number_field``): ``Section`` checks durations and integer ranges from that, and the file
loader (``featcache.config``) reads an environment override's text by it, so a field is
declared in one place. Checks that belong to one field alone (a choice, a URL) are in its
section's ``__post_init__``.
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Final, overload
from urllib.parse import urlsplit

from featcache.errors import ConfigError
from featcache.urls import mask_url

__all__ = [
    "DEFAULT_L1_ACCESS_SAMPLE_RATE",
    "KIND",
    "L1_POLICIES",
    "REDIS_MODES",
    "SECTIONS",
    "DegradationConfig",
    "InvalidationConfig",
    "L1Config",
    "LimitsConfig",
    "OfflineStoreConfig",
    "PopularityConfig",
    "RedisConfig",
    "Seconds",
    "Section",
    "ServeConfig",
    "StampedeConfig",
    "StatsConfig",
    "duration_field",
    "flag_field",
    "integer_field",
    "number_field",
    "parse_duration",
]

#: Share of L1 hits a ``tinylfu`` L1 records in its frequency sketch (``featcache.l1``);
#: docs/l1-policies.md measures the hit rate it costs.
DEFAULT_L1_ACCESS_SAMPLE_RATE = 0.125
L1_POLICIES: Final = ("lru", "lfu", "ttl", "tinylfu")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

#: the metadata key of a field's kind: "duration", "duration>=0", "integer", "number" or "flag"
KIND = "featcache.kind"


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from ``30``, ``2.5``, ``"500ms"``, ``"10m"``, ``"1h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration like 30, '500ms', '10m', got {value!r}", path)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"expected a duration like 30, '500ms', '10m', '1h', '7d', got {value!r}", path
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"expected a non-negative duration, got {value!r}", path)
    return seconds


class Seconds:
    """The declared type of a duration field (``duration_field``), for type checkers only.

    A section takes a duration as a number of seconds or as text (``"500ms"``, ``"1h"``) and
    holds it as float seconds once built (``Section._check_fields``). A dataclass field
    annotated with a descriptor type takes, in ``__init__``, what the descriptor's ``__set__``
    takes and reads as what its ``__get__`` returns (the typing spec's dataclass rules), so
    ``RedisConfig(socket_timeout="500ms").socket_timeout`` type-checks as a float while
    ``float`` alone would refuse the documented ``"500ms"``. Nothing of it runs: a slotted
    dataclass replaces the class attribute with its slot, and ``duration_field`` gives a
    float default."""

    __slots__ = ()

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> Seconds: ...
    @overload
    def __get__(self, obj: object, owner: type[Any] | None = None) -> float: ...
    def __get__(self, obj: object, owner: type[Any] | None = None) -> Seconds | float:
        raise NotImplementedError  # pragma: no cover - never installed on a class

    def __set__(self, obj: object, value: float | str) -> None:
        raise NotImplementedError  # pragma: no cover - never installed on a class


def duration_field(default: float, *, zero: bool = False) -> Any:
    """Seconds, in any form ``parse_duration`` reads; greater than zero unless ``zero``.
    Annotate the field ``Seconds``."""
    return field(default=default, metadata={KIND: "duration>=0" if zero else "duration"})


def integer_field(default: int, low: int, high: int) -> Any:
    """An integer from ``low`` to ``high`` (not a bool, not ``1.5``)."""
    return field(default=default, metadata={KIND: "integer", "range": (low, high)})


def number_field(default: float) -> Any:
    """A plain number: an override's text is read with ``float()``, not as a duration."""
    return field(default=default, metadata={KIND: "number"})


def flag_field(default: bool) -> Any:
    """true or false (an override's text: true/false, yes/no, on/off, 1/0)."""
    return field(default=default, metadata={KIND: "flag"})


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


class Section:
    """What every section shares: its name in the file, and the checks its fields declare."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    #: the section's key in the file; error paths start with it
    NAME: ClassVar[str]

    def _check_fields(self) -> None:
        """Durations become float seconds; integers are checked against their range."""
        for f in fields(self):
            kind = f.metadata.get(KIND)
            path = f"{self.NAME}.{f.name}"
            value = getattr(self, f.name)
            if kind in ("duration", "duration>=0"):
                seconds = parse_duration(value, path)
                if kind == "duration" and seconds <= 0:
                    raise ConfigError("must be greater than zero", path)
                object.__setattr__(self, f.name, seconds)
            elif kind == "flag" and not isinstance(value, bool):
                raise ConfigError(f"expected true or false, got {value!r}", path)
            elif kind == "integer":
                low, high = f.metadata["range"]
                if isinstance(value, bool) or not isinstance(value, int) or not (
                        low <= value <= high):
                    raise ConfigError(
                        f"expected an integer from {low} to {high}, got {value!r}", path)

    def _repr_masked(self) -> str:
        """The dataclass repr, with the URL's password masked (``featcache.urls.mask_url``)."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "url" and isinstance(value, str):
                value = mask_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


#: the Redis deployments featcache talks to (``RedisConfig.mode``)
REDIS_MODES: Final = ("standalone", "sentinel", "cluster")


def _addresses(value: object, path: str) -> tuple[str, ...]:
    """``host:port`` entries, from a list or a comma-separated string (an env override)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"expected a list of host:port, got {value!r}", path)
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        host, sep, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"expected host:port, got {item!r}", path)
        out.append(text)
    return tuple(out)


def _check_url(url: object, path: str) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigError("expected a URL", path)


@dataclass(frozen=True, slots=True, repr=False)
class RedisConfig(Section):
    """``redis``: where the cache is and how the client talks to it (``redis_store``).

    ``mode`` is the deployment: ``standalone`` (one server at ``url``), ``sentinel`` (the
    primary that ``sentinels`` name for ``master_name``; ``url`` gives the user, password,
    database and TLS of the connections to it, its host and port are not used) or ``cluster``
    (a Redis/Valkey Cluster; ``url`` is any of its nodes, which tells the client the rest;
    database 0 only; ``cluster_nodes``: more nodes, ``host:port``, asked for the slot map
    when the URL's does not answer). ``read_from_replicas`` (cluster only) spreads reads over
    each shard's replicas; an invalidation then waits for every replica of the shards it
    wrote (docs/deployment.md says what it costs).
    ``key_prefix`` starts
    every key featcache writes; ``read_chunk`` is the most keys one ``MGET`` carries (a larger
    batch is several in one round trip)."""

    NAME: ClassVar[str] = "redis"

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "fc"
    socket_timeout: Seconds = duration_field(0.5)
    connect_timeout: Seconds = duration_field(2.0)
    max_connections: int = integer_field(64, 1, 10_000)
    read_chunk: int = integer_field(1000, 1, 100_000)
    mode: str = "standalone"
    sentinels: tuple[str, ...] = ()
    master_name: str = ""
    cluster_nodes: tuple[str, ...] = ()
    read_from_replicas: bool = flag_field(False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_prefix, str) or not _PREFIX_RE.match(self.key_prefix):
            raise ConfigError(
                f"expected 1-64 characters among letters, digits, '_', '-', '.'; "
                f"got {self.key_prefix!r}",
                "redis.key_prefix",
            )
        self._check_fields()
        _check_url(self.url, "redis.url")
        if self.mode not in REDIS_MODES:
            raise ConfigError(f"expected one of {', '.join(REDIS_MODES)}, got {self.mode!r}",
                              "redis.mode")
        object.__setattr__(self, "sentinels", _addresses(self.sentinels, "redis.sentinels"))
        object.__setattr__(self, "cluster_nodes",
                           _addresses(self.cluster_nodes, "redis.cluster_nodes"))
        if self.cluster_nodes and self.mode != "cluster":
            raise ConfigError(f"only read with mode: cluster (the mode is {self.mode})",
                              "redis.cluster_nodes")
        if not isinstance(self.master_name, str):
            raise ConfigError(f"expected a name, got {self.master_name!r}", "redis.master_name")
        if self.mode == "sentinel":
            if not self.sentinels:
                raise ConfigError("mode sentinel needs the sentinels' addresses (host:port)",
                                  "redis.sentinels")
            if not self.master_name:
                raise ConfigError("mode sentinel needs the name the sentinels monitor the "
                                  "primary under", "redis.master_name")
        elif self.mode == "cluster" and urlsplit(self.url).path not in ("", "/", "/0"):
            raise ConfigError(f"a cluster has database 0 only, got {mask_url(self.url)!r}",
                              "redis.url")
        if self.read_from_replicas and self.mode != "cluster":
            raise ConfigError(
                f"replica reads are for mode cluster (the mode is {self.mode}): a Sentinel "
                "replica's reads would need every invalidation to wait for it, which "
                "mode sentinel does not do", "redis.read_from_replicas")
        if self.mode != "sentinel" and (self.sentinels or self.master_name):
            key = "sentinels" if self.sentinels else "master_name"
            raise ConfigError(f"only read with mode: sentinel (the mode is {self.mode})",
                              f"redis.{key}")

    def __repr__(self) -> str:  # the URL may carry a password
        return self._repr_masked()


@dataclass(frozen=True, slots=True, repr=False)
class OfflineStoreConfig(Section):
    """``offline_store``: the SQL database the features are read from (``OfflineStore``).

    ``chunk_size`` is the most ids one SQL query carries."""

    NAME: ClassVar[str] = "offline_store"

    url: str = "sqlite:///featcache.db"
    chunk_size: int = integer_field(1000, 1, 30_000)
    connect_timeout: Seconds = duration_field(5.0)
    pool_size: int = integer_field(5, 1, 1_000)

    def __post_init__(self) -> None:
        self._check_fields()
        _check_url(self.url, "offline_store.url")

    def __repr__(self) -> str:  # the URL may carry a password
        return self._repr_masked()


@dataclass(frozen=True, slots=True)
class LimitsConfig(Section):
    """``limits``: what a request may hold; ``max_id_length`` bounds a string id's UTF-8 bytes
    (and so a key's length)."""

    NAME: ClassVar[str] = "limits"

    max_id_length: int = integer_field(512, 1, 1_000_000)

    def __post_init__(self) -> None:
        self._check_fields()


@dataclass(frozen=True, slots=True)
class InvalidationConfig(Section):
    """``invalidation``: the tombstones an invalidation leaves (``fence_ttl``), the length the
    stream every L1 tails is trimmed to (``stream_maxlen``), and how many replicas must hold
    it before it returns (``replicas``, within ``replica_timeout``): with a replica that may
    be promoted, a tombstone only the old primary held would not fence a fill that raced with
    the invalidation."""

    NAME: ClassVar[str] = "invalidation"

    fence_ttl: Seconds = duration_field(60.0)
    stream_maxlen: int = integer_field(100_000, 100, 100_000_000)
    #: replicas that must hold an invalidation's tombstones and epoch before it returns
    #: (``WAIT``); 0 returns as soon as the primary has them
    replicas: int = integer_field(0, 0, 100)
    replica_timeout: Seconds = duration_field(0.25)

    def __post_init__(self) -> None:
        self._check_fields()

    @property
    def fill_window(self) -> float:
        """Seconds after its fence (the read before SQL) within which a fill or fenced write
        may still land: half of ``fence_ttl``, so a tombstone it raced with is certainly still
        there; the other half is margin (docs/consistency.md, "The fill deadline")."""
        return self.fence_ttl / 2


@dataclass(frozen=True, slots=True)
class L1Config(Section):
    """``l1``: the optional in-process cache (``L1Cache``); ``policy`` None: no L1."""

    NAME: ClassVar[str] = "l1"

    policy: str | None = None
    max_entries: int = integer_field(100_000, 1, 100_000_000)
    max_ttl: Seconds = duration_field(5.0)
    access_sample_rate: float = number_field(DEFAULT_L1_ACCESS_SAMPLE_RATE)

    def __post_init__(self) -> None:
        self._check_fields()
        rate = self.access_sample_rate
        if not _is_number(rate) or not 0 < rate <= 1:
            raise ConfigError(f"expected a number greater than 0 and at most 1, got {rate!r}",
                              "l1.access_sample_rate")
        if self.policy is not None and self.policy not in L1_POLICIES:
            raise ConfigError(
                f"expected one of {', '.join(L1_POLICIES)}, got {self.policy!r}", "l1.policy"
            )


@dataclass(frozen=True, slots=True)
class StampedeConfig(Section):
    """``stampede``: fill leases (``lease_ttl``, how long a reader waits for another's fill:
    ``lease_wait``) and XFetch early refresh (``xfetch_beta``; 0 turns it off)."""

    NAME: ClassVar[str] = "stampede"

    lease_ttl: Seconds = duration_field(2.0)
    lease_wait: Seconds = duration_field(0.2, zero=True)
    xfetch_beta: float = number_field(1.0)

    def __post_init__(self) -> None:
        self._check_fields()
        # a number >= 0, checked by the duration parser so the messages match the others'
        beta = parse_duration(self.xfetch_beta, "stampede.xfetch_beta")
        object.__setattr__(self, "xfetch_beta", beta)


@dataclass(frozen=True, slots=True)
class DegradationConfig(Section):
    """``degradation``: the circuit breaker in front of Redis, the concurrency limit in front of
    SQL, and what a call gets when SQL fails (``on_sql_error``: ``raise``, or ``mark``: values
    become None with status ``UNAVAILABLE``)."""

    NAME: ClassVar[str] = "degradation"

    breaker_failures: int = integer_field(5, 1, 1_000_000)
    breaker_window: Seconds = duration_field(10.0)
    breaker_open_for: Seconds = duration_field(2.0)
    sql_concurrency: int = integer_field(16, 1, 10_000)
    sql_queue_timeout: Seconds = duration_field(1.0, zero=True)
    on_sql_error: str = "raise"

    def __post_init__(self) -> None:
        self._check_fields()
        if self.on_sql_error not in ("raise", "mark"):
            raise ConfigError(
                f"expected 'raise' or 'mark', got {self.on_sql_error!r}",
                "degradation.on_sql_error",
            )


@dataclass(frozen=True, slots=True)
class PopularityConfig(Section):
    """``popularity``: the sampled read counts the warmer picks its top K from
    (``PopularityCounter``); ``sample_rate`` 0 turns counting off."""

    NAME: ClassVar[str] = "popularity"

    sample_rate: float = number_field(0.05)
    bucket: Seconds = duration_field(60.0)
    buckets: int = integer_field(120, 1, 100_000)
    half_life: Seconds = duration_field(3600.0)
    flush_interval: Seconds = duration_field(1.0)

    def __post_init__(self) -> None:
        self._check_fields()
        rate = self.sample_rate
        if not _is_number(rate) or not 0 <= rate <= 1:
            raise ConfigError(f"expected a number from 0 to 1, got {rate!r}",
                              "popularity.sample_rate")


@dataclass(frozen=True, slots=True)
class StatsConfig(Section):
    """``stats``: this process's counters and call latencies published into Redis every
    ``publish_interval``, summed there per minute with every other process's and kept for
    ``retention``, for ``featcache stats`` (``StatsPublisher``). ``publish_interval: 0``
    publishes nothing and times no call (the per-view counters of ``stats()`` stay).
    ``trace_rate`` above 0 records a spatially sampled trace of reads per view, kept for
    ``trace_window`` and up to about ``trace_max_ids`` sampled reads, for ``featcache
    analyze`` (``AccessTrace``)."""

    NAME: ClassVar[str] = "stats"

    publish_interval: Seconds = duration_field(10.0, zero=True)
    retention: Seconds = duration_field(86400.0)
    trace_rate: float = number_field(0.0)
    trace_window: Seconds = duration_field(3600.0)
    trace_max_ids: int = integer_field(1_000_000, 1_000, 1_000_000_000)

    def __post_init__(self) -> None:
        self._check_fields()
        rate = self.trace_rate
        if not _is_number(rate) or not 0 <= rate <= 1:
            raise ConfigError(f"expected a number from 0 to 1, got {rate!r}", "stats.trace_rate")
        if self.retention < 60:
            raise ConfigError(f"must be at least 1m (stats are kept per minute), got "
                              f"{self.retention:g} s", "stats.retention")


@dataclass(frozen=True, slots=True)
class ServeConfig(Section):
    """``serve``: what ``featcache serve`` accepts per request (``max_ids`` entity ids,
    ``max_body`` bytes of body: more is refused with 413) and how long a stopping server
    waits for the requests in flight (``drain_timeout``)."""

    NAME: ClassVar[str] = "serve"

    max_ids: int = integer_field(10_000, 1, 10_000_000)
    max_body: int = integer_field(1_048_576, 1024, 1_073_741_824)
    drain_timeout: Seconds = duration_field(30.0)

    def __post_init__(self) -> None:
        self._check_fields()


#: the serving sections, in the order the file format lists them
SECTIONS: Final[tuple[type[Section], ...]] = (
    RedisConfig, OfflineStoreConfig, LimitsConfig, InvalidationConfig, L1Config,
    StampedeConfig, DegradationConfig, PopularityConfig, StatsConfig, ServeConfig,
)
