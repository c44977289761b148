"""``FeatureResult``: the answer of ``get_features``, a read-only mapping with statuses.

It is ``Mapping[entity_id, dict[feature, value]]`` in the caller's order (the shape of the
original design sketch), keyed by the feature names exactly as the caller spelled them. Every
value carries a status and the event timestamp of the row it came from. The per-entity dicts are
built on first access: a caller that goes straight to ``to_arrow()`` never pays for them.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from featcache.codec import BODY_VALUES
from featcache.convert import us_to_timestamp
from featcache.l1 import InOrder
from featcache.request import EntityId, Plan
from featcache.types import FeatureType, Status

if TYPE_CHECKING:  # imported by the calls that use them: a serving import pays for neither
    import pandas as pd
    import pyarrow as pa

__all__ = ["EVENT_US", "STATUS", "VALUES", "Answer", "Column", "FeatureResult", "RedisHits",
           "arrow_type", "hit_answers"]


def arrow_type(ftype: FeatureType) -> pa.DataType:
    return _arrow_types()[ftype]


@functools.cache
def _arrow_types() -> dict[FeatureType, pa.DataType]:
    import pyarrow as pa  # noqa: PLC0415 - only to_arrow() and the bulk paths need Arrow

    return {
        FeatureType.INT: pa.int64(),
        FeatureType.FLOAT: pa.float64(),
        FeatureType.BOOL: pa.bool_(),
        FeatureType.STR: pa.string(),
        FeatureType.TIMESTAMP: pa.timestamp("us", tz="UTC"),
        FeatureType.EMBEDDING: pa.list_(pa.float64()),
    }


#: One row of one view for one entity, as answered: (status, values or None when ABSENT,
#: event time in microseconds or None). A plain tuple with named positions, not a NamedTuple:
#: the read path builds one per row, for a batch of hits by C-level zips.
Answer = tuple[Status, Sequence[Any] | None, int | None]
STATUS: Final = 0
VALUES: Final = 1
EVENT_US: Final = 2


_body_values = itemgetter(BODY_VALUES)
_status = itemgetter(STATUS)


def hit_answers(bodies: Sequence[tuple[Any, ...]], events_us: Sequence[int | None]
                ) -> Iterator[Answer]:
    """The ``HIT_REDIS`` answer of each decoded row (``RowBatch``), by C-level zips."""
    return zip(repeat(Status.HIT_REDIS), map(_body_values, bodies), events_us,
               strict=False)  # repeat() is endless; the other two have a row each


class RedisHits(InOrder[EntityId, Answer]):
    """One view's answers when every row of the call was a plain Redis hit: the rows' decoded
    bodies (``RowBatch.bodies``, checked by the read path) and event times as read, every
    status ``HIT_REDIS``.

    The ``Answer`` tuples are built on the first lookup by id or in order, as the per-entity
    dicts are; ``FeatureResult.columns`` (``to_arrow``, the HTTP server) reads the values
    straight from the bodies and never builds them. A call answered from Redis then
    allocates no object per row beyond what decoding made.
    """

    __slots__ = ("_answers", "_bodies", "_events_us")

    def __init__(self, ids: Sequence[EntityId], bodies: Sequence[tuple[Any, ...]],
                 events_us: list[int | None]) -> None:
        super().__init__(ids, ())
        self._bodies = bodies
        self._events_us = events_us
        self._answers: list[Answer] | None = None

    def in_order(self) -> Sequence[Answer]:
        answers = self._answers
        if answers is None:
            answers = self._answers = list(hit_answers(self._bodies, self._events_us))
        return answers

    def rows(self) -> tuple[list[Status], list[int | None], list[Sequence[Any] | None]]:
        """Statuses, event times and values in the ids' order, without an ``Answer`` each."""
        return ([Status.HIT_REDIS] * len(self._bodies), self._events_us,
                list(map(_body_values, self._bodies)))


def _in_order(answers: Mapping[EntityId, Answer], ids: Sequence[EntityId]) -> Sequence[Answer]:
    return answers.in_order() if isinstance(answers, InOrder) else [answers[e] for e in ids]


