"""The row format and the freshness rules: pure functions, no servers needed."""

from __future__ import annotations

import datetime as dt
import math
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from featcache import Feature, FeatureView
from featcache.codec import (
    KIND_ABSENT,
    KIND_TOMBSTONE,
    NO_EVENT,
    TOMBSTONE_HEAD,
    VALUE_VERSION,
    RowCodec,
    schema_fingerprint,
)
from featcache.freshness import (
    is_fresh,
    refresh_early,
    servable_stale,
    xfetch_delta,
    xfetch_delta_floor,
)
from featcache.keys import CLUSTER_BUCKETS, KeyLayout, bucket_of, slot_of
from featcache.types import FeatureType

VIEW = FeatureView(
    name="v", table="t", entity_column="id", event_timestamp_column="ts",
    features=(Feature("a", "float", 60), Feature("b", "int", 60), Feature("c", "str", 60)),
)


def test_head_is_fixed_width_and_big_endian_event() -> None:
    raw = RowCodec(VIEW).encode((1.5, 2, "x"), 1_700_000_000_000_001, 5)
    array8, version, kind, int64, event = struct.unpack_from(">BBBBq", raw)
    assert (array8, version, kind, int64) == (0x98, VALUE_VERSION, ord("R"), 0xD3)
    assert event == 1_700_000_000_000_001
    assert RowCodec(VIEW).encode((1.5, 2, "x"), None, 5)[4:12] == struct.pack(">q", NO_EVENT)
    # the whole value is one msgpack array: any msgpack reader can inspect it
    fp = RowCodec(VIEW).fingerprint
    assert msgpack.unpackb(raw) == [2, 0x52, 1_700_000_000_000_001, fp, 0, 5, 0, [1.5, 2, "x"]]
    assert msgpack.unpackb(RowCodec.encode_absent(9, 4)) == [2, 0x41, NO_EVENT, 0, 4, 9, 0, []]
    assert raw[:2] + b"T" + raw[3:4] + struct.pack(">q", NO_EVENT) == TOMBSTONE_HEAD


def test_absent_entry_round_trip() -> None:
    row = RowCodec(VIEW).decode(RowCodec.encode_absent(123))
    assert row is not None and row.kind == KIND_ABSENT and row.loaded_ms == 123 and row.values == ()


def test_garbage_decodes_to_none_never_raises() -> None:
    codec = RowCodec(VIEW)
    good = codec.encode((1.0, 1, "a"), 1, 1)
    for bad in (b"", b"\x98", good[:1] + b"\x03" + good[2:], good[:-1], good[:12],
                good[:2] + b"Z" + good[3:], good[:12] + msgpack.packb({"a": 1}),
                good[:12] + msgpack.packb([1, 2, 3, 4, 5, 6, 7])[1:],
                b"\x01R" + good[4:12] + msgpack.packb([1, 2, 3, 4, 5])):
        assert codec.decode(bad) is None


def test_other_schema_is_a_miss_but_appended_features_keep_old_rows() -> None:
    old = RowCodec(VIEW).encode((1.0, 1, "a"), 1, 1)
    grown = FeatureView(name="v", table="t", entity_column="id", event_timestamp_column="ts",
                        features=(*VIEW.features, Feature("d", "bool", 60)))
    row = RowCodec(grown).decode(old)
    assert row is not None and tuple(row.values) == (1.0, 1, "a")  # three of four: d missing
    retyped = FeatureView(name="v", table="t", entity_column="id", event_timestamp_column="ts",
                          features=(Feature("a", "int", 60), *VIEW.features[1:]))
    assert RowCodec(retyped).decode(old) is None


def test_fingerprint_depends_on_order_and_type() -> None:
    a = schema_fingerprint([("x", FeatureType.INT), ("y", FeatureType.STR)])
    assert a != schema_fingerprint([("y", FeatureType.STR), ("x", FeatureType.INT)])
    assert a != schema_fingerprint([("x", FeatureType.FLOAT), ("y", FeatureType.STR)])
    assert a & 1 and a > 0


