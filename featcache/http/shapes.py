"""Request and response bodies of the HTTP server, as plain data: pure, no I/O.

Feast's feature server (``POST /get-online-features``) takes::

    {"features": ["view:feature", ...], "entities": {"<join key>": [id, ...]},
     "full_feature_names": false}

and answers, column by column, the join key first::

    {"metadata": {"feature_names": ["<join key>", "feature", ...]},
     "results": [{"values": [...], "statuses": ["PRESENT", ...],
                  "event_timestamps": ["2026-01-01T00:00:00Z", ...]}, ...]}

featcache's statuses map onto Feast's: a served value (``HIT_L1``, ``HIT_REDIS``, ``FILLED``)
is ``PRESENT``, or ``NULL_VALUE`` when the value is null; ``ABSENT`` and ``UNAVAILABLE`` are
``NOT_FOUND``; ``STALE`` is ``OUTSIDE_MAX_AGE``, with its value, as Feast's own server gives
it. Every feature's vector also carries ``featcache_statuses``, the full statuses, which a Feast
client ignores. Timestamps (event times and ``timestamp`` features) are RFC 3339 strings in
UTC; a missing event time is the epoch, as Feast writes an unset one.

featcache's own ``POST /v1/features`` takes ``{"ids": [...], "features": [...]}`` and answers
``{"ids": [...], "features": {"<name>": {"view", "type", "values"}}, "views": {"<view>":
{"statuses", "event_timestamps"}}}``: a row's status and event time are those of every feature
read from it, so they are given once per view, in the ids' order (``null`` event time where no
row was found); or the Arrow IPC stream of ``FeatureResult.to_arrow(with_status=True)`` when
asked for by ``Accept``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

from featcache.config import CacheConfig
from featcache.errors import InvalidRequest
from featcache.result import Column, FeatureResult
from featcache.types import Status

__all__ = [
    "ARROW_STREAM",
    "WRITE_TIMES",
    "FeastRequest",
    "FeaturesRequest",
    "InvalidateRequest",
    "feast_response",
    "features_response",
    "parse_feast_request",
    "parse_features_request",
    "parse_invalidate_request",
]

#: the media type of an Arrow IPC stream, asked for in ``Accept``
ARROW_STREAM = "application/vnd.apache.arrow.stream"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECONDS = np.dtype("datetime64[us]")
#: the orjson options a body with event times is written with: numpy arrays, a naive time
#: (a ``datetime64``) as UTC, and UTC as ``Z``
WRITE_TIMES = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
_SERVED = frozenset({Status.HIT_L1, Status.HIT_REDIS, Status.FILLED})
_FEAST_STATUS = {Status.ABSENT: "NOT_FOUND", Status.UNAVAILABLE: "NOT_FOUND",
                 Status.STALE: "OUTSIDE_MAX_AGE"}


class FeastRequest(NamedTuple):
    features: list[str]  # as the client spelled them ("view:feature")
    join_key: str
    ids: list[Any]
    full_feature_names: bool


class FeaturesRequest(NamedTuple):
    ids: list[Any]
    features: list[str]


class InvalidateRequest(NamedTuple):
    view: str
    ids: list[Any] | None  # None: the whole view


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got "
                             f"{type(body).__name__}")
    return body


def _names(body: Mapping[str, Any], key: str) -> list[str]:
    names = body.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InvalidRequest(f"{key!r} must be a non-empty list of feature names")
    return names


def _ids(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a list of entity ids, got "
                             f"{type(value).__name__}")
    return value


def _unknown(body: Mapping[str, Any], allowed: Sequence[str]) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, extra))}; expected "
                             f"{', '.join(allowed)}")


def parse_feast_request(body: Any, config: CacheConfig) -> FeastRequest:
    """Feast's request, checked: one join key, the entity column of the views it names."""
    body = _object(body)
    if body.get("feature_service") is not None:
        raise InvalidRequest("feature services are not supported: list the features "
                             "('features': ['view:feature', ...])")
    _unknown(body, ("features", "entities", "full_feature_names", "feature_service"))
    features = _names(body, "features")
    entities = body.get("entities")
    if not isinstance(entities, dict) or len(entities) != 1:
        raise InvalidRequest("'entities' must be an object with exactly one join key: "
                             "{\"<join key>\": [id, ...]}")
    ((join_key, ids),) = entities.items()
    full = body.get("full_feature_names", False)
    if not isinstance(full, bool):
        raise InvalidRequest("'full_feature_names' must be true or false")
    columns = set()
    for ref in features:
        view, sep, _ = ref.partition(":")
        if sep:  # an unknown view is UnknownView, a 400 like any bad reference
            columns.add(config.view(view).entity_column)
    if columns and join_key not in columns:
        raise InvalidRequest(f"join key {join_key!r} is not the entity column of the views "
                             f"requested (expected {' or '.join(map(repr, sorted(columns)))})")
    return FeastRequest(features, join_key, _ids(ids, f"entities[{join_key!r}]"), full)


def parse_features_request(body: Any) -> FeaturesRequest:
    body = _object(body)
    _unknown(body, ("ids", "features"))
    return FeaturesRequest(_ids(body.get("ids"), "'ids'"), _names(body, "features"))


