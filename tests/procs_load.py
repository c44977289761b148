"""Process body for the cross-process stampede test in ``test_stampede``.

Each worker runs in a *spawned* process: it gets its ``CacheConfig`` pickled in a
``StampedeJob``, builds its own ``FeatureCache`` (own Redis pool, own SQLAlchemy engine), warms
them up on an entity nobody else asks for, and only then counts the SQL feature queries it
sends (``featdata.SqlCounter``: statements containing ``fc_latest``). Its threads wait on a
``threading.Barrier`` that its main thread joins only after every process has reached the
shared ``multiprocessing.Barrier``, so all threads of all processes ask for the cold row at
once. What it saw goes back through a queue as plain data; an exception goes back as text.
Every wait is bounded: a worker always ends by itself.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

from featdata import SqlCounter, client_for

from featcache import CacheConfig


@dataclass(frozen=True)
class StampedeJob:
    """What one worker process needs; pickled into the spawned child."""

    config: CacheConfig
    entity: int  # the cold row every thread asks for
    warm_entity: int  # an entity only this worker reads, before counting starts
    features: tuple[str, ...]
    threads: int
    wait_s: float  # bound on every barrier wait and thread join


def run_stampede_worker(job: StampedeJob, start: Any, out: Any) -> None:
    """One process of the stampede: ``job.threads`` threads ask for ``job.entity`` at once."""
    payload: dict[str, Any] = {"pid": os.getpid()}
    try:
        payload.update(_run(job, start))
    except BaseException:  # reported to the parent, which fails the test with it
        payload["error"] = traceback.format_exc()
    out.put(payload)


def _run(job: StampedeJob, start: Any) -> dict[str, Any]:
    with client_for(job.config) as fc:
        # Connect Redis and SQL, reflect the table: none of that may count or slow the fill.
        fc.get_features([job.warm_entity], list(job.features))
        counter = SqlCounter(fc.engine)
        go = threading.Barrier(job.threads + 1)
        answers: list[tuple[str, Any] | None] = [None] * job.threads
        errors: list[str] = []
        done_at: list[float] = [0.0] * job.threads

        def reader(i: int) -> None:
            try:
                go.wait(job.wait_s)
                result = fc.get_features([job.entity], list(job.features))
                done_at[i] = time.monotonic()
                statuses = {result.status(job.entity, f).value for f in job.features}
                status = statuses.pop() if len(statuses) == 1 else f"mixed {sorted(statuses)}"
                answers[i] = (status, dict(result[job.entity]))
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [
            threading.Thread(target=reader, args=(i,), name=f"reader{i}", daemon=True)
            for i in range(job.threads)
        ]
        for thread in threads:
            thread.start()
        start.wait(job.wait_s)  # every process is warmed up and its threads are parked
        released = time.monotonic()
        go.wait(job.wait_s)
        for thread in threads:
            thread.join(job.wait_s)
        hung = sum(thread.is_alive() for thread in threads)
        counter.close()
        got = [a for a in answers if a is not None]
        return {
            "sql_queries": counter.count,
            "statuses": Counter(status for status, _ in got),
            "values": [values for _, values in got],
            "errors": errors,
            "hung": hung,
            "answered": len(got),
            "released": released,
            "last_answer_s": max(done_at) - released if got else None,
            "stats": fc.stats().get(job.config.views[0].name, {}),
        }