@given(st.floats(allow_nan=False), st.integers(-(2**63), 2**63 - 1), st.text(),
       st.integers(-(2**62), 2**62), st.integers(0, 2**50))
def test_any_row_round_trips(f: float, i: int, s: str, event: int, loaded: int) -> None:
    codec = RowCodec(VIEW)
    row = codec.decode(codec.encode((f, i, s), event, loaded, 3, 17))
    assert row is not None
    assert tuple(row.values) == (f, i, s) and row.event_us == event
    assert (row.loaded_ms, row.epoch, row.fill_ms) == (loaded, 3, 17)


def test_encode_many_gives_the_bytes_of_encode() -> None:
    """The bulk writers' batch encoder and the one-row encoder write the same bytes, also
    for embeddings (packed specially), timestamps and rows without an event time."""
    view = FeatureView(
        name="w", table="t", entity_column="id", event_timestamp_column="ts",
        features=(Feature("e", "list[float]", 60), Feature("t", "timestamp", 60),
                  Feature("s", "str", 60), Feature("n", "int", 60)),
    )
    codec = RowCodec(view)
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    rows = [(10, ([0.5, -1.0], when, "x", 3)), (None, (None, None, None, None)),
            (-(2**62), ([], when, "\u00e9", 2**62))]
    events, values = [e for e, _ in rows], [v for _, v in rows]
    assert codec.encode_many(events, values, 1234, 7) == [
        codec.encode(v, event, 1234, 7) for event, v in rows
    ]
    # without embeddings every row goes through map() alone: same bytes
    plain = FeatureView(
        name="p", table="t", entity_column="id", event_timestamp_column="ts",
        features=(Feature("f", "float", 60), Feature("t", "timestamp", 60),
                  Feature("s", "str", 60), Feature("b", "bool", 60)),
    )
    pcodec = RowCodec(plain)
    prow = [(1.5, when, "a", True), [float("nan"), None, "", False], (None,) * 4]
    pevents = [1, None, 2**62]
    assert pcodec.encode_many(pevents, prow, 99, 3) == [
        pcodec.encode(v, e, 99, 3) for e, v in zip(pevents, prow, strict=True)
    ]
    assert pcodec.encode_many([], [], 99) == []
    with pytest.raises(ValueError, match="expected 4 values, got 3"):
        pcodec.encode_many([1, 2], [(1.0, when, "a", True), (1.0, when, "a")], 99)
    with pytest.raises(ValueError, match="1 event times for 2 rows"):
        pcodec.encode_many([1], prow[:2], 99)


def test_encode_columns_gives_the_bytes_of_encode_many() -> None:
    """The bulk reader's columns encode to exactly the bytes of the same rows as tuples,
    embeddings and missing event times included; shapes that do not fit are refused."""
    view = FeatureView(
        name="w", table="t", entity_column="id", event_timestamp_column="ts",
        features=(Feature("e", "list[float]", 60), Feature("t", "timestamp", 60),
                  Feature("s", "str", 60), Feature("n", "int", 60)),
    )
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    rows = [([0.5, -1.0], when, "x", 3), (None, None, None, None), ([], when, "\u00e9", 2**62)]
    events = [10, None, -(2**62)]
    columns = [list(column) for column in zip(*rows, strict=True)]
    codec = RowCodec(view)  # an embedding: packed per row
    assert codec.encode_columns(events, columns, 1234, 7) == codec.encode_many(
        events, rows, 1234, 7)
    plain = RowCodec(VIEW)  # none: map() alone
    rows3 = [(1.5, 2, "a"), (float("nan"), None, ""), (None, 2**62, "\u00e9")]
    columns3 = [list(column) for column in zip(*rows3, strict=True)]
    assert plain.encode_columns(events, columns3, 99, 3) == plain.encode_many(
        events, rows3, 99, 3)
    codec = RowCodec(view)
    assert codec.encode_columns([], [[], [], [], []], 1) == []
    with pytest.raises(ValueError, match="expected 4 columns, got 3"):
        codec.encode_columns(events, columns[:3], 1)
    with pytest.raises(ValueError, match="columns of"):
        codec.encode_columns(events[:2], columns, 1)


