"""Validation of a ``get_features`` call, done before any I/O.

Resolving feature references is pure and the same few feature lists recur on a serving path,
so plans are memoised per tuple of names; validating ids is one pass with a fast path for the
common all-``int`` or all-``str`` batch.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from featcache.codec import RowCodec
from featcache.config import CacheConfig, FeatureView
from featcache.convert import is_utf8_text
from featcache.errors import (
    AmbiguousFeature,
    InvalidEntityId,
    InvalidRequest,
    UnknownFeature,
    UnknownView,
)
from featcache.freshness import xfetch_delta_floor

__all__ = [
    "EntityId",
    "Plan",
    "Planner",
    "ViewPlan",
    "check_id",
    "check_ids",
    "distinct_ids",
    "id_sequence",
    "normalize_ids",
]

EntityId = int | str
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# isinstance() tuples built once: ``list | tuple`` builds a union object on every evaluation
_TEXT = (str, bytes)
_SEQUENCES = (list, tuple)


@dataclass(frozen=True, slots=True)
class ViewPlan:
    """What one call needs from one view."""

    view: FeatureView
    codec: RowCodec
    features: tuple[int, ...]  # requested feature indices in the view
    width: int  # a cached row must hold at least this many features
    max_age_ms: int  # the strictest max_age among the requested features
    ttl_ms: int
    negative_ttl_ms: int
    stale_window_ms: int  # max_age + stale_if_error: how long a row may be served STALE
    view_max_age_ms: int  # the strictest max_age of the whole view (L1's soft deadline)
    view_width: int  # features in the view
    #: the XFetch delta floor of ``max_age_ms`` (``featcache.freshness.xfetch_delta_floor``)
    delta_floor_ms: int


@dataclass(frozen=True, slots=True)
class Plan:
    names: tuple[str, ...]  # output names, as the caller spelled them
    columns: tuple[tuple[int, int], ...]  # per name: (index into views, feature index)
    views: tuple[ViewPlan, ...]
    entity_type: str
    #: the requested values of a single-view plan's row, in output order (one C call)
    pick: Callable[[Sequence[Any]], Sequence[Any]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        positions = [f for _, f in self.columns]
        picker: Callable[[Sequence[Any]], Sequence[Any]]
        if len(positions) == 1:
            only = positions[0]

            def picker(values: Sequence[Any]) -> Sequence[Any]:
                return (values[only],)
        else:
            picker = operator.itemgetter(*positions)
        object.__setattr__(self, "pick", picker)


class Planner:
    """Resolves ``"view:feature"`` and bare ``"feature"`` references against the config."""

    def __init__(self, config: CacheConfig, codecs: dict[str, RowCodec]) -> None:
        self._config = config
        self._codecs = codecs
        self._views = {v.name: v for v in config.views}
        owners: dict[str, list[str]] = {}
        for view in config.views:
            for feature in view.features:
                owners.setdefault(feature.name, []).append(view.name)
        self._owners = owners
        self._all_refs = [f"{v.name}:{f.name}" for v in config.views for f in v.features]
        self.plan = lru_cache(maxsize=256)(self._plan)

    def _resolve(self, ref: str) -> tuple[FeatureView, int]:
        if not isinstance(ref, str):
            raise InvalidRequest(f"feature references are strings, got {ref!r}")
        view_name, sep, feature_name = ref.partition(":")
        if sep:
            view = self._views.get(view_name)
            if view is None:
                raise UnknownView(view_name, list(self._views))
            names = view.feature_names
            if feature_name not in names:
                close = difflib.get_close_matches(ref, self._all_refs, n=3, cutoff=0.5)
                raise UnknownFeature(ref, close)
            return view, names.index(feature_name)
        owners = self._owners.get(ref)
        if not owners:
            close = difflib.get_close_matches(ref, list(self._owners) + self._all_refs, n=3,
                                              cutoff=0.5)
            raise UnknownFeature(ref, close)
        if len(owners) > 1:
            raise AmbiguousFeature(ref, [f"{owner}:{ref}" for owner in owners])
        view = self._views[owners[0]]
        return view, view.feature_names.index(ref)

    def _plan(self, refs: tuple[str, ...]) -> Plan:
        if not refs:
            raise InvalidRequest("feature_names is empty: ask for at least one feature")
        order: list[str] = []
        wanted: dict[str, list[int]] = {}
        columns_by_view: list[tuple[str, int]] = []
        seen: set[str] = set()
        names: list[str] = []
        for ref in refs:
            view, index = self._resolve(ref)
            if ref in seen:
                continue
            seen.add(ref)
            if view.name not in wanted:
                wanted[view.name] = []
                order.append(view.name)
            if index not in wanted[view.name]:
                wanted[view.name].append(index)
            names.append(ref)
            columns_by_view.append((view.name, index))
        entity_types = {self._views[name].entity_type for name in order}
        if len(entity_types) > 1:
            raise InvalidRequest(
                "these features come from views keyed by different id types "
                f"({', '.join(f'{n}: {self._views[n].entity_type}' for n in order)}); "
                "ask for them in separate calls"
            )
        plans = []
        for name in order:
            view = self._views[name]
            indices = tuple(wanted[name])
            max_age = min(view.features[i].max_age for i in indices)
            plans.append(
                ViewPlan(
                    view=view,
                    codec=self._codecs[name],
                    features=indices,
                    width=max(indices) + 1,
                    max_age_ms=int(max_age * 1000),
                    ttl_ms=int(view.ttl * 1000),
                    negative_ttl_ms=int(view.negative_ttl * 1000),
                    stale_window_ms=int((max_age + view.stale_if_error) * 1000),
                    view_max_age_ms=int(min(f.max_age for f in view.features) * 1000),
                    view_width=len(view.features),
                    delta_floor_ms=xfetch_delta_floor(int(max_age * 1000)),
                )
            )
        position = {name: i for i, name in enumerate(order)}
        columns = tuple((position[v], i) for v, i in columns_by_view)
        return Plan(tuple(names), columns, tuple(plans), entity_types.pop())


def _bad_id(value: Any, entity_type: str, max_len: int) -> InvalidEntityId:
    if value is None:
        return InvalidEntityId("entity id None is not allowed")
    if isinstance(value, float) and math.isnan(value):
        return InvalidEntityId("entity id NaN is not allowed")
    if isinstance(value, bytes | bytearray | memoryview):
        return InvalidEntityId(f"entity id {bytes(value)[:40]!r} is bytes; decode it to str first")
    if isinstance(value, bool):
        return InvalidEntityId(f"entity id {value!r} is a bool; ids are {entity_type}")
    if isinstance(value, str) and entity_type == "str":
        if not value:
            return InvalidEntityId("entity id '' (empty string) is not allowed")
        if "\x00" in value:
            return InvalidEntityId(
                f"entity id {value!r:.60} contains a NUL character, which SQL text columns "
                "(PostgreSQL's) cannot hold"
            )
        if not is_utf8_text(value):
            return InvalidEntityId(
                f"entity id {value!r:.60} is not valid Unicode text (a lone surrogate)"
            )
        return InvalidEntityId(
            f"entity id of {len(value.encode())} bytes is longer than the limit of {max_len} "
            "bytes (limits.max_id_length)"
        )
    return InvalidEntityId(
        f"entity id {value!r:.60} is {type(value).__name__}; this view's ids are {entity_type}"
    )


def id_sequence(entity_ids: Iterable[Any]) -> Sequence[Any]:
    """The ids as a list or tuple (an iterator is read once, here); ``InvalidRequest`` for a
    single str/bytes or something that is not iterable."""
    if isinstance(entity_ids, _TEXT):
        raise InvalidRequest(
            "entity_ids must be a list of ids, not a single "
            f"{type(entity_ids).__name__}; wrap it: [{entity_ids!r:.40}]"
        )
    if isinstance(entity_ids, _SEQUENCES):
        return entity_ids
    try:
        return list(entity_ids)
    except TypeError:
        raise InvalidRequest(
            f"entity_ids must be an iterable of ids, got {type(entity_ids).__name__}"
        ) from None


def normalize_ids(entity_ids: Iterable[Any], entity_type: str, max_len: int) -> list[EntityId]:
    """Unique ids in first-seen order; raises ``InvalidEntityId`` for the first bad one."""
    ids = id_sequence(entity_ids)
    if len(ids) == 1 and entity_type == "int":  # one id, the commonest call: no passes
        only = ids[0]
        if type(only) is int and _INT64_MIN <= only <= _INT64_MAX:
            return [only]
    # Validate before de-duplicating: True == 1 and 1.0 == 1, so a bad id equal to a good one
    # would otherwise vanish into it silently.
    # The common cases take C-level passes only: this runs on every call that L1 does not
    # answer whole (see ``distinct_ids`` for those).
    if _exact_type(ids, entity_type) and _within_limits(ids, entity_type, max_len):
        return _unique(ids)
    return list(dict.fromkeys(check_id(x, entity_type, max_len) for x in ids))


def distinct_ids(ids: Sequence[Any], entity_type: str) -> list[EntityId] | None:
    """A copy of ``ids`` when every one is exactly of the view's type and none repeats, else
    None (then ``normalize_ids``).

    Such ids are not yet checked against the limits (64-bit range, byte length, NUL): an L1
    that answers every one of them needs no such check, since each id it holds was checked
    before it was stored and these are equal to them, type included. Only ids going on to
    Redis or SQL are checked, by ``check_ids``. Skipping that pass is a tenth of a 100-id L1
    hit (docs/benchmarks.md).
    """
    if ids and _exact_type(ids, entity_type) and len(set(ids)) == len(ids):
        return list(ids)
    return None


def check_ids(ids: Sequence[EntityId], entity_type: str, max_len: int) -> None:
    """``InvalidEntityId`` for the first id of a ``distinct_ids`` answer beyond the limits."""
    if not _within_limits(ids, entity_type, max_len):
        for x in ids:
            check_id(x, entity_type, max_len)


def _exact_type(ids: Sequence[Any], entity_type: str) -> bool:
    """Every id exactly ``int`` (no bool, no numpy scalar) or exactly ``str``: one C pass."""
    return [*map(type, ids)].count(int if entity_type == "int" else str) == len(ids)


def _within_limits(ids: Sequence[EntityId], entity_type: str, max_len: int) -> bool:
    """True when every id of an ``_exact_type`` batch is surely valid (C-level passes); False
    sends it to ``check_id``, which decides each one exactly."""
    if entity_type == "int":
        try:
            array("q", cast(Sequence[int], ids))  # OverflowError past a signed 64-bit int
        except OverflowError:
            return False
        return True
    limit = max_len // 4  # a str this many characters long is under the byte limit for sure
    if not all(0 < len(x) <= limit for x in ids):  # type: ignore[arg-type]
        return False
    joined = "".join(ids)  # type: ignore[arg-type]  # one pass for a NUL or lone surrogate
    return "\x00" not in joined and (joined.isascii() or is_utf8_text(joined))


def _unique(ids: Sequence[EntityId]) -> list[EntityId]:
    """A copy in first-seen order; a set is cheaper than ``dict.fromkeys`` when, as usual, no
    id repeats."""
    return list(ids) if len(set(ids)) == len(ids) else list(dict.fromkeys(ids))


def check_id(value: Any, entity_type: str, max_len: int) -> EntityId:
    """One id, converted to ``int`` or ``str`` (numpy scalars too), or ``InvalidEntityId``."""
    if entity_type == "int":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            number = int(value)  # numpy/pandas integers too
            if _INT64_MIN <= number <= _INT64_MAX:
                return number
            raise InvalidEntityId(f"entity id {number} does not fit in a 64-bit int")
        raise _bad_id(value, entity_type, max_len)
    if isinstance(value, str) and value and "\x00" not in value and is_utf8_text(value) and len(
            value.encode()) <= max_len:
        return str(value)
    raise _bad_id(value, entity_type, max_len)
