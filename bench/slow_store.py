"""The honestly slow offline store of ``bench stampede`` and ``bench invalidation``.

``dataset``'s table for ``SLOW_USERS`` users (~35k rows with history), copied ``SLOW_COPIES``
times under new ids (~280k rows), with the (entity, event time) index dropped: the latest-row
query of one id scans the table (tens of ms, like an unindexed warehouse table). Its ids start
at ``dataset.ID_BASE + SLOW_ID_START``, disjoint from the users ``bench read`` and ``bench l1``
load.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import dataset
from bench.common import log

SLOW_USERS = 20_000  # base users of the slow table (~35k rows with history)
SLOW_COPIES = 8  # copies under new ids: ~280k rows, no index on the entity column
SLOW_ID_START = 1_000_000  # slow-table ids start at ID_BASE + this: disjoint from bench l1's


@dataclass(frozen=True)
class SlowStore:
    url: str
    base: dict[int, dataset.Row]  # base id -> latest row
    rows: int  # rows in the table

    def copy_ids(self) -> list[int]:
        """Ids that exist only as copies: in SQL, never written to Redis."""
        first = dataset.ID_BASE + SLOW_ID_START
        return list(range(first + SLOW_USERS, first + SLOW_USERS * SLOW_COPIES))

    def expected(self, eid: int) -> dict[str, Any]:
        offset = (eid - dataset.ID_BASE - SLOW_ID_START) % SLOW_USERS
        return dataset.feature_dict(self.base[dataset.ID_BASE + SLOW_ID_START + offset])


def build_slow_store(path: Path, seed: int) -> SlowStore:
    """``dataset``'s table for SLOW_USERS users, copied SLOW_COPIES times under new ids, with
    the (entity, event time) index dropped: the latest-row query has to scan the table."""
    rng = random.Random(seed + 7)
    latest = dataset.make_rows(dataset.user_ids(SLOW_USERS, start=SLOW_ID_START), rng)
    url = dataset.build_offline_store(path, latest, rng)
    first = dataset.ID_BASE + SLOW_ID_START
    columns = ", ".join([dataset.EVENT_COLUMN, *(f.column for f in dataset.FEATURES)])
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for copy in range(1, SLOW_COPIES):
                conn.execute(sa.text(
                    f"INSERT INTO {dataset.VIEW_NAME} ({dataset.ENTITY_COLUMN}, {columns}) "
                    f"SELECT {dataset.ENTITY_COLUMN} + :shift, {columns} "
                    f"FROM {dataset.VIEW_NAME} WHERE {dataset.ENTITY_COLUMN} < :end"
                ), {"shift": copy * SLOW_USERS, "end": first + SLOW_USERS})
            conn.execute(sa.text(f"DROP INDEX ix_{dataset.VIEW_NAME}_entity_ts"))
            rows = int(conn.execute(sa.text(f"SELECT count(*) FROM {dataset.VIEW_NAME}"))
                       .scalar_one())
    finally:
        engine.dispose()
    return SlowStore(url, {r[dataset.ENTITY_COLUMN]: r for r in latest}, rows)


@contextlib.contextmanager
def slow_store(seed: int) -> Iterator[SlowStore]:
    """``build_slow_store`` in a temporary directory removed afterwards, its build logged."""
    with tempfile.TemporaryDirectory(prefix="fcbench-slow-") as tmp:
        t0 = time.perf_counter()
        store = build_slow_store(Path(tmp) / "slow.db", seed)
        log(f"slow offline store: {store.rows:,} rows, no index on the entity column "
            f"({time.perf_counter() - t0:.1f} s)")
        yield store