def test_the_bulk_encoders_write_encodes_bytes_at_every_msgpack_boundary() -> None:
    """The bulk encoders pack values with msgspec (``encode`` with msgpack): the same bytes
    for ints at every width boundary, floats (NaN, infinities, -0.0), text and embeddings of
    every length class, booleans and nulls; a value msgspec refuses (a str subclass) makes
    msgpack pack the batch, as ``encode`` does."""
    view = FeatureView(
        name="b", table="t", entity_column="id", event_timestamp_column="ts",
        features=(Feature("i", "int", 60), Feature("f", "float", 60), Feature("s", "str", 60),
                  Feature("b", "bool", 60), Feature("e", "list[float]", 60)),
    )
    codec = RowCodec(view)
    ints = [0, 1, 127, 128, 255, 256, 2**16 - 1, 2**16, 2**32 - 1, 2**32, 2**63 - 1, -1, -32,
            -33, -128, -129, -(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1, -(2**63)]
    floats = [0.0, -0.0, 1.5, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7e308]
    texts = ["", "a", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "\u00e9" * 40_000, "\U0001f642"]
    embeddings = [[], [0.5], [1.0] * 40, [2.0] * 8192, None]
    n = max(len(ints), len(floats), len(texts), len(embeddings))
    rows = [(ints[k % len(ints)], floats[k % len(floats)], texts[k % len(texts)], k % 2 == 0,
             embeddings[k % len(embeddings)]) for k in range(n)]
    rows.append((None, None, None, None, None))
    events = [k * 1_000_003 for k in range(len(rows))]
    expected = [codec.encode(row, event, 5, 9) for row, event in zip(rows, events, strict=True)]
    assert codec.encode_many(events, rows, 5, 9) == expected
    columns = [list(column) for column in zip(*rows, strict=True)]
    assert codec.encode_columns(events, columns, 5, 9) == expected

    class Text(str):
        pass

    odd = [(1, 1.0, Text("sub"), True, None)]
    assert codec.encode_many([7], odd, 5, 9) == [codec.encode(odd[0], 7, 5, 9)]


def test_freshness_boundaries() -> None:
    assert is_fresh(1000, 1000 + 600_000, 600_000)
    assert not is_fresh(1000, 1000 + 600_001, 600_000)
    assert is_fresh(2000, 1000, 10)  # loaded "in the future" (clock skew): fresh, not negative
    assert servable_stale(0, 900_000, 900_000) and not servable_stale(0, 900_001, 900_000)



def test_xfetch_delta_is_the_fill_time_floored_at_2_percent_of_max_age() -> None:
    assert xfetch_delta_floor(2000) == 40 and xfetch_delta_floor(10) == 1
    assert xfetch_delta(3, 2000) == 40  # a fast read: the floor
    assert xfetch_delta(250, 2000) == 250  # a slow read: its own time


def test_refresh_early_draws_exactly_at_the_xfetch_boundary() -> None:
    """``now - delta * beta * ln(rand) >= expiry``: at ``r`` ms before expiry a draw refreshes
    iff ``rand <= exp(-r / (beta * delta))``, so the chance is exactly that."""
    loaded, max_age, fill = 0, 2000, 5  # delta = 40 (the floor)
    now = 1900  # 100 ms before expiry
    edge = math.exp(-100 / 40)
    assert refresh_early(loaded, now, max_age, fill, 1.0, edge * 0.999)
    assert not refresh_early(loaded, now, max_age, fill, 1.0, edge * 1.001)
    assert refresh_early(loaded, now, max_age, fill, 2.0, math.exp(-100 / 80) * 0.999)
    assert not refresh_early(loaded, 2000, max_age, fill, 0.0, 1e-300)  # beta 0: never
    assert refresh_early(loaded, 2000, max_age, fill, 1.0, 1.0)  # at expiry: always


def test_a_row_read_every_5_ms_is_refreshed_before_it_expires() -> None:
    """The reason for the floor: the chance that no read of a row read every 5 ms draws an
    early refresh before its 2 s ``max_age`` ends, a hard miss, is below 2e-5 whatever the
    phase of the reads (4e-6 on average; 2.5e-3 with a 1% floor: one XFetch test run in 40
    failed)."""
    delta = xfetch_delta(2, 2000)
    worst = max(
        math.prod(1 - math.exp(-(r0 + 5 * k) / delta) for k in range(400))
        for r0 in (0.5, 1, 2, 3, 4, 5)
    )
    assert worst < 2e-5


def test_key_layout() -> None:
    layout = KeyLayout("fc")
    assert layout.row_key("users", 42) == "fc:users:42"
    assert layout.row_keys("users", ["a:b", "ü"]) == ["fc:users:a:b", "fc:users:ü"]
    assert layout.epoch_key("users") == "fc:~users:epoch"
    # the bulk builder spells every key as row_key does, '%' in a prefix or view included
    odd = KeyLayout("50%s")
    ids: list[int | str] = [0, -7, 2**63 - 1, "%d", "a%%b"]
    assert odd.row_keys("v%", ids) == [odd.row_key("v%", i) for i in ids] == [
        "50%s:v%:0", "50%s:v%:-7", f"50%s:v%:{2**63 - 1}", "50%s:v%:%d", "50%s:v%:a%%b"]


def test_tombstone_decodes_as_a_tombstone() -> None:
    raw = TOMBSTONE_HEAD + b"1764000000000-0"
    row = RowCodec(VIEW).decode(raw)
    assert row is not None and row.kind == KIND_TOMBSTONE


# ------------------------------------------------------------------ declared types on decode

TYPED = FeatureView(
    name="v", table="t", entity_column="id", event_timestamp_column="ts",
    features=(Feature("i", "int", 60), Feature("f", "float", 60), Feature("b", "bool", 60),
              Feature("s", "str", 60), Feature("t", "timestamp", 60),
              Feature("e", "list[float]", 60)),
)
_GOOD = (7, 0.5, True, "x", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), [1.0, -2.5])
#: for each feature of TYPED, values msgpack can hold that are not of its declared type
_WRONG: tuple[tuple[object, ...], ...] = (
    ("7", 7.0, True, [7], b"7", {"a": 7}),
    ("0.5", False, [0.5], b"\x00" * 8),
    (1, 0, "true", 1.0, [True]),
    (b"x", 1, 1.0, ["x"], True),
    (1_767_225_600_000_000, "2026-01-01", 1.5),
    ([1.0, -2.5], "e", 1.0, 3),
)


