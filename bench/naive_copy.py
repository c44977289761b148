"""The same-run baseline of ``python -m bench materialize``: the copy a straightforward script
makes without featcache, timed on the same data in the same minute.

The absolute rows/s of a materialize on this VM moves by a third from one run to the next (and
by several times between its slow and fast phases, docs/benchmarks.md). A baseline measured
right after featcache's call, on the same table and into the same kind of fresh server, moves
with it: the ratio says what the code is worth, the absolute figure what the minute was like.

The baseline is what one would write with the usual libraries and no featcache:

* SQLAlchemy Core streams the table ordered by (entity, event time) in partitions of
  ``chunk_rows`` (a server-side cursor on PostgreSQL), and a fold keeps the last row of each
  entity, so memory is bounded by the chunk as materialize's is;
* each row's values are packed with msgpack (event time as its ISO string);
* a redis-py pipeline (``transaction=False``) of ``SET key value PX ttl`` per row is executed
  once per chunk.

It does less than materialize: no fence, no conditional write (an older row can replace a newer
one), no epoch, no header for freshness checks, no verification. Its ratio is therefore a
conservative one: featcache carries its guarantees and is still compared with a copy that has
none.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

__all__ = ["latest_per_entity", "naive_copy"]

TTL_MS = 86_400_000


def _iso(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot pack {type(value).__name__}")


def latest_per_entity(partitions: Iterator[Sequence[Any]]) -> Iterator[list[Any]]:
    """Rows sorted by (entity, event time), in partitions; yields lists of the last row of each
    entity, one list per partition (an entity's last row may wait for the next partition)."""
    pending: Any = None
    for part in partitions:
        out: list[Any] = []
        for row in part:
            if pending is not None and pending[0] != row[0]:
                out.append(pending)
            pending = row
        if out:
            yield out
    if pending is not None:
        yield [pending]


def naive_copy(offline_url: str, table: sa.Table, redis_url: str, key_prefix: str,
               chunk_rows: int) -> dict[str, Any]:
    """Copy the latest row of every entity of ``table`` into Redis as above; returns rows
    written and seconds. The key of entity ``e`` is ``{key_prefix}:naive:{e}``."""
    engine = sa.create_engine(offline_url, poolclass=NullPool)
    client = redis.Redis.from_url(redis_url)
    columns = list(table.c)
    query = sa.select(*columns).order_by(columns[0], columns[1])
    packer = msgpack.Packer(default=_iso)
    written = 0
    try:
        client.ping()  # connect outside the clock, as materialize's cache is
        started = time.perf_counter()
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows) \
                .execute(query)
            for rows in latest_per_entity(result.partitions(chunk_rows)):
                pipe = client.pipeline(transaction=False)
                for row in rows:
                    pipe.set(f"{key_prefix}:naive:{row[0]}", packer.pack(list(row[1:])),
                             px=TTL_MS)
                pipe.execute()
                written += len(rows)
        seconds = time.perf_counter() - started
    finally:
        client.close()
        engine.dispose()
    return {"rows": written, "seconds": round(seconds, 3), "rows_per_s": round(written / seconds)}
