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
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from featcache.convert import us_to_timestamp
from featcache.l1 import InOrder
from featcache.request import EntityId, Plan
from featcache.types import FeatureType, Status

if TYPE_CHECKING:  # imported by the calls that use them: a serving import pays for neither
    import pandas as pd
    import pyarrow as pa

__all__ = ["EVENT_US", "STATUS", "VALUES", "Answer", "Column", "FeatureResult", "arrow_type"]


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

    __slots__ = ("_answers", "_dicts", "_ids", "_plan")

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

    # ---------------------------------------------------------------- Mapping

    def __getitem__(self, entity_id: EntityId) -> dict[str, Any]:
        cached = self._dicts.get(entity_id)
        if cached is not None:
            return cached
        if self._plan is None:
            raise KeyError(entity_id)
        plan = self._plan
        if len(self._answers) == 1:  # one view: pick the requested positions in one C call
            vals = self._answers[0][entity_id][VALUES]  # KeyError if not asked for
            if vals is None:
                out = dict.fromkeys(plan.names)
            else:
                out = dict(zip(plan.names, plan.pick(vals), strict=True))
        else:
            values = [answers[entity_id][VALUES] for answers in self._answers]
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
        return bool(self._answers) and entity_id in self._answers[0]

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
        return self._answers[v][entity_id]

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
        return {
            eid: {
                name: self._answers[v][eid][STATUS]
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
            for answer in answers.values():
                counts[answer[STATUS]] += per_view[v]
        return counts

    # ---------------------------------------------------------------- columnar

    def columns(self) -> list[Column]:
        """Per requested feature, its values, statuses and event times in the ids' order:
        the result column by column (``to_arrow`` and the HTTP server's answers)."""
        plan = self._plan
        if plan is None or not plan.views:
            return []
        in_order = [
            answers.in_order() if isinstance(answers, InOrder)
            else [answers[eid] for eid in self._ids]
            for answers in self._answers
        ]
        # a row's status and event time are its view's: one list per view, shared by the
        # view's columns (``statuses`` and ``event_us`` of one view are the same objects)
        statuses = [[r[STATUS] for r in rows] for rows in in_order]
        event_us = [[r[EVENT_US] for r in rows] for rows in in_order]
        out = []
        for name, (v, f) in zip(plan.names, plan.columns, strict=True):
            view = plan.views[v].view
            out.append(Column(
                name, view.name, view.features[f].type,
                [None if (vals := r[VALUES]) is None else vals[f] for r in in_order[v]],
                statuses[v], event_us[v],
            ))
        return out

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
