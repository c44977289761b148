"""The canonical encoding of model inputs (``featcache.model_inputs``): every equality rule of
its docstring both ways, the fast path agreeing with the normalizer, digests that are the same in
every process, the refusals and where they point, and what ``batch_of`` takes as a batch."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys
import types
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featcache.codec import RowCodec
from featcache.config import CacheConfig, Feature, FeatureView
from featcache.errors import InvalidRequest
from featcache.model_inputs import (
    DATE_EXT,
    MAX_DEPTH,
    batch_of,
    canonical_bytes,
    input_digest,
    input_digests,
)
from featcache.request import Planner
from featcache.result import FeatureResult
from featcache.types import Status

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.UTC
PARIS_WINTER = dt.timezone(dt.timedelta(hours=1))
NEW_YORK_WINTER = dt.timezone(dt.timedelta(hours=-5))


def nan_with_bits(bits: int) -> float:
    """A float64 of these bits: a NaN with another payload or sign than float('nan')."""
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


NEGATIVE_NAN = nan_with_bits(0xFFF8_0000_0000_0000)
PAYLOAD_NAN = nan_with_bits(0x7FF0_0000_0000_0001)  # a signalling NaN with payload 1
NEGATIVE_PAYLOAD_NAN = nan_with_bits(0xFFFF_FFFF_FFFF_FFFF)


class Color(enum.IntEnum):
    RED = 3


class Country(enum.StrEnum):
    FR = "FR"


class Point(NamedTuple):
    x: int
    y: float


def same(a: Any, b: Any) -> bool:
    """Same digest, and the same canonical bytes, through both public entry points."""
    one = input_digest(a) == input_digest(b)
    assert one == (canonical_bytes(a) == canonical_bytes(b))
    assert input_digests([a, b]) == [input_digest(a), input_digest(b)]
    return one


# ---------------------------------------------------------------- equal where documented


EQUAL: list[tuple[str, Any, Any]] = [
    ("numpy int8", np.int8(7), 7),
    ("numpy int16", np.int16(7), 7),
    ("numpy int32", np.int32(-7), -7),
    ("numpy int64", np.int64(2**62), 2**62),
    ("numpy uint8", np.uint8(7), 7),
    ("numpy uint16", np.uint16(7), 7),
    ("numpy uint32", np.uint32(7), 7),
    ("numpy uint64 max", np.uint64(2**64 - 1), 2**64 - 1),
    ("IntEnum", Color.RED, 3),
    ("numpy float16", np.float16(0.5), 0.5),
    ("numpy float32", np.float32(0.5), 0.5),
    ("numpy float64", np.float64(0.5), 0.5),
    ("float32 widened", np.float32(0.1), float(np.float32(0.1))),
    ("numpy bool", np.bool_(True), True),
    ("numpy bool False", np.bool_(False), False),
    ("-0.0", -0.0, 0.0),
    ("numpy -0.0", np.float32(-0.0), 0.0),
    ("negative NaN", NEGATIVE_NAN, math.nan),
    ("NaN payload", PAYLOAD_NAN, math.nan),
    ("negative NaN payload", NEGATIVE_PAYLOAD_NAN, PAYLOAD_NAN),
    ("numpy float32 NaN", np.float32("nan"), math.nan),
    ("numpy float16 -NaN", -np.float16("nan"), math.nan),
    ("numpy inf", np.float32("inf"), math.inf),
    ("numpy -inf", np.float16("-inf"), -math.inf),
    ("numpy str", np.str_("héllo"), "héllo"),
    ("StrEnum", Country.FR, "FR"),
    ("bytearray", bytearray(b"\x00ab"), b"\x00ab"),
    ("memoryview", memoryview(b"\x00ab"), b"\x00ab"),
    ("numpy bytes", np.bytes_(b"ab"), b"ab"),
    ("tuple", (1, 2.5, "x"), [1, 2.5, "x"]),
    ("NamedTuple", Point(1, 2.0), (1, 2.0)),
    ("float array", np.array([1.0, 2.0]), [1.0, 2.0]),
    ("float array and tuple", np.array([1.0, 2.0]), (1.0, 2.0)),
    ("int array", np.array([1, 2], dtype=np.int16), [1, 2]),
    ("uint64 array", np.array([2**64 - 1], dtype=np.uint64), [2**64 - 1]),
    ("bool array", np.array([True, False]), [True, False]),
    ("float32 array", np.array([0.1, 0.2], dtype=np.float32),
     [float(np.float32(0.1)), float(np.float32(0.2))]),
    ("float16 array with NaN and -0.0", np.array([np.nan, -0.0, 1.5], dtype=np.float16),
     [NEGATIVE_NAN, 0.0, 1.5]),
    ("2-d array", np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
    ("3-d array", np.arange(8.0).reshape(2, 2, 2), [[[0.0, 1.0], [2.0, 3.0]],
                                                   [[4.0, 5.0], [6.0, 7.0]]]),
    ("non-contiguous array", np.arange(6)[::2], [0, 2, 4]),
    ("empty float array", np.array([]), []),
    ("0-d array", np.array(5), 5),
    ("0-d float32 array", np.array(0.5, dtype=np.float32), 0.5),
    ("unicode array", np.array(["a", "bc"]), ["a", "bc"]),
    ("object array", np.array([1, "a", None, 2.5], dtype=object), [1, "a", None, 2.5]),
    ("array in a dict", {"emb": np.array([0.5, -0.0])}, {"emb": [0.5, 0.0]}),
    ("key order", {"a": 1, "b": [2], "c": {"x": 1, "y": 2}},
     {"c": {"y": 2, "x": 1}, "b": [2], "a": 1}),
    ("OrderedDict", collections.OrderedDict([("b", 1), ("a", 2)]), {"a": 2, "b": 1}),
    ("MappingProxyType", types.MappingProxyType({"a": 1}), {"a": 1}),
    ("StrEnum key", {Country.FR: 1}, {"FR": 1}),
    ("aware zones", dt.datetime(2024, 1, 1, 13, 30, tzinfo=PARIS_WINTER),
     dt.datetime(2024, 1, 1, 7, 30, tzinfo=NEW_YORK_WINTER)),
    ("aware and UTC", dt.datetime(2024, 1, 1, 13, 30, tzinfo=PARIS_WINTER),
     dt.datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
    ("naive is UTC", dt.datetime(2024, 1, 1, 12, 30, 0, 5), dt.datetime(2024, 1, 1, 12, 30, 0, 5,
                                                                         tzinfo=UTC)),
    ("pandas Timestamp aware", pd.Timestamp("2024-01-01 13:30", tz="Europe/Paris"),
     dt.datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
    ("pandas Timestamp naive", pd.Timestamp("2024-01-01 12:30:00.000001"),
     dt.datetime(2024, 1, 1, 12, 30, 0, 1, tzinfo=UTC)),
    ("pandas Timestamp nanoseconds dropped", pd.Timestamp("2024-01-01 12:30:00.000001999Z"),
     dt.datetime(2024, 1, 1, 12, 30, 0, 1, tzinfo=UTC)),
    ("pandas Timestamp before the epoch floors", pd.Timestamp(-1, unit="ns"),
     dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ("datetime64 ns", np.datetime64("2024-01-01T12:30:00.000001999", "ns"),
     dt.datetime(2024, 1, 1, 12, 30, 0, 1, tzinfo=UTC)),
    ("datetime64 before the epoch floors", np.datetime64(-1, "ns"),
     dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ("datetime64 us", np.datetime64("2024-01-01T12:30:00.000001", "us"),
     dt.datetime(2024, 1, 1, 12, 30, 0, 1)),
    ("datetime64 s", np.datetime64("2024-01-01T12:30:00", "s"),
     dt.datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
    ("datetime64 D is an instant", np.datetime64("2024-03-01", "D"), dt.datetime(2024, 3, 1)),
    ("datetime64 W", np.datetime64(1, "W"), dt.datetime(1970, 1, 8)),
    ("datetime64 M", np.datetime64("2024-03", "M"), dt.datetime(2024, 3, 1)),
    ("datetime64 Y", np.datetime64("2024", "Y"), dt.datetime(2024, 1, 1)),
    ("datetime64 of 5 s steps", np.array([2], dtype="datetime64[5s]")[0],
     dt.datetime(1970, 1, 1, 0, 0, 10)),
    ("pandas and numpy", pd.Timestamp("2024-01-01T00:00:00.5"),
     np.datetime64("2024-01-01T00:00:00.500", "ms")),
]


@pytest.mark.parametrize(("a", "b"), [(a, b) for _, a, b in EQUAL],
                         ids=[name for name, _, _ in EQUAL])
def test_equal_inputs_have_one_digest(a: Any, b: Any) -> None:
    assert same(a, b)
    assert same(b, a)


@pytest.mark.parametrize(("a", "b"), [(a, b) for _, a, b in EQUAL],
                         ids=[name for name, _, _ in EQUAL])
def test_equal_inputs_stay_equal_inside_a_dict_and_a_list(a: Any, b: Any) -> None:
    assert same({"x": a, "n": 1}, {"n": 1, "x": b})
    assert same([a, "tail"], (b, "tail"))


# ---------------------------------------------------------------- different where different


DISTINCT: list[Any] = [
    None, 0, 0.0, False, "", b"", [], {}, "0", "None", "nan",
    1, 1.0, True, "1", b"1", [1], [1.0], [True], [[1]], (1, 2), [2, 1], {"a": 1},
    {"a": 1.0}, {"a": True}, {"a": "1"}, {"a": None}, {"a": 1, "b": None}, ["a", 1],
    [["a", 1]], {"A": 1},
    math.nan, math.inf, -math.inf, 0.1, float(np.float32(0.1)), 2**63, -(2**63), 2**64 - 1,
    "héllo", "héllo".encode(),
    dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    dt.datetime(2024, 1, 1, 1, tzinfo=UTC), dt.date(2024, 1, 1), dt.date(2024, 1, 2),
    dt.date(1970, 1, 1), "2024-01-01", "2024-01-01T00:00:00", "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00+00:00", "2024-01-01 00:00:00",
    1704067200, 1704067200.0, 1704067200000000, 19723,
]


def test_distinct_inputs_have_distinct_digests() -> None:
    digests = input_digests(DISTINCT)
    clashes = [(DISTINCT[i], DISTINCT[j]) for i in range(len(DISTINCT))
               for j in range(i) if digests[i] == digests[j]]
    assert clashes == []


@pytest.mark.parametrize(("a", "b"), [
    (1, 1.0), (True, 1), (True, 1.0), (False, 0), (None, math.nan), (None, ""), (None, 0),
    (np.float32(0.1), 0.1), (np.int64(1), 1.0), (np.float64(1.0), 1), (np.bool_(True), 1),
    (np.array([1, 2]), [1.0, 2.0]), (np.array([1.0, 2.0]), [1, 2]),
    (np.array([True]), [1]), (np.array([0.1], dtype=np.float32), [0.1]),
    (np.array([[1, 2]]), [1, 2]), (np.array(["1"]), [1]), ("ab", b"ab"), (np.str_("a"), b"a"),
    (math.inf, -math.inf), (math.inf, math.nan), ([1, 2], [2, 1]), ({"a": 1}, ["a", 1]),
    ({}, []), ({"a": 1}, {"a": 1, "b": None}),
])
def test_inputs_that_differ_have_different_digests(a: Any, b: Any) -> None:
    assert not same(a, b)


def test_a_string_that_looks_like_a_timestamp_is_not_that_timestamp() -> None:
    # msgspec alone writes a naive datetime as exactly this string, and a date as its ISO text
    naive = dt.datetime(2024, 1, 1, 12, 30)
    assert msgspec.msgpack.encode(naive) == msgspec.msgpack.encode("2024-01-01T12:30:00")
    for text in ("2024-01-01T12:30:00", "2024-01-01T12:30:00Z", "2024-01-01T12:30:00+00:00",
                 naive.isoformat(), str(naive)):
        assert not same(naive, text)
        assert not same(naive.replace(tzinfo=UTC), text)
        assert not same(pd.Timestamp(naive), text)
        assert not same(np.datetime64(naive), text)


def test_a_date_is_not_its_iso_string_nor_its_midnight() -> None:
    day = dt.date(2024, 1, 1)
    assert msgspec.msgpack.encode(day) == msgspec.msgpack.encode("2024-01-01")
    assert not same(day, "2024-01-01")
    assert not same(day, dt.datetime(2024, 1, 1))
    assert not same(day, dt.datetime(2024, 1, 1, tzinfo=UTC))
    assert not same({"d": day}, {"d": "2024-01-01"})
    assert canonical_bytes(day) == msgspec.msgpack.encode(
        msgspec.msgpack.Ext(DATE_EXT, struct.pack("<i", 19723)))


def test_a_timestamp_below_the_microsecond_is_digested_without_a_warning() -> None:
    # pandas warns when to_pydatetime() discards nanoseconds: the module drops them itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(pd.Timestamp("2024-01-01T00:00:00.000001999Z"),
                    dt.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC))
        assert input_digests([{"t": pd.Timestamp(-1, unit="ns")}]) == [
            input_digest({"t": dt.datetime(1969, 12, 31, 23, 59, 59, 999999)})]


def test_timestamps_one_microsecond_apart_differ() -> None:
    t = dt.datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert not same(t, t + dt.timedelta(microseconds=1))
    assert not same(pd.Timestamp(t), pd.Timestamp(t) + pd.Timedelta(microseconds=1))


# ---------------------------------------------------------------- the fast path


def test_a_flat_dict_with_negative_zero_equals_the_one_with_zero_on_every_path() -> None:
    plain = {"a": 0.0, "b": "x", "c": 1}
    negative = {"a": -0.0, "b": "x", "c": 1}
    via_normalizer = collections.OrderedDict(negative)  # not a dict: never the fast path
    assert canonical_bytes(negative) == canonical_bytes(plain) == canonical_bytes(via_normalizer)
    batch = [plain, negative, {"a": 1.5, "b": "y", "c": 2}]
    assert input_digests(batch) == [input_digest(plain), input_digest(plain),
                                    input_digest({"a": 1.5, "b": "y", "c": 2})]


def test_nan_payloads_in_a_batch_of_flat_dicts_are_one_nan() -> None:
    batch = [{"v": NEGATIVE_NAN}, {"v": PAYLOAD_NAN}, {"v": math.nan}, {"v": np.float32("nan")}]
    assert len(set(input_digests(batch))) == 1
    assert len(set(input_digests([[x] for x in (NEGATIVE_NAN, PAYLOAD_NAN, math.nan)]))) == 1


def test_special_floats_in_a_batch_of_same_key_dicts_equal_each_input_keyed_alone() -> None:
    """The batch path checks NaN and -inf in C and searches the bytes for -0.0 only: each
    special float, and bytes that merely look like -0.0 inside a str, key as they do alone
    (where the normalizer decides)."""
    lookalike = "\u02c0" + "\x00" * 7  # UTF-8: cb 80 00 00 00 00 00 00 00, a -0.0's bytes
    assert bytes.fromhex("cb80") + bytes(7) in lookalike.encode()
    values = [-0.0, 0.0, math.nan, NEGATIVE_NAN, math.inf, -math.inf, 1.5, lookalike]
    batch = [{"v": v, "w": 2.0} for v in values]
    assert input_digests(batch) == [input_digest(collections.OrderedDict(d)) for d in batch]
    for one_special in ([{"v": -math.inf}, {"v": 1.0}], [{"v": 1.0}, {"v": -0.0}]):
        assert input_digests(one_special) == [input_digest(d) for d in one_special]


def test_the_fast_path_writes_what_the_normalizer_writes() -> None:
    """A value the fast path takes, and the same value forced through the normalizer (numpy
    scalars, a Mapping that is not a dict, a list subclass) give the same bytes."""
    plain = {"age": 42, "ctr": 0.25, "country": "FR", "vip": True, "note": None}
    numpy = {"age": np.int64(42), "ctr": np.float64(0.25), "country": np.str_("FR"),
             "vip": np.bool_(True), "note": None}
    assert canonical_bytes(plain) == canonical_bytes(numpy)
    assert input_digests([plain]) == input_digests([numpy])
    assert canonical_bytes(plain) == msgspec.msgpack.Encoder(order="deterministic").encode(plain)


class _List(list[Any]):
    pass


plain_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), plain_values, max_size=8))
def test_property_a_flat_dict_encodes_the_same_on_the_fast_and_the_slow_path(
        d: dict[str, Any]) -> None:
    fast = canonical_bytes(d)
    assert fast == canonical_bytes(types.MappingProxyType(d))
    assert input_digests([d, d]) == [input_digest(collections.OrderedDict(d))] * 2


@settings(max_examples=300, deadline=None)
@given(st.lists(plain_values, max_size=8))
def test_property_a_flat_list_encodes_the_same_on_the_fast_and_the_slow_path(
        items: list[Any]) -> None:
    assert canonical_bytes(items) == canonical_bytes(_List(items))
    assert canonical_bytes(items) == canonical_bytes(tuple(items))


def _false_positives() -> Iterator[Any]:
    """Plain inputs whose msgpack holds a byte 0xcb, then 0x7f and >= 0xf0, with no special
    float: a str8 header of length 203 (0xcb) before DEL and a 4-byte character, and a uint64
    whose big-endian bytes start 0x00 0xcb 0x7f 0xf8."""
    text = "\x7f\U0001f600" + "a" * 198
    assert len(text.encode()) == 0xCB
    yield {"note": text, "score": 0.5}
    yield [text, 1.5]
    yield {"id": 0x00CB_7FF8_0000_0000, "score": 0.5}


@pytest.mark.parametrize("value", list(_false_positives()), ids=["str", "list", "int"])
def test_a_false_match_of_the_special_float_pattern_hashes_as_the_value_itself(
        value: Any) -> None:
    raw = msgspec.msgpack.Encoder(order="deterministic").encode(value)
    assert re.search(rb"\xcb[\x7f\xff][\xf0-\xff]", raw) is not None  # it does look like one
    assert canonical_bytes(value) == raw  # nothing to normalize: the bytes msgspec writes
    assert input_digests([value, value]) == [input_digest(value)] * 2
    assert input_digest(value) == input_digest(json.loads(json.dumps(value)))


# ---------------------------------------------------------------- the same in every process


#: built the same way in this process and in the children, whose PYTHONHASHSEED differs: the
#: dict built from a set of str has its keys in a per-process order
INPUTS_CODE = """
import datetime as dt, math
import numpy as np, pandas as pd
KEYS = sorted({f"feature_{i}" for i in range(24)})
SHUFFLED = {k: int(k.removeprefix("feature_")) for k in set(KEYS)}
INPUTS = [
    42, "user_42", 1.5, -0.0, math.nan, True, None, b"\\x00raw",
    {"age": 42, "ctr": 0.25, "country": "FR", "vip": True, "note": None},
    {k: SHUFFLED[k] for k in KEYS}, SHUFFLED,
    [1, 2.5, "x", [None, {"b": 1, "a": 2}]],
    {"emb": np.arange(4, dtype=np.float32), "n": np.int64(7)},
    dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.date(2024, 1, 1), pd.Timestamp("2024-01-01T10:00:00.000000999Z"),
]
ORDER = list(SHUFFLED)
"""


def _digests_in_a_child(seed: str) -> tuple[list[str], list[str]]:
    code = (INPUTS_CODE + "import json\nfrom featcache.model_inputs import input_digests\n"
            "print(json.dumps([input_digests(INPUTS), ORDER]))")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT, env=env)
    digests, order = json.loads(done.stdout.splitlines()[-1])
    return digests, order


def test_digests_are_the_same_in_other_processes_whatever_their_hash_seed() -> None:
    namespace: dict[str, Any] = {}
    exec(INPUTS_CODE, namespace)
    here = input_digests(namespace["INPUTS"])
    first, first_order = _digests_in_a_child("0")
    second, second_order = _digests_in_a_child("4242")
    assert first_order != second_order  # the children did build their dicts in other orders
    assert first == here
    assert second == here


#: THESE VALUES ARE THE FORMAT. A change that alters any of them changes the key of every
#: cached output, orphaning all of them: only ever change them on purpose, with a new key space
#: (a format version in ``featcache.keys``), never to make this test pass.
KNOWN: list[tuple[Any, str]] = [
    (42, "1d30b9060a0a3e5f170d24d01884e555"),
    ("user_42", "88c31c2e2756d41955c1171fd86053f1"),
    (1.0, "d5422ccc39d3e18e54a0d307e5bded08"),
    (math.nan, "feff8c8e2d56b9a86a38b7de1ae20cdb"),
    (True, "af4ce7fcb77c5a35196608dae032903a"),
    (None, "45b5b4d6293993511d1f1368aee28b47"),
    ({"age": 42, "ctr": 0.25, "country": "FR", "vip": True, "note": None},
     "a6f5143b5a6661d4c6344e05498beb9d"),
    ([1, 2.5, "x", b"\x00"], "fc27d51bca919902f6b500a6dfdc49b1"),
    (dt.datetime(2024, 1, 1, 12, tzinfo=UTC), "231879d1f9d5575e70a8e8cbbf262247"),
    (dt.date(2024, 1, 1), "502812f3c55dc10af114bd15890d64a7"),
]


@pytest.mark.parametrize(("value", "digest"), KNOWN, ids=[repr(v)[:30] for v, _ in KNOWN])
def test_known_answer_digests(value: Any, digest: str) -> None:
    assert input_digest(value) == digest
    assert input_digests([value]) == [digest]


def test_a_digest_is_32_lowercase_hex_characters_of_blake2b_128() -> None:
    digest = input_digest({"a": 1})
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert digest == hashlib.blake2b(canonical_bytes({"a": 1}), digest_size=16).hexdigest()


def test_importing_the_module_loads_neither_numpy_nor_pandas() -> None:
    code = ("import sys\nimport featcache.model_inputs as m\n"
            "m.input_digests([1, 'a', {'x': 1.5, 'y': None}, [1, 2], b'x'])\n"
            "print(sorted(n for n in ('numpy', 'pandas') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT)
    assert done.stdout.split() == ["[]"]


# ---------------------------------------------------------------- refusals


class Opaque:
    pass


REFUSED: list[tuple[Any, str]] = [
    ({"age": decimal.Decimal("1.5")},
     "input['age']: Decimal is not a supported input value; use int, float"),
    ({"tags": {"a", "b"}}, "input['tags']: set is not a supported input value; a set has no "
                           "order"),
    ([1, frozenset({1})], "input[1]: frozenset is not a supported input value"),
    ({"id": uuid.UUID(int=1)}, "input['id']: UUID is not a supported input value"),
    ({"wait": dt.timedelta(seconds=1)}, "input['wait']: timedelta is not a supported input"),
    ({"at": dt.time(12, 30)}, "input['at']: time is not a supported input value"),
    ([1j], "input[0]: complex is not a supported input value"),
    ({"t": pd.NaT}, "input['t']: pandas.NaTType is not a supported input value; a missing "
                    "timestamp: pass None"),
    ({"n": pd.NA}, "input['n']: pandas.NAType is not a supported input value; a missing value"),
    ({"t": np.datetime64("NaT")}, "input['t']: numpy.datetime64('NaT') is not a supported"),
    ({"d": np.timedelta64(1, "s")}, "input['d']: numpy.timedelta64 is not a supported"),
    ({"c": np.complex64(1)}, "input['c']: numpy.complex64 is not a supported"),
    ({"x": np.longdouble(1)}, "input['x']: numpy.longdouble is not a supported"),
    ({"a": np.array([1j])}, "input['a']: numpy.ndarray of dtype complex128 is not"),
    ({"a": np.array(["2024-01-01"], dtype="datetime64[D]")},
     "input['a']: numpy.ndarray of dtype datetime64[D] is not"),
    ({"a": np.array([1], dtype="timedelta64[s]")}, "numpy.ndarray of dtype timedelta64[s]"),
    ({"a": np.array([b"x"])}, "input['a']: numpy.ndarray of dtype |S1 is not"),
    ({"a": np.zeros(1, dtype=[("f", "i4")])}, "input['a']: numpy.ndarray of dtype"),
    ({"a": np.zeros(1, dtype=np.longdouble)}, "numpy.ndarray of dtype float128"),
    ({"a": np.array(1j)}, "input['a']: numpy.ndarray of dtype complex128"),
    ({"a": np.ma.array([1, 2], mask=[0, 1])}, "input['a']: numpy.MaskedArray is not"),
    ({"a": np.array([1, decimal.Decimal(2)], dtype=object)}, "input['a'][1]: Decimal is not"),
    ({"a": pd.Series([1, 2])}, "input['a']: pandas.Series is not a supported input value"),
    ([Opaque()], "input[0]: Opaque is not a supported input value; use int, float, str"),
    ([x for x in range(2)].__iter__(), "input: list_iterator is not a supported input value"),
    (range(3), "input: range is not a supported input value"),
    ({1: "a"}, "input: dict key 1 (int) is not a str"),
    ({"a": {(1, 2): 1}}, "input['a']: dict key (1, 2) (tuple) is not a str"),
    ({"a": [2**64]}, "input['a'][0]: int 18446744073709551616 is out of range"),
    (-(2**63) - 1, "input: int -9223372036854775809 is out of range"),
    ({"s": "ok\ud800"}, "input['s']: str is not text: it holds a lone surrogate at position 2"),
    ({"\udc00": 1}, "input: dict key '\\udc00' is not text"),
    ([np.array(["\ud800"])], "input[0][0]: str is not text"),
    ({"a": msgspec.msgpack.Ext(DATE_EXT, b"\x00\x00\x00\x00")}, "input['a']: Ext is not"),
    ({"t": dt.datetime(1, 1, 1, tzinfo=PARIS_WINTER)}, "input['t']: datetime 0001-01-01 "
                                                       "00:00:00+01:00 is outside the years"),
]


@pytest.mark.parametrize(("value", "message"), REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_an_input_that_cannot_be_encoded_is_refused_with_its_place(value: Any,
                                                                   message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        input_digest(value)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        canonical_bytes(value)


@pytest.mark.parametrize(("batch", "message"), [
    ([1, 2, 3, {"age": decimal.Decimal("1")}],
     "inputs[3]['age']: Decimal is not a supported input value; use int, float, str"),
    ([{"a": 1}, {"a": 2}, {"a": {1, 2}}], "inputs[2]['a']: set is not a supported"),
    ([{"a": 1}, {2: 1}], "inputs[1]: dict key 2 (int) is not a str"),
    ([{"a": 1.5}, {"a": 2**64}], "inputs[1]['a']: int 18446744073709551616 is out of range"),
    ([1, 2**64], "inputs[1]: int 18446744073709551616 is out of range"),
    (["a", "b\ud800"], "inputs[1]: str is not text"),
    ([{"a": -0.0}, {"a": "\ud800"}], "inputs[1]['a']: str is not text"),
    ([[1], [2, [3, pd.NaT]]], "inputs[1][1][1]: pandas.NaTType is not"),
])
def test_a_refused_input_in_a_batch_is_named_by_its_index(batch: list[Any],
                                                         message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        input_digests(batch)


def _nested(levels: int) -> Any:
    value: Any = 0.0
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_is_limited_to_max_depth_levels_for_lists_and_arrays_alike() -> None:
    assert MAX_DEPTH == 32
    deepest = _nested(MAX_DEPTH)
    assert same(deepest, np.zeros((1,) * MAX_DEPTH))
    with pytest.raises(InvalidRequest, match="nested deeper than 32 levels"):
        input_digest(_nested(MAX_DEPTH + 1))
    with pytest.raises(InvalidRequest, match="nested deeper than 32 levels"):
        input_digest(np.zeros((1,) * (MAX_DEPTH + 1)))
    with pytest.raises(InvalidRequest, match=r"input\['a'\]: nested deeper"):
        input_digest({"a": np.zeros((1,) * MAX_DEPTH)})


def test_a_container_that_holds_itself_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(InvalidRequest, match="contains itself"):
        input_digest(loop)
    cycle: dict[str, Any] = {"a": 1}
    cycle["self"] = cycle
    with pytest.raises(InvalidRequest, match="contains itself"):
        input_digests([cycle])


# ---------------------------------------------------------------- batch_of


def _feature_result() -> FeatureResult:
    view = FeatureView(name="user", table="user_stats", entity_column="user_id",
                       entity_type="int", event_timestamp_column="event_ts",
                       features=(Feature("age", "int", "1h"), Feature("ctr", "float", "1h")))
    plan = Planner(CacheConfig(views=(view,)), {"user": RowCodec(view)}).plan(("ctr", "age"))
    rows = {3: (Status.HIT_REDIS, (30, 0.5), 0), 1: (Status.ABSENT, None, None),
            2: (Status.FILLED, (20, -0.0), 0)}
    return FeatureResult([3, 1, 2], plan, [rows])


def test_a_list_or_tuple_is_its_own_batch() -> None:
    items = [1, {"a": 2}]
    assert batch_of(items) is items
    pair = (1, 2)
    assert batch_of(pair) is pair


def test_a_feature_result_is_the_batch_of_its_entity_dicts_in_its_order() -> None:
    result = _feature_result()
    batch = batch_of(result)
    assert batch == [{"ctr": 0.5, "age": 30}, {"ctr": None, "age": None},
                     {"ctr": -0.0, "age": 20}]
    assert input_digests(batch) == [input_digest({"age": 30, "ctr": 0.5}),
                                    input_digest({"age": None, "ctr": None}),
                                    input_digest({"age": 20, "ctr": 0.0})]


def test_a_dataframe_is_one_input_dict_per_row() -> None:
    frame = pd.DataFrame({"age": np.array([30, 40], dtype=np.int32), "ctr": [0.5, np.nan],
                          "country": ["FR", "DE"], "seen": pd.to_datetime(
                              ["2024-01-01 12:00:00", "2024-01-02 00:00:00"], utc=True)})
    batch = batch_of(frame)
    assert len(batch) == 2
    assert input_digests(batch) == [
        input_digest({"age": 30, "ctr": 0.5, "country": "FR",
                      "seen": dt.datetime(2024, 1, 1, 12, tzinfo=UTC)}),
        input_digest({"age": 40, "ctr": math.nan, "country": "DE",
                      "seen": dt.datetime(2024, 1, 2)}),
    ]


def test_a_dataframe_with_duplicate_columns_is_refused() -> None:
    frame = pd.DataFrame([[1, 2]], columns=["a", "a"])
    with pytest.raises(InvalidRequest, match="duplicate column names"):
        batch_of(frame)


def test_a_numpy_array_is_the_batch_of_its_rows() -> None:
    matrix = np.array([[1.0, 2.0], [3.0, -0.0]], dtype=np.float32)
    batch = batch_of(matrix)
    assert len(batch) == 2
    assert input_digests(batch) == [input_digest([1.0, 2.0]), input_digest([3.0, 0.0])]
    assert input_digests(batch_of(np.array([7, 8]))) == [input_digest(7), input_digest(8)]


def test_a_generator_is_read_once_into_a_list() -> None:
    batch = batch_of(x * 2 for x in range(3))
    assert batch == [0, 2, 4]
    assert input_digests(x * 2 for x in range(3)) == input_digests([0, 2, 4])  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "message"), [
    ("abc", "a batch is a list of inputs; got str, which is one input: pass [x]"),
    (b"abc", "got bytes, which is one input"),
    (bytearray(b"abc"), "got bytearray, which is one input"),
    ({"a": 1}, "got dict: a dict is one input: pass [d]"),
    (types.MappingProxyType({"a": 1}), "got mappingproxy: a dict is one input: pass [d]"),
    ({1, 2}, "got set, which has no order to answer in"),
    (frozenset({1}), "got frozenset, which has no order"),
    (42, "a batch is a list of inputs; got int: pass [x]"),
    (None, "got NoneType: pass [x]"),
    (np.array(5), "got a 0-d numpy array, which is one input"),
])
def test_what_is_not_a_batch_is_refused(value: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        batch_of(value)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        input_digests(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=8, unique=True), st.data())
def test_property_a_batch_of_dicts_with_one_key_set_digests_as_each_dict_alone(
        keys: list[str], data: st.DataObject) -> None:
    """The batch path (a Struct of the first dict's keys, sorted) writes the bytes each dict
    gets alone, whatever the order of its keys, and a dict with other keys or a value the
    Struct does not take (a numpy scalar, an int past uint64) goes the per-input way."""
    rows = [{key: data.draw(plain_values) for key in data.draw(st.permutations(keys))}
            for _ in range(data.draw(st.integers(1, 4)))]
    odd = data.draw(st.sampled_from([None, "extra key", "missing key", "numpy", "big int"]))
    if odd == "extra key":
        rows.append({**rows[0], "\x00extra": 1})
    elif odd == "missing key" and keys:
        rows.append({key: rows[0][key] for key in keys[1:]})
    elif odd == "numpy" and keys:
        rows.append({**rows[0], keys[0]: np.int64(7)})
    elif odd == "big int" and keys:
        rows.append({**rows[0], keys[0]: 2**64})
    try:
        alone = [input_digest(row) for row in rows]
    except InvalidRequest:
        with pytest.raises(InvalidRequest, match=r"inputs\[\d\]"):
            input_digests(rows)
        return
    assert input_digests(rows) == alone
