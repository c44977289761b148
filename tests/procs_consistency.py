"""Process bodies and the checker for ``test_consistency_processes`` (DESIGN section 4).

The workers run in *spawned* processes: everything they need arrives pickled in a ``Job`` (the
``CacheConfig`` included), each builds its own ``FeatureCache`` and SQLAlchemy engine, and each
writes what it observed to a msgpack file in the test's ``tmp_path`` (tuples come back as
lists). Timestamps are
``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on Linux), so "invalidation
w returned before read r started" is a real-time fact comparable across processes.

The checker (``check``) is a pure function of those files, so it is unit-tested with
hand-made histories too.
"""

from __future__ import annotations

import bisect
import datetime as dt
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa
from featdata import client_for

from featcache import CacheConfig, Status

#: How long after an invalidation returned a read may still see the older value: the declared
#: bound of an in-process L1 cache; 0 without one (the default config; the test derives the
#: bound of each run from its config, ``declared_l1_bound``).
L1_BOUND_S = 0.0

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

WRITER = 0  # index of the writer in the shared progress array; readers are 1..n

# progress slots hold done/total; a finished (or crashed) process sets its slot to DONE
DONE = 2.0
# The writer may run this far (a fraction of its ops) ahead of the readers; readers never run
# ahead of the writer, so their last ~2% of reads come after its last invalidation and the final
# Redis content holds rows (not just tombstones) to compare with SQL.
PACE_SLACK = 0.02
PACE_SLEEP_S = 0.0002


@dataclass(frozen=True)
class Job:
    """Everything one worker process needs; pickled into the spawned child."""

    config: CacheConfig
    view: str
    table: str
    schema: str | None
    sql_url: str
    entities: tuple[int, ...]
    ops: int
    seed: int
    out: str  # the msgpack file this worker writes
    deadline: float  # time.monotonic() after which a worker stops early (safety net only)
    whole_view_pct: float = 2.0  # writer: share of invalidations that are whole-view
    multi_pct: float = 10.0  # writer: share of transactions that update 2-3 entities
    naive: bool = False  # reader: the BROKEN control, unfenced cache-aside sets


def timestamp_for(version: int, dialect: str) -> dt.datetime:
    """The event time of a version: later versions have later event times, as in an ETL."""
    ts = T0 + dt.timedelta(microseconds=version)
    if dialect in ("mysql", "mariadb", "sqlite"):  # no offset stored: naive UTC
        return ts.replace(tzinfo=None)
    return ts


def _engine(url: str) -> sa.Engine:
    if sa.engine.make_url(url).get_backend_name() == "sqlite":
        return sa.create_engine(url, connect_args={"timeout": 30})  # busy timeout
    return sa.create_engine(url, pool_pre_ping=True)


def _table(engine: sa.Engine, job: Job) -> sa.Table:
    return sa.Table(job.table, sa.MetaData(schema=job.schema), autoload_with=engine)


def _wait_for(progress: Any, mine: int, others: Sequence[int], job: Job, slack: float) -> None:
    """Do not run more than ``slack`` ahead of the mean of ``others`` (unless all are done),
    so the writer's updates and the readers' reads overlap for the whole run."""
    while time.monotonic() < job.deadline:
        theirs = [progress[i] for i in others]
        live = [p for p in theirs if p < DONE]
        if not live or progress[mine] <= sum(live) / len(live) + slack:
            return
        time.sleep(PACE_SLEEP_S)


def _start(barrier: Any, payload: dict[str, Any], born: float) -> None:
    """Wait for every worker to be connected and ready; note how long getting ready took."""
    payload["ready_after"] = f"ready {time.monotonic() - born:.2f} s after start"
    barrier.wait(timeout=120)