def _with(values: tuple[object, ...], index: int, value: object) -> bytes:
    """An encoded row of TYPED whose value ``index`` is replaced after encoding (as a foreign
    writer would leave it): fingerprint, epoch and header are those of a real row."""
    real = RowCodec(TYPED).encode(values, 1, 2, 3)
    body = msgpack.unpackb(real, timestamp=3)
    body[7][index] = value
    return _repacked(real, body)


def _repacked(real: bytes, body: list[object]) -> bytes:
    """The 12 fixed bytes of ``real``, then the elements of ``body`` after them."""
    return real[:12] + msgpack.packb(body[3:], datetime=True)[1:]


@pytest.mark.parametrize("index", range(len(_GOOD)))
def test_a_value_of_another_type_than_declared_is_a_decode_error(index: int) -> None:
    codec = RowCodec(TYPED)
    for wrong in _WRONG[index]:
        assert codec.decode(_with(_GOOD, index, wrong)) is None, (index, wrong)
    assert codec.decode(_with(_GOOD, index, None)) is not None  # a null is always allowed


def test_an_int_in_a_float_feature_reads_as_that_float() -> None:
    """Lossless (as Arrow's float64 would take it), so not refused; featcache itself always
    writes floats there."""
    row = RowCodec(TYPED).decode(_with(_GOOD, 1, 3))
    assert row is not None and row.values[1] == 3.0 and type(row.values[1]) is float


