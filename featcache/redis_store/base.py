"""The Redis store's interface: what every backend implements, and the types it speaks.

Every Redis command, script and stream read featcache sends goes through a ``RedisStore``; the
read path, the writers, the fences, invalidation, leases, popularity, the subscriber and the
warmer see only this interface, so a backend (``featcache.redis_store.standalone`` today; a
cluster or Sentinel one) plugs in without touching them. Values are opaque bytes: nothing read
is ever unpickled or evaluated. Keys are spelled by ``featcache.keys`` alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import hiredis

__all__ = [
    "Command",
    "IfAbsent",
    "LuaScript",
    "Packing",
    "RedisStore",
    "ScriptCall",
    "StreamTail",
    "TimedRead",
    "WriteBatch",
    "WriteItem",
    "coalesce",
    "coalesced",
    "fenced_write",
    "pack",
    "row_write",
    "split_if_absent",
]


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, by hiredis' C packer (str, bytes, int and float arguments): the
    backends send commands packed so, without redis-py's per-argument pass."""
    packed: bytes = hiredis.pack_command(args)
    return packed


#: the most bytes of commands joined into one socket write (``coalesce``)
WRITE_BYTES = 65_536


def coalesce(packed: Sequence[bytes], limit: int = WRITE_BYTES) -> list[bytes]:
    """Packed commands joined into writes of about ``limit`` bytes: redis-py's
    ``send_packed_command`` calls ``sendall`` once per item, so 64 small MGETs would be 64
    system calls, while one write of megabytes would have to finish within one socket
    timeout (Python's limit covers the whole ``sendall``) even while the server is busy."""
    return list(coalesced(packed, limit))


class Packing:
    """Commands packed as they are sent, joined as by ``coalesce``: handed to redis-py's
    ``send_packed_command``, each write goes out as soon as it is packed, so the server runs
    a bulk write's first script while the rest are packed. Iterating again packs again: a
    connection class that looks at what it sends before sending it still sends it all."""

    __slots__ = ("_commands", "count")

    def __init__(self, commands: Callable[[], Iterable[bytes]], count: int) -> None:
        self._commands = commands
        self.count = count  #: how many commands, hence replies

    def commands(self) -> Iterable[bytes]:
        """The commands one by one, packed as they are taken."""
        return self._commands()

    def __iter__(self) -> Iterator[bytes]:
        return coalesced(self._commands())


def coalesced(packed: Iterable[bytes], limit: int = WRITE_BYTES) -> Iterator[bytes]:
    """``coalesce`` as it goes: each write is yielded as soon as it is full."""
    buffer: list[bytes] = []
    size = 0
    for command in packed:
        buffer.append(command)
        size += len(command)
        if size >= limit:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


class LuaScript:
    """A server-side script, sent by its SHA-1 and loaded only when the server lacks it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis' script id


class ScriptCall(NamedTuple):
    """One script run of a pipelined round trip. In a cluster, a call's keys share one slot."""

    script: LuaScript
    keys: Sequence[str]
    args: Sequence[Any]


class Command(NamedTuple):
    """One command of a pipelined round trip (``execute``): its name, the one key it touches
    (how a cluster backend routes it), and its other arguments."""

    name: str
    key: str
    args: tuple[Any, ...] = ()


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
    #: the epoch the rows are stamped with, when not ``epoch_seen``: a cluster's write scripts
    #: judge old rows' epochs against it (they cannot read the epoch key's slot)
    rows_epoch: bytes | None = None


def split_if_absent(batch: WriteBatch) -> tuple[list[WriteItem], list[IfAbsent]]:
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


class StreamTail(Protocol):
    """A connection of its own for following one stream (``XREAD BLOCK`` holds it).

    Errors come translated (``CacheUnavailable``, ``CacheConfigError``), as from the store.
    """

    description: str  #: where it reads from, with any password masked

    def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` on this connection (loaded when the server lacks it)."""

    def block(self, stream: str, after_id: str, block_ms: int) -> None:
        """Return when an entry after ``after_id`` exists, or after ``block_ms``."""

    def interrupt(self) -> None:
        """From another thread: end a blocked read now (it raises in the reading thread)."""

    def close(self) -> None: ...


class TimedRead(Protocol):
    """A ``read_timed`` prepared (its commands packed) but not yet sent: ``send()`` sends it
    without waiting for the answer, ``result()`` (once, after or without ``send()``) returns
    what ``read_timed`` returns. A bulk writer prepares the next fence while a write is in
    flight and sends it the moment the write lands."""

    def send(self) -> None: ...

    def result(self) -> tuple[list[bytes | None], int]: ...


class RedisStore(Protocol):
    """Round trips to Redis/Valkey: what every backend implements.

    Each method is one network round trip per server involved, whatever the number of keys;
    a failure raises ``CacheUnavailable`` (an outage: callers degrade) or ``CacheConfigError``
    (credentials, permissions, database: never degraded).
    """

    url: str  #: the server (or seed), with any password masked
    #: whether replicas answer reads: every invalidation must then be held by each replica
    #: that serves reads before it returns (``eval_replicated`` waits for them all)
    replica_reads: bool

    @property
    def client(self) -> Any:
        """The redis-py client behind it, for applications that inspect Redis."""

    def read(self, keys: Sequence[str], slots: Sequence[int] | None = None
             ) -> list[bytes | None]:
        """Values in key order, None where absent. ``slots``: each key's cluster hash slot when
        the caller knows them (``KeyLayout.row_slots``), which a cluster backend then need
        not compute; others ignore it."""

    def read_timed(self, keys: Sequence[str]) -> tuple[list[bytes | None], int]:
        """``read``, and the server's clock (microseconds) when it ran: the clock the write
        scripts judge a fence's deadline on (``WriteBatch.deadline_us``)."""

    def timed_read(self, keys: Sequence[str]) -> TimedRead:
        """``read_timed`` in steps: prepared now, sent by ``send()``, answered by
        ``result()``, so that the caller times when the server sees it."""

    def write(self, batches: Sequence[WriteBatch]) -> int:
        """Conditionally write rows of several views; how many keys were written (the rest
        were fenced off or older than what Redis holds)."""

    def ensure_epochs(self, epoch_keys: Sequence[str]) -> list[bytes]:
        """The epochs of these views, creating missing ones from the server clock."""

    def eval_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run each script call; results in call order."""

    def eval_many(
        self, script: LuaScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """``eval_scripts`` of one script over several (keys, args)."""

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Run each command; replies in order (an error reply raises, translated)."""

    def eval_replicated(
        self, calls: Sequence[ScriptCall], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        """``eval_scripts``, then ``WAIT`` on the same connection: the results, and how many
        replicas hold what the calls wrote (at most ``replicas``; fewer when ``timeout_ms``
        ran out)."""

    def open_tail(self, socket_timeout: float) -> StreamTail:
        """A new connection of its own for an invalidation stream's tail."""

    def close(self) -> None: ...
