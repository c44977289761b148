"""The sampled trace of each view's reads, recorded into Redis for ``featcache analyze``.

With ``stats.trace_rate`` above 0, a serving call appends its ids per view (a reference to
the call's list, no copy) and the time to a buffer; no hashing, no I/O on the serving path. A
background thread, every ``flush_interval``, keeps the ids ``featcache.analysis.sampling``
keeps at that rate (SHARDS' spatial sampling: a hash of view and id, so an id's every read is
in the trace or none is) and adds, per view, one entry to the stream
``<prefix>:~<view>:trace`` holding the kept ids in read order, each one's time, the rate, and
how many reads of the view the flush covered (kept or not, so the analysis knows the whole
trace's length); a flush that kept more than ``IDS_PER_ENTRY`` ids adds several entries, its
reads shared among them. Entries older than ``stats.trace_window`` are trimmed (``XADD MINID
~``), the stream is trimmed to its newest ``stats.trace_max_ids / IDS_PER_ENTRY`` entries
(``XTRIM MAXLEN``) and expires ``trace_window`` after its last write: its memory is about
``rate x reads per second x window x 15 bytes``, and never more than about ``trace_max_ids x
15 bytes`` (about 15 MB per view by default), whatever the read rate. The buffer of calls
holds at most one flush interval's worth: a flush takes all of it, even when Redis fails.

``read_trace`` reads a view's stream back (pages of ``XRANGE``); processes configured with
different rates leave entries of different rates, so every id is filtered again at the
lowest rate found, which keeps a consistent sample (what a rate keeps, every higher rate
keeps too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from featcache.errors import FeatcacheError
from featcache.keys import KeyLayout
from featcache.outage import OutageLog
from featcache.redis_store import Command, RedisStore
from featcache.request import EntityId

__all__ = ["IDS_PER_ENTRY", "AccessTrace", "RecordedTrace", "read_trace"]

log = logging.getLogger("featcache.trace")

_PAGE = 1000  # stream entries per XRANGE
#: the most ids one stream entry holds (about 15 KB): the unit ``trace_max_ids`` is kept in
IDS_PER_ENTRY = 1000


class AccessTrace:
    """Records sampled reads of every view; ``close`` flushes what is buffered."""

    def __init__(
        self,
        store: RedisStore,
        layout: KeyLayout,
        rate: float,
        window: float,
        *,
        max_ids: int = 1_000_000,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._layout = layout
        self.rate = rate
        self._window_ms = int(window * 1000)
        self._max_entries = max(1, max_ids // IDS_PER_ENTRY)
        self._interval = flush_interval
        self._clock = clock
        self._pending: deque[tuple[str, Sequence[EntityId], float]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.flushed_reads = 0
        self.errors = 0
        self._outage = OutageLog(log, f"Redis {store.url}")

    def record(self, view: str, ids: Sequence[EntityId]) -> None:
        """A call read ``ids`` of ``view``: one append (thread-safe, no lock)."""
        self._pending.append((view, ids, self._clock()))
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="featcache-trace",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> int:
        """Write what is buffered; how many reads it covered (0 if Redis failed: those
        reads are not in the trace, which samples reads and may miss some)."""
        from featcache.analysis.sampling import sampled  # noqa: PLC0415 - only when tracing

        pending = self._pending
        taken: list[tuple[str, Sequence[EntityId], float]] = []
        while pending:
            taken.append(pending.popleft())
        if not taken:
            return 0
        per_view: dict[str, tuple[list[EntityId], list[int], list[int]]] = {}
        rate = self.rate
        for view, ids, at in taken:
            kept, times, reads = per_view.setdefault(view, ([], [], [0]))
            reads[0] += len(ids)
            at_ms = int(at * 1000)
            for entity in ids:
                if sampled(view, entity, rate):
                    kept.append(entity)
                    times.append(at_ms)
        now_ms = int(time.time() * 1000)  # stream ids are the server's wall clock, not ours
        commands: list[Command] = []
        for view, (kept, times, reads) in per_view.items():
            key = self._layout.trace_key(view)
            for start, n in _entries(len(kept), reads[0]):
                end = start + IDS_PER_ENTRY
                commands.append(Command("XADD", key, (
                    "MINID", "~", now_ms - self._window_ms, "*", "r", repr(rate), "n", n,
                    "i", msgpack.packb(kept[start:end]), "t", msgpack.packb(times[start:end]))))
            commands += [Command("XTRIM", key, ("MAXLEN", self._max_entries)),
                         Command("PEXPIRE", key, (self._window_ms,))]
        try:
            self._store.execute(commands)
        except FeatcacheError as exc:
            self.errors += 1
            self._outage.failed("access trace not recorded", exc)
            return 0
        self._outage.ok()
        covered = sum(reads[0] for _, _, reads in per_view.values())
        self.flushed_reads += covered
        return covered

    def close(self) -> None:
        """Stop the thread and flush what is buffered; once."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


def _entries(kept: int, reads: int) -> list[tuple[int, int]]:
    """Where each stream entry of one view's flush starts in its kept ids, and the reads it
    stands for: the flush's reads shared in proportion to the ids, so trimming old entries
    leaves the count of reads matching the ids that stay."""
    if kept <= IDS_PER_ENTRY:
        return [(0, reads)]
    starts = range(0, kept, IDS_PER_ENTRY)
    shares = [reads * min(IDS_PER_ENTRY, kept - start) // kept for start in starts]
    shares[-1] += reads - sum(shares)
    return list(zip(starts, shares, strict=True))


@dataclass(frozen=True)
class RecordedTrace:
    """A view's recorded sample: kept ids in read order, each one's time (seconds), the rate
    they were kept at, and how many reads the recording covered in all."""

    ids: list[EntityId]
    times: list[float]
    rate: float
    reads: int


def read_trace(store: RedisStore, layout: KeyLayout, view: str) -> RecordedTrace | None:
    """The trace recorded for ``view``, or None when there is none."""
    from featcache.analysis.sampling import sampled  # noqa: PLC0415 - the analysis side

    key = layout.trace_key(view)
    entries: list[tuple[float, int, list[Any], list[int]]] = []
    start = "-"
    while True:
        (page,) = store.execute([Command("XRANGE", key, (start, "+", "COUNT", _PAGE))])
        for _, fields in page:
            data = _fields(fields)
            entries.append((float(data[b"r"]), int(data[b"n"]),
                            msgpack.unpackb(data[b"i"]), msgpack.unpackb(data[b"t"])))
        if len(page) < _PAGE:
            break
        last = page[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    if not entries:
        return None
    rate = min(entry[0] for entry in entries)
    reads = 0
    accesses: list[tuple[int, EntityId]] = []
    for entry_rate, n, kept, at in entries:
        reads += n
        accesses.extend((at_ms, entity) for entity, at_ms in zip(kept, at, strict=True)
                        if entry_rate == rate or sampled(view, entity, rate))
    # several processes' flushes interleave: read order is time order (stable within one)
    accesses.sort(key=lambda access: access[0])
    return RecordedTrace([e for _, e in accesses], [t / 1000 for t, _ in accesses], rate,
                         reads)


def _fields(fields: Any) -> dict[bytes, Any]:
    """A stream entry's fields: a flat [name, value, ...] list or a mapping."""
    if isinstance(fields, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in fields.items()}
    return {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
