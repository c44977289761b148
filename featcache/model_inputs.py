"""The canonical encoding of a model's inputs, and the digest that keys its cached outputs.

The prediction cache keys a model output by ``input_digest(inputs)``: 32 hex characters of
BLAKE2b-128 over ``canonical_bytes(inputs)``, which is msgspec's deterministic msgpack of the
inputs after normalization. Two inputs share a cache entry exactly when they are equal under
the rules below. These rules are the contract: changing any of them changes the digests of
existing inputs and orphans every cached output, so ``tests/test_model_inputs.py`` pins
known-answer digests.

=================================  ==========================================  ===============
value                              equal to                                    different from
=================================  ==========================================  ===============
int ``1``                          numpy int8..int64, uint8..uint64 ``1``;     ``1.0``,
                                   an int subclass (``IntEnum``) of value 1    ``True``, ``"1"``
float ``0.5``                      numpy float16/32/64 ``x`` where             any int,
                                   ``float(x) == 0.5`` (``np.float32(0.1)``    any str
                                   is ``float(np.float32(0.1))``, not 0.1)
``-0.0``                           ``0.0``
any NaN (any payload, any sign)    any other NaN, float or numpy
``inf``, ``-inf``                  themselves
bool ``True``                      ``np.bool_(True)``                          ``1``, ``1.0``
``None``                           ``None`` only                               NaN, ``""``, 0
str                                any str of the same text (``np.str_``,      its UTF-8 bytes,
                                   a ``StrEnum``)                              timestamps
bytes                              bytearray, memoryview, ``np.bytes_`` of     str
                                   the same bytes
list ``[a, b]``                    ``(a, b)``, a 1-d array of ``a, b``         a dict
nested lists                       an ndim >= 2 array (``arr.tolist()``)
scalar ``x``                       a 0-d array holding ``x``
dict (any Mapping, str keys)       the same items in any key order
aware datetime                     the same instant in any zone; a naive       its ISO str,
                                   datetime of that UTC wall time; a pandas    a date
                                   Timestamp or numpy datetime64 (any unit,
                                   ``D`` included) of that instant
date                               the same date only                          its ISO str,
                                                                               its midnight
=================================  ==========================================  ===============

Sequences compare element by element, so an int array equals a list of ints and not a list of
floats, and a float32 array equals the list of its values widened to float (``tolist()``).
Array dtypes: bool, int, uint, float16/32/64, unicode str, and object (element by element);
complex, datetime64, timedelta64, bytes (``S``), void and longdouble arrays are refused.

Timestamps are instants with microsecond precision: a naive datetime is taken as UTC, as
everywhere in featcache; a pandas Timestamp or numpy datetime64 drops what it holds below the
microsecond (rounding towards the past, so 1 ns before the epoch is the microsecond before it).
A date is its own kind (msgpack extension 1, below), not the midnight that starts it: models
that take a day take a day. msgspec alone would write a naive datetime, a date, a time, a
timedelta, a UUID and a Decimal as strings, equal to a str of the same text, so datetimes are
made aware UTC (the msgpack Timestamp extension), dates get their own extension, and the others
are refused.

Refused, with ``InvalidRequest`` naming the value's place (``inputs[3]['age']``): sets (a set
has no order a model would see, and a set of str iterates in a different order in each
process), non-str dict keys, ints outside ``-2**63 .. 2**64 - 1``, strs holding lone
surrogates, NaT and ``pd.NA`` (pass None), timedelta, UUID, Decimal, complex, masked arrays,
and every type not named above. Containers nest at most ``MAX_DEPTH`` (32) deep, which also
stops a list that contains itself.

Encoding: msgspec ``Encoder(order="deterministic")`` (map keys sorted) of the normalized value:
None, bool, int, float (always float64: ``0xcb`` and 8 big-endian bytes), str, bytes, arrays,
maps, the Timestamp extension (-1) for datetimes, and extension 1 for a date, whose payload is
its days since 1970-01-01 as a little-endian int32 (4 bytes).

The serving hot path is a batch of flat dicts of plain values, or of entity ids: those are
encoded as they are, in C, and only the bytes are checked for a float that needs normalizing
(-0.0 or a NaN, found by one regex over the batch). A match, possibly a false one inside a
str, sends that input through the normalizer, which writes the same bytes for the same value,
so a false match costs time, never a different digest. A batch of dicts that share one key
set (built by one piece of code, as a request's inputs are) is checked and encoded by two C
passes, ``msgspec.convert`` into a Struct of those keys and its encoder, which writes the
deterministic encoder's bytes without sorting each dict's keys again. That Struct's float
fields refuse NaN and -inf, so its bytes are searched only for a -0.0: one fixed 9-byte
needle, which a bytes search skips along in half the time the regex takes to try every 0xcb
byte (each float's marker). A batch holding a NaN, -inf or -0.0 takes the regex's pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from math import isnan
from typing import Annotated, Any, Final

import msgspec

from featcache.errors import InvalidRequest
from featcache.model_walk import (
    MAX_DEPTH,
    Refused,
    too_deep,
    type_name,
    utc,
    walk_items,
    walk_mapping,
)
from featcache.result import FeatureResult

__all__ = [
    "DATE_EXT",
    "MAX_DEPTH",
    "batch_of",
    "canonical_bytes",
    "input_digest",
    "input_digests",
]

#: how deep containers may nest (the top-level value's container is level 1)
_WHY_STR_KEYS: Final = ": an input dict maps names to values"
#: the msgpack extension type of a date: payload = days since 1970-01-01, ``<i``
DATE_EXT: Final = 1

_encode = msgspec.msgpack.Encoder(order="deterministic").encode
#: writes a Struct's fields in their declared order (``_same_keys_encoded`` sorts them)
_encode_fields = msgspec.msgpack.Encoder().encode
#: the values a flat input dict may hold for ``_same_keys_encoded``: a float that is not
#: NaN (which fails every comparison) or -inf, so that the check in C leaves only a -0.0 for
#: the bytes to be searched for, with one fixed 9-byte needle instead of a regex
_Checked = bool | int | Annotated[float, msgspec.Meta(ge=-sys.float_info.max)] | str | None
#: the batch type of each key set seen (``_batch_type_of``), up to ``_MAX_SHAPES`` of them
_SHAPES: dict[tuple[Any, ...], Any] = {}
_UNSEEN: Final = object()
_MAX_SHAPES: Final = 256
#: the empty BLAKE2b state with a 16-byte digest, copied for each digest
_BLAKE2B_128: Final = hashlib.blake2b(digest_size=16)
_NONE = type(None)
#: the types encoded as they are, without normalization, when no float needs it
_PLAIN: Final = frozenset({int, float, str, bool, _NONE})
_STR: Final = frozenset({str})
_IDS: Final = frozenset({int, str})
_DICT: Final = frozenset({dict})
#: a float64 in msgspec's output that is -0.0 or has an all-ones exponent (NaN, and inf,
#: which needs nothing but costs only a trip through the normalizer)
_SPECIAL_FLOAT: Final = re.compile(rb"\xcb(?:[\x7f\xff][\xf0-\xff]|\x80\x00{7})")
#: a -0.0 in msgspec's output (a batch holding one takes ``_SPECIAL_FLOAT``'s pass)
_NEGATIVE_ZERO: Final = b"\xcb\x80" + bytes(7)
_NAN: Final = float("nan")
_UTC: Final = dt.UTC
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()
_DAYS: Final = struct.Struct("<i")
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # msgpack's uint64: a numpy uint64 array fits
#: microseconds per numpy datetime64 unit, as (numerator, denominator)
_US_PER_UNIT: Final = {
    "W": (7 * 86_400_000_000, 1), "D": (86_400_000_000, 1), "h": (3_600_000_000, 1),
    "m": (60_000_000, 1), "s": (1_000_000, 1), "ms": (1_000, 1), "us": (1, 1),
    "ns": (1, 1_000), "ps": (1, 1_000_000), "fs": (1, 10**9), "as": (1, 10**12),
}
_USE: Final = ("use int, float, str, bool, None, bytes, datetime, date, or a list, tuple, "
               "dict or numpy array of them")
#: a better suggestion than _USE for the types callers do pass
_HINTS: Final = {
    "set": "a set has no order a model would see (a set of str even iterates in a different "
           "order in each process); pass a sorted list",
    "frozenset": "a set has no order a model would see (a set of str even iterates in a "
                 "different order in each process); pass a sorted list",
    "UUID": "use str(uuid)",
    "timedelta": "use a number, such as total_seconds()",
    "time": "use a str or a datetime",
    "complex": "use a list [real, imag]",
    "NAType": "a missing value: pass None",
    "NaTType": "a missing timestamp: pass None",
}


def input_digest(value: Any) -> str:
    """The cache key digest of one model input: 32 lowercase hex characters."""
    try:
        data = _canonical(value)
    except Refused as e:
        raise InvalidRequest(e.placed("input")) from None
    h = _BLAKE2B_128.copy()
    h.update(data)
    return h.hexdigest()


def canonical_bytes(value: Any) -> bytes:
    """The canonical encoding of one model input (the module docstring's rules)."""
    try:
        return _canonical(value)
    except Refused as e:
        raise InvalidRequest(e.placed("input")) from None


def input_digests(inputs: Sequence[Any]) -> list[str]:
    """``input_digest`` of each input of a batch, in order; an error names ``inputs[i]``.

    Anything but a list or tuple is first taken as ``batch_of`` takes it, so a generator is
    read once, not consumed by a type check, and a str or a dict is refused."""
    if type(inputs) is not list and type(inputs) is not tuple:
        inputs = batch_of(inputs)
    kinds = set(map(type, inputs))
    if kinds <= _IDS:  # entity ids: nothing to normalize, and no float to look for
        try:
            return _hexdigests(map(_encode, inputs))
        except (OverflowError, UnicodeEncodeError):
            pass  # the per-input path below names the one that is refused
    elif kinds == _DICT:
        digests = _plain_dict_digests(inputs)
        if digests is not None:
            return digests
    return _hexdigests(_canonical_at(x, i) for i, x in enumerate(inputs))


def _hexdigests(encoded: Iterable[bytes]) -> list[str]:
    """``input_digest`` of each encoding. Copying the empty BLAKE2b-128 state costs less than
    constructing one per input (0.40 against 0.49 us here), for the same digest."""
    out: list[str] = []
    append = out.append
    fresh = _BLAKE2B_128.copy
    for data in encoded:
        h = fresh()
        h.update(data)
        append(h.hexdigest())
    return out


def _plain_dict_digests(inputs: Sequence[dict[Any, Any]]) -> list[str] | None:
    """The digests of a batch of flat dicts of plain values, with one type check of the whole
    batch in C; None when some dict is not one (the caller takes the per-input path)."""
    encoded = _same_keys_encoded(inputs)
    if encoded is not None and _NEGATIVE_ZERO not in b"".join(encoded):
        return _hexdigests(encoded)  # no NaN or -inf (the check refused them), no -0.0
    if encoded is None:
        values = set(map(type, chain.from_iterable(map(dict.values, inputs))))
        if not values <= _PLAIN:
            return None
        try:
            # every key a str: the deterministic encoder refuses anything else (TypeError),
            # and writes a str subclass (a StrEnum) as its text, as the normalizer does
            encoded = list(map(_encode, inputs))
        except (TypeError, OverflowError, UnicodeEncodeError):
            return None
    if _SPECIAL_FLOAT.search(b"".join(encoded)) is not None:
        encoded = [data if _SPECIAL_FLOAT.search(data) is None else _canonical_at(x, i)
                   for i, (x, data) in enumerate(zip(inputs, encoded, strict=True))]
    return _hexdigests(encoded)


def _same_keys_encoded(inputs: Sequence[dict[Any, Any]]) -> list[bytes] | None:
    """The canonical bytes of a batch of dicts that all have the first one's str keys and
    plain values (a request's inputs, built by one piece of code), checked and encoded in
    two C passes: ``msgspec.convert`` into a ``Struct`` of those keys in sorted order, whose
    every field takes only ``_Checked`` values, then the encoder, which writes a Struct as
    the map of its fields in their order: the bytes the deterministic encoder writes for the
    dict. None when any dict is not such a one, or holds a NaN or -inf."""
    keys = tuple(inputs[0])
    batch_type = _SHAPES.get(keys, _UNSEEN)
    if batch_type is _UNSEEN:
        if len(_SHAPES) >= _MAX_SHAPES:
            return None
        batch_type = _SHAPES[keys] = _batch_type_of(keys)
    if batch_type is None:
        return None
    try:
        return list(map(_encode_fields, msgspec.convert(inputs, batch_type, strict=True)))
    except (msgspec.ValidationError, TypeError, OverflowError, UnicodeEncodeError):
        return None


def _batch_type_of(keys: tuple[Any, ...]) -> Any:
    """The type ``list[S]``, S a Struct whose fields are ``keys`` in sorted order (named
    ``f0``, ``f1``... in Python, renamed to the keys on the wire), each a ``_Checked``; None
    when a key is not a str or is one msgspec does not take as a name (control characters,
    quotes, backslashes)."""
    if not all(type(k) is str for k in keys):
        return None
    names = sorted(keys)
    try:
        shape = msgspec.defstruct(
            "Input", [(f"f{i}", _Checked) for i in range(len(names))],
            rename={f"f{i}": name for i, name in enumerate(names)},
            forbid_unknown_fields=True)
    except ValueError:
        return None
    return list[shape]  # type: ignore[valid-type]


def _canonical_at(value: Any, index: int) -> bytes:
    try:
        return _canonical(value)
    except Refused as e:
        raise InvalidRequest(e.placed(f"inputs[{index}]")) from None


def _canonical(value: Any) -> bytes:
    t = type(value)
    if t is int or t is str:
        try:
            return _encode(value)
        except (OverflowError, UnicodeEncodeError):
            pass  # the normalizer says why
    elif t is dict:
        if _PLAIN.issuperset(map(type, value.values())) and _STR.issuperset(map(type, value)):
            data = _encode_plain(value)
            if data is not None:
                return data
    elif (t is list or t is tuple) and _PLAIN.issuperset(map(type, value)):
        data = _encode_plain(value)
        if data is not None:
            return data
    return _encode(_normalize(value, 0))


def _encode_plain(value: Any) -> bytes | None:
    """msgspec's bytes of a flat container of plain values, or None when a float in it needs
    normalizing (or it holds what msgspec cannot write: the normalizer says what)."""
    try:
        data = _encode(value)
    except (OverflowError, UnicodeEncodeError):
        return None
    return data if _SPECIAL_FLOAT.search(data) is None else None


# ---------------------------------------------------------------- the normalizer


def _normalize(v: Any, depth: int) -> Any:
    """``v`` as the plain Python values (and extensions) it is encoded as; ``depth`` is the
    number of containers around it."""
    t = type(v)
    if t is str:
        return v if v.isascii() else _text(v)
    if t is int:
        return _int(v)
    if t is float:
        return _float(v)
    if t is bool or v is None or t is bytes:
        return v
    if t is dict:
        return walk_mapping(v, depth, _normalize, _WHY_STR_KEYS)
    if t is list or t is tuple:
        return walk_items(v, depth, _normalize)
    if t is dt.datetime:
        return _utc(v)
    if t is dt.date:
        return _date(v)
    return _other(v, t, depth)


def _other(v: Any, t: type, depth: int) -> Any:
    module = t.__module__
    if module.startswith("numpy"):
        return _numpy(v, t, depth)
    if module.startswith("pandas"):
        return _pandas(v, t)
    if isinstance(v, int):  # an IntEnum, an int subclass (bool is final)
        return _int(int(v))
    if isinstance(v, float):
        return _float(float(v))
    if isinstance(v, str):  # a StrEnum: its text
        return _text(str.__str__(v))
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, dt.datetime):
        return _utc(v)
    if isinstance(v, dt.date):
        return _date(v)
    if isinstance(v, Mapping):
        return walk_mapping(v, depth, _normalize, _WHY_STR_KEYS)
    if isinstance(v, list | tuple):  # a NamedTuple is the tuple of its fields
        return walk_items(v, depth, _normalize)
    raise _refused(v)


