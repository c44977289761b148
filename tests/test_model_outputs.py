"""The byte format of cached model outputs (``featcache.model_outputs``): every type round-trips
as its docstring says, arrays come back as read-only views of the bytes, the extension payloads
are what the docstring draws byte by byte, bytes it did not write are a ValueError, and what it
cannot store is a ModelOutputError that says where."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import struct
import subprocess
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from featcache.errors import ModelOutputError
from featcache.model_outputs import (
    ARRAY_EXT,
    MAX_DEPTH,
    SCALAR_EXT,
    decode_output,
    decode_outputs,
    encode_output,
)

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.UTC
PARIS_WINTER = dt.timezone(dt.timedelta(hours=1))
NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "float16", "float32", "float64", "complex64", "complex128"]


def bits(value: float) -> int:
    word: int = struct.unpack("<Q", struct.pack("<d", value))[0]
    return word


def from_bits(word: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", word))[0]
    return value


class Label(enum.StrEnum):
    CAT = "cat"


class Rank(enum.IntEnum):
    TOP = 1


def round_trip(output: Any) -> Any:
    return decode_output(encode_output(output))


# ---------------------------------------------------------------- plain values


@pytest.mark.parametrize("output", [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 1.5, -2.25e300, 5e-324, math.inf,
    -math.inf, "", "héllo ✓", b"", b"\x00\xff\x80", [], {}, [1, "a", None, 2.5, True],
    {"label": "cat", "score": 0.75, "top": [{"k": "a", "p": 0.5}, {"k": "b", "p": 0.25}]},
    [[[]]], {"nested": {"deeper": {"list": [b"x", None]}}},
], ids=repr)
def test_plain_outputs_round_trip_as_themselves(output: Any) -> None:
    decoded = round_trip(output)
    assert decoded == output
    assert type(decoded) is type(output)


def test_negative_zero_and_nan_payloads_keep_their_bits() -> None:
    for word in (bits(-0.0), 0x7FF8_0000_0000_0000, 0xFFF8_0000_0000_0001, 0x7FF0_0000_0000_0001):
        decoded = round_trip(from_bits(word))
        assert bits(decoded) == word
    decoded = round_trip({"scores": [from_bits(0xFFF8_0000_0000_0001), -0.0]})
    assert [bits(x) for x in decoded["scores"]] == [0xFFF8_0000_0000_0001, bits(-0.0)]


def test_a_tuple_decodes_as_a_list_and_a_mapping_as_a_dict() -> None:
    assert round_trip((1, (2, "x"))) == [1, [2, "x"]]
    assert type(round_trip((1,))) is list
    assert round_trip(types.MappingProxyType({"a": (1,)})) == {"a": [1]}


def test_bytes_likes_decode_as_bytes_and_str_and_int_subclasses_as_their_values() -> None:
    assert round_trip(bytearray(b"ab")) == b"ab"
    assert round_trip(memoryview(b"ab")) == b"ab"
    assert type(round_trip(bytearray(b"ab"))) is bytes
    decoded = round_trip([Label.CAT, np.str_("dog"), Rank.TOP, np.bytes_(b"z")])
    assert decoded == ["cat", "dog", 1, b"z"]
    assert [type(x) for x in decoded] == [str, str, int, bytes]


def test_datetimes_come_back_aware_in_utc_and_a_naive_one_is_utc() -> None:
    paris = dt.datetime(2024, 1, 1, 13, 30, 0, 123456, tzinfo=PARIS_WINTER)
    decoded = round_trip(paris)
    assert decoded == paris
    assert decoded.tzinfo == UTC
    assert decoded == dt.datetime(2024, 1, 1, 12, 30, 0, 123456, tzinfo=UTC)
    naive = round_trip({"at": dt.datetime(2024, 1, 1, 12, 30)})["at"]
    assert naive == dt.datetime(2024, 1, 1, 12, 30, tzinfo=UTC)
    assert naive.tzinfo == UTC
    assert round_trip(dt.datetime(1, 1, 1, tzinfo=UTC)) == dt.datetime(1, 1, 1, tzinfo=UTC)


def test_int_outputs_are_limited_to_int64() -> None:
    assert round_trip(2**63 - 1) == 2**63 - 1
    with pytest.raises(ModelOutputError, match=r"output\[1\]: int 9223372036854775808 is "
                                                "outside int64"):
        encode_output([1, 2**63])
    with pytest.raises(ModelOutputError, match="int -9223372036854775809 is outside int64"):
        encode_output(-(2**63) - 1)
    with pytest.raises(ModelOutputError, match=r"output\['r'\]: int"):
        encode_output({"r": np.uint64(2**64 - 1).item()})


# ---------------------------------------------------------------- numpy


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_scalars_round_trip_as_the_same_scalar_type(dtype: str) -> None:
    value = np.arange(3).astype(dtype)[-1]  # 2, or True
    decoded = round_trip(value)
    assert type(decoded) is type(value)
    assert decoded.tobytes() == value.tobytes()
    inside = round_trip({"v": [value]})["v"][0]
    assert type(inside) is type(value)
    assert inside == value


def test_numpy_float_scalars_keep_nan_payloads_and_negative_zero() -> None:
    for value in (np.float32(-0.0), np.float64(-0.0), np.float16(-0.0),
                  np.frombuffer(struct.pack("<I", 0xFFC0_0001), np.float32)[0]):
        decoded = round_trip(value)
        assert decoded.tobytes() == value.tobytes()
        assert type(decoded) is type(value)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 1, 1, 2)],
                         ids=str)
def test_numpy_arrays_round_trip_with_dtype_shape_and_bits(dtype: str,
                                                         shape: tuple[int, ...]) -> None:
    size = math.prod(shape)
    array = (np.arange(size) - 2).astype(dtype).reshape(shape)
    decoded = round_trip(array)
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == array.dtype
    assert decoded.shape == shape
    assert decoded.tobytes() == array.tobytes()
    assert not decoded.flags.writeable


def test_a_decoded_array_is_a_read_only_view_of_the_bytes_not_a_copy() -> None:
    data = bytearray(encode_output(np.zeros(4, dtype=np.int32)))
    decoded = decode_output(data)
    assert not decoded.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        decoded[0] = 1
    data[-4:] = struct.pack("<i", 7)  # the last element, written in the buffer
    assert decoded.tolist() == [0, 0, 0, 7]


def test_a_big_endian_or_non_contiguous_array_is_stored_little_endian_in_c_order() -> None:
    big = np.arange(6, dtype=">f8").reshape(2, 3)
    decoded = round_trip(big)
    assert decoded.dtype == np.dtype("<f8")
    assert decoded.tolist() == big.tolist()
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    strided = np.arange(20, dtype=np.float32)[::3]
    transposed = np.arange(6).reshape(2, 3).T
    for array in (fortran, strided, transposed):
        decoded = round_trip(array)
        assert decoded.flags.c_contiguous
        assert np.array_equal(decoded, array)
        assert decoded.dtype == array.dtype


def test_an_embedding_of_768_float32_is_its_bytes_plus_16_and_comes_back_bit_exact() -> None:
    rng = np.random.default_rng(7)
    embedding = rng.standard_normal(768).astype(np.float32)
    embedding[5] = np.frombuffer(struct.pack("<I", 0xFFC0_1234), np.float32)[0]  # a NaN
    embedding[6] = -0.0
    data = encode_output(embedding)
    assert len(data) == 768 * 4 + 16
    decoded = decode_output(data)
    assert decoded.dtype == np.float32
    assert decoded.tobytes() == embedding.tobytes()
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert (decoded.ctypes.data - start) % 16 == 0  # the pad aligned the elements
    assert decoded.flags.aligned


@pytest.mark.parametrize("count", [0, 1, 3, 4, 60, 61, 62, 63, 64, 8191, 8192, 16384, 16385])
def test_a_whole_output_array_is_aligned_to_16_whatever_its_size(count: int) -> None:
    array = np.arange(count, dtype=np.float64)
    data = encode_output(array)
    decoded = decode_output(data)
    assert decoded.tobytes() == array.tobytes()
    assert (decoded.ctypes.data - np.frombuffer(data, np.uint8).ctypes.data) % 16 == 0
    assert len(data) <= array.nbytes + 8 + 3 + 15 + 6


def test_arrays_inside_containers_round_trip_without_a_pad() -> None:
    output = {"embedding": np.arange(4, dtype=np.float32), "top": [np.array([[1, 2]]), 0.5],
              "label": np.str_("cat")}
    decoded = round_trip(output)
    assert decoded["embedding"].tobytes() == output["embedding"].tobytes()  # type: ignore[union-attr]
    assert decoded["top"][0].tolist() == [[1, 2]]
    assert decoded["top"][1] == 0.5
    assert decoded["label"] == "cat"
    ext = msgspec.msgpack.decode(encode_output([np.arange(4, dtype=np.float32)]))[0]
    assert ext.data[2] == 0  # no pad inside a list


# ---------------------------------------------------------------- the format, byte by byte


def test_an_array_extension_is_code_ndim_pad_shape_then_little_endian_elements() -> None:
    array = np.array([1.0, 2.0], dtype=np.float32)
    payload = (b"f" + bytes([1, 2]) + b"\x00\x00" + struct.pack("<Q", 2)
               + struct.pack("<2f", 1.0, 2.0))
    # ext8 (0xc7), its length, type 1: the elements start at byte 3 + 3 + 2 + 8 = 16
    assert encode_output(array) == b"\xc7" + bytes([len(payload), ARRAY_EXT]) + payload
    two_d = msgspec.msgpack.Ext(ARRAY_EXT, b"q" + bytes([2, 0]) + struct.pack("<2Q", 2, 1)
                                + struct.pack("<2q", -1, 2**40))
    decoded = decode_output(msgspec.msgpack.encode(two_d))
    assert decoded.dtype == np.int64
    assert decoded.tolist() == [[-1], [2**40]]


def test_a_scalar_extension_is_its_code_then_its_little_endian_bytes() -> None:
    assert encode_output(np.float32(1.5)) == b"\xc7\x05\x02f" + struct.pack("<f", 1.5)
    assert encode_output(np.int16(-2)) == b"\xc7\x03\x02h" + struct.pack("<h", -2)
    assert encode_output(np.bool_(True)) == msgspec.msgpack.encode(
        msgspec.msgpack.Ext(SCALAR_EXT, b"?\x01"))
    assert encode_output(np.complex64(1 - 2j)) == msgspec.msgpack.encode(
        msgspec.msgpack.Ext(SCALAR_EXT, b"F" + struct.pack("<2f", 1.0, -2.0)))


def test_plain_outputs_are_plain_msgpack_readable_by_any_msgpack_library() -> None:
    output = {"score": 0.5, "labels": ["a", "b"], "n": 3, "ok": True, "raw": b"\x00"}
    assert msgspec.msgpack.decode(encode_output(output)) == output
    assert encode_output(dt.datetime(2024, 1, 1, tzinfo=UTC)) == msgspec.msgpack.encode(
        dt.datetime(2024, 1, 1, tzinfo=UTC))


# ---------------------------------------------------------------- bytes it did not write


def _valid() -> bytes:
    return encode_output({"emb": np.arange(3, dtype=np.float32), "n": np.int64(3),
                          "at": dt.datetime(2024, 1, 1, tzinfo=UTC), "label": "cat"})


def _ext(code: int, payload: bytes) -> bytes:
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(code, payload))


MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("trailing byte", _valid() + b"\x00"),
    ("invalid opcode", b"\xc1"),
    ("str that is not UTF-8", b"\xa2\xff\xfe"),
    ("unknown extension", _ext(7, b"abc")),
    ("unknown type code", _ext(ARRAY_EXT, b"x\x01\x00" + struct.pack("<Q", 1) + b"\x00")),
    ("object dtype code", _ext(ARRAY_EXT, b"O\x01\x00" + struct.pack("<Q", 1) + bytes(8))),
    ("array header cut", _ext(ARRAY_EXT, b"f\x01")),
    ("shape cut", _ext(ARRAY_EXT, b"f\x01\x00" + b"\x02\x00")),
    ("too few elements", _ext(ARRAY_EXT, b"f\x01\x00" + struct.pack("<Q", 3) + bytes(8))),
    ("too many elements", _ext(ARRAY_EXT, b"f\x01\x00" + struct.pack("<Q", 1) + bytes(8))),
    ("pad over 15", _ext(ARRAY_EXT, b"f\x01\x10" + bytes(16) + struct.pack("<Q", 0))),
    ("ndim over 64", _ext(ARRAY_EXT, b"f\x41\x00" + bytes(8 * 65))),
    ("huge dimension", _ext(ARRAY_EXT, b"f\x02\x00" + struct.pack("<2Q", 0, 2**64 - 1))),
    ("shape product overflows", _ext(ARRAY_EXT, b"B\x02\x00"
                                     + struct.pack("<2Q", 2**32, 2**32) + bytes(16))),
    ("empty scalar", _ext(SCALAR_EXT, b"")),
    ("scalar of the wrong size", _ext(SCALAR_EXT, b"d" + bytes(4))),
    ("scalar of an unknown code", _ext(SCALAR_EXT, b"g" + bytes(16))),
    ("bad timestamp", _ext(-1, b"\x00\x00\x00")),
    ("nested too deep", b"\x91" * 100_000 + b"\xc0"),
    ("map too deep", b"\x81\xa1a" * 100_000 + b"\xc0"),
]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_bytes_it_did_not_write_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="not an encoded model output"):
        decode_output(data)


def test_every_truncation_of_an_output_is_a_value_error() -> None:
    data = _valid()
    for end in range(len(data)):
        with pytest.raises(ValueError, match="not an encoded model output"):
            decode_output(data[:end])
    with pytest.raises(ValueError, match="not an encoded model output"):
        decode_output(memoryview(data)[:-1])


def test_a_memoryview_decodes_like_its_bytes() -> None:
    data = _valid()
    decoded = decode_output(memoryview(data))
    assert decoded["emb"].tolist() == [0.0, 1.0, 2.0]
    assert decoded["label"] == "cat"


# ---------------------------------------------------------------- what cannot be stored


class Opaque:
    pass


REFUSED: list[tuple[Any, str]] = [
    ({"scores": [0.5, 0.25, {1, 2}]}, "output['scores'][2]: set is not a supported model output"),
    (frozenset(), "output: frozenset is not a supported model output"),
    ([Opaque()], "output[0]: Opaque is not a supported model output; use None, bool, int"),
    ({"d": decimal.Decimal(1)}, "output['d']: Decimal is not"),
    ({"d": dt.date(2024, 1, 1)}, "output['d']: date is not"),
    ({"t": dt.time(1)}, "output['t']: time is not"),
    ({"t": dt.timedelta(1)}, "output['t']: timedelta is not"),
    ({"u": uuid.UUID(int=1)}, "output['u']: UUID is not"),
    (1j, "output: complex is not"),
    (pd.Series([1.0]), "output: pandas.Series is not"),
    (pd.DataFrame({"a": [1]}), "output: pandas.DataFrame is not"),
    ([pd.Timestamp("2024-01-01")], "output[0]: pandas.Timestamp is not"),
    ({"t": pd.NaT}, "output['t']: pandas.NaTType is not"),
    ({"a": np.array([1, 2], dtype=object)}, "output['a']: numpy.ndarray of dtype object is not"),
    ({"a": np.array(["x"])}, "output['a']: numpy.ndarray of dtype <U1 is not"),
    ({"a": np.array([b"x"])}, "numpy.ndarray of dtype |S1 is not"),
    ({"a": np.array(["2024-01-01"], dtype="datetime64[D]")}, "dtype datetime64[D] is not"),
    ({"a": np.zeros(1, dtype=np.longdouble)}, "dtype float128 is not"),
    ({"a": np.zeros(1, dtype=[("f", "i4")])}, "output['a']: numpy.ndarray of dtype"),
    ({"a": np.datetime64("2024-01-01")}, "output['a']: numpy.datetime64 is not"),
    ({"a": np.timedelta64(1, "s")}, "output['a']: numpy.timedelta64 is not"),
    ({"a": np.longdouble(1)}, "output['a']: numpy.longdouble is not"),
    ({"a": np.ma.array([1.0])}, "output['a']: numpy.MaskedArray is not a supported model output"),
    ({1: "a"}, "output: dict key 1 (int) is not a str"),
    ({"a": {None: 1}}, "output['a']: dict key None (NoneType) is not a str"),
    ({"a": ["ok", "bad\ud800"]}, "output['a'][1]: str is not text"),
    ({"a": {"\udc00": 1}}, "output['a']: dict key '\\udc00' is not text"),
    ((x for x in ()), "output: generator is not"),
    ({"t": dt.datetime(1, 1, 1, tzinfo=PARIS_WINTER)}, "output['t']: datetime 0001-01-01"),
]


@pytest.mark.parametrize(("output", "message"), REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_an_output_that_cannot_be_stored_is_refused_with_its_place(output: Any,
                                                                   message: str) -> None:
    with pytest.raises(ModelOutputError) as caught:
        encode_output(output)
    assert message in str(caught.value)
    assert isinstance(caught.value, TypeError)


def test_nesting_deeper_than_max_depth_or_into_itself_is_refused() -> None:
    value: Any = 1.0
    for _ in range(MAX_DEPTH):
        value = [value]
    assert round_trip(value) == value
    with pytest.raises(ModelOutputError, match="nested deeper than 32 levels"):
        encode_output([value])
    with pytest.raises(ModelOutputError, match="nested deeper than 32 levels"):
        encode_output({"a": value})
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ModelOutputError, match="contains itself"):
        encode_output(loop)


def test_importing_the_module_and_plain_outputs_load_neither_numpy_nor_pandas() -> None:
    code = ("import sys\nfrom featcache.model_outputs import encode_output, decode_output\n"
            "out = {'a': [1, 2.5, 'x', None, b'y'], 'b': True}\n"
            "assert decode_output(encode_output(out)) == out\n"
            "print(sorted(n for n in ('numpy', 'pandas') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT)
    assert done.stdout.split() == ["[]"]


def test_decode_outputs_decodes_a_batch_as_decode_output_does_and_refuses_any_bad_one() -> None:
    outputs = [0.5, None, "x", [1, 2], {"a": np.float32(1.5)}, np.arange(3, dtype=np.int16)]
    encoded = [encode_output(o) for o in outputs]
    batch = decode_outputs(encoded)
    one_by_one = [decode_output(e) for e in encoded]
    assert batch[:4] == one_by_one[:4] == outputs[:4]
    assert type(batch[4]["a"]) is np.float32 and batch[4] == one_by_one[4]
    assert np.array_equal(batch[5], outputs[5]) and not batch[5].flags.writeable
    with pytest.raises(ValueError, match="not an encoded model output"):
        decode_outputs([*encoded, encoded[3][:-1]])  # one truncated output spoils the batch
