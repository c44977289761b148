"""The byte format of cached model outputs (``encode_output`` writes it, ``decode_output`` reads).

An output is one msgpack value, written by msgspec:

=============================  ===========================  ================================
output                         msgpack                      decoded as
=============================  ===========================  ================================
None, bool                     nil, true/false              themselves
int (int64 range only)         int                          int
float (NaN and inf kept)       float64                      float
str (a subclass: its text)     str                          str
bytes, bytearray, memoryview   bin                          bytes
list, tuple                    array                        list
dict (any Mapping), str keys   map                          dict
datetime                       Timestamp extension (-1)     aware datetime in UTC
numpy array                    extension 1 (below)          read-only numpy array
numpy scalar                   extension 2 (below)          the same numpy scalar type
=============================  ===========================  ================================

A naive datetime is taken as UTC, as everywhere in featcache; every datetime comes back aware,
in UTC. Containers nest at most ``MAX_DEPTH`` (32) deep, which also stops a list that holds
itself. Anything else (other objects, sets, ints beyond int64, dates, object or str arrays,
numpy datetime64, pandas objects, strs holding lone surrogates) raises ``ModelOutputError``
naming the type and its place (``output['scores'][2]``).

Numpy dtypes, each written as one ASCII type code byte (Python's ``struct`` letters):
``?`` bool, ``b h i q`` int8/16/32/64, ``B H I Q`` uint8/16/32/64, ``e f d`` float16/32/64,
``F D`` complex64/128. Elements are little-endian whatever the machine; a big-endian array is
converted, as is a non-contiguous one (to C order).

Extension 1, a numpy array, payload byte by byte::

    byte 0       type code
    byte 1       ndim, 0 to 64
    byte 2       pad: how many zero bytes follow, 0 to 15
    then         pad zero bytes
    then         the shape: ndim little-endian uint64
    then         the elements in C order, exactly prod(shape) * itemsize bytes

Extension 2, a numpy scalar: byte 0 the type code, then the value (itemsize bytes).

The pad puts the elements of an array that is the whole output at an offset that is a
multiple of 16 from the output's first byte, so ``decode_output`` of a bytes object (whose data
CPython aligns to 16) gives an aligned array; an array inside a list or dict has no pad and may
be unaligned, which numpy reads correctly, a little slower. A decoded array is a read-only view
of the bytes passed in (``np.frombuffer``, no copy), which it keeps alive; a 768-float32
embedding takes 3,088 bytes: 3,072 of elements and 16 of headers (msgpack's 4, this format's
3, a pad of 1, the shape's 8).

Why not pickle: unpickling runs code named by the bytes, and these bytes come from Redis,
which any client of that server can write. msgpack has no such thing: decoding builds only
the values above, and bytes that are truncated, malformed, or hold an unknown extension or
type code raise ``ValueError`` (the prediction cache counts it and computes again).
"""

from __future__ import annotations

import datetime as dt
import struct
import sys
from collections.abc import Iterable, Mapping
from math import prod
from typing import Any, Final

import msgspec

from featcache.errors import ModelOutputError
from featcache.model_walk import (
    MAX_DEPTH,
    Refused,
    too_deep,
    type_name,
    utc,
    walk_items,
    walk_mapping,
)

__all__ = ["ARRAY_EXT", "MAX_DEPTH", "SCALAR_EXT", "decode_output", "decode_outputs",
           "encode_output"]

#: the msgpack extension types of a numpy array and of a numpy scalar
ARRAY_EXT: Final = 1
SCALAR_EXT: Final = 2

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_MAX_NDIM: Final = 64  # numpy's own limit
#: (dtype kind, itemsize) -> type code, and type code -> little-endian dtype string
_CODES: Final = {
    ("b", 1): ord("?"),
    ("i", 1): ord("b"), ("i", 2): ord("h"), ("i", 4): ord("i"), ("i", 8): ord("q"),
    ("u", 1): ord("B"), ("u", 2): ord("H"), ("u", 4): ord("I"), ("u", 8): ord("Q"),
    ("f", 2): ord("e"), ("f", 4): ord("f"), ("f", 8): ord("d"),
    ("c", 8): ord("F"), ("c", 16): ord("D"),
}
#: by size, not by letter: np.dtype("<q") is numpy.longlong, not numpy.int64, on Linux
_DTYPES: Final = {code: f"<{kind}{size}" if kind != "b" else "|b1"
                  for (kind, size), code in _CODES.items()}