def test_an_int_beyond_int64_is_a_decode_error() -> None:
    assert RowCodec(TYPED).decode(_with(_GOOD, 0, 2**63)) is None
    assert RowCodec(TYPED).decode(_with(_GOOD, 0, 2**63 - 1)) is not None


def test_rows_with_nulls_and_rows_of_a_leading_schema_still_decode() -> None:
    codec = RowCodec(TYPED)
    nulls = codec.decode(codec.encode((None,) * 6, None, 5, 6))
    assert nulls is not None and tuple(nulls.values) == (None,) * 6
    older = FeatureView(name="v", table="t", entity_column="id", event_timestamp_column="ts",
                        features=TYPED.features[:3])
    row = codec.decode(RowCodec(older).encode((1, None, False), 9, 5, 6))
    assert row is not None and tuple(row.values) == (1, None, False)
    bad_older = RowCodec(older).encode((1, None, 0), 9, 5, 6)  # bool feature holding an int
    body = msgpack.unpackb(bad_older)
    body[7][2] = 0
    assert codec.decode(_repacked(bad_older, body)) is None


def test_a_negative_entry_with_bookkeeping_of_another_type_is_a_decode_error() -> None:
    good = RowCodec.encode_absent(123, 4)
    assert RowCodec(TYPED).decode(good) is not None
    body = msgpack.unpackb(good)
    body[5] = "123"
    assert RowCodec(TYPED).decode(_repacked(good, body)) is None


# ------------------------------------------------------------------ a batch decoded at once

_VALUE_OF = {
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False),
    "bool": st.booleans(),
    "str": st.text(max_size=8),
    "timestamp": st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: d.replace(microsecond=0)),
    "list[float]": st.lists(st.floats(allow_nan=False), max_size=4),
}
_ROWS = st.lists(
    st.tuples(
        st.tuples(*(st.none() | _VALUE_OF[f.type.value] for f in TYPED.features)),
        st.none() | st.integers(-(2**62), 2**62),
    ),
    min_size=1, max_size=12,
)


@given(_ROWS)
def test_decode_rows_reads_what_decode_reads(
    rows: list[tuple[tuple[object, ...], int | None]],
) -> None:
    codec = RowCodec(TYPED)
    blobs = [codec.encode(values, event, 5, 6, 7) for values, event in rows]
    batch = codec.decode_rows(blobs)
    assert batch is not None
    one_by_one = [codec.decode(b) for b in blobs]
    assert batch.events_us == [r.event_us for r in one_by_one if r is not None]
    assert [tuple(b[7]) for b in batch.bodies] == [tuple(r.values) for r in one_by_one if r]
    assert [b[4:7] for b in batch.bodies] == [(6, 5, 7)] * len(rows)


