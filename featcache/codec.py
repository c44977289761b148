"""The row value format, layout version 1 (keys: ``featcache.keys``).

A row value is a 10-byte header followed by one msgpack array::

    byte 0      layout version (1)
    byte 1      kind: b"R" a row, b"A" "SQL has no such entity" (a negative entry),
                b"T" a tombstone left by an invalidation (the fence of DESIGN section 4)
    bytes 2-9   event timestamp, microseconds since the Unix epoch, big-endian int64
                (INT64_MIN when the row has none, and for A and T)
    msgpack     [schema_fp, epoch, loaded_at_ms, fill_ms, v0, v1, ...]   (R)
                [0, epoch, loaded_at_ms]                                   (A)
    bytes       the invalidation's stream entry id, unique per invalidation  (T, written by
                the invalidation script in ``featcache.invalidation``)

``epoch`` is the view's epoch when the row was read (``featcache.invalidation``): a row of an
older epoch was invalidated with its whole view and is a miss.

The event timestamp sits at a fixed offset so the conditional write script in
``featcache.redis_store`` can compare an old row with a new one without parsing msgpack: an
older row never overwrites a newer one. ``schema_fp`` fingerprints the view's ordered
``(name, type)`` list; a row written before features were appended to the view still decodes,
and the features it lacks come back as ``NO_VALUE`` (a miss for those features only). Any other
schema change, or bytes that do not decode, make the row a miss and bump a metric; nothing here
ever raises to the caller. ``fill_ms`` is how long the SQL read behind this row took (the
``delta`` of XFetch early refresh). msgpack never executes anything it reads, unlike pickle.

Types: int (int64), float (double, NaN and inf kept), bool, str, None as themselves;
timestamps as the msgpack Timestamp extension, decoded as aware UTC datetimes; ``list[float]``
embeddings as raw little-endian float64 bytes, which is smaller and much faster than a msgpack
array of floats.
"""

from __future__ import annotations

import datetime as dt
import operator
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import add
from typing import Annotated, Any, Final, NamedTuple

import msgpack
import msgspec

from featcache.config import FeatureView
from featcache.keys import LAYOUT_VERSION
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
    "DecodedRow",
    "RowBatch",
    "RowCodec",
]

NO_EVENT: Final = -(2**63)
KIND_ROW: Final = 0x52  # "R"
KIND_ABSENT: Final = 0x41  # "A"
KIND_TOMBSTONE: Final = 0x54  # "T"
_HEADER = struct.Struct(">BBq")
_HEADER_SIZE: Final = _HEADER.size
_unpack_header = _HEADER.unpack_from
_unpackb = msgpack.unpackb
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: how a row body's first four elements (schema fingerprint, epoch, loaded_at_ms, fill_ms)
#: and each declared type are read back: msgspec refuses anything else (a bool for an int, an
#: int beyond int64, text for a float...) while it parses, in C
_BOOKKEEPING: Final[tuple[Any, ...]] = (int, _Int64, _Int64, _Int64)
_STORED_TYPE: Final[dict[FeatureType, Any]] = {
    FeatureType.INT: _Int64,
    FeatureType.FLOAT: float,  # an int there reads as the same float: lossless, so allowed
    FeatureType.BOOL: bool,
    FeatureType.STR: str,
    FeatureType.TIMESTAMP: dt.datetime,  # the msgpack Timestamp extension, aware UTC
    FeatureType.EMBEDDING: bytes,  # raw little-endian float64, unpacked after
}
_ABSENT_BODY = msgspec.msgpack.Decoder(tuple[int, _Int64, _Int64])
_ANY_BODY = msgspec.msgpack.Decoder()


def _row_decoder(types: Sequence[FeatureType]) -> msgspec.msgpack.Decoder[tuple[Any, ...]]:
    """A decoder of a row body whose features are ``types``, each also null."""
    fields = (*_BOOKKEEPING, *(_STORED_TYPE[t] | None for t in types))
    return msgspec.msgpack.Decoder(tuple[fields])  # type: ignore[valid-type]


_heads = operator.itemgetter(slice(0, 2))  # layout version and kind
_fingerprint = operator.itemgetter(0)
_events = operator.itemgetter(slice(2, _HEADER.size))
_bodies = operator.itemgetter(slice(_HEADER.size, None))
_ROW_HEAD: Final = bytes((LAYOUT_VERSION, KIND_ROW))


