"""Cluster-wide stats in Redis: this process's counters published in the background, and
every process's read back summed over a window (``featcache stats``).

Every ``stats.publish_interval`` a serving process sends one pipelined round trip: an
``HINCRBY`` of each count that moved since its last publish (``CacheStats.totals``: events
per view, calls per view, tier and latency bucket) into the hash of the current minute,
``<prefix>:~:stats:<minute start>``, that hash's ``EXPIRE`` (``stats.retention``), and a
``ZADD`` of the process into ``<prefix>:~:stats:procs`` (score: when it published). Every
process adds into the same minute's hash, so a window's figures are the sum of its minutes'
hashes, field by field: no process has to be alive to be counted, and none is counted
twice. Counts land in the minute they were published, up to one interval after they were
counted. A publish that fails is retried with the next one (the counts are deltas against
the last publish that succeeded); one that timed out after Redis applied it counts twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featcache.config_sections import StatsConfig
from featcache.errors import FeatcacheError
from featcache.keys import KeyLayout
from featcache.outage import OutageLog
from featcache.redis_store import Command, RedisStore
from featcache.stats import CacheStats

__all__ = ["StatsPublisher", "StatsWindow", "process_id", "read_window"]

log = logging.getLogger("featcache.stats")

MINUTE = 60


def process_id() -> str:
    """``host:pid:random``: names a publishing process in ``featcache stats``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class StatsPublisher:
    """Publishes ``stats`` (the views' counters and the prediction caches': their names do not
    meet) every ``config.publish_interval`` from a daemon thread (started by ``start``), and
    once more on ``close``."""

    def __init__(
        self,
        store: RedisStore,
        layout: KeyLayout,
        config: StatsConfig,
        stats: Sequence[CacheStats],
        *,
        clock: Callable[[], float] = time.time,
        name: str | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._interval = config.publish_interval
        self._retention = max(MINUTE, int(config.retention))
        self._stats = tuple(stats)
        self._clock = clock
        self.name = name or process_id()
        self._published: dict[str, int] = {}
        self._lock = threading.Lock()  # one publish at a time: deltas against one baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.publishes = 0
        self.errors = 0
        self._outage = OutageLog(log, f"Redis {store.url}")

    def start(self) -> None:
        if self._interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="featcache-stats",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.publish()

    def publish(self) -> int:
        """Send what moved since the last publish; how many fields moved (0 when nothing did
        or Redis failed: the next publish carries them)."""
        with self._lock:
            totals: dict[str, int] = {}
            for source in self._stats:
                totals.update(source.totals())
            published = self._published
            moved = {field: n - published.get(field, 0) for field, n in totals.items()
                     if n != published.get(field, 0)}
            now = self._clock()
            minute = int(now // MINUTE) * MINUTE
            key = self._layout.stats_key(minute)
            procs = self._layout.stats_processes_key()
            commands = [Command("HINCRBY", key, (field, n)) for field, n in moved.items()]
            if commands:
                commands.append(Command("EXPIRE", key, (self._retention,)))
            commands += [
                Command("ZADD", procs, (now, self.name)),
                Command("ZREMRANGEBYSCORE", procs, ("-inf", now - self._retention)),
                Command("EXPIRE", procs, (self._retention,)),
            ]
            try:
                self._store.execute(commands)
            except FeatcacheError as exc:
                self.errors += 1
                self._outage.failed("stats not published", exc)
                return 0
            self._outage.ok()
            self._published = totals
            self.publishes += 1
            return len(moved)

    def close(self) -> None:
        """Stop the thread, then publish what is left (a process's last counts count); once:
        a second close publishes nothing (its keys may have been deleted since)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._interval > 0:
            self.publish()


@dataclass(frozen=True)
class StatsWindow:
    """Every process's counts summed over ``minutes`` whole minutes up to ``until``
    (``CacheStats.totals`` fields), and the processes that published in that window (name ->
    when they last did)."""

    totals: dict[str, int]
    processes: dict[str, float]
    minutes: int
    until: float


def read_window(store: RedisStore, layout: KeyLayout, since: float, now: float) -> StatsWindow:
    """The minutes from ``now - since`` to ``now`` (the current minute included), read in one
    round trip."""
    minutes = max(1, -(-int(since) // MINUTE))
    current = int(now // MINUTE) * MINUTE
    starts = [current - i * MINUTE for i in range(minutes)]
    commands = [Command("HGETALL", layout.stats_key(start), ()) for start in starts]
    procs = layout.stats_processes_key()
    commands.append(Command("ZRANGEBYSCORE", procs, (current - (minutes - 1) * MINUTE, "+inf",
                                                     "WITHSCORES")))
    replies = store.execute(commands)
    totals: dict[str, int] = {}
    for reply in replies[:-1]:
        # a flat [field, value, ...] (RESP2, replies as the server sent them) or a map (RESP3)
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2],
                                                                  strict=True)
        for field, value in pairs:
            name = field.decode() if isinstance(field, bytes) else str(field)
            totals[name] = totals.get(name, 0) + int(value)
    scored = replies[-1]
    if scored and not isinstance(scored[0], list | tuple):  # flat [member, score, ...]
        scored = list(zip(scored[::2], scored[1::2], strict=True))
    processes: dict[str, float] = {}
    for member, score in scored:
        name = member.decode() if isinstance(member, bytes) else str(member)
        processes[name] = float(score)
    return StatsWindow(totals, processes, minutes, now)