def _refused(v: Any, detail: str = "") -> Refused:
    name = type_name(v) + detail
    hint = _HINTS.get(type(v).__qualname__, _USE)
    return Refused(f"{name} is not a supported input value; {hint}")


def _int(v: int) -> int:
    if _INT_MIN <= v <= _INT_MAX:
        return v
    raise Refused(f"int {v} is out of range (-2**63 .. 2**64-1); pass it as a str")


def _float(v: float) -> float:
    if isnan(v):  # every NaN is the same input, whatever its payload and sign
        return _NAN
    if v == 0.0:  # -0.0 is 0.0
        return 0.0
    return v


def _text(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Refused(f"str is not text: it holds a lone surrogate at position {e.start}") \
            from None
    return v


def _utc(v: dt.datetime) -> dt.datetime:
    v = utc(v)
    if type(v) is not dt.datetime:  # a subclass: the plain datetime of its fields
        v = dt.datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond,
                        tzinfo=_UTC)
    return v


def _date(v: dt.date) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(DATE_EXT, _DAYS.pack(v.toordinal() - _EPOCH_ORDINAL))


def _numpy(v: Any, t: type, depth: int) -> Any:
    """numpy scalars and arrays, seen only when an object of numpy's exists: numpy is
    already imported then, so this imports nothing."""
    np = sys.modules["numpy"]
    if isinstance(v, np.ndarray):
        if t.__module__.startswith("numpy.ma"):
            raise Refused(f"{type_name(v)} is not a supported input value; its masked "
                           "elements have no value: pass arr.filled(...)")
        return _array(np, v, depth)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.timedelta64):  # an np.integer subclass: not an int to a model
        raise _refused(v)
    if isinstance(v, np.integer):
        return _int(int(v))
    if isinstance(v, np.floating) and v.dtype.itemsize <= 8:
        return _float(float(v))
    if isinstance(v, np.str_):
        return _text(str.__str__(v))
    if isinstance(v, np.bytes_):
        return bytes(v)
    if isinstance(v, np.datetime64):
        return _datetime64(np, v)
    raise _refused(v)