#: types whose values msgspec writes as they are: a flat list of them needs no walk
_LEAF: Final = frozenset({float, str, bool, type(None), bytes})
_USE: Final = ("use None, bool, int, float, str, bytes, datetime, a numpy array or scalar "
               "(bool, int, uint, float, complex), or a list or dict of them")

_encode = msgspec.msgpack.Encoder().encode


def encode_output(output: Any) -> bytes:
    """The bytes of one model output; ``ModelOutputError`` for what cannot be stored."""
    try:
        prepared = _prepare(output, 0, top=True)
    except Refused as e:
        raise ModelOutputError(e.placed("output")) from None
    try:
        return _encode(prepared)
    except UnicodeEncodeError:  # a str with a lone surrogate, which the walk let through
        raise ModelOutputError(f"{_text_error_path(output, 'output')}: str is not text: it "
                               "holds a lone surrogate") from None


def _prepare(v: Any, depth: int, top: bool = False) -> Any:
    """``v`` as msgspec writes it: numpy objects as extensions, datetimes aware."""
    t = type(v)
    if t in _LEAF:
        return v
    if t is int:
        if _INT64_MIN <= v <= _INT64_MAX:
            return v
        raise Refused(f"int {v} is outside int64; use a float or a str")
    if t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise too_deep()
        if _LEAF.issuperset(map(type, v)):
            return v
        return walk_items(v, depth, _prepare)
    if t is dict:
        return walk_mapping(v, depth, _prepare)
    if t is dt.datetime:
        return utc(v)
    module = t.__module__
    if module.startswith("numpy"):
        return _numpy(v, t, top)
    if module.startswith("pandas"):
        raise _refused(v)
    if isinstance(v, int):  # an IntEnum: its value (bool is final)
        return _prepare(int(v), depth)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):  # a StrEnum: its text
        return str.__str__(v)
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, dt.datetime):
        return utc(v)
    if isinstance(v, Mapping):
        return walk_mapping(v, depth, _prepare)
    if isinstance(v, list | tuple):
        return _prepare(list(v), depth)
    raise _refused(v)


def _refused(v: Any, detail: str = "") -> Refused:
    return Refused(f"{type_name(v)}{detail} is not a supported model output; {_USE}")


def _text_error_path(v: Any, where: str) -> str:
    """Where the first str that is not UTF-8 text is, for the error message (a dict key
    that is not is refused by the walk, ``model_walk.walk_mapping``)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return ""
    if isinstance(v, Mapping):
        for k, item in v.items():
            found = _text_error_path(item, f"{where}[{k!r}]")
            if found:
                return found
    elif isinstance(v, list | tuple):
        for i, item in enumerate(v):
            found = _text_error_path(item, f"{where}[{i}]")
            if found:
                return found
    return ""


# ---------------------------------------------------------------- numpy


def _numpy(v: Any, t: type, top: bool) -> Any:
    """numpy arrays and scalars, seen only when numpy is imported: this imports nothing."""
    np = sys.modules["numpy"]
    if t is np.ndarray:
        return _array_ext(np, v, top)
    if isinstance(v, np.ndarray):  # a masked array, a matrix: a subclass we would not return
        raise Refused(f"{type_name(v)} is not a supported model output; pass np.asarray(x) "
                       "(its plain array)")
    if isinstance(v, np.str_):
        return str.__str__(v)
    if isinstance(v, np.bytes_):
        return bytes(v)
    if isinstance(v, np.generic):
        code = _CODES.get((v.dtype.kind, v.dtype.itemsize))
        if code is not None:
            data = np.asarray(v).astype(_DTYPES[code]).tobytes()
            return msgspec.msgpack.Ext(SCALAR_EXT, bytes((code,)) + data)
    raise _refused(v)


def _array_ext(np: Any, a: Any, top: bool) -> msgspec.msgpack.Ext:
    code = _CODES.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise _refused(a, f" of dtype {a.dtype}")
    little = np.dtype(_DTYPES[code])
    if a.dtype != little:  # big-endian
        a = a.astype(little, order="C")
    elif not a.flags.c_contiguous:
        a = a.copy(order="C")
    shape = struct.pack(f"<{a.ndim}Q", *a.shape)
    pad = _pad(3 + len(shape), a.nbytes) if top else 0
    return msgspec.msgpack.Ext(ARRAY_EXT, b"".join(
        (bytes((code, a.ndim, pad)), bytes(pad), shape, a.data)))


def _pad(head: int, nbytes: int) -> int:
    """The pad that puts the elements at a multiple of 16 from the first byte of an output
    that is this one extension, after msgpack's own header (2, 3, 4 or 6 bytes by size)."""
    for pad in range(16):
        size = head + pad + nbytes
        ext_head = (2 if size in (1, 2, 4, 8, 16) else 3 if size < 256
                    else 4 if size < 65536 else 6)
        if (ext_head + head + pad) % 16 == 0:
            return pad
    return 0  # not reached: the ext header size changes at most once over the 16 pads


