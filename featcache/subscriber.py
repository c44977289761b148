"""Tails the invalidation stream so an in-process L1 cache can drop what was invalidated.

``featcache.invalidation`` appends one entry per invalidation to ``<prefix>:~stream``; every
process with an L1 runs one ``InvalidationSubscriber`` that reads those entries from a
background thread and calls back into the L1. The DESIGN rules it implements:

* It tails the stream **from its last id**, so a blip costs a replay, not a clear. The
  position is fixed synchronously in ``start()`` (the stream's last generated id, or ``0-0``
  when it does not exist yet), so an entry written right after ``start()`` returns is never
  missed and nothing written before it is replayed.
* When it finds a **gap** it clears the L1 (``on_reset("gap")``) and goes on from the stream's
  current end: the stream is gone (DEL, server restart without persistence) while we had a
  position, or entries we never read were removed (``MAXLEN`` trimming overtook us, XDEL), or
  the stream was recreated under us. The check runs **in the same atomic Lua call as every
  read** (``_SNAPSHOT``), not only now and then: a subscriber that falls behind while
  connected would otherwise skip trimmed entries silently (XREAD from an id that was trimmed
  away just returns what is left).
* When it **loses its connection** it clears the L1 (``on_reset("connection lost")``), backs
  off, reconnects, and resumes from its last id: the replay covers what was published
  meanwhile, and the gap check covers what was trimmed meanwhile.
* Every L1 entry also has a maximum TTL (``featcache.l1``); that, not this thread, is the last
  bound on staleness. Pub/sub alone would be at-most-once, hence a stream.

Ids arrive msgpack-packed and are decoded with ``msgpack.unpackb`` only (never pickle or
eval); an entry that does not decode as documented clears the L1 (``"undecodable entry"``),
since we cannot tell what it invalidated. A callback that raises is logged and counted and,
because the rows it should have dropped may still be cached, followed by
``on_reset("callback error")``; nothing a callback does can kill the thread.

The subscriber needs its own connection: ``XREAD BLOCK`` holds it for up to ``block_ms``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import msgpack

from featcache.errors import CacheUnavailable, ConfigError, FeatcacheError
from featcache.redis_store import LuaScript, StreamTail, open_tail

__all__ = [
    "RESET_CALLBACK_ERROR",
    "RESET_CONNECTION_LOST",
    "RESET_GAP",
    "RESET_UNDECODABLE",
    "InvalidationSubscriber",
]

log = logging.getLogger("featcache.subscriber")

#: ``on_reset`` reasons. Every one means "drop everything": the L1 cannot know which rows
#: the missed or unreadable invalidations were about.
RESET_GAP: Final = "gap"
RESET_CONNECTION_LOST: Final = "connection lost"
RESET_UNDECODABLE: Final = "undecodable entry"
RESET_CALLBACK_ERROR: Final = "callback error"

EntityId = int | str
OnIds = Callable[[str, list[EntityId]], object]
OnView = Callable[[str], object]
OnReset = Callable[[str], object]
#: Where the dedicated connection comes from: a URL, ``redis.Redis(**kwargs)``, or a factory
#: of a new ``redis.Redis`` (or of a ``StreamTail``: ``RedisStore.open_tail``).
ConnectionSource = str | Mapping[str, Any] | Callable[[], Any]

StreamId = tuple[int, int]
ZERO: Final[StreamId] = (0, 0)
_MAX_SEQ: Final = 2**64 - 1

# One atomic snapshot: the stream's bookkeeping and the next batch of entries, so the gap
# check and the read see the same stream (a trim between the two would otherwise go unseen).
# XINFO runs server-side and only four ids travel back, not the first and last entries XINFO
# embeds (which can be a thousand ids each).
# KEYS[1]: the stream. ARGV[1]: first id to read (inclusive), ARGV[2]: COUNT (0: no read),
# ARGV[3]: the id of the last entry read ('' for none).
# Returns {type} when the key is not a stream ('none' when missing), else
# {'stream', last-generated-id, max-deleted-entry-id ('' before Redis 7), first entry id
#  ('' when empty), entries-added ('' before Redis 7), length, entries, the entry now at the
#  last id read ({} when there is none)}.
_SNAPSHOT = LuaScript("""
local kind = redis.call('TYPE', KEYS[1])
if type(kind) == 'table' then kind = kind['ok'] end
if kind ~= 'stream' then return {kind} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted, first, added, length = '', '', '', '', 0
for i = 1, #info, 2 do
  local name, value = info[i], info[i + 1]
  if name == 'last-generated-id' then last = value
  elseif name == 'max-deleted-entry-id' then deleted = value
  elseif name == 'entries-added' then added = tostring(value)
  elseif name == 'length' then length = value
  elseif name == 'first-entry' and type(value) == 'table' then first = value[1]
  end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
