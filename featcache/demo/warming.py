"""The demo's warmer: what ``featcache warmer`` does on its schedule, run in a thread beside
the demo's load, so that the table shows what a warmer changes for the serving path.

It is built as a warmer process builds itself (``Parts``: a Redis store, an SQL engine of its
own and the fenced writer; no read path, no L1, no stats of serving calls) and does the
warmer's two jobs in the order a deployment runs them: ``materialize`` of every view (the
latest row of every entity the table has, written through the fenced write path beside the
serving fills), then ``warm`` passes (the most read entities, from the popularity counts the
serving process publishes, rewritten when their row is missing or goes stale within
``warmer.horizon``) one after the other until it is stopped. Its SQL statements go through
its own engine, so the demo's count of the serving path's queries does not include them: the
report says what the warmer itself read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from featcache.config import CacheConfig
from featcache.leader import ViewLeader
from featcache.materialize import materialize, warm_once
from featcache.parts import Parts

__all__ = ["DemoWarmer", "WarmerReport"]

#: pause between two warm passes over every view: a scheduled warmer waits
#: ``warmer.schedule`` (a minute by default), longer than a demo phase
PASS_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class WarmerReport:
    """What the warmer did: ``materialized`` rows written by the bulk load (of
    ``entities`` read from SQL) in ``materialize_s``; ``passes`` warm passes over every view,
    which rewrote ``warmed`` rows (of the ``k`` most read entities of each view, those missing
    or about to go stale); ``fenced_off``
    rows not written because a serving fill or an invalidation had changed the key since the
    warmer's fence (the fenced write path at work, not a loss)."""

    views: int
    k: int
    entities: int
    materialized: int
    materialize_s: float
    passes: int
    warmed: int
    fenced_off: int
    complete: bool


class DemoWarmer:
    """``start`` runs the warmer in a daemon thread; ``stop`` ends it after the chunk or pass
    under way and returns its report, or raises what failed in it (an error in the warmer
    must not pass for a warmer that had no effect)."""

    def __init__(self, config: CacheConfig) -> None:
        self._config = config
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featcache-demo-warmer",
                                        daemon=True)
        self._error: BaseException | None = None
        self._entities = self._materialized = self._passes = self._warmed = 0
        self._fenced_off = 0
        self._materialize_s = 0.0
        self._complete = False

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """End the thread, if it was started, and forget its report: the demo is ending on
        an error of its own."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def stop(self) -> WarmerReport:
        self.halt()
        if self._error is not None:
            raise self._error
        return WarmerReport(
            views=len(self._config.views), k=self._config.warmer.k, entities=self._entities,
            materialized=self._materialized, materialize_s=self._materialize_s,
            passes=self._passes, warmed=self._warmed, fenced_off=self._fenced_off,
            complete=self._complete,
        )

    def _run(self) -> None:
        settings = self._config.warmer
        try:
            with Parts(self._config) as parts:
                started = time.perf_counter()
                complete = True
                for view in self._config.views:
                    if self._stop.is_set():
                        complete = False
                        break
                    done = materialize(parts, view, all=True, chunk_rows=settings.chunk_rows,
                                       keep_going=lambda: not self._stop.is_set())
                    self._entities += done.entities
                    self._materialized += done.rows_written
                    self._fenced_off += done.fenced_off
                    complete = complete and done.complete
                self._materialize_s = time.perf_counter() - started
                self._complete = complete
                leaders = {view.name: ViewLeader(parts.store, parts.layout, view.name,
                                                 settings.lease_ttl)
                           for view in self._config.views}
                try:
                    while not self._stop.wait(PASS_PAUSE_S):
                        for view in self._config.views:
                            report = warm_once(parts, view, k=settings.k,
                                               horizon_s=settings.horizon,
                                               leader=leaders[view.name],
                                               chunk_rows=settings.chunk_rows)
                            if report.materialized is not None:
                                self._warmed += report.materialized.rows_written
                                self._fenced_off += report.materialized.fenced_off
                        self._passes += 1
                finally:
                    for leader in leaders.values():
                        leader.release()
        except BaseException as exc:
            self._error = exc
