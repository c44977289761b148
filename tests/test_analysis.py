"""featcache.analysis: exact LRU curves against a brute-force LRU, SHARDS against the exact
curve, the spatial sampling rule, the L1 policy simulations, the freshness ceiling and the
trace readers. Pure computation on small traces made here; no server."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featcache.analysis.ceiling import freshness_ceiling
from featcache.analysis.mattson import lru_curve, reference_lru_hits, stack_distances
from featcache.analysis.policies import policy_curves, simulate
from featcache.analysis.readers import read_trace
from featcache.analysis.report import analyze, size_grid
from featcache.analysis.sampling import sampled
from featcache.analysis.trace import Trace, sample
from featcache.errors import InvalidRequest

# ----------------------------------------------------------------------------- helpers


lru_hits = reference_lru_hits  # the brute-force LRU every exact curve must equal


def naive_distances(ids: Sequence[object]) -> list[int]:
    """Per reuse, the distinct other ids read since the previous read: a recency list."""
    stack: list[object] = []
    out = []
    for entity in ids:
        if entity in stack:
            depth = stack.index(entity)
            out.append(depth)
            del stack[depth]
        stack.insert(0, entity)
    return out


def zipf(accesses: int, ids: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, ids + 1) ** alpha)
    ranks = np.searchsorted(cdf / cdf[-1], rng.random(accesses), side="right")
    return [int(i) for i in rng.permutation(ids)[np.minimum(ranks, ids - 1)]]


def with_scans(base: list[int], every: int, length: int) -> list[int]:
    """``base`` with a scan of ``length`` never-repeated ids after every ``every`` accesses."""
    out: list[int] = []
    fresh = 10**9
    for start in range(0, len(base), every):
        out += base[start:start + every]
        out += range(fresh, fresh + length)
        fresh += length
    return out


RANDOM = [random.Random(7).randrange(60) for _ in range(3000)]
ZIPF = zipf(4000, 400, 1.0, 11)
WORDS = [f"user-{i}" for i in zipf(2000, 150, 0.8, 5)]


# ----------------------------------------------------------------------------- exact curve


@pytest.mark.parametrize("ids", [RANDOM, ZIPF, WORDS], ids=["random", "zipf", "str"])
def test_exact_curve_equals_an_lru_simulation_at_every_size(ids: list[object]) -> None:
    curve = lru_curve(Trace.of("v", ids))
    distinct = len(set(ids))
    assert curve.exact and curve.distinct == distinct
    for size in [*range(1, 40), *range(40, distinct + 3, 7)]:
        assert round(curve.hit_rate(size) * len(ids)) == lru_hits(ids, size), size
    assert curve.max_hit_rate == (len(ids) - distinct) / len(ids)
    assert curve.hit_rate(0) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=0, max_size=120))
def test_stack_distances_equal_a_recency_list(ids: list[int]) -> None:
    positions, distances = stack_distances(np.asarray(ids, dtype=np.int64))
    assert distances.tolist() == naive_distances(ids)
    seen: set[int] = set()
    reuses = []
    for i, entity in enumerate(ids):
        if entity in seen:
            reuses.append(i)
        seen.add(entity)
    assert positions.tolist() == reuses


@pytest.mark.parametrize(
    ("ids", "expected"),
    [([5], []), ([5, 5, 5], [0, 0]), ([1, 2, 3, 1, 2, 3], [2, 2, 2]),
     ([1, 2, 1, 2, 3, 3, 1], [1, 1, 0, 2])],
)
def test_stack_distances_of_hand_made_traces(ids: list[int], expected: list[int]) -> None:
    assert stack_distances(np.asarray(ids)).__getitem__(1).tolist() == expected


def test_size_for_is_the_smallest_size_reaching_the_rate() -> None:
    curve = lru_curve(Trace.of("v", ZIPF))
    for target in (0.3, 0.5, 0.8):
        size = curve.size_for(target)
        assert size is not None
        assert curve.hit_rate(size) >= target > curve.hit_rate(size - 1)
    assert curve.size_for(curve.max_hit_rate + 0.01) is None


# ----------------------------------------------------------------------------- sampling


def test_sampling_follows_the_documented_hash() -> None:
    for view, entity, rate in [("user", 42, 0.5), ("user", "abc", 0.3), ("item", 7, 0.01),
                               ("user", -3, 0.9)]:
        text = str(entity).encode()
        digest = hashlib.blake2b(view.encode() + b"\x00" + text, digest_size=8).digest()
        assert sampled(view, entity, rate) == (
            int.from_bytes(digest, "big") < int(rate * 2**64))
    assert all(sampled("user", i, 1.0) for i in range(100))


def test_sampling_is_the_same_in_another_process_whatever_the_hash_seed() -> None:
    here = [sampled("user", i, 0.1) for i in range(2000)] + [
        sampled("user", f"u{i}", 0.1) for i in range(2000)]
    code = ("from featcache.analysis.sampling import sampled\n"
            "print(''.join('1' if sampled('user', i, 0.1) else '0' for i in range(2000))"
            " + ''.join('1' if sampled('user', f'u{i}', 0.1) else '0' for i in range(2000)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert done.stdout.strip() == "".join("1" if k else "0" for k in here)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.3])
def test_sampling_keeps_about_the_rate_and_nests(rate: float) -> None:
    ids = range(100_000)
    kept = {i for i in ids if sampled("user", i, rate)}
    assert abs(len(kept) / 100_000 - rate) < 0.005 + rate * 0.05
    assert {i for i in ids if sampled("user", i, rate / 2)} <= kept
    # another view keeps other ids: the hash covers the view's name
    other = {i for i in ids if sampled("item", i, rate)}
    assert len(kept & other) < 0.5 * len(kept)


def test_sample_keeps_every_access_of_the_kept_ids_only() -> None:
    trace = Trace.of("v", ZIPF, timestamps=list(range(len(ZIPF))))
    part = sample(trace, 0.2)
    kept = {i for i in set(ZIPF) if sampled("v", i, 0.2)}
    assert part.ids.tolist() == [i for i in ZIPF if i in kept]
    assert part.timestamps is not None
    assert part.timestamps.tolist() == [t for t, i in enumerate(ZIPF) if i in kept]
    assert (part.sampling_rate, part.full_accesses) == (0.2, len(ZIPF))
    # a sample of the sample is the sample of the whole at the product of the rates
    assert sample(part, 0.5).ids.tolist() == sample(trace, 0.1).ids.tolist()
    assert sample(part, 0.5).sampling_rate == pytest.approx(0.1)
    with pytest.raises(InvalidRequest, match="kept none"):
        sample(Trace.of("v", [1, 1, 1]), 1e-9)
    with pytest.raises(InvalidRequest, match="sampling rate"):
        sample(trace, 0.0)


# ----------------------------------------------------------------------------- SHARDS


def test_shards_is_close_to_the_exact_curve() -> None:
    ids = zipf(300_000, 30_000, 1.0, 3)
    trace = Trace.of("v", ids)
    exact = lru_curve(trace)
    part = sample(trace, 0.1)
    every = np.arange(1, exact.distinct + 1)
    for adjusted in (False, True):
        estimate = lru_curve(part, adjusted=adjusted)
        assert not estimate.exact and estimate.min_size == 10
        error = np.abs(exact.hit_rates(every) - estimate.hit_rates(every)).mean()
        assert error < 0.03, (adjusted, error)
    assert lru_curve(part).distinct == pytest.approx(exact.distinct, rel=0.15)


def test_shards_scales_the_sampled_distances() -> None:
    # two ids alternating: every reuse has one distinct id in between (distance 1)
    trace = Trace.of("v", [1, 2] * 50, sampling_rate=0.25)
    curve = lru_curve(trace)
    # a sampled distance d is (d + 1) / R = 8 entries of the whole trace
    assert curve.hit_rate(7) == 0.0
    assert curve.hit_rate(8) == pytest.approx(98 / 100)
    assert curve.min_size == 4


# ----------------------------------------------------------------------------- policies


def test_simulated_lru_is_the_exact_curve() -> None:
    trace = Trace.of("v", ZIPF)
    exact = lru_curve(trace)
    (found,) = policy_curves(trace, [1, 5, 50, 200, 400], ["lru"])
    assert found.exact and found.sizes == (1, 5, 50, 200, 400)
    assert list(found.hit_rates) == [exact.hit_rate(s) for s in found.sizes]


def test_tinylfu_beats_lru_on_zipf_with_scans() -> None:
    random.seed(3)  # tinylfu records a random sample of its hits
    ids = with_scans(zipf(30_000, 5_000, 0.9, 21), 3_000, 1_000)
    trace = Trace.of("v", ids)
    for size in (100, 250, 500):
        assert simulate(trace, "tinylfu", size) > simulate(trace, "lru", size) + 0.03


def test_policy_hit_rates_grow_with_size_and_stay_rates() -> None:
    trace = Trace.of("v", ZIPF)
    sizes = size_grid(1, 400, 9)
    for curve in policy_curves(trace, sizes, ["lru", "lfu", "ttl"]):
        assert all(0.0 <= h <= 1.0 for h in curve.hit_rates)
        if curve.policy in ("lru", "ttl"):  # stack policies: never worse when larger
            assert list(curve.hit_rates) == sorted(curve.hit_rates), curve


def test_a_long_trace_is_simulated_in_miniature() -> None:
    ids = zipf(200_000, 20_000, 1.0, 9)
    trace = Trace.of("v", ids)
    (mini,) = policy_curves(trace, [10, 2_000, 10_000], ["lru"], max_accesses=20_000)
    assert not mini.exact and mini.simulated_rate == pytest.approx(0.1)
    assert mini.sizes == (2_000, 10_000)  # a 10-entry cache is 1 entry in miniature: left out
    # an LRU of S * R entries on the sample hits iff the sampled distance d < S * R, which is
    # SHARDS' (d + 1) / R <= S: the miniature is the SHARDS curve of the same sample, and
    # with the same correction (the whole trace's length is known), SHARDS-adj's
    assert mini.adjusted
    shards = lru_curve(sample(trace, 0.1), adjusted=True)
    assert mini.hit_rates == pytest.approx([shards.hit_rate(s) for s in mini.sizes], abs=1e-12)
    # a sample of unknown length is not corrected: fixed-rate SHARDS
    part = Trace.of("v", sample(trace, 0.1).ids, sampling_rate=0.1)
    (plain,) = policy_curves(part, [2_000, 10_000], ["lru"])
    assert not plain.adjusted
    assert list(plain.hit_rates) == [lru_curve(part).hit_rate(s) for s in plain.sizes]


# ----------------------------------------------------------------------------- freshness


def test_freshness_ceiling_of_a_hand_made_trace() -> None:
    # a@0 miss (load), b@1 miss, a@5 hit, a@10 hit (exactly max_age: fresh), a@10.5 miss
    # (reload at 10.5), a@20 hit (9.5 s after the reload), b@30 miss (29 s after its load)
    trace = Trace.of("v", ["a", "b", "a", "a", "a", "a", "b"],
                     timestamps=[0, 1, 5, 10, 10.5, 20, 30])
    assert freshness_ceiling(trace, 10) == pytest.approx(3 / 7)
    assert freshness_ceiling(trace, 1e9) == pytest.approx(5 / 7)  # only first reads miss
    assert freshness_ceiling(trace, 0) == 0.0


def test_freshness_ceiling_equals_an_unbounded_cache_with_max_age() -> None:
    rng = random.Random(5)
    ids = [rng.randrange(50) for _ in range(5000)]
    times = sorted(rng.uniform(0, 1000) for _ in range(5000))
    times[100:110] = [times[100]] * 10  # ties
    loaded: dict[int, float] = {}
    hits = 0
    for entity, t in zip(ids, times, strict=True):
        if entity in loaded and t - loaded[entity] <= 30:
            hits += 1
        else:
            loaded[entity] = t
    trace = Trace.of("v", ids, timestamps=times)
    assert freshness_ceiling(trace, 30) == hits / len(ids)


def test_freshness_ceiling_needs_timestamps() -> None:
    with pytest.raises(InvalidRequest, match="ts column"):
        freshness_ceiling(Trace.of("v", [1, 2]), 10)


def test_analysis_reads_the_targets_from_the_lru_curve_under_the_ceiling() -> None:
    # twenty ids in a loop, one read every 0.1 s: LRU hits only with all twenty (98% at
    # most); with max_age 60 each id is loaded twice (at its first read and 62 s later)
    ids = [i % 20 for i in range(1000)]
    trace = Trace.of("v", ids, timestamps=[i / 10 for i in range(1000)])
    found = analyze(trace, max_age=60, policies=["lru"])
    assert found.freshness_ceiling == pytest.approx(0.96)
    assert found.sizes_for == {"0.9": 20, "0.95": 20, "0.99": None}
    assert found.curves[0].method == "stack distances"
    tight = analyze(trace, max_age=5, policies=[])
    assert tight.freshness_ceiling is not None and tight.freshness_ceiling < 0.95
    assert tight.sizes_for["0.95"] is None


# ----------------------------------------------------------------------------- traces


def test_a_trace_refuses_what_it_cannot_analyse() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        Trace.of("v", [])
    with pytest.raises(InvalidRequest, match="all ints or all strs"):
        Trace.of("v", [1.5, 2.5])
    with pytest.raises(InvalidRequest, match="all ints or all strs"):
        Trace.of("v", np.asarray([1, "a"], dtype=object))
    with pytest.raises(InvalidRequest, match="must not decrease"):
        Trace.of("v", [1, 2], timestamps=[2, 1])
    with pytest.raises(InvalidRequest, match="2 timestamps for 3"):
        Trace.of("v", [1, 2, 3], timestamps=[1, 2])
    with pytest.raises(InvalidRequest, match="sampling rate"):
        Trace.of("v", [1], sampling_rate=1.5)


def test_read_a_csv_trace_of_one_view_in_ts_order(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("view,entity_id,ts,extra\n"
                    "user,3,10.5,x\nitem,9,1,x\nuser,1,2,x\nuser,3,2,x\nuser,2,7,x\n")
    trace = read_trace(path, "user")
    assert trace.ids.tolist() == [1, 3, 2, 3]  # by ts; the tie at 2 in file order
    assert trace.timestamps is not None and trace.timestamps.tolist() == [2, 2, 7, 10.5]
    assert (trace.view, trace.sampling_rate) == ("user", 1.0)
    no_ts = tmp_path / "no_ts.csv"
    no_ts.write_text("entity_id,view\nb,user\na,user\nb,user\n")
    strings = read_trace(no_ts, "user", sampling_rate=0.5)
    assert strings.ids.tolist() == ["b", "a", "b"] and strings.timestamps is None
    assert strings.sampling_rate == 0.5


def test_read_a_parquet_trace_with_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "trace.parquet"
    table = pa.table({
        "view": pa.array(["user", "user", "item"]).dictionary_encode(),
        "entity_id": pa.array([5, 6, 7], pa.int32()),
        "ts": pa.array([1_700_000_000_000_000, 1_700_000_001_500_000, 0],
                       pa.timestamp("us", tz="UTC")),
    })
    pq.write_table(table, path)
    trace = read_trace(path, "user")
    assert trace.ids.tolist() == [5, 6]
    assert trace.timestamps is not None
    assert trace.timestamps.tolist() == [1_700_000_000.0, 1_700_000_001.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("view,id\nuser,1\n", "no column 'entity_id'"),
        ("entity_id\n1\n", "no column 'view'"),
        ("view,entity_id\nitem,1\n", "no accesses of view 'user' (views in the file: 'item')"),
        ("view,entity_id\n", "no accesses of view 'user' (the file has no rows)"),
        ("view,entity_id\nuser,1.5\n", "entity_id must hold integers or strings, got double"),
        ("view,entity_id\nuser,1\nuser,\n", "1 rows of the view have no entity_id"),
        ("view,entity_id,ts\nuser,1,soon\n", "ts must be seconds"),
        ("view,entity_id\nuser,1\nuser,2,3\n", "cannot read it"),
    ],
)
def test_bad_trace_files_are_invalid_requests(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        read_trace(path, "user")


def test_a_missing_trace_file_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no such file"):
        read_trace(tmp_path / "nope.parquet", "user")