def parse_invalidate_request(body: Any) -> InvalidateRequest:
    body = _object(body)
    _unknown(body, ("view", "ids"))
    view = body.get("view")
    if not isinstance(view, str) or not view:
        raise InvalidRequest("'view' must be the name of a view")
    ids = body.get("ids")
    return InvalidateRequest(view, None if ids is None else _ids(ids, "'ids'"))


def _event_times(event_us: list[int | None], missing: dt.datetime | None) -> Any:
    """The event times as orjson writes them in RFC 3339 UTC (with ``WRITE_TIMES``): when
    every row has one, a numpy ``datetime64[us]`` array, which orjson writes in C (6 us for
    100 event times, against 45 us to build and write 100 datetimes); else aware datetimes,
    ``missing`` where a row has none."""
    if None not in event_us:
        return np.array(event_us, dtype=_MICROSECONDS)
    return [missing if us is None else _EPOCH + dt.timedelta(0, 0, us) for us in event_us]


class _Shared:
    """What the columns of one view share, computed once per response: a view's statuses and
    event times are the same list objects in every column of it (``FeatureResult.columns``)."""

    def __init__(self) -> None:
        self._stamps: dict[int, list[str | None]] = {}
        self._feast: dict[int, tuple[list[str], bool]] = {}

    def stamps(self, event_us: list[int | None], missing: dt.datetime | None
               ) -> list[str | None]:
        """RFC 3339 strings, made once per view: by orjson's own datetime writer, in one
        call (a datetime written once per column would cost as much as the rest of the
        body)."""
        found = self._stamps.get(id(event_us))
        if found is None:
            found = orjson.loads(orjson.dumps(_event_times(event_us, missing),
                                              option=WRITE_TIMES))
            self._stamps[id(event_us)] = found
        return found

    def feast_statuses(self, statuses: list[Status]) -> tuple[list[str], bool]:
        """Feast's statuses of served rows (null values aside), and whether every row was
        served (then only a null value changes a status)."""
        found = self._feast.get(id(statuses))
        if found is None:
            mapped = ["PRESENT" if s in _SERVED else _FEAST_STATUS[s] for s in statuses]
            found = (mapped, all(s in _SERVED for s in statuses))
            self._feast[id(statuses)] = found
        return found


def _feast_vector(column: Column, shared: _Shared) -> dict[str, Any]:
    statuses, all_served = shared.feast_statuses(column.statuses)
    values = column.values
    if None in values:
        statuses = ["NULL_VALUE" if value is None and status == "PRESENT" else status
                    for status, value in zip(statuses, values, strict=True)]
    if not all_served:  # a STALE value is given, as Feast does; others are null
        values = [value if s in _SERVED or s is Status.STALE else None
                  for s, value in zip(column.statuses, values, strict=True)]
    return {
        "values": values,
        "statuses": statuses,
        "event_timestamps": shared.stamps(column.event_us, _EPOCH),
        "featcache_statuses": column.statuses,  # orjson writes an enum as its value
    }


def feast_response(result: FeatureResult, request: FeastRequest) -> dict[str, Any]:
    """Feast's response body for ``result`` (orjson serializes its datetimes; see the module
    docstring for the statuses). Ids repeated in the request are answered in every place."""
    columns = result.columns()
    by_name = {c.name: c for c in columns}
    ids = request.ids
    distinct = list(result)
    if len(distinct) != len(ids):  # duplicates collapse in get_features: spread them back
        position = {entity: i for i, entity in enumerate(distinct)}
        order = [position[entity] for entity in ids]
        by_name = {name: Column(c.name, c.view, c.type, [c.values[i] for i in order],
                                [c.statuses[i] for i in order],
                                [c.event_us[i] for i in order])
                   for name, c in by_name.items()}
    names = [request.join_key]
    shared = _Shared()
    results: list[dict[str, Any]] = [{
        "values": ids, "statuses": ["PRESENT"] * len(ids),
        "event_timestamps": [_EPOCH] * len(ids),
    }]
    for ref in request.features:
        view, sep, feature = ref.partition(":")
        names.append(f"{view}__{feature}" if request.full_feature_names and sep
                     else feature if sep else ref)
        results.append(_feast_vector(by_name[ref], shared))
    return {"metadata": {"feature_names": names}, "results": results}


def features_response(result: FeatureResult) -> dict[str, Any]:
    """featcache's own columnar body for ``result``: each feature's values, and per view the
    rows' statuses and event times (a row's status is every one of its features'). Event
    times are written by the caller's ``orjson.dumps`` with ``WRITE_TIMES``."""
    features: dict[str, Any] = {}
    views: dict[str, Any] = {}
    for column in result.columns():
        features[column.name] = {"view": column.view, "type": column.type.value,
                                 "values": column.values}
        if column.view not in views:
            views[column.view] = {"statuses": column.statuses,  # orjson writes enum values
                                  "event_timestamps": _event_times(column.event_us, None)}
    return {"ids": list(result), "features": features, "views": views}