def _array(np: Any, a: Any, depth: int) -> Any:
    kind = a.dtype.kind
    if kind not in "biufUO" or (kind == "f" and a.dtype.itemsize > 8):
        raise _refused(a, f" of dtype {a.dtype}")
    if a.ndim == 0:
        return _normalize(a[()], depth)
    if depth + a.ndim > MAX_DEPTH:
        raise too_deep()
    if kind in "biu":
        return a.tolist()  # Python bools and ints: already canonical
    if kind == "f" and not (np.isnan(a).any() or (np.signbit(a) & (a == 0)).any()):
        return a.tolist()  # no NaN and no -0.0: the widened floats are canonical
    return _normalize(a.tolist(), depth)  # str (text to check), object, or floats to fix


def _datetime64(np: Any, v: Any) -> dt.datetime:
    if np.isnat(v):
        raise Refused(f"{type_name(v)}('NaT') is not a supported input value; a missing "
                       "timestamp: pass None")
    unit, step = np.datetime_data(v.dtype)
    if unit in ("Y", "M"):  # calendar units: days first, exactly
        v = v.astype("datetime64[D]")
        unit, step = "D", 1
    num, den = _US_PER_UNIT[unit]
    us = int(v.astype("int64")) * step * num // den  # floor: towards the past
    try:
        return _EPOCH + dt.timedelta(microseconds=us)
    except OverflowError:
        raise Refused(f"{type_name(v)} {v} is outside the years 1-9999") from None