def decode_output(data: bytes | memoryview) -> Any:
    """The output ``encode_output`` wrote; ``ValueError`` for any bytes it did not write.

    Arrays are read-only views of ``data``, which they keep alive."""
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as e:
        raise ValueError(f"not an encoded model output: {e}") from None
    except RecursionError:  # msgspec's guard against nesting that would crash the stack
        raise ValueError("not an encoded model output: nested too deep") from None


def decode_outputs(data: Iterable[bytes | memoryview]) -> list[Any]:
    """``decode_output`` of each, in one C-level pass (the prediction cache's all-hit
    batch); ``ValueError`` when any of them is not an output."""
    try:
        return list(map(_DECODER.decode, data))
    except msgspec.DecodeError as e:
        raise ValueError(f"not an encoded model output: {e}") from None
    except RecursionError:
        raise ValueError("not an encoded model output: nested too deep") from None


def _from_ext(code: int, data: memoryview) -> Any:
    if code == ARRAY_EXT:
        return _array_from(data)
    if code == SCALAR_EXT:
        return _scalar_from(data)
    raise ValueError(f"not an encoded model output: unknown msgpack extension {code}")


def _dtype_of(code: int) -> Any:
    import numpy as np  # noqa: PLC0415 - a serving import loads no numpy; a decoded array does

    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"not an encoded model output: unknown numpy type code {code}")
    return np.dtype(dtype)


def _array_from(data: memoryview) -> Any:
    if len(data) < 3:
        raise ValueError("not an encoded model output: a numpy array header is truncated")
    dtype = _dtype_of(data[0])
    ndim, pad = data[1], data[2]
    start = 3 + pad + 8 * ndim
    if ndim > _MAX_NDIM or pad > 15 or len(data) < start:
        raise ValueError("not an encoded model output: a bad numpy array header")
    shape = struct.unpack_from(f"<{ndim}Q", data, 3 + pad)
    count = prod(shape)
    if count * dtype.itemsize != len(data) - start or max(shape, default=0) > sys.maxsize:
        raise ValueError("not an encoded model output: a numpy array's size does not match "
                         "its shape")
    import numpy as np  # noqa: PLC0415 - see _dtype_of

    array = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
    array.flags.writeable = False  # a view of bytes a caller may share: never written
    return array


def _scalar_from(data: memoryview) -> Any:
    if not data:
        raise ValueError("not an encoded model output: an empty numpy scalar")
    dtype = _dtype_of(data[0])
    if len(data) != 1 + dtype.itemsize:
        raise ValueError("not an encoded model output: a numpy scalar of the wrong size")
    import numpy as np  # noqa: PLC0415 - see _dtype_of

    return np.frombuffer(data, dtype=dtype, count=1, offset=1)[0]


_DECODER: Final = msgspec.msgpack.Decoder(ext_hook=_from_ext)