def _dump(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(msgspec.msgpack.encode(payload))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ writer


def run_writer(job: Job, progress: Any, barrier: Any, n_readers: int) -> None:
    """UPDATE one (sometimes 2-3) entities to new, higher versions, COMMIT, then invalidate
    them (sometimes the whole view); record when each invalidation returned and what SQL held.

    Records:
      ``updates``: (t_before_update, entity, version): the version cannot be read before this
      ``invalidations``: (t_returned, {entity: version}) with every entity it covers and the
      version SQL held for it when it returned (all entities for a whole-view one)
    """
    born = time.monotonic()
    payload: dict[str, Any] = {"role": "writer", "ready_after": "never ready", "updates": [],
                               "invalidations": [], "whole_view": 0, "ops": 0,
                               "truncated": False}
    rng = random.Random(job.seed)
    try:
        engine = _engine(job.sql_url)
        table = _table(engine, job)
        dialect = engine.dialect.name
        current = dict.fromkeys(job.entities, 0)  # the version SQL holds, as only we write
        version = 0
        readers = list(range(1, n_readers + 1))
        with client_for(job.config) as cache:
            _start(barrier, payload, born)
            for i in range(job.ops):
                if time.monotonic() > job.deadline:
                    payload["truncated"] = True
                    break
                _wait_for(progress, WRITER, readers, job, PACE_SLACK)
                k = rng.choice((2, 3)) if rng.random() * 100 < job.multi_pct else 1
                chosen = rng.sample(job.entities, k)
                t_update = time.monotonic()
                with engine.begin() as conn:
                    for entity in chosen:
                        version += 1
                        ts = timestamp_for(version, dialect)
                        conn.execute(
                            table.update()
                            .where(table.c.entity_id == entity)
                            .values(clicks=version, event_ts=ts, updated_at=ts)
                        )
                        current[entity] = version
                        payload["updates"].append((t_update, entity, version))
                # committed: now the hook
                if rng.random() * 100 < job.whole_view_pct:
                    cache.invalidate(job.view)
                    covered = dict(current)
                    payload["whole_view"] += 1
                else:
                    cache.invalidate(job.view, chosen)
                    covered = {e: current[e] for e in chosen}
                payload["invalidations"].append((time.monotonic(), covered))
                payload["ops"] = i + 1
                progress[WRITER] = (i + 1) / job.ops
                if rng.random() < 0.05:
                    time.sleep(0)
            payload["stats"] = cache.stats()
        engine.dispose()
    except BaseException:
        payload["error"] = traceback.format_exc()
        barrier.abort()  # the others must not wait for us at the start
    finally:
        progress[WRITER] = DONE
        _dump(job.out, payload)


# ------------------------------------------------------------------------------------ readers


def run_reader(job: Job, progress: Any, barrier: Any, index: int) -> None:
    """get_features of 1-5 random entities in a loop; record (t_start, t_end, entity, value,
    status) for every entity read.

    With ``job.naive`` (the BROKEN control) the reader also acts as a naive cache-aside
    application: for every entity that missed (FILLED), it reads the row from SQL itself and
    sets it with ``put_rows`` *without a fence*, the classic stale set this design prevents.
    """
    born = time.monotonic()
    payload: dict[str, Any] = {"role": f"reader{index}", "ready_after": "never ready",
                               "reads": [], "ops": 0, "naive_sets": 0, "naive_written": 0,
                               "truncated": False}
    rng = random.Random(job.seed)
    reads: list[tuple[float, float, int, Any, str]] = payload["reads"]
    try:
        engine = _engine(job.sql_url) if job.naive else None
        table = _table(engine, job) if engine is not None else None
        with client_for(job.config) as cache:
            cache.get_features(job.entities[:1], ["clicks"])  # reflect the table before the start
            _start(barrier, payload, born)
            for i in range(job.ops):
                if time.monotonic() > job.deadline:
                    payload["truncated"] = True
                    break
                _wait_for(progress, index, [WRITER], job, 0.0)
                ids = rng.sample(job.entities, rng.randint(1, 5))
                t_start = time.monotonic()
                result = cache.get_features(ids, ["clicks"])
                t_end = time.monotonic()
                missed = []
                for eid in ids:
                    status = result.status(eid, "clicks")
                    reads.append((t_start, t_end, eid, result[eid]["clicks"], status.value))
                    if status is Status.FILLED:
                        missed.append(eid)
                if missed and engine is not None and table is not None:
                    with engine.connect() as conn:  # the naive app's own read...
                        rows = [dict(r._mapping) for r in conn.execute(
                            sa.select(table).where(table.c.entity_id.in_(missed)))]
                    report = cache.put_rows(job.view, rows)  # ...and its unfenced set
                    payload["naive_sets"] += len(rows)
                    payload["naive_written"] += report.written
                payload["ops"] = i + 1
                progress[index] = (i + 1) / job.ops
            payload["stats"] = cache.stats()
        if engine is not None:
            engine.dispose()
    except BaseException:
        payload["error"] = traceback.format_exc()
        barrier.abort()  # the others must not wait for us at the start
    finally:
        progress[index] = DONE
        _dump(job.out, payload)


# ------------------------------------------------------------------------------------ checker


@dataclass
class Report:
    """What the checker found; ``violations`` holds the first few bad reads in full."""

    reads: int = 0
    constrained: int = 0  # reads with an invalidation of their entity returned before them
    tight: int = 0  # constrained reads that returned exactly the version that bound them
    recent: int = 0  # constrained reads started < 5 ms after the invalidation that bound them
    pre_invalidation: int = 0  # older than an UPDATE begun before the read: allowed, the
    #                            invalidation had not returned yet
    lagged: int = 0  # older than an invalidation returned before the read, but within the bound
    max_lag_s: float = 0.0  # the longest such lag (how long after an invalidation returned)
    stale: int = 0  # older than an invalidation returned more than the bound before: VIOLATIONS
    impossible: int = 0  # values never written, or written only after the read returned
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.reads} reads checked, {self.constrained} with a constraining "
                f"invalidation ({self.tight} exactly at its bound, {self.recent} started <5 ms "
                f"after it), {self.pre_invalidation} legitimately older than SQL (read before "
                f"the invalidation returned), {self.lagged} older within the L1 bound (max lag "
                f"{self.max_lag_s * 1000:.1f} ms), {self.stale} STALE, {self.impossible} "
                f"impossible; statuses {dict(self.statuses)}")