local at_last = {}
if ARGV[3] ~= '' then at_last = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) end
return {kind, last, deleted, first, added, length, entries, at_last}
""")



def parse_id(raw: bytes | str) -> StreamId:
    """A stream id as an ``(ms, seq)`` tuple, so ids compare numerically, not as text
    (``"9-0" > "10-0"`` as strings)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, sep, seq = text.partition("-")
    value = (int(ms), int(seq) if sep else 0)
    if value[0] < 0 or value[1] < 0 or value[1] > _MAX_SEQ:
        raise ValueError(f"not a stream id: {text!r}")
    return value


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _successor(sid: StreamId) -> StreamId:
    ms, seq = sid
    return (ms, seq + 1) if seq < _MAX_SEQ else (ms + 1, 0)


@dataclass(frozen=True, slots=True)
class _StreamInfo:
    last_generated: StreamId
    max_deleted: StreamId | None  # None: the server predates Redis 7
    first: StreamId | None  # None: the stream is empty
    entries_added: int | None  # None: the server predates Redis 7
    length: int


def _find_gap(info: _StreamInfo | None, last: StreamId) -> str | None:
    """Why entries after ``last`` may have been lost, or None; ``info`` None = no stream.

    Trimming (``MAXLEN``) does not move ``max-deleted-entry-id``, only XDEL does, so the
    trimming test is on the first entry: if it is beyond the successor of our last id,
    something we never read was removed. It can misfire in one case, trimming that stopped
    exactly at our last entry while the next one has a later timestamp; then we clear for
    nothing, which is safe, and only happens to a subscriber already ``MAXLEN`` entries behind.
    """
    if info is None:
        return "the stream is gone" if last != ZERO else None
    if info.last_generated < last:
        return "the stream was recreated (its ids went backwards)"
    if info.max_deleted is not None and info.max_deleted > last:
        return "an entry we had not read was deleted"
    if last == ZERO:
        # Everything ever added is unread: any removal at all is a gap.
        if info.entries_added is not None and info.entries_added > info.length:
            return "entries we had not read were trimmed"
        return None
    if info.first is None:
        if info.last_generated > last:
            return "entries we had not read were trimmed"
        return None
    if info.first > _successor(last):
        return "entries we had not read were trimmed, or the stream was recreated"
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Undecodable(ValueError):
    """A stream entry that does not follow the documented format."""