class RowBatch(NamedTuple):
    """Rows of one view decoded together: what ``RowCodec.decode_rows`` returns."""

    events_us: list[int | None]  # the event time of each row, None where it has none
    bodies: list[tuple[Any, ...]]  # each row's body: the BODY_* fields, then its values


#: Where each bookkeeping field sits in a decoded row body; the values follow ``BODY_VALUES``.
BODY_EPOCH: Final = 1
BODY_LOADED_MS: Final = 2
BODY_FILL_MS: Final = 3
BODY_VALUES: Final = 4
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


class RowCodec:
    """Encodes and decodes the rows of one view; knows the view's types and schema history."""

    __slots__ = ("_decoders", "_embedding_idx", "_fp", "_full", "_prefix_len", "_width")

    def __init__(self, view: FeatureView) -> None:
        pairs = [(f.name, f.type) for f in view.features]
        self._width = len(pairs)
        self._fp = schema_fingerprint(pairs)
        # fingerprint of every leading part of the feature list -> how many features it holds
        self._prefix_len = {schema_fingerprint(pairs[:k]): k for k in range(1, len(pairs) + 1)}
        self._embedding_idx = tuple(
            i for i, f in enumerate(view.features) if f.type is FeatureType.EMBEDDING
        )
        types = [f.type for f in view.features]
        #: a typed decoder per leading part of the feature list, by its length
        self._decoders = {k: _row_decoder(types[:k]) for k in range(1, len(types) + 1)}
        self._full = self._decoders[len(types)]

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
        payload: list[Any] = [self._fp, epoch, loaded_ms, fill_ms, *values]
        for i in self._embedding_idx:
            if payload[4 + i] is not None:
                payload[4 + i] = _pack_embedding(payload[4 + i])
        header = _HEADER.pack(
            LAYOUT_VERSION, KIND_ROW, NO_EVENT if event_us is None else event_us
        )
        body: bytes = msgpack.packb(payload, datetime=True)
        return header + body

    def encode_many(
        self,
        events_us: Sequence[int | None],
        values: Sequence[Sequence[Any]],
        loaded_ms: int,
        epoch: int = 0,
    ) -> list[bytes]:
        """``encode`` of many rows stamped alike, given as columns (event times, value rows):
        the bulk writers' path. Same bytes as ``encode``, built without a Python-level step
        per row: every row's payload is the batch's common prefix plus its values, so the
        rows go through ``msgpack.Packer.pack`` and the header struct by ``map`` alone."""
        if len(events_us) != len(values):
            raise ValueError(f"{len(events_us)} event times for {len(values)} rows")
        if not values:
            return []
        if set(map(len, values)) != {self._width}:
            bad = next(v for v in values if len(v) != self._width)
            raise ValueError(f"expected {self._width} values, got {len(bad)}")
        prefix = (self._fp, epoch, loaded_ms, 0)
        return self._packed(events_us, map(add, repeat(prefix), map(tuple, values)))

    def encode_columns(
        self,
        events_us: Sequence[int | None],
        columns: Sequence[Sequence[Any]],
        loaded_ms: int,
        epoch: int = 0,
    ) -> list[bytes]:
        """``encode_many`` of rows given as one list per feature (the bulk reader's shape):
        each row's payload tuple is zipped straight from the columns, so no row tuple is
        built first only to be copied behind the prefix (docs/benchmarks.md)."""
        if len(columns) != self._width:
            raise ValueError(f"expected {self._width} columns, got {len(columns)}")
        if set(map(len, columns)) - {len(events_us)}:
            raise ValueError(f"columns of {sorted(set(map(len, columns)))} values for "
                             f"{len(events_us)} event times")
        if not events_us:
            return []
        return self._packed(events_us, zip(
            repeat(self._fp), repeat(epoch), repeat(loaded_ms), repeat(0), *columns
        ))

    def _packed(
        self, events_us: Sequence[int | None], payloads: Iterable[Sequence[Any]]
    ) -> list[bytes]:
        """Header + msgpack of each payload, by ``map`` alone (embeddings packed first)."""
        if self._embedding_idx:  # packed per row: the embeddings become raw bytes first
            payloads = map(self._with_packed_embeddings, payloads)
        events = events_us if None not in events_us else [
            NO_EVENT if e is None else e for e in events_us
        ]
        headers = map(_HEADER.pack, repeat(LAYOUT_VERSION), repeat(KIND_ROW), events)
        pack = msgpack.Packer(datetime=True).pack
        return list(map(add, headers, map(pack, payloads)))

    def _with_packed_embeddings(self, payload: Sequence[Any]) -> list[Any]:
        out = list(payload)
        for i in self._embedding_idx:
            if out[4 + i] is not None:
                out[4 + i] = _pack_embedding(out[4 + i])
        return out

    @staticmethod
    def encode_absent(loaded_ms: int, epoch: int = 0) -> bytes:
        body: bytes = msgpack.packb([0, epoch, loaded_ms])
        return _HEADER.pack(LAYOUT_VERSION, KIND_ABSENT, NO_EVENT) + body

    def decode(self, raw: bytes) -> DecodedRow | None:
        """The row, or None when the bytes are not a row of this view's schema (a miss).

        Every value must be of its feature's declared type (or null), and the bookkeeping
        fields int64s: a row some other writer left with ``"x"`` or ``1.5`` in an ``int``
        feature is a decode error, never a hit that ``to_arrow()`` would then reject or
        truncate. msgspec checks the types while it parses the msgpack body, in C, and parses
        faster than msgpack itself; only rows of an older, shorter feature list take a second
        parse (``_decode_older``). On the read path for every row of a batch.
        """
        try:
            version, kind, event_us = _unpack_header(raw)
            if version != LAYOUT_VERSION:
                return None
            if kind == KIND_ROW:
                try:
                    body = self._full.decode(memoryview(raw)[_HEADER_SIZE:])
                except msgspec.ValidationError:
                    body = self._decode_older(raw)
                if body[0] != self._fp:
                    body = self._decode_older(raw)
                values: Sequence[Any] = body[4:]
                if self._embedding_idx:
                    values = self._unpack_embeddings(values)
                event = None if event_us == NO_EVENT else event_us
                return _new_row(DecodedRow, (KIND_ROW, event, body[1], body[2], body[3], values))
            if kind == KIND_TOMBSTONE:
                return _TOMBSTONE
            if kind == KIND_ABSENT:
                _, epoch, loaded_ms = _ABSENT_BODY.decode(memoryview(raw)[_HEADER_SIZE:])
                return _new_row(DecodedRow, (KIND_ABSENT, None, epoch, loaded_ms, 0, ()))
            return None
        except Exception:  # any undecodable value is a miss, by contract
            return None

    def decode_rows(self, blobs: Sequence[bytes]) -> RowBatch | None:
        """Every value a row of this view's full schema: their event times and bodies, checked
        as ``decode`` checks one; None when any is not (a miss, a tombstone, a negative entry,
        an older schema, garbage): then decode them one by one.

        The all-hit batch's path: the headers are checked, the event times read and the bodies
        parsed by C-level maps over the batch, so no Python code runs per row. Each body is
        parsed on its own (not the batch's bodies as one msgpack array, which costs the same):
        a value that held two rows, or half of one, must not shift its neighbours into rows.
        """
        n = len(blobs)
        if not n:
            return RowBatch([], [])
        if b"".join(map(_heads, blobs)) != _ROW_HEAD * n:
            return None
        try:
            bodies = list(map(self._full.decode, map(_bodies, blobs)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if {*map(_fingerprint, bodies)} != {self._fp}:
            return None
        events = array("q", b"".join(map(_events, blobs)))
        if _LITTLE:
            events.byteswap()
        events_us: list[int | None] = events.tolist()  # type: ignore[assignment]
        if NO_EVENT in events_us:
            events_us = [None if e == NO_EVENT else e for e in events_us]
        if self._embedding_idx:
            bodies = [(*body[:BODY_VALUES], *self._unpack_embeddings(body[BODY_VALUES:]))
                      for body in bodies]
        return RowBatch(events_us, bodies)

    def _decode_older(self, raw: bytes) -> tuple[Any, ...]:
        """The body of a row written before features were appended to the view (its schema
        fingerprint is that of a leading part of the feature list), checked against that
        part's types; raises for anything else."""
        body = _ANY_BODY.decode(memoryview(raw)[_HEADER_SIZE:])
        width = self._prefix_len[body[0]]  # KeyError: another schema
        checked: tuple[Any, ...] = self._decoders[width].decode(memoryview(raw)[_HEADER_SIZE:])
        return checked

    def _unpack_embeddings(self, values: Sequence[Any]) -> list[Any]:
        out = list(values)
        for i in self._embedding_idx:
            if i < len(out) and out[i] is not None:
                out[i] = _unpack_embedding(out[i])
        return out

    def value_or_missing(self, row: DecodedRow, index: int) -> Any:
        return row.values[index] if index < len(row.values) else NO_VALUE
