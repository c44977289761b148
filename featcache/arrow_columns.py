"""Arrow columns as featcache's declared types, a column at a time: which Arrow types hold a
feature type exactly (their values are kept as they are), and timestamp columns as
microseconds. Shared by the ADBC reads (``featcache.offline.arrow``) and the writer of Arrow
batches (``featcache.batches``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from featcache.convert import MAX_US, MIN_US
from featcache.types import FeatureType

__all__ = ["arrow_micros", "holds_exactly", "parsed_text"]


def holds_exactly(ftype: FeatureType, arrow_type: pa.DataType) -> bool:
    """Whether every value of an Arrow column of this type, as Python, is what featcache's
    converter for ``ftype`` would return for it unchanged (or None): signed integers of at
    most 64 bits for INT (Python ints within int64), floating point for FLOAT, UTF-8 text for
    STR, booleans for BOOL. Timestamps and embeddings always go through the converters."""
    if ftype is FeatureType.INT:
        return bool(pa.types.is_signed_integer(arrow_type))
    if ftype is FeatureType.FLOAT:
        return bool(pa.types.is_floating(arrow_type)) and arrow_type != pa.float16()
    if ftype is FeatureType.STR:
        return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))
    if ftype is FeatureType.BOOL:
        return bool(pa.types.is_boolean(arrow_type))
    return False


def arrow_micros(column: pa.ChunkedArray[Any]) -> list[int | None] | None:
    """Microseconds since the epoch of an Arrow timestamp column (naive ones read as UTC,
    like every featcache read), or of SQLite's ISO 8601 text, parsed by Arrow; None when
    Arrow cannot (then ``OfflineStore.convert_columns`` parses the text in Python).

    Arrow's parser takes a subset of what ``datetime.fromisoformat`` takes (it refuses more
    than six fractional digits, for one) and gives the same instant wherever it parses: text
    without an offset as naive (UTC, as featcache reads it), text with offsets as aware. A
    column that mixes the two, or anything else it refuses, goes to Python whole.
    """
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        parsed = parsed_text(column)
        if parsed is None:
            return None
        as_int = parsed.cast(pa.int64())
    elif pa.types.is_timestamp(column.type):
        as_int = column.cast(pa.timestamp("us", column.type.tz)).cast(pa.int64())
    else:
        return None
    low, high = pc.min_max(as_int).values()
    if (low.is_valid and low.as_py() < MIN_US) or (high.is_valid and high.as_py() > MAX_US):
        return None  # beyond a UTC datetime (Arrow's range is wider): Python says which row
    micros: list[int | None] = as_int.to_pylist()
    return micros


def parsed_text(column: pa.ChunkedArray[Any]) -> pa.ChunkedArray[Any] | None:
    """ISO 8601 text as an Arrow timestamp column, or None where Arrow refuses any of it."""
    for target in _TEXT_TARGETS:
        try:
            return column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None


#: naive text first (what SQLite columns hold), then text with offsets
_TEXT_TARGETS = (pa.timestamp("us"), pa.timestamp("us", "UTC"))
