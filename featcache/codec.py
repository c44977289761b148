"""The row value format, value layout version 2 (keys: ``featcache.keys``).

A row value is one msgpack array of eight elements whose first twelve bytes are written by
hand, so that they sit at fixed offsets::

    byte 0      0x98, a msgpack array of 8
    byte 1      value layout version (2)
    byte 2      kind: 0x52 ("R") a row, 0x41 ("A") "SQL has no such entity" (a negative
                entry), 0x54 ("T") a tombstone left by an invalidation (the fence of DESIGN
                section 4)
    byte 3      0xd3, a msgpack int64
    bytes 4-11  event timestamp, microseconds since the Unix epoch, big-endian int64
                (INT64_MIN when the row has none, and for A and T)
    then        schema_fp, epoch, loaded_at_ms, fill_ms, [v0, v1, ...]        (R)
                0, epoch, loaded_at_ms, 0, []                                  (A)
    T           the twelve bytes, then the invalidation's stream entry id (unique per
                invalidation), written by the invalidation script in ``featcache.invalidation``

Why one array, not a header and then a body: a row of the view's current schema is checked
and parsed by ONE typed msgspec decode of the whole value, in C (the layout version, the kind
and the schema fingerprint are ``Literal`` fields of the decoder's type, the values a nested
array that becomes the answer's tuple as it is), with no Python step and no byte slice per
row; see docs/architecture.md.

``epoch`` is the view's epoch when the row was read (``featcache.invalidation``): a row of an
older epoch was invalidated with its whole view and is a miss.

The event timestamp sits at a fixed offset so the conditional write script in
``featcache.redis_store`` can compare an old row with a new one without parsing msgpack: an
older row never overwrites a newer one. ``schema_fp`` fingerprints the view's ordered
``(name, type)`` list; a row written before features were appended to the view still decodes,
and the features it lacks come back as ``NO_VALUE`` (a miss for those features only). Any other
schema change, another layout version, or bytes that do not decode make the row a miss and
bump a metric; nothing here ever raises to the caller. ``fill_ms`` is how long the SQL read
behind this row took (the ``delta`` of XFetch early refresh). msgpack never executes anything
it reads, unlike pickle.

Types: int (int64), float (double, NaN and inf kept), bool, str, None as themselves;
timestamps as the msgpack Timestamp extension, decoded as aware UTC datetimes; ``list[float]``
embeddings as raw little-endian float64 bytes, which is smaller and much faster than a msgpack
array of floats.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import add, itemgetter
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgpack
import msgspec

from featcache.config import FeatureView
from featcache.types import NO_VALUE, FeatureType

__all__ = [
    "BODY_EPOCH",
    "BODY_FILL_MS",
    "BODY_LOADED_MS",
    "BODY_VALUES",
    "KIND_ABSENT",
    "KIND_ROW",
    "KIND_TOMBSTONE",
    "NO_EVENT",
    "TOMBSTONE_HEAD",
    "VALUE_VERSION",
    "DecodedRow",
    "RowBatch",
    "RowCodec",
    "held_event_us",
    "is_tombstone",
]

VALUE_VERSION: Final = 2
NO_EVENT: Final = -(2**63)
KIND_ROW: Final = 0x52  # "R"
KIND_ABSENT: Final = 0x41  # "A"
KIND_TOMBSTONE: Final = 0x54  # "T"
_ARRAY_OF_8: Final = 0x98
_INT64: Final = 0xD3
#: the twelve hand-written bytes: array of 8, version, kind, int64 marker, event time
_HEAD = struct.Struct(">BBBBq")
_HEAD_SIZE: Final = _HEAD.size
#: a tombstone's first twelve bytes; the invalidation script appends its stream entry id
TOMBSTONE_HEAD: Final = _HEAD.pack(_ARRAY_OF_8, VALUE_VERSION, KIND_TOMBSTONE, _INT64, NO_EVENT)

#: Where each field sits in a decoded value (``RowBatch.bodies``): the event time at 2, then
#: these; ``BODY_VALUES`` holds the row's values as one tuple.
BODY_EVENT: Final = 2
BODY_FP: Final = 3
BODY_EPOCH: Final = 4
BODY_LOADED_MS: Final = 5
BODY_FILL_MS: Final = 6
BODY_VALUES: Final = 7

_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_STORED_TYPE: Final[dict[FeatureType, Any]] = {
    FeatureType.INT: _Int64,
    FeatureType.FLOAT: float,  # an int there reads as the same float: lossless, so allowed
    FeatureType.BOOL: bool,
    FeatureType.STR: str,
    FeatureType.TIMESTAMP: dt.datetime,  # the msgpack Timestamp extension, aware UTC
    FeatureType.EMBEDDING: bytes,  # raw little-endian float64, unpacked after
}
_Version = Literal[2]  # VALUE_VERSION, spelled as the type msgspec checks
_ABSENT_VALUE = msgspec.msgpack.Decoder(
    tuple[_Version, Literal[0x41], _Int64, Literal[0], _Int64, _Int64, _Int64, tuple[()]])
_ANY_VALUE = msgspec.msgpack.Decoder()


def _row_decoder(fp: int, types: Sequence[FeatureType]) -> msgspec.msgpack.Decoder[Any]:
    """A decoder of a whole row value of schema ``fp`` whose features are ``types`` (each
    also null): msgspec refuses anything else (another version, kind or schema, a bool for an
    int, an int beyond int64, text for a float...) while it parses, in C."""
    values: Any = tuple[tuple(_STORED_TYPE[t] | None for t in types)]  # type: ignore[misc]
    whole: Any = tuple[_Version, Literal[0x52], _Int64, Literal[fp],  # type: ignore[valid-type]
                       _Int64, _Int64, _Int64, values]
    return msgspec.msgpack.Decoder(whole)


_events = itemgetter(BODY_EVENT)

#: Feature types whose values (as ``featcache.convert`` gives them, and embeddings as packed
#: bytes) msgspec packs to exactly msgpack's bytes: the same smallest int encodings, float64,
#: str/bin of every length (tests/test_codec.py checks the boundaries). Not timestamps: a
#: naive datetime, which msgpack refuses, msgspec would write as text.
_MSGSPEC_SAFE = frozenset({FeatureType.INT, FeatureType.FLOAT, FeatureType.BOOL,
                           FeatureType.STR, FeatureType.EMBEDDING})
_MSGSPEC_ENCODER = msgspec.msgpack.Encoder()


class RowBatch(NamedTuple):
    """Rows of one view decoded together: what ``RowCodec.decode_rows`` returns."""

    events_us: list[int | None]  # the event time of each row, None where it has none
    bodies: list[tuple[Any, ...]]  # each row's decoded value: the BODY_* fields


_LITTLE = sys.byteorder == "little"


class DecodedRow(NamedTuple):
    """A value read back from Redis. ``values`` may be shorter than the view (older schema)."""

    kind: int  # KIND_ROW, KIND_ABSENT or KIND_TOMBSTONE
    event_us: int | None
    epoch: int
    loaded_ms: int
    fill_ms: int
    values: Sequence[Any]


_new_row = tuple.__new__  # builds a DecodedRow without NamedTuple.__new__'s Python frame
_TOMBSTONE = DecodedRow(KIND_TOMBSTONE, None, 0, 0, 0, ())


def _pack_embedding(value: Sequence[float]) -> bytes:
    arr = array("d", value)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def _unpack_embedding(raw: bytes) -> list[float]:
    arr = array("d")
    arr.frombytes(raw)
    if not _LITTLE:  # pragma: no cover
        arr.byteswap()
    return arr.tolist()


def schema_fingerprint(features: Sequence[tuple[str, FeatureType]]) -> int:
    """A non-zero 31-bit fingerprint of an ordered (name, type) list."""
    text = ";".join(f"{name}:{ftype.value}" for name, ftype in features)
    return (zlib.crc32(text.encode()) & 0x7FFFFFFF) | 1


def _packed_ints(*values: int) -> bytes:
    """msgpack of each int, one after the other (elements of the value's array)."""
    return b"".join(map(msgpack.packb, values))


def _uint_at(raw: bytes, pos: int) -> tuple[int, int] | None:
    """The msgpack unsigned int at ``pos`` and the position after it, or None."""
    if pos >= len(raw):
        return None
    b = raw[pos]
    if b < 0x80:
        return b, pos + 1
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(b)
    if width is None or pos + 1 + width > len(raw):
        return None
    return int.from_bytes(raw[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def is_tombstone(raw: bytes | None) -> bool:
    """Whether ``raw`` is a tombstone an invalidation left (its fixed head)."""
    return raw is not None and raw[:_HEAD_SIZE] == TOMBSTONE_HEAD


def held_event_us(raw: bytes | None, epoch: int) -> int | None:
    """The event time of the row ``raw`` holds, when it is a row of this value layout and of
    ``epoch`` (one the write scripts would keep against an older row); None for anything
    else. Reads the fixed head and two msgpack ints, as the write scripts do, decoding no
    value: a writer tells "older than Redis holds" from "fenced off" with it."""
    if raw is None or len(raw) < _HEAD_SIZE:
        return None
    array, version, kind, marker, event = _HEAD.unpack_from(raw)
    if (array, version, kind, marker) != (_ARRAY_OF_8, VALUE_VERSION, KIND_ROW, _INT64):
        return None
    fingerprint = _uint_at(raw, _HEAD_SIZE)
    held = _uint_at(raw, fingerprint[1]) if fingerprint is not None else None
    if held is None or held[0] != epoch:
        return None
    held_event: int = event
    return held_event


class RowCodec:
    """Encodes and decodes the rows of one view; knows the view's types and schema history."""

    __slots__ = ("_decoders", "_embedding_idx", "_fp", "_full", "_msgspec_values", "_width")

    def __init__(self, view: FeatureView) -> None:
        pairs = [(f.name, f.type) for f in view.features]
        self._width = len(pairs)
        self._fp = schema_fingerprint(pairs)
        self._embedding_idx = tuple(
            i for i, f in enumerate(view.features) if f.type is FeatureType.EMBEDDING
        )
        types = [f.type for f in view.features]
        #: a typed decoder per leading part of the feature list, by that part's fingerprint
        self._decoders = {
            schema_fingerprint(pairs[:k]): _row_decoder(schema_fingerprint(pairs[:k]), types[:k])
            for k in range(1, len(types) + 1)
        }
        self._full = self._decoders[self._fp]
        #: the bulk encoders pack the values with msgspec where it writes msgpack's bytes
        #: (``_MSGSPEC_SAFE``): half the time per row
        self._msgspec_values = all(t in _MSGSPEC_SAFE for t in types)

    @property
    def fingerprint(self) -> int:
        return self._fp

    def encode(
        self,
        values: Sequence[Any],
        event_us: int | None,
        loaded_ms: int,
        epoch: int = 0,
        fill_ms: int = 0,
    ) -> bytes:
        """Values must already be coerced to the declared types (``featcache.convert``)."""
        if len(values) != self._width:
            raise ValueError(f"expected {self._width} values, got {len(values)}")
        if self._embedding_idx:
            values = self._with_packed_embeddings(values)
        head = _HEAD.pack(_ARRAY_OF_8, VALUE_VERSION, KIND_ROW, _INT64,
                          NO_EVENT if event_us is None else event_us)
        rest: bytes = msgpack.packb(values, datetime=True)
        return head + _packed_ints(self._fp, epoch, loaded_ms, fill_ms) + rest

    def encode_many(
        self,
        events_us: Sequence[int | None],
        values: Sequence[Sequence[Any]],
        loaded_ms: int,
        epoch: int = 0,
    ) -> list[bytes]:
        """``encode`` of many rows stamped alike, given as columns (event times, value rows):
        the bulk writers' path. Same bytes as ``encode``, built without a Python-level step
        per row: the bookkeeping fields are the same for the whole batch, packed once, and
        the rows go through the head struct and msgspec's packer (msgpack's, for views with
        timestamps) by ``map`` alone."""
        if len(events_us) != len(values):
            raise ValueError(f"{len(events_us)} event times for {len(values)} rows")
        if not values:
            return []
        if set(map(len, values)) != {self._width}:
            bad = next(v for v in values if len(v) != self._width)
            raise ValueError(f"expected {self._width} values, got {len(bad)}")
        return self._packed(events_us, lambda: values, loaded_ms, epoch)

    def encode_columns(
        self,
        events_us: Sequence[int | None],
        columns: Sequence[Sequence[Any]],
        loaded_ms: int,
        epoch: int = 0,
    ) -> list[bytes]:
        """``encode_many`` of rows given as one list per feature (the bulk reader's shape):
        each row's tuple is zipped straight from the columns."""
        if len(columns) != self._width:
            raise ValueError(f"expected {self._width} columns, got {len(columns)}")
        if set(map(len, columns)) - {len(events_us)}:
            raise ValueError(f"columns of {sorted(set(map(len, columns)))} values for "
                             f"{len(events_us)} event times")
        if not events_us:
            return []
        return self._packed(events_us, lambda: zip(*columns, strict=True), loaded_ms, epoch)

    def _packed(
        self,
        events_us: Sequence[int | None],
        rows: Callable[[], Iterable[Sequence[Any]]],
        loaded_ms: int,
        epoch: int,
    ) -> list[bytes]:
        """Each row's value by ``map`` alone (embeddings packed first): the head with its
        event time and the batch's packed bookkeeping in one struct, then the values.
        ``rows()`` iterates over the rows' values (again, when msgspec refused one of them:
        msgpack then packs the batch, or raises, as ``encode`` would)."""
        events = events_us if None not in events_us else [
            NO_EVENT if e is None else e for e in events_us
        ]
        common = _packed_ints(self._fp, epoch, loaded_ms, 0)
        head = struct.Struct(f">BBBBq{len(common)}s")

        def packed(pack: Callable[[Any], bytes]) -> list[bytes]:
            values = rows()
            if self._embedding_idx:  # packed per row: the embeddings become raw bytes first
                values = map(self._with_packed_embeddings, values)
            heads = map(head.pack, repeat(_ARRAY_OF_8), repeat(VALUE_VERSION),
                        repeat(KIND_ROW), repeat(_INT64), events, repeat(common))
            return list(map(add, heads, map(pack, values)))

        if self._msgspec_values:
            # a value msgspec does not take (an int subclass...): msgpack packs them all
            with contextlib.suppress(Exception):
                return packed(_MSGSPEC_ENCODER.encode)
        return packed(msgpack.Packer(datetime=True).pack)

    def _with_packed_embeddings(self, values: Sequence[Any]) -> list[Any]:
        out = list(values)
        for i in self._embedding_idx:
            if out[i] is not None:
                out[i] = _pack_embedding(out[i])
        return out

    @staticmethod
    def encode_absent(loaded_ms: int, epoch: int = 0) -> bytes:
        return (_HEAD.pack(_ARRAY_OF_8, VALUE_VERSION, KIND_ABSENT, _INT64, NO_EVENT)
                + _packed_ints(0, epoch, loaded_ms, 0) + b"\x90")

    def decode(self, raw: bytes) -> DecodedRow | None:
        """The row, or None when the bytes are not a row of this view's schema (a miss).

        Every value must be of its feature's declared type (or null), and the bookkeeping
        fields int64s: a row some other writer left with ``"x"`` or ``1.5`` in an ``int``
        feature is a decode error, never a hit that ``to_arrow()`` would then reject or
        truncate. A row of the current schema takes one typed parse of the whole value; a
        row of an older, shorter feature list, a negative entry or a tombstone are told by
        their head and fingerprint (``_decode_other``).
        """
        try:
            try:
                body = self._full.decode(raw)
            except msgspec.ValidationError:
                return self._decode_other(raw)
            return self._row(body)
        except Exception:  # any undecodable value is a miss, by contract
            return None

    def _decode_other(self, raw: bytes) -> DecodedRow | None:
        """A value the current schema's decoder refused: a tombstone, a negative entry, a
        row of a leading part of the feature list (written before features were appended,
        checked against that part's types), or a miss (None); raises for garbage."""
        array8, version, kind, int64, _ = _HEAD.unpack_from(raw)
        if (array8, version, int64) != (_ARRAY_OF_8, VALUE_VERSION, _INT64):
            return None
        if kind == KIND_TOMBSTONE:
            return _TOMBSTONE
        if kind == KIND_ABSENT:
            absent = _ABSENT_VALUE.decode(raw)
            return _new_row(DecodedRow, (KIND_ABSENT, None, absent[4], absent[5], 0, ()))
        if kind != KIND_ROW:
            return None
        decoder = self._decoders.get(_ANY_VALUE.decode(raw)[BODY_FP])
        if decoder is None:  # another schema
            return None
        return self._row(decoder.decode(raw))

    def _row(self, body: tuple[Any, ...]) -> DecodedRow:
        """The ``DecodedRow`` of a decoded row value."""
        values: Sequence[Any] = body[BODY_VALUES]
        if self._embedding_idx:
            values = self._unpack_embeddings(values)
        event = body[BODY_EVENT]
        return _new_row(DecodedRow, (KIND_ROW, None if event == NO_EVENT else event,
                                     body[BODY_EPOCH], body[BODY_LOADED_MS], body[BODY_FILL_MS],
                                     values))

    def decode_rows(self, blobs: Sequence[bytes]) -> RowBatch | None:
        """Every value a row of this view's full schema: their event times and bodies, checked
        as ``decode`` checks one; None when any is not (a miss, a tombstone, a negative entry,
        an older schema, garbage): then decode them one by one.

        The all-hit batch's path: each value is checked and parsed by one typed decode, by a
        C-level map over the batch, so no Python code runs per row. Each value is parsed on
        its own: a value that held two rows, or half of one, must not shift its neighbours.
        """
        if not blobs:
            return RowBatch([], [])
        try:
            bodies = list(map(self._full.decode, blobs))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        events_us: list[int | None] = list(map(_events, bodies))
        if NO_EVENT in events_us:
            events_us = [None if e == NO_EVENT else e for e in events_us]
        if self._embedding_idx:
            bodies = [(*body[:BODY_VALUES], tuple(self._unpack_embeddings(body[BODY_VALUES])))
                      for body in bodies]
        return RowBatch(events_us, bodies)

    def _unpack_embeddings(self, values: Sequence[Any]) -> list[Any]:
        out = list(values)
        for i in self._embedding_idx:
            if i < len(out) and out[i] is not None:
                out[i] = _unpack_embedding(out[i])
        return out

    def value_or_missing(self, row: DecodedRow, index: int) -> Any:
        return row.values[index] if index < len(row.values) else NO_VALUE