def test_decode_rows_leaves_any_batch_with_one_other_value_to_decode() -> None:
    """One value that is not a row of the full schema (whatever it is) and the batch is not
    decoded at once: the caller judges each value on its own."""
    codec = RowCodec(TYPED)
    good = codec.encode(_GOOD, 1, 2, 3)
    older = FeatureView(name="v", table="t", entity_column="id", event_timestamp_column="ts",
                        features=TYPED.features[:2])
    body = good[12:]
    others = {
        "garbage": b"\x00\xffnope",
        "tombstone": TOMBSTONE_HEAD + b"1-0",
        "negative entry": RowCodec.encode_absent(1, 2),
        "older schema": RowCodec(older).encode((1, 0.5), 1, 2, 3),
        "wrong type": _with(_GOOD, 0, "7"),
        "two rows in one value": good + body,
        "half a row": good[: 12 + len(body) // 2],
        "layout 1": b"\x01R" + good[4:],
        "layout 3": good[:1] + b"\x03" + good[2:],
        "empty": b"",
    }
    for name, other in others.items():
        assert codec.decode_rows([good, other, good]) is None, name
    # the two halves of a row split across two values do not make two rows either
    half = 12 + len(body) // 2
    assert codec.decode_rows([good[:half], good[:12] + good[half:]]) is None
    assert codec.decode_rows([good, good]) is not None


def test_the_cluster_layout_tags_a_row_and_its_lease_alike() -> None:
    """On a cluster a row and its lease share a hash tag (one slot, so one write script can
    hold both), one of 64 per view; the bookkeeping keys carry none."""
    layout = KeyLayout("fc", buckets=CLUSTER_BUCKETS)
    assert layout.row_keys("users", [42, 106, "ü"]) == [
        "fc:{users:42}:42", "fc:{users:42}:106", f"fc:{{users:{bucket_of('ü', 64):02d}}}:ü"]
    assert layout.row_key("users", 5) == "fc:{users:05}:5"
    assert layout.lease_keys("users", [5]) == ["fc:~{users:05}:lease:5"]
    assert layout.epoch_key("users") == "fc:~{users}:epoch"
    pops = [layout.popularity_key("users", t) for t in (0, 60)]
    assert len({key_slot(k.encode()) for k in [layout.epoch_key("users"), *pops]}) == 1
    groups = layout.slot_groups([1, 65, 2, "a", 129])
    assert bucket_of("a", 64) not in (1, 2) and groups == [[1, 65, 129], [2], ["a"]]
    assert [len({key_slot(k.encode()) for k in layout.row_keys("v", g)}) for g in groups] == [
        1, 1, 1]
    assert KeyLayout("fc").slot_groups([3, 1]) == [[3, 1]]
    mixed: list[int | str] = [1, 65, -3, "a", "ü", 2**63 - 1]
    assert layout.row_slots("v", mixed) == [key_slot(k.encode())
                                            for k in layout.row_keys("v", mixed)]
    assert layout.row_slots("v", [5, 6]) == [key_slot(k.encode())
                                            for k in layout.row_keys("v", [5, 6])]
    assert KeyLayout("fc").row_slots("v", [1]) is None
    for key in ["a{}b", "x{y", "plain", "fc:~{v}:epoch", "{a}{b}", "a{b}c}", "ü{é}"]:
        assert slot_of(key) == key_slot(key.encode()), key
    for entity in [0, 1, 63, 64, -1, 2**63 - 1, "a", "ü", "a:b"]:
        row, lease = layout.row_key("v", entity), layout.lease_keys("v", [entity])[0]
        assert key_slot(row.encode()) == key_slot(lease.encode()), entity
    slots = {key_slot(k.encode()) for k in layout.row_keys("v", range(10_000))}
    assert len(slots) == CLUSTER_BUCKETS  # a view spreads over 64 slots, never one
    assert bucket_of(-1, 64) == 63 and bucket_of("a", 64) == bucket_of("a", 64)
    # without buckets nothing changes: no hash tag anywhere
    plain = KeyLayout("fc")
    assert plain.epoch_key("users") == "fc:~users:epoch"
    assert plain.row_keys("users", [42]) == ["fc:users:42"]
    assert plain.lease_keys("users", [42]) == ["fc:~users:lease:42"]
    with pytest.raises(ValueError, match="buckets"):
        KeyLayout("fc", buckets=-1)
