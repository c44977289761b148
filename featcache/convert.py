"""Coercion of values from SQL drivers and from ``put_rows`` input to the declared types.

Drivers disagree (SQLite gives 0/1 for booleans and text for timestamps, MySQL gives Decimal,
pandas gives numpy scalars and NaT), so everything entering the cache passes through one strict
converter per declared type. A value that does not fit its type is an error naming the view, the
feature and the entity, never a silent cast: a wrong answer served fast is still wrong.
Naive timestamps are taken as UTC; every timestamp leaves as an aware UTC datetime.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Final

from featcache.types import FeatureType

__all__ = [
    "ConversionError",
    "convert_column",
    "converter",
    "timestamp_to_us",
    "timestamps_to_us",
    "us_to_timestamp",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_REAL = (numbers.Real, decimal.Decimal)  # built once, not a union per element
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
_ONE_US = dt.timedelta(microseconds=1)
#: the instants a UTC ``datetime`` can hold (years 1-9999): featcache answers timestamps as
#: such, so one outside (say 9999-12-31T23:00-02:00) is refused when it is read or written
MIN_US: Final = (dt.datetime.min.replace(tzinfo=dt.UTC) - _EPOCH) // _ONE_US
MAX_US: Final = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // _ONE_US
_NONE = type(None)


class ConversionError(ValueError):
    """A value does not fit its declared type; the caller adds which view/feature/entity."""


def _is_missing(value: Any) -> bool:
    # None, pandas NaT/NA; NaN is a real float value and is not missing here
    if value is None:
        return True
    kind = type(value).__name__
    return kind in ("NaTType", "NAType")


def _to_int(value: Any) -> int | None:
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:  # what drivers give: fast
        return value
    if _is_missing(value):
        return None
    if isinstance(value, bool):
        raise ConversionError(f"expected an int, got the bool {value!r}")
    whole_number = (
        isinstance(value, float | decimal.Decimal) and math.isfinite(value) and value == int(value)
    )
    if isinstance(value, numbers.Integral) or whole_number:
        result = int(value)
    else:
        raise ConversionError(f"expected an int, got {value!r}")
    if not _INT64_MIN <= result <= _INT64_MAX:
        raise ConversionError(f"{result} does not fit in a 64-bit int")
    return result


def _to_float(value: Any) -> float | None:
    if type(value) is float:  # what drivers give: fast
        return value
    if _is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real | decimal.Decimal):
        raise ConversionError(f"expected a float, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ConversionError(f"{value!r:.40} does not fit in a float") from None


def _to_bool(value: Any) -> bool | None:
    if type(value) is bool:
        return value
    if _is_missing(value):
        return None
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)  # SQLite and MySQL store booleans as 0/1
    raise ConversionError(f"expected a bool (or 0/1), got {value!r}")


def _to_str(value: Any) -> str | None:
    if type(value) is str and (value.isascii() or is_utf8_text(value)):
        return value
    if _is_missing(value):
        return None
    if isinstance(value, str) and is_utf8_text(value):
        return str(value)
    if isinstance(value, str):
        raise ConversionError(f"{value!r:.60} is not valid Unicode text (a lone surrogate)")
    raise ConversionError(f"expected a str, got {type(value).__name__} {value!r}")


def is_utf8_text(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a lone surrogate (left by a bad decode) does not,
    and would fail in the middle of a Redis command or a SQL query instead of up front."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def to_timestamp(value: Any) -> dt.datetime | None:
    if type(value) is dt.datetime and value.tzinfo is dt.UTC:  # already what we return
        return value
    if _is_missing(value):
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ConversionError(f"expected an ISO 8601 timestamp, got {value!r}") from None
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp; nanoseconds are dropped
        value = value.to_pydatetime(warn=False)
    if not isinstance(value, dt.datetime):
        raise ConversionError(f"expected a timestamp, got {type(value).__name__} {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise _out_of_range(value) from None


def _out_of_range(value: Any) -> ConversionError:
    return ConversionError(f"timestamp {str(value)[:60]!r} is outside the years 1-9999 in UTC")


def _to_embedding(value: Any) -> list[float] | None:
    if _is_missing(value):
        return None
    if isinstance(value, str):  # JSON text, as SQLite/MySQL store arrays
        try:
            value = json.loads(value)
        except ValueError:
            raise ConversionError(f"expected a JSON array of numbers, got {value!r}") from None
        if value is None:  # JSON 'null', as a JSON column holds a None
            return None
    if hasattr(value, "tolist"):  # numpy arrays
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ConversionError(f"expected a list of floats, got {type(value).__name__}")
    out: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, _REAL):
            raise ConversionError(f"expected a list of floats, found the element {item!r}")
        try:
            out.append(float(item))
        except OverflowError:
            raise ConversionError(f"the element {item!r:.40} does not fit in a float") from None
    return out


_CONVERTERS: dict[FeatureType, Callable[[Any], Any]] = {
    FeatureType.INT: _to_int,
    FeatureType.FLOAT: _to_float,
    FeatureType.BOOL: _to_bool,
    FeatureType.STR: _to_str,
    FeatureType.TIMESTAMP: to_timestamp,
    FeatureType.EMBEDDING: _to_embedding,
}


def converter(ftype: FeatureType) -> Callable[[Any], Any]:
    return _CONVERTERS[ftype]


def timestamp_to_us(value: Any) -> int | None:
    """Microseconds since the epoch, exact (no float rounding), or None."""
    ts = to_timestamp(value)
    if ts is None:
        return None
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def us_to_timestamp(us: int | None) -> dt.datetime | None:
    if us is None:
        return None
    return _EPOCH + dt.timedelta(microseconds=us)


# ----------------------------------------------------------------------------- whole columns
#
# The bulk paths (materialize, a read of many rows) convert a column at a time: one C-level
# pass tells whether the driver already gave exactly the declared type (then the column is
# kept as it is), else the scalar converter is mapped over it. Same results, same errors.

_KEEP_AS_IS: dict[FeatureType, frozenset[type]] = {
    FeatureType.FLOAT: frozenset({float, _NONE}),
    FeatureType.BOOL: frozenset({bool, _NONE}),
    FeatureType.STR: frozenset({str, _NONE}),
}


def convert_column(ftype: FeatureType, column: Sequence[Any]) -> Sequence[Any]:
    """``[converter(ftype)(v) for v in column]``, without the calls where they change nothing."""
    kinds = set(map(type, column))
    if ftype is FeatureType.INT:
        if kinds == {int} and min(column) >= _INT64_MIN and max(column) <= _INT64_MAX:
            return column
    elif kinds <= _KEEP_AS_IS.get(ftype, frozenset()):
        return column
    return list(map(_CONVERTERS[ftype], column))


def _str_to_us(text: str) -> int:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConversionError(f"expected an ISO 8601 timestamp, got {text!r}") from None
    return _datetime_to_us(value)


def _datetime_to_us(value: dt.datetime) -> int:
    try:
        us = (value - (_NAIVE_EPOCH if value.tzinfo is None else _EPOCH)) // _ONE_US
    except OverflowError:
        raise _out_of_range(value) from None
    if MIN_US <= us <= MAX_US:  # naive is UTC, always in range; an offset may move it out
        return us
    raise _out_of_range(value)


def timestamps_to_us(column: Sequence[Any]) -> list[int | None]:
    """``[timestamp_to_us(v) for v in column]``: the text (SQLite) and ``datetime`` (other
    drivers) columns without the detour through an aware ``datetime`` per value."""
    kinds = set(map(type, column))
    if kinds == {str}:
        return list(map(_str_to_us, column))
    if kinds == {dt.datetime}:
        return list(map(_datetime_to_us, column))
    return list(map(timestamp_to_us, column))