def _pandas(v: Any, t: type) -> Any:
    if t.__qualname__ == "Timestamp":
        if v.nanosecond:  # below the microsecond: dropped (the module docstring)
            v = v.replace(nanosecond=0)
        try:
            pydt = v.to_pydatetime()
        except (ValueError, OverflowError):
            raise Refused(f"pandas.Timestamp {v} is outside the years 1-9999") from None
        return _utc(pydt)
    raise _refused(v)


# ---------------------------------------------------------------- batches


def batch_of(inputs: Any) -> Sequence[Any]:
    """What a caller passes as a batch, as the sequence of its inputs.

    A list or tuple as it is; a ``FeatureResult`` as its per-entity feature dicts in its order;
    a pandas DataFrame as one ``{column: value}`` dict per row; a numpy array (ndim >= 1) as
    its rows (sub-arrays along the first axis); any other iterable (a generator) as a list.
    A str, bytes, a dict or other Mapping, a set, or a non-iterable is refused: those are
    one input, or have no order.
    """
    t = type(inputs)
    if t is list or t is tuple:
        return inputs  # type: ignore[no-any-return]
    if isinstance(inputs, FeatureResult):
        return [inputs[entity_id] for entity_id in inputs]
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(inputs, pd.DataFrame):
        if not inputs.columns.is_unique:
            raise InvalidRequest("a DataFrame batch has duplicate column names: each row is "
                                 "one input dict, keyed by column")
        return inputs.to_dict("records")  # type: ignore[no-any-return]
    np = sys.modules.get("numpy")
    if np is not None and isinstance(inputs, np.ndarray):
        if inputs.ndim == 0:
            raise InvalidRequest("a batch is a list of inputs; got a 0-d numpy array, which is "
                                 "one input: pass [x]")
        return list(inputs)
    name = type_name(inputs)
    if isinstance(inputs, str | bytes | bytearray | memoryview):
        raise InvalidRequest(f"a batch is a list of inputs; got {name}, which is one input: "
                             "pass [x]")
    if isinstance(inputs, Mapping):
        raise InvalidRequest(f"a batch is a list of inputs; got {name}: a dict is one input: "
                             "pass [d]")
    if isinstance(inputs, set | frozenset):
        raise InvalidRequest(f"a batch is a list of inputs; got {name}, which has no order to "
                             "answer in: pass a list")
    if isinstance(inputs, Iterable):
        return list(inputs)
    raise InvalidRequest(f"a batch is a list of inputs; got {name}: pass [x]")