def _decode_entry(fields: Mapping[bytes, bytes]) -> tuple[str, list[EntityId] | None]:
    """(view, ids), ids None for a whole-view entry; raises ``_Undecodable``."""
    try:
        view = fields[b"v"].decode("utf-8")
        kind = fields[b"k"]
    except (KeyError, UnicodeDecodeError) as exc:
        raise _Undecodable(f"bad view or kind: {exc!r}") from None
    if not view:
        raise _Undecodable("empty view name")
    if kind == b"all":
        return view, None
    if kind != b"ids":
        raise _Undecodable(f"unknown kind {kind!r}")
    packed = fields.get(b"ids")
    if packed is None:
        raise _Undecodable("an 'ids' entry without ids")
    try:
        ids = msgpack.unpackb(packed, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise _Undecodable(f"ids are not msgpack: {exc!r}") from None
    if not isinstance(ids, list) or not all(
        isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in ids
    ):
        raise _Undecodable("ids are not a list of int or str")
    return view, ids


def _fields(raw: Any) -> dict[bytes, bytes]:
    """A flat [field, value, ...] list (the Lua reply) as a dict."""
    if isinstance(raw, Mapping):
        return {bytes(k): bytes(v) for k, v in raw.items()}
    items = list(raw)
    return {bytes(items[i]): bytes(items[i + 1]) for i in range(0, len(items) - 1, 2)}


class InvalidationSubscriber:
    """One background thread applying the invalidation stream to callbacks (see module doc).

    ``connection`` is where the subscriber's own connection comes from:

    * a URL (``redis://``, ``rediss://``, ``unix://``), or a mapping of ``redis.Redis``
      keyword arguments: the subscriber builds the client with ``socket_timeout``
      (default ``block_ms`` plus ``max(1 s, block_ms)``, so a blocked XREAD is never mistaken
      for a dead server, but a hung server is noticed), ``connect_timeout`` and no retries
      (it does its own backoff, and redis-py's default retries would make ``stop()`` slow);
    * a factory returning a **new, dedicated** ``redis.Redis`` each call: the subscriber
      disables its retries, closes it when done, and disconnects it from another thread to
      interrupt a blocked read. It must have ``decode_responses=False`` (ids are binary) and a
      ``socket_timeout`` longer than ``block_ms``; both are checked in ``start()``;
    * a factory returning a ``StreamTail`` (``RedisStore.open_tail``): what ``FeatureCache``
      passes, so the tail reads from whatever backend the cache's store is.

    The connection itself is the Redis store's (``featcache.redis_store``): this module holds
    the policy (position, gap checks, applying entries, backoff), not the commands.

    Callbacks run on the subscriber thread, in stream order: ``on_ids(view, ids)`` for a
    per-entity invalidation, ``on_view(view)`` for a whole view, ``on_reset(reason)`` to drop
    everything (``RESET_*``). They should be quick: the next entry waits for them.

    Single use: ``start()`` once, ``stop()`` any number of times. Start it before the L1 serves
    anything (or clear the L1 right after ``start()``): entries before the start are not
    replayed.
    """

    def __init__(
        self,
        connection: ConnectionSource,
        stream_key: str,
        *,
        on_ids: OnIds,
        on_view: OnView,
        on_reset: OnReset,
        block_ms: int = 1000,
        batch: int = 1000,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
        socket_timeout: float | None = None,
        connect_timeout: float = 2.0,
        name: str = "featcache-invalidation",
    ) -> None:
        if not stream_key:
            raise ConfigError("the stream key must not be empty", "stream_key")
        if not isinstance(block_ms, int) or not 1 <= block_ms <= 60_000:
            raise ConfigError(f"expected 1..60000 ms, got {block_ms!r}", "block_ms")
        if not isinstance(batch, int) or not 1 <= batch <= 100_000:
            raise ConfigError(f"expected 1..100000, got {batch!r}", "batch")
        initial, maximum = reconnect_backoff
        if not 0 < initial <= maximum:
            raise ConfigError(
                f"expected (initial, max) seconds with 0 < initial <= max, got "
                f"{reconnect_backoff!r}",
                "reconnect_backoff",
            )
        block_s = block_ms / 1000
        if socket_timeout is None:
            socket_timeout = block_s + max(1.0, block_s)
        if socket_timeout <= block_s:
            raise ConfigError(
                f"must exceed block_ms ({block_ms} ms), or every idle XREAD BLOCK times out: "
                f"got {socket_timeout} s",
                "socket_timeout",
            )
        if connect_timeout <= 0:
            raise ConfigError(f"expected > 0 seconds, got {connect_timeout!r}", "connect_timeout")
        self._source = connection
        self.stream_key = stream_key
        self._on_ids = on_ids
        self._on_view = on_view
        self._on_reset = on_reset
        self.block_ms = block_ms
        self.batch = batch
        self._backoff = (float(initial), float(maximum))
        self._socket_timeout = float(socket_timeout)
        self._connect_timeout = float(connect_timeout)
        self.name = name

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tail_lock = threading.Lock()  # guards _tail against stop()'s interrupt
        self._tail: StreamTail | None = None
        self._lock = threading.Lock()  # guards the fields stats() reads
        self._last: StreamId = ZERO
        #: the fields of the entry at ``_last`` as read (None: not read yet): a stream
        #: recreated within that entry's millisecond repeats its id, but not its content
        self._last_fields: dict[bytes, bytes] | None = None
        self._connected = False
        self._outage = False
        self._caught_up = False
        self._delay = self._backoff[0]  # the next reconnect wait, doubled per failure
        self._bad_kind = ""  # the key's type when it is not a stream, so we log it once
        self._counts = dict.fromkeys(
            (
                "entries_applied", "ids_applied", "views_applied", "resets", "gaps",
                "reconnects", "callback_errors", "undecodable",
            ),
            0,
        )

    # ----------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------

    def start(self, from_id: str | None = None) -> str:
        """Fix the position, then start the thread; returns the position (``ms-seq``).

        ``from_id`` None: the stream's last generated id, or ``0-0`` when the stream does not
        exist yet, so its first entry ever is read. A given ``from_id`` (a ``last_id`` saved
        from an earlier subscriber) resumes after it; a gap since then calls
        ``on_reset("gap")`` first. Raises ``CacheUnavailable`` if Redis cannot be reached (no
        thread is left running) and ``ConfigError`` for a bad ``from_id`` or client.
        """
        if self._thread is not None:
            raise RuntimeError("an InvalidationSubscriber can be started only once")
        if from_id is not None:
            try:
                position = parse_id(from_id)
            except ValueError:
                raise ConfigError(f"not a stream id: {from_id!r}", "from_id") from None
        try:
            tail = self._new_tail()
            with self._tail_lock:
                self._tail = tail
            if from_id is None:
                kind, info, _, _ = self._snapshot(tail, ZERO, 0, None)
                if kind not in ("stream", "none"):
                    raise CacheUnavailable(
                        f"{self.stream_key!r} is a {kind}, not a stream"
                    )
                position = info.last_generated if info is not None else ZERO
        except CacheUnavailable as exc:
            self._close_tail()
            raise CacheUnavailable(
                f"invalidation stream {self.stream_key!r}: {exc}"
            ) from exc
        except BaseException:
            self._close_tail()
            raise
        with self._lock:
            self._last = position
            self._connected = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return format_id(position)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and close the connection; True once the thread has ended.

        Idempotent. The connection is shut down from here so a blocked XREAD (or a read from
        a hung server) returns at once instead of after ``block_ms`` or ``socket_timeout``.
        Called from a callback (on the thread itself) it only asks the thread to end.
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False
        deadline = time.monotonic() + max(0.0, timeout)
        self._interrupt()
        thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
        if thread.is_alive():  # it may have opened a new connection after the first interrupt
            self._interrupt()
            thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("invalidation subscriber %s did not stop within %.1f s", self.name,
                        timeout)
            return False
        return True

    def __enter__(self) -> InvalidationSubscriber:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def thread(self) -> threading.Thread | None:
        """The background thread (None before ``start()``), for health checks and tests."""
        return self._thread

    @property
    def last_id(self) -> str:
        """The id of the last entry applied (or the start position); resume from it."""
        with self._lock:
            return format_id(self._last)

    def stats(self) -> dict[str, Any]:
        """Counters since construction, plus where we are.

        ``lag_ms`` is 0 when the last read drained the stream, else the age of the last
        applied entry by our clock (ids carry the server's clock; skew is clamped at 0), and
        None when unknown (no position yet). ``connected`` is False during an outage.
        """
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            last = self._last
            connected = self._connected
            caught_up = self._caught_up
        out["last_id"] = format_id(last)
        out["connected"] = connected
        if connected and caught_up:
            out["lag_ms"] = 0
        elif last == ZERO:
            out["lag_ms"] = None
        else:
            out["lag_ms"] = max(0, int(time.time() * 1000) - last[0])
        thread = self._thread
        out["running"] = thread is not None and thread.is_alive()
        return out

    # ----------------------------------------------------------------------------------
    # Connection
    # ----------------------------------------------------------------------------------

    def _new_tail(self) -> StreamTail:
        """A new connection of its own, from ``connection`` (the Redis store builds it)."""
        source = self._source
        if callable(source) and not isinstance(source, str | Mapping):
            made = source()
            if hasattr(made, "block") and hasattr(made, "run_script"):  # RedisStore.open_tail's
                tail: StreamTail = made
                return tail
            source = (lambda: made)  # noqa: E731 - a redis.Redis: the store checks it
        return open_tail(source, socket_timeout=self._socket_timeout,
                         connect_timeout=self._connect_timeout, block_ms=self.block_ms)

    def _close_tail(self) -> None:
        with self._tail_lock:
            tail, self._tail = self._tail, None
        if tail is not None:
            tail.close()

    def _interrupt(self) -> None:
        """End a blocked read (from another thread)."""
        with self._tail_lock:
            if self._tail is not None:
                self._tail.interrupt()

    # ----------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as exc:
                    if self._stop.is_set():
                        break  # stop() shut the socket down under us: expected
                    self._lost(exc)
        except BaseException:  # pragma: no cover - a bug; never let it escape the thread
            log.exception("invalidation subscriber %s crashed", self.name)
        finally:
            self._close_tail()
            with self._lock:
                self._connected = False

    def _step(self) -> None:
        """One snapshot (gap check + a batch), then a blocking wait if we are caught up."""
        with self._tail_lock:
            tail = self._tail
        if tail is None:
            tail = self._new_tail()
            with self._tail_lock:
                if self._stop.is_set():
                    tail.close()
                    return
                self._tail = tail
        with self._lock:
            last = self._last
        kind, info, entries, at_last = self._snapshot(tail, _successor(last), self.batch, last)
        if self._outage:
            self._outage = False
            with self._lock:
                self._counts["reconnects"] += 1
            log.info("invalidation subscriber %s reconnected to %s", self.name,
                     tail.description)
        with self._lock:
            self._connected = True
        self._delay = self._backoff[0]
        if kind not in ("stream", "none") and kind != self._bad_kind:
            log.warning("%r is a %s, not a stream: treating it as gone", self.stream_key, kind)
        self._bad_kind = kind if kind not in ("stream", "none") else ""
        gap = _find_gap(info, last)
        if gap is None and at_last is not None:
            if self._last_fields is None:
                self._last_fields = at_last  # the position we started from: its content now
            elif at_last != self._last_fields:
                gap = "the stream was recreated (the entry at our last id is another one)"
        if gap is not None:
            restart = info.last_generated if info is not None else ZERO
            log.warning(
                "invalidation stream %r: %s (we were at %s); clearing the L1 and going on "
                "from %s", self.stream_key, gap, format_id(last), format_id(restart),
            )
            with self._lock:
                self._last = restart
                self._last_fields = None
                self._counts["gaps"] += 1
                self._caught_up = False
            # The entries of this snapshot are all <= restart: the reset covers them.
            self._reset(RESET_GAP)
            return
        for entry_id, fields in entries:
            if self._stop.is_set():
                return
            self._apply(entry_id, fields)
        drained = len(entries) < self.batch
        with self._lock:
            self._caught_up = drained
        if not drained or self._stop.is_set():
            return
        if kind not in ("stream", "none"):
            self._stop.wait(self.block_ms / 1000)  # XREAD would fail with WRONGTYPE
            return
        # Caught up: wait for the next entry. What this returns is not used: the next
        # snapshot reads it together with the gap check.
        with self._lock:
            last = self._last
        tail.block(self.stream_key, format_id(last), self.block_ms)

    def _snapshot(
        self, tail: StreamTail, read_from: StreamId, count: int, last: StreamId | None
    ) -> tuple[str, _StreamInfo | None, list[tuple[StreamId, dict[bytes, bytes]]],
               dict[bytes, bytes] | None]:
        """(type, stream info, entries from ``read_from``, the fields of the entry at ``last``
        or None when there is none), in one atomic call."""
        args = (format_id(read_from), count,
                format_id(last) if last is not None and last != ZERO else "")
        reply = tail.run_script(_SNAPSHOT, [self.stream_key], args)
        kind = _text(reply[0])
        if kind != "stream":
            return kind, None, [], None
        _, last_id, deleted, first, added, length, raw_entries, at_last = reply
        info = _StreamInfo(
            last_generated=parse_id(last_id),
            max_deleted=parse_id(deleted) if deleted else None,
            first=parse_id(first) if first else None,
            entries_added=int(added) if added else None,
            length=int(length),
        )
        entries = [(parse_id(raw[0]), _fields(raw[1])) for raw in raw_entries]
        return kind, info, entries, _fields(at_last[0][1]) if at_last else None

    def _lost(self, exc: Exception) -> None:
        """The connection failed: clear once per outage, then back off and reconnect."""
        self._close_tail()
        if not self._outage:
            self._outage = True
            with self._lock:
                self._connected = False
                self._caught_up = False
            if isinstance(exc, FeatcacheError):  # the store's: an outage or a refusal
                log.warning("invalidation subscriber %s lost the stream %r: %s; clearing the "
                            "L1", self.name, self.stream_key, exc)
            else:
                log.error("invalidation subscriber %s failed; clearing the L1", self.name,
                          exc_info=exc)
            self._reset(RESET_CONNECTION_LOST)
            self._delay = self._backoff[0]
        else:
            log.debug("invalidation subscriber %s: still no connection: %s", self.name, exc)
        delay = self._delay
        self._delay = min(self._backoff[1], delay * 2)
        # Jitter, so a fleet of processes does not reconnect in lockstep after an outage.
        self._stop.wait(delay * random.uniform(0.5, 1.0))

    # ----------------------------------------------------------------------------------
    # Applying entries
    # ----------------------------------------------------------------------------------

    def _apply(self, entry_id: StreamId, fields: Mapping[bytes, bytes]) -> None:
        try:
            view, ids = _decode_entry(fields)
        except _Undecodable as exc:
            log.warning("invalidation stream %r: entry %s is undecodable (%s); clearing the L1",
                        self.stream_key, format_id(entry_id), exc)
            with self._lock:
                self._last = entry_id
                self._last_fields = dict(fields)
                self._counts["undecodable"] += 1
            self._reset(RESET_UNDECODABLE)
            return
        try:
            if ids is None:
                self._on_view(view)
            else:
                self._on_ids(view, ids)
        except Exception:
            log.exception("invalidation callback failed on entry %s (view %r); clearing the L1",
                          format_id(entry_id), view)
            with self._lock:
                self._last = entry_id
                self._last_fields = dict(fields)
                self._counts["callback_errors"] += 1
            self._reset(RESET_CALLBACK_ERROR)
            return
        with self._lock:
            self._last = entry_id
            self._last_fields = dict(fields)
            self._counts["entries_applied"] += 1
            if ids is None:
                self._counts["views_applied"] += 1
            else:
                self._counts["ids_applied"] += len(ids)

    def _reset(self, reason: str) -> None:
        with self._lock:
            self._counts["resets"] += 1
        try:
            self._on_reset(reason)
        except Exception:
            log.exception("on_reset(%r) failed", reason)
            with self._lock:
                self._counts["callback_errors"] += 1
