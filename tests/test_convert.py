"""The column converters of the bulk paths give exactly what the scalar ones give.

``convert_column`` keeps a column as it is when the driver already gave the declared type
and otherwise maps the scalar converter; ``timestamps_to_us`` takes text and datetimes without
an aware ``datetime`` per value. Both must agree with the scalar path value for value, and fail
where it fails. Pure: no servers.
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pyarrow as pa
import pytest

from featcache.arrow_columns import arrow_micros, holds_exactly
from featcache.convert import (
    ConversionError,
    convert_column,
    converter,
    timestamp_to_us,
    timestamps_to_us,
)
from featcache.types import FeatureType

COLUMNS: list[tuple[FeatureType, list[Any]]] = [
    (FeatureType.INT, [1, -(2**63), 2**63 - 1, 0]),
    (FeatureType.INT, [1, None, 3]),
    (FeatureType.INT, [1.0, decimal.Decimal(7), 2]),
    (FeatureType.FLOAT, [1.5, None, float("nan"), -0.0]),
    (FeatureType.FLOAT, [1, decimal.Decimal("2.5"), 3.0]),
    (FeatureType.BOOL, [True, False, None]),
    (FeatureType.BOOL, [0, 1, None]),
    (FeatureType.STR, ["a", "", None, "\u00e9\u4e2d"]),
    (FeatureType.TIMESTAMP, ["2024-01-02 03:04:05.123456", None]),
    (FeatureType.TIMESTAMP, [dt.datetime(2024, 1, 2, tzinfo=dt.UTC)]),
    (FeatureType.EMBEDDING, ["[1, 2.5]", None, [0.5]]),
]


@pytest.mark.parametrize(("ftype", "column"), COLUMNS)
def test_convert_column_equals_the_scalar_converter(ftype: FeatureType, column: list[Any]) -> None:
    expected = [converter(ftype)(v) for v in column]
    got = list(convert_column(ftype, column))
    assert repr(got) == repr(expected)  # repr: NaN == NaN, -0.0 keeps its sign, types show
    assert [type(v) for v in got] == [type(v) for v in expected]


@pytest.mark.parametrize(("ftype", "column"), [
    (FeatureType.INT, [1, 2**63]),  # all ints, one out of range: not kept as it is
    (FeatureType.INT, [1, True]),
    (FeatureType.FLOAT, [1.0, "x"]),
    (FeatureType.BOOL, [0, 2]),
    (FeatureType.STR, ["a", 1]),
    (FeatureType.TIMESTAMP, ["yesterday"]),
])
def test_convert_column_fails_where_the_scalar_converter_fails(
    ftype: FeatureType, column: list[Any]
) -> None:
    with pytest.raises(ConversionError):
        convert_column(ftype, column)


@pytest.mark.parametrize("column", [
    ["2024-01-02 03:04:05.123456", "1969-12-31 23:59:59.999999", "2024-01-02T03:04:05+02:00"],
    [dt.datetime(2024, 1, 2, 3, 4, 5, 6), dt.datetime(1900, 1, 1, tzinfo=dt.UTC),
     dt.datetime(2024, 6, 1, tzinfo=dt.timezone(dt.timedelta(hours=-7)))],
    ["2024-01-02 03:04:05", None, dt.datetime(2024, 1, 2)],  # mixed: the general path
])
def test_timestamps_to_us_equals_the_scalar_path(column: list[Any]) -> None:
    assert timestamps_to_us(column) == [timestamp_to_us(v) for v in column]


def test_timestamps_to_us_rejects_text_that_is_not_a_timestamp() -> None:
    with pytest.raises(ConversionError, match="ISO 8601"):
        timestamps_to_us(["2024-01-02", "soon"])


@pytest.mark.parametrize(("texts", "by_arrow"), [
    (["2026-11-26 12:34:56", "2026-11-26 12:34:56.123456", "2026-11-26T12:34:56.5",
      "2026-11-26", "2026-11-26 12", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999",
      None], True),
    (["2026-11-26 12:34:56+00:00", "2026-11-26T12:34:56Z", "2026-11-26 12:34:56.1-05:30",
      "2026-11-26 12:34:56+0200", None], True),
    (["2026-11-26 12:34:56", "2026-11-26 12:34:56+02:00"], False),  # naive and aware mixed
    (["2026-11-26 12:34:56.1234567"], False),  # Python truncates past 6 digits, Arrow refuses
    (["20261126T123456"], False),  # basic format: Python only
])
def test_sqlite_text_timestamps_parsed_by_arrow_equal_pythons(
    texts: list[str | None], by_arrow: bool
) -> None:
    """The ADBC path parses SQLite's text timestamps in Arrow where Arrow's parser takes the
    whole column, and must then give exactly the microseconds Python gives; elsewhere it
    hands the column to Python (None)."""
    got = arrow_micros(pa.chunked_array([pa.array(texts, pa.string())]))
    assert (got is not None) == by_arrow
    if got is not None:
        assert got == timestamps_to_us(texts)


_ARROW_COLUMNS: list[pa.Array[Any]] = [
    pa.array([1, None, -(2**63), 2**63 - 1], pa.int64()),
    pa.array([1, None, -7], pa.int32()),
    pa.array([1, None], pa.int8()),
    pa.array([1, None, 2**64 - 1], pa.uint64()),
    pa.array([1.5, None, float("nan"), float("inf"), -0.0], pa.float64()),
    pa.array([1.5, None], pa.float32()),
    pa.array([1.5, None], pa.float16()),
    pa.array(["a", None, "", "東京"], pa.string()),
    pa.array(["a", None], pa.large_string()),
    pa.array([True, None, False], pa.bool_()),
    pa.array([b"a", None], pa.binary()),
    pa.array([dt.datetime(2026, 1, 1), None], pa.timestamp("us")),
    pa.array([[1.0, 2.0], None], pa.list_(pa.float64())),
]


_KEPT = [(f, c) for f in FeatureType for c in _ARROW_COLUMNS if holds_exactly(f, c.type)]


@pytest.mark.parametrize(("ftype", "column"), _KEPT,
                         ids=[f"{f.value}-{c.type}" for f, c in _KEPT])
def test_arrow_columns_kept_as_they_are_are_what_conversion_gives(
    ftype: FeatureType, column: pa.Array[Any]
) -> None:
    """The ADBC path skips the converters for an Arrow column whose type already is the
    declared one (``holds_exactly``); that must change nothing: converting those values
    returns them unchanged, value for value and type for type."""
    values = column.to_pylist()
    converted = list(convert_column(ftype, values))
    assert [(type(v), repr(v)) for v in converted] == [(type(v), repr(v)) for v in values]


def test_which_arrow_types_skip_conversion() -> None:
    assert len(_KEPT) == 8  # int64/32/8, float64/32, string, large_string, bool
    assert holds_exactly(FeatureType.INT, pa.int64())
    assert holds_exactly(FeatureType.FLOAT, pa.float32())
    assert holds_exactly(FeatureType.STR, pa.large_string())
    assert holds_exactly(FeatureType.BOOL, pa.bool_())
    assert not holds_exactly(FeatureType.INT, pa.uint64())  # may exceed int64
    assert not holds_exactly(FeatureType.FLOAT, pa.int64())  # ints become floats
    assert not holds_exactly(FeatureType.FLOAT, pa.float16())  # numpy scalars
    assert not holds_exactly(FeatureType.TIMESTAMP, pa.timestamp("us"))
    assert not holds_exactly(FeatureType.EMBEDDING, pa.list_(pa.float64()))