def check(
    writer: Mapping[str, Any],
    readers: Sequence[Mapping[str, Any]],
    l1_bound_s: float = L1_BOUND_S,
    keep: int = 10,
) -> Report:
    """For every read r of entity x with value v: the latest invalidation covering x (per
    entity or whole view) that returned before ``r.t_start - l1_bound_s`` says SQL held at
    least V then; v >= V must hold.

    Versions only grow and the writer is sequential, so per entity the invalidations' versions
    are sorted by the time they returned: the latest one before a moment has the largest V, and
    the first one with a version above v tells how long v had been outdated (the lag).
    """
    inv_t: dict[int, list[float]] = {}
    inv_v: dict[int, list[int]] = {}
    for t, covered in sorted(writer["invalidations"], key=lambda item: item[0]):
        for entity, version in covered.items():
            inv_t.setdefault(entity, []).append(t)
            inv_v.setdefault(entity, []).append(version)
    upd_t: dict[int, list[float]] = {}
    upd_v: dict[int, list[int]] = {}
    written: dict[tuple[int, int], float] = {}
    for t, entity, version in sorted(writer["updates"], key=lambda item: item[0]):
        upd_t.setdefault(entity, []).append(t)
        upd_v.setdefault(entity, []).append(version)
        written[(entity, version)] = t
    report = Report()
    for reader in readers:
        for t_start, t_end, entity, value, status in reader["reads"]:
            report.reads += 1
            report.statuses[status] += 1
            if not isinstance(value, int) or (
                value != 0 and (t_w := written.get((entity, value))) is None
            ) or (value != 0 and t_w > t_end):
                report.impossible += 1
                _keep(report, keep, "impossible", reader, t_start, t_end, entity, value, status)
                continue
            times, versions = inv_t.get(entity, []), inv_v.get(entity, [])
            j = bisect.bisect_left(times, t_start)  # invalidations [0, j) returned before
            if not j:
                continue
            report.constrained += 1
            if t_start - times[j - 1] < 0.005:
                report.recent += 1
            if value >= versions[j - 1]:
                report.tight += value == versions[j - 1]
                k = bisect.bisect_left(upd_t.get(entity, []), t_start)
                report.pre_invalidation += bool(k) and value < upd_v[entity][k - 1]
                continue
            first = bisect.bisect_right(versions, value)  # the first invalidation past value
            lag = t_start - times[first]
            if lag <= l1_bound_s:
                report.lagged += 1
                report.max_lag_s = max(report.max_lag_s, lag)
            else:
                report.stale += 1
                _keep(report, keep, "stale", reader, t_start, t_end, entity, value, status,
                      bound=versions[j - 1], outdated_by=versions[first],
                      outdated_for_s=round(lag, 6))
    return report


def _keep(report: Report, keep: int, kind: str, reader: Mapping[str, Any], t_start: float,
          t_end: float, entity: int, value: Any, status: str, **more: Any) -> None:
    if len(report.violations) < keep:
        report.violations.append({"kind": kind, "reader": reader["role"], "t_start": t_start,
                                  "t_end": t_end, "entity": entity, "value": value,
                                  "status": status, **more})


def load(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = msgspec.msgpack.decode(path.read_bytes())
    return payload