class Column(NamedTuple):
    """One requested feature of a result, in the ids' order (``FeatureResult.columns``)."""

    name: str  # as the caller spelled it
    view: str
    type: FeatureType
    values: list[Any]  # None where the row is ABSENT or UNAVAILABLE, or the value is null
    statuses: list[Status]  # shared by the columns of one view: never mutate
    event_us: list[int | None]  # the row's event time, microseconds UTC (shared, as statuses)


class FeatureResult(Mapping[EntityId, dict[str, Any]]):
    """``entity_id -> {feature: value}`` plus ``status()``, ``event_timestamp()``, Arrow, pandas."""

    __slots__ = ("_answers", "_dicts", "_ids", "_lookups", "_plan")

    def __init__(
        self,
        ids: Sequence[EntityId],
        plan: Plan | None,
        answers: Sequence[Mapping[EntityId, Answer]],
    ) -> None:
        self._ids = ids
        self._plan = plan
        self._answers = answers
        self._dicts: dict[EntityId, dict[str, Any]] = {}
        self._lookups: list[Mapping[EntityId, Answer]] | None = None

    def _by_id(self) -> list[Mapping[EntityId, Answer]]:
        """Each view's answers as a dict (or the mapping given), for lookups by id: an
        ``InOrder`` answer is indexed once here, not looked up through a method per id."""
        lookups = self._lookups
        if lookups is None:
            lookups = self._lookups = [
                a.index() if isinstance(a, InOrder) else a for a in self._answers]
        return lookups

    # ---------------------------------------------------------------- Mapping

    def __getitem__(self, entity_id: EntityId) -> dict[str, Any]:
        cached = self._dicts.get(entity_id)
        if cached is not None:
            return cached
        if self._plan is None:
            raise KeyError(entity_id)
        plan = self._plan
        lookups = self._by_id()
        if len(lookups) == 1:  # one view: pick the requested positions in one C call
            vals = lookups[0][entity_id][VALUES]  # KeyError if not asked for
            if vals is None:
                out = dict.fromkeys(plan.names)
            else:
                out = dict(zip(plan.names, plan.pick(vals), strict=True))
        else:
            values = [answers[entity_id][VALUES] for answers in lookups]
            out = {
                name: (None if (vals := values[v]) is None else vals[f])
                for name, (v, f) in zip(plan.names, plan.columns, strict=True)
            }
        self._dicts[entity_id] = out
        return out

    def __iter__(self) -> Iterator[EntityId]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entity_id: object) -> bool:
        return bool(self._answers) and entity_id in self._by_id()[0]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s.value}={n}" for s, n in sorted(self.status_counts().items()))
        shape = f"{len(self)} entities x {len(self.feature_names)} features"
        return f"<FeatureResult {shape}; {counts}>"

    # ---------------------------------------------------------------- statuses

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._plan.names if self._plan is not None else ()

    def _answer(self, entity_id: EntityId, feature: str) -> Answer:
        if self._plan is None:
            raise KeyError(entity_id)
        try:
            v, _ = self._plan.columns[self._plan.names.index(feature)]
        except ValueError:
            raise KeyError(f"{feature!r} was not requested in this call") from None
        return self._by_id()[v][entity_id]

    def status(self, entity_id: EntityId, feature: str) -> Status:
        """Where this value came from (``HIT_REDIS``, ``FILLED``, ``ABSENT``, ``STALE``...)."""
        return self._answer(entity_id, feature)[STATUS]

    def event_timestamp(self, entity_id: EntityId, feature: str) -> dt.datetime | None:
        """The event time of the SQL row behind this value (None when ABSENT or unset)."""
        return us_to_timestamp(self._answer(entity_id, feature)[EVENT_US])

    def statuses(self) -> dict[EntityId, dict[str, Status]]:
        if self._plan is None:
            return {}
        cols = self._plan.columns
        lookups = self._by_id()
        return {
            eid: {
                name: lookups[v][eid][STATUS]
                for name, (v, _) in zip(self._plan.names, cols, strict=True)
            }
            for eid in self._ids
        }

    def status_counts(self) -> Counter[Status]:
        """How many values (entity x feature) have each status."""
        counts: Counter[Status] = Counter()
        if self._plan is None:
            return counts
        per_view = Counter(v for v, _ in self._plan.columns)
        for v, answers in enumerate(self._answers):
            rows: Mapping[Status, int] = (
                {Status.HIT_REDIS: len(answers)} if isinstance(answers, RedisHits)
                else Counter(map(_status, _in_order(answers, self._ids))))
            for status, n in rows.items():
                counts[status] += n * per_view[v]
        return counts

    # ---------------------------------------------------------------- columnar

    def columns(self) -> list[Column]:
        """Per requested feature, its values, statuses and event times in the ids' order:
        the result column by column (``to_arrow`` and the HTTP server's answers)."""
        plan = self._plan
        if plan is None or not plan.views:
            return []
        # a row's status and event time are its view's: one list per view, shared by the
        # view's columns (``statuses`` and ``event_us`` of one view are the same objects)
        rows = [self._rows_of(answers) for answers in self._answers]
        # a view whose every row has values (no ABSENT or UNAVAILABLE row) gives its columns
        # by C-level passes: all of them by one transposition when it gives several (100
        # rows of 10 values: 6-10 us, against 16-26 us for one pass per column)
        every_row = [None not in values for _, _, values in rows]
        asked = Counter(v for v, _ in plan.columns)
        by_view = [_transposed(values) if every_row[v] and asked[v] > 1 else None
                   for v, (_, _, values) in enumerate(rows)]
        out = []
        for name, (v, f) in zip(plan.names, plan.columns, strict=True):
            view = plan.views[v].view
            statuses, event_us, values = rows[v]
            transposed = by_view[v]
            out.append(Column(
                name, view.name, view.features[f].type,
                list(transposed[f]) if transposed is not None
                else list(map(itemgetter(f), cast(list[Sequence[Any]], values)))
                if every_row[v]
                else [None if vals is None else vals[f] for vals in values],
                statuses, event_us,
            ))
        return out

    def _rows_of(self, answers: Mapping[EntityId, Answer]
                 ) -> tuple[list[Status], list[int | None], list[Sequence[Any] | None]]:
        """One view's statuses, event times and values, in the ids' order."""
        if isinstance(answers, RedisHits):
            return answers.rows()
        in_order = _in_order(answers, self._ids)
        return ([r[STATUS] for r in in_order], [r[EVENT_US] for r in in_order],
                [r[VALUES] for r in in_order])

    def to_arrow(self, with_status: bool = False) -> pa.Table:
        """One row per entity; columns typed as declared (timestamps UTC, NaN != null).

        ``with_status`` adds ``<feature>.status`` and ``<feature>.event_ts`` columns.
        """
        import pyarrow as pa  # noqa: PLC0415 - see arrow_type

        plan = self._plan
        columns: dict[str, pa.Array[Any]] = {}
        if plan is None or not plan.views:
            return pa.table({"entity_id": pa.array([], pa.int64())})
        id_type = pa.int64() if plan.entity_type == "int" else pa.string()
        columns["entity_id"] = pa.array(self._ids, id_type)
        for column in self.columns():
            name = column.name
            columns[name] = pa.array(column.values, arrow_type(column.type))
            if with_status:
                columns[f"{name}.status"] = pa.array([s.value for s in column.statuses],
                                                     pa.string())
                columns[f"{name}.event_ts"] = pa.array(
                    column.event_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        return pa.table(columns)

    def to_pandas(self, with_status: bool = False) -> pd.DataFrame:
        """A DataFrame indexed by entity id, Arrow-backed so int nulls and NaN vs null survive."""
        import pandas as pd  # noqa: PLC0415 - half of a serving import's time, when at the top

        frame = self.to_arrow(with_status).to_pandas(types_mapper=pd.ArrowDtype)
        return frame.set_index("entity_id")


def _transposed(values: list[Sequence[Any] | None]) -> list[tuple[Any, ...]] | None:
    """A view's values feature by feature, every row having values (None for no rows). Rows
    written before features were appended to the view are shorter: the transposition stops at
    the shortest, which still holds every feature asked for, since a row is served only if it
    does (``ViewPlan.width``)."""
    if not values:
        return None
    return list(zip(*cast(list[Sequence[Any]], values), strict=False))
