"""The in-process L1 cache: pure tests, no servers.

Every behaviour that must not depend on the eviction policy is parametrized over all four, so
a policy swapped in later inherits the same guarantees (bounds, max_ttl, invalidation).
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator

import pytest

from featcache.config import L1Config
from featcache.errors import ConfigError, FeatcacheError
from featcache.l1 import POLICIES, EntityId, InOrder, L1Cache

MAX_TTL = 10.0
T0 = 1000.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=POLICIES)
def policy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(policy: str, clock: FakeClock, max_entries: int = 100) -> L1Cache[object]:
    return L1Cache(L1Config(policy, max_entries, MAX_TTL), clock=clock)


def drop_dead(cache: L1Cache[object], views: list[str], ids: range) -> None:
    """Read every possible key, so entries of old generations or past max_ttl are dropped."""
    for view in views:
        cache.get_many(view, ids)


# -------------------------------------------------------------------- store and return


def test_stores_and_returns(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    rows: dict[EntityId, tuple[str]] = {1: ("a",), 2: ("b",), "x": ("c",)}
    cache.put_many("user", rows)
    ids: list[EntityId] = [1, 2, "x", 3]
    assert cache.get_many("user", ids) == rows
    assert len(cache) == 3
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (3, 1, 3)


def test_overwrite_replaces_value(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "old"})
    cache.put_many("user", {1: "new"})
    assert cache.get_many("user", [1]) == {1: "new"}
    assert len(cache) == 1


def test_values_are_opaque_even_none(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: None, 2: 0, 3: ()})
    assert cache.get_many("user", [1, 2, 3]) == {1: None, 2: 0, 3: ()}


def test_int_and_str_ids_are_distinct(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    rows: dict[EntityId, str] = {1: "int", "1": "str"}
    cache.put_many("user", rows)
    assert cache.get_many("user", list(rows)) == rows


def test_empty_batches_and_duplicates(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {})
    assert cache.get_many("user", []) == {}
    cache.put_many("user", {7: "v"})
    assert cache.get_many("user", (i for i in [7, 7, 8])) == {7: "v"}
    assert cache.stats()["hits"] == 2
    assert cache.stats()["misses"] == 1


# -------------------------------------------------------------------- bounds


def test_respects_max_entries(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock, max_entries=50)
    inserted = 0
    for start in range(0, 1000, 37):  # batches larger and smaller than the cache
        batch = {i: i for i in range(start, start + 37)}
        cache.put_many("user", batch)
        inserted += len(batch)
        assert len(cache) <= 50
    for i in range(1000):  # and one at a time
        cache.put_many("item", {i: i})
        inserted += 1
        assert len(cache) <= 50
    stats = cache.stats()
    assert len(cache) >= 40  # a cache that keeps evicting everything is not bounded, it is broken
    assert stats["evictions"] == inserted - len(cache)
    found = cache.get_many("user", range(1000)) | cache.get_many("item", range(1000))
    assert len(found) == len(cache)


def test_max_entries_of_one(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock, max_entries=1)
    cache.put_many("user", {1: "a", 2: "b", 3: "c"})
    assert len(cache) == 1
    assert len(cache.get_many("user", [1, 2, 3])) == 1


@pytest.mark.parametrize(
    ("age", "served"),
    [
        (0.0, True),
        (MAX_TTL - 1e-6, True),
        (MAX_TTL, False),  # exactly max_ttl old: expired (served only while younger)
        (MAX_TTL + 1e-6, False),
        (MAX_TTL * 100, False),
    ],
)
def test_respects_max_ttl(policy: str, clock: FakeClock, age: float, served: bool) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "v"})
    clock.now = T0 + age
    assert cache.get_many("user", [1]) == ({1: "v"} if served else {})
    stats = cache.stats()
    assert stats["expired"] == (0 if served else 1)
    assert (stats["hits"], stats["misses"]) == ((1, 0) if served else (0, 1))
    assert len(cache) == (1 if served else 0)  # an expired entry is dropped, not kept
    assert cache.invalidate_view("user") == (1 if served else 0)


def test_max_ttl_counts_from_the_last_put(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "v1", 2: "v2"})
    clock.now = T0 + 6
    cache.put_many("user", {1: "v1b"})
    clock.now = T0 + MAX_TTL + 1
    assert cache.get_many("user", [1, 2]) == {1: "v1b"}


def test_max_ttl_bounds_a_missed_invalidation(policy: str, clock: FakeClock) -> None:
    """Reading does not extend an entry's life: hot rows are re-read from Redis every max_ttl."""
    cache = make(policy, clock)
    cache.put_many("user", {1: "v"})
    for step in range(1, 10):
        clock.now = T0 + step
        assert cache.get_many("user", [1]) == {1: "v"}
    clock.now = T0 + MAX_TTL
    assert cache.get_many("user", [1]) == {}


# -------------------------------------------------------------------- invalidation


def test_invalidate(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "a", 2: "b", 3: "c"})
    assert cache.invalidate("user", [1, 3, 99]) == 2
    assert cache.get_many("user", [1, 2, 3]) == {2: "b"}
    assert cache.invalidate("user", [1]) == 0
    assert len(cache) == 1
    assert cache.stats()["invalidated"] == 2


def test_invalidate_view(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "a", 2: "b"})
    cache.put_many("item", {1: "i"})
    assert cache.invalidate_view("user") == 2
    assert cache.invalidate_view("user") == 0
    assert cache.invalidate_view("never-used") == 0
    assert cache.get_many("user", [1, 2]) == {}
    assert cache.get_many("item", [1]) == {1: "i"}
    assert len(cache) == 1  # the reads above dropped the old generation's entries
    cache.put_many("user", {1: "a2"})
    assert cache.get_many("user", [1, 2]) == {1: "a2"}
    assert cache.invalidate_view("user") == 1
    stats = cache.stats()
    assert stats["invalidated"] == 3
    assert stats["expired"] == 0


def test_put_over_an_invalidated_entry_counts_once(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "a", 2: "b"})
    cache.invalidate_view("user")
    cache.put_many("user", {1: "a2"})  # replaces the old generation's entry without a read
    cache.put_many("user", {1: "a3"})
    assert cache.invalidate_view("user") == 1


def test_invalidate_after_max_ttl_counts_what_was_held(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "a"})
    clock.now = T0 + MAX_TTL + 1
    assert cache.invalidate("user", [1]) in (0, 1)  # ttl may have swept it already
    assert cache.get_many("user", [1]) == {}


def test_fill_token_refuses_a_fill_that_raced_an_invalidation(
    policy: str, clock: FakeClock
) -> None:
    """Miss, read v0, the invalidation lands, then the fill: v0 must not be stored."""
    cache = make(policy, clock)
    token = cache.fill_token()
    cache.invalidate("user", [1])  # id 1 is not even in L1: the fence still counts
    cache.put_many("user", {1: "v0", 2: "v0"}, token=token)
    assert cache.get_many("user", [1, 2]) == {}
    assert cache.stats()["refused"] == 2
    cache.put_many("user", {1: "v1"}, token=cache.fill_token())
    assert cache.get_many("user", [1]) == {1: "v1"}


@pytest.mark.parametrize(
    "event",
    ["invalidate_view", "clear", "invalidate_other_view", "invalidate_nothing", "none"],
)
def test_fill_token_fences(policy: str, clock: FakeClock, event: str) -> None:
    cache = make(policy, clock)
    token = cache.fill_token()
    if event == "invalidate_view":
        cache.invalidate_view("user")
    elif event == "clear":
        cache.clear()
    elif event == "invalidate_other_view":
        cache.invalidate_view("item")
        cache.invalidate("item", [1])
    elif event == "invalidate_nothing":
        cache.invalidate("user", [])
    cache.put_many("user", {1: "v0"}, token=token)
    stored = event in ("invalidate_other_view", "invalidate_nothing", "none")
    assert cache.get_many("user", [1]) == ({1: "v0"} if stored else {})
    assert cache.stats()["refused"] == (0 if stored else 1)


def test_clear(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "a"})
    cache.put_many("item", {1: "b"})
    cache.clear()
    assert len(cache) == 0
    assert cache.get_many("user", [1]) == {}
    assert cache.invalidate_view("user") == 0
    cache.put_many("user", {1: "a2"})
    assert cache.get_many("user", [1]) == {1: "a2"}
    cache.clear()
    assert cache.stats()["cleared"] == 2


def test_view_isolation(policy: str, clock: FakeClock) -> None:
    cache = make(policy, clock)
    cache.put_many("user", {1: "user-1", 2: "user-2"})
    cache.put_many("item", {1: "item-1", 2: "item-2"})
    assert cache.get_many("user", [1, 2]) == {1: "user-1", 2: "user-2"}
    assert cache.get_many("item", [1, 2]) == {1: "item-1", 2: "item-2"}
    assert cache.invalidate("item", [1]) == 1
    assert cache.get_many("user", [1]) == {1: "user-1"}
    assert cache.invalidate_view("item") == 1
    assert cache.get_many("user", [1, 2]) == {1: "user-1", 2: "user-2"}


@pytest.mark.parametrize("record_width", [None, 2], ids=["values", "records"])
def test_bookkeeping_stays_consistent_under_random_operations(
    policy: str, clock: FakeClock, record_width: int | None
) -> None:
    """After any sequence, the per-view counts behind invalidate_view match the entries held;
    every value served is the one stored (a record: the entry's first fields)."""
    rng = random.Random(1234)
    views = ["user", "item", "shop"]
    ids = range(60)
    cache: L1Cache[object] = L1Cache(L1Config(policy, 40, MAX_TTL), clock=clock,
                                     record_width=record_width)
    checked = 0
    for step in range(1, 4001):
        view = rng.choice(views)
        op = rng.random()
        if op < 0.35:
            cache.put_many(view, {i: (view, i) for i in rng.sample(ids, rng.randint(1, 8))})
        elif op < 0.75:
            got = cache.get_many(view, rng.sample(ids, rng.randint(1, 12)))
            if record_width is None:
                assert all(value == (view, i) for i, value in got.items())
            else:
                assert all(value[:2] == (view, i) for i, value in got.items())  # type: ignore[index]
        elif op < 0.85:
            cache.invalidate(view, rng.sample(ids, rng.randint(1, 5)))
        elif op < 0.88:
            cache.invalidate_view(view)
        elif op < 0.995:
            clock.now += rng.uniform(0, MAX_TTL / 4)
        else:
            cache.clear()
        assert len(cache) <= 40
        if step % 200 == 0:
            drop_dead(cache, views, ids)
            held = len(cache)
            checked += held
            assert sum(cache.invalidate_view(view) for view in views) == held
    stats = cache.stats()
    assert checked > 0
    assert stats["expired"] > 0
    assert stats["evictions"] > 0


# -------------------------------------------------------------------- policies differ


def _scan_after_hot_set(policy: str, clock: FakeClock) -> int:
    cache = make(policy, clock, max_entries=100)
    hot = range(50)
    for _ in range(20):
        missing = [i for i in hot if i not in cache.get_many("hot", hot)]
        cache.put_many("hot", {i: i for i in missing})
    for start in range(0, 5000, 10):  # a scan of one-hit keys, read-through like the client
        batch = range(start, start + 10)
        cache.get_many("scan", batch)
        cache.put_many("scan", {i: i for i in batch})
    return len(cache.get_many("hot", hot))


def test_lru_evicts_the_least_recently_used(clock: FakeClock) -> None:
    cache = make("lru", clock, max_entries=3)
    cache.put_many("v", {1: 1, 2: 2, 3: 3})
    cache.get_many("v", [1])
    cache.put_many("v", {4: 4})
    assert sorted(cache.get_many("v", [1, 2, 3, 4])) == [1, 3, 4]


def test_lfu_evicts_the_least_frequently_used(clock: FakeClock) -> None:
    cache = make("lfu", clock, max_entries=3)
    cache.put_many("v", {1: 1, 2: 2, 3: 3})
    cache.get_many("v", [1, 1, 2, 3, 3])
    cache.put_many("v", {4: 4})
    assert sorted(cache.get_many("v", [1, 2, 3, 4])) == [1, 3, 4]


def test_tinylfu_keeps_a_hot_set_through_a_scan(clock: FakeClock) -> None:
    assert _scan_after_hot_set("tinylfu", clock) >= 45
    assert _scan_after_hot_set("lru", FakeClock()) == 0


def test_tinylfu_hash_collisions_never_return_a_wrong_value(clock: FakeClock) -> None:
    # hash(-1) == hash(-2) in CPython, so ("v", -1) and ("v", -2) share theine's policy slot
    assert hash(("v", -1)) == hash(("v", -2))
    cache = make("tinylfu", clock)
    cache.put_many("v", {-1: "minus one"})
    cache.put_many("v", {-2: "minus two"})
    got = cache.get_many("v", [-1, -2])
    assert got == {-2: "minus two"}
    assert len(cache) == 1
    assert cache.invalidate_view("v") == 1


# -------------------------------------------------------------------- threads


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every few microseconds instead of every 5 ms, so the calls interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_thread_safety_smoke(policy: str) -> None:
    # the real clock: entries do expire
    cache: L1Cache[object] = L1Cache(L1Config(policy, 200, 0.05))
    views = ["user", "item"]
    ids = range(1000)
    errors: list[BaseException] = []
    reads = [0] * 8
    start = threading.Barrier(8)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(1500):
                view = rng.choice(views)
                op = rng.random()
                if op < 0.5:
                    batch = [
                        rng.randrange(300) if rng.random() < 0.8 else rng.choice(ids)
                        for _ in range(20)
                    ]
                    token = cache.fill_token()
                    got = cache.get_many(view, batch)
                    reads[seed] += len(batch)
                    assert all(value == (view, i) for i, value in got.items())
                    fill = {i: (view, i) for i in batch if i not in got}
                    cache.put_many(view, fill, token=token)
                elif op < 0.9:
                    cache.put_many(view, {i: (view, i) for i in rng.sample(ids, 20)})
                elif op < 0.97:
                    cache.invalidate(view, rng.sample(ids, 10))
                elif op < 0.995:
                    cache.invalidate_view(view)
                else:
                    cache.clear()
                assert len(cache) <= 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    stats = cache.stats()
    assert len(cache) <= 200
    assert stats["hits"] + stats["misses"] == sum(reads)
    assert stats["hits"] > 0
    drop_dead(cache, views, ids)
    held = len(cache)
    assert sum(cache.invalidate_view(view) for view in views) == held


# -------------------------------------------------------------------- configuration
# ``L1Config`` validates what ``L1Cache`` runs on; ``L1Cache`` checks only its own arguments.


@pytest.mark.parametrize("bad", ["arc", "LRU", "", "w-tinylfu"])
def test_bad_policy(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        L1Config(bad, 10, 1.0)
    message = str(info.value)
    assert repr(bad) in message
    for name in POLICIES:
        assert name in message
    assert isinstance(info.value, FeatcacheError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10", None])
def test_bad_max_entries(policy: str, bad: object) -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        L1Config(policy, bad, 1.0)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "soon", None])
def test_bad_max_ttl(policy: str, bad: object) -> None:
    with pytest.raises(ConfigError, match="max_ttl"):
        L1Config(policy, 10, bad)  # type: ignore[arg-type]


def test_max_ttl_takes_the_config_duration_forms() -> None:
    """As every duration of the config: ``"1"`` is one second, ``"500ms"`` half of one."""
    assert (L1Config("lru", 10, "1").max_ttl, L1Config("lru", 10, "500ms").max_ttl) == (1.0, 0.5)


def test_an_l1_needs_a_policy() -> None:
    """``L1Config()`` (no policy) means no L1: ``FeatureCache`` builds none, and an ``L1Cache``
    asked to run on it refuses at ``l1.policy``."""
    with pytest.raises(ConfigError) as info:
        L1Cache(L1Config())
    assert info.value.path == "l1.policy"


def test_integer_max_ttl_is_accepted(policy: str, clock: FakeClock) -> None:
    cache: L1Cache[str] = L1Cache(L1Config(policy, 10, 5), clock=clock)
    assert cache.max_ttl == 5.0
    cache.put_many("v", {1: "x"})
    clock.now += 5
    assert cache.get_many("v", [1]) == {}


# -------------------------------------------------------------------- soft deadlines


def test_soft_deadline_then_recheck_then_max_ttl(policy: str, clock: FakeClock) -> None:
    """Before its soft deadline an entry is served outright; between it and max_ttl only when
    recheck agrees (misses are kept, not dropped); past max_ttl it is gone."""
    cache = make(policy, clock)
    cache.put_many("user", {1: "a", 2: "b", 3: "c"}, fresh_for={1: 1.0, 2: 1.0, 3: 100.0},
                   stamps={1: 11, 2: 22})
    assert cache.get_many("user", [3, 2, 1]) == {3: "c", 2: "b", 1: "a"}
    clock.now += 2.0  # past 1 and 2's soft deadline, within max_ttl (10 s)
    asked: list[tuple[object, int]] = []

    def recheck(value: object, stamp: int) -> bool:
        asked.append((value, stamp))
        return stamp == 22

    assert cache.get_many("user", [1, 2, 3]) == {3: "c"}  # no recheck: misses
    got = cache.get_many("user", [1, 2, 3], recheck=recheck)
    assert list(got.items()) == [(2, "b"), (3, "c")]  # the order asked, not the order found
    assert sorted(asked, key=lambda a: a[1]) == [("a", 11), ("b", 22)]
    assert len(cache) == 3  # a rechecked miss keeps its entry for callers it suits
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (3 + 1 + 2, 2 + 1)
    clock.now += MAX_TTL  # the soft deadline never extends max_ttl (3's was 100 s)
    assert cache.get_many("user", [1, 2, 3], recheck=lambda v, s: True) == {}
    assert len(cache) == 0 and cache.stats()["expired"] == 3


def test_records_are_answered_as_their_entries(policy: str, clock: FakeClock) -> None:
    """With ``record_width``, a hit answers L1's own entry: the record's fields first, on the
    every-id-held path, the per-id path (an id missing) and the recheck path alike."""
    cache: L1Cache[tuple[str, int, None]] = L1Cache(L1Config(policy, 100, MAX_TTL),
                                                    clock=clock, record_width=3)
    cache.put_many("user", {1: ("a", 1, None), 2: ("b", 2, None)},
                   fresh_for={1: 100.0, 2: 1.0}, stamps={2: 7})
    every = cache.get_many("user", [2, 1])
    assert list(every) == [2, 1]
    assert [v[:3] for v in every.values()] == [("b", 2, None), ("a", 1, None)]
    assert len(every[1]) > 3  # L1's own fields follow the record
    some = cache.get_many("user", [3, 1])
    assert list(some) == [1] and some[1][:3] == ("a", 1, None)
    clock.now += 2.0  # past 2's soft deadline
    seen: list[tuple[object, int]] = []

    def recheck(value: object, stamp: int) -> bool:
        seen.append((value[:3], stamp))
        return True

    rechecked = cache.get_many("user", [1, 2], recheck=recheck)
    assert seen == [(("b", 2, None), 7)]
    assert [v[:3] for v in rechecked.values()] == [("a", 1, None), ("b", 2, None)]


@pytest.mark.parametrize("bad", [("a", 1), ("a", 1, None, 4), ["a", 1, None], "abc", None])
def test_a_record_of_the_wrong_shape_is_refused_whole(
    policy: str, clock: FakeClock, bad: object
) -> None:
    cache: L1Cache[object] = L1Cache(L1Config(policy, 100, MAX_TTL), clock=clock,
                                     record_width=3)
    with pytest.raises(TypeError, match="tuple of 3 items"):
        cache.put_many("user", {1: ("a", 1, None), 2: bad})
    assert len(cache) == 0  # checked before anything is stored


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_record_width(bad: object) -> None:
    with pytest.raises(ConfigError, match="record_width"):
        L1Cache(L1Config("tinylfu", 10, 1.0), record_width=bad)  # type: ignore[arg-type]


def test_access_sample_rate_is_validated() -> None:
    for bad in (0, 0.0, -0.5, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="access_sample_rate"):
            L1Config("tinylfu", 10, 1.0, access_sample_rate=bad)
    assert L1Cache(L1Config("tinylfu", 10, 1.0, 0.125)).access_sample_rate == 0.125


@pytest.mark.parametrize("rate", [1.0, 0.125])
def test_sampled_tinylfu_keeps_a_hot_set_against_a_scan(rate: float) -> None:
    """With hits sampled (1 in 8), the frequency sketch still tells a hot set from one-hit
    ids: a scan of new ids does not flush a read-often working set out of a full cache."""
    cache: L1Cache[int] = L1Cache(L1Config("tinylfu", 1000, 1e9, access_sample_rate=rate))
    hot = list(range(500))
    for _ in range(200):  # 1/8 of 200 reads: the sketch's 4-bit counters are full either way
        got = cache.get_many("v", hot)
        cache.put_many("v", {i: i for i in hot if i not in got})
    for start in range(10_000, 30_000, 100):  # a scan of 20,000 ids, each read once
        batch = list(range(start, start + 100))
        cache.put_many("v", {i: i for i in batch if not cache.get_many("v", [i])})
        cache.get_many("v", hot[start % 500 : start % 500 + 5])  # light traffic goes on
    kept = len(cache.get_many("v", hot))
    assert kept >= 450, f"{kept} of 500 hot ids survived the scan at sample rate {rate}"


# -------------------------------------------------------------------- the all-hit answer


def test_an_all_hit_distinct_read_answers_in_order(policy: str, clock: FakeClock) -> None:
    """``distinct=True``: every id held -> an ``InOrder`` mapping equal to the dict answer,
    indexed only when asked by id; any id not held -> the usual dict."""
    cache = make(policy, clock)
    cache.put_many("user", {1: "a", 2: "b", 3: "c"})
    got = cache.get_many("user", [3, 1, 2], distinct=True)
    assert isinstance(got, InOrder)
    assert list(got) == [3, 1, 2] and len(got) == 3
    assert list(got.in_order()) == ["c", "a", "b"]
    assert got._index is None  # nothing built until a lookup by id
    assert got[1] == "a" and 2 in got and 4 not in got
    assert got == {1: "a", 2: "b", 3: "c"} and dict(got.items()) == {3: "c", 1: "a", 2: "b"}
    with pytest.raises(KeyError):
        got[4]
    partial = cache.get_many("user", [1, 4], distinct=True)
    assert type(partial) is dict and partial == {1: "a"}
    assert type(cache.get_many("user", [1, 2])) is dict  # not vouched distinct: a dict
    assert cache.stats()["hits"] == 6 and cache.stats()["misses"] == 1


def test_no_read_serves_a_value_an_invalidation_dropped(
    policy: str, clock: FakeClock
) -> None:
    """Against a model of what each key may still answer (the value of its last put after
    its last invalidation, whole-view ones included): over random operations, every value
    served, by either answer shape, is exactly that one. The all-hit path skips comparing
    each entry's generation where the view's bookkeeping says none is old (tinylfu), so this
    also checks that bookkeeping."""
    rng = random.Random(99)
    views = ["user", "item"]
    ids = range(30)
    cache: L1Cache[object] = L1Cache(L1Config(policy, 25, MAX_TTL), clock=clock)
    servable: dict[tuple[str, int], int] = {}
    stamp = 0
    served = 0
    for _ in range(6000):
        view = rng.choice(views)
        op = rng.random()
        if op < 0.4:
            stamp += 1
            batch = rng.sample(ids, rng.randint(1, 10))
            cache.put_many(view, {i: stamp for i in batch})
            servable.update({(view, i): stamp for i in batch})
        elif op < 0.85:
            batch = rng.sample(ids, rng.randint(1, 6))
            got = cache.get_many(view, batch, distinct=rng.random() < 0.7)
            for i, value in got.items():
                assert servable.get((view, i)) == value, (view, i, value)
            served += len(got)
        elif op < 0.93:
            batch = rng.sample(ids, rng.randint(1, 4))
            cache.invalidate(view, batch)
            for i in batch:
                servable.pop((view, i), None)
        elif op < 0.97:
            cache.invalidate_view(view)
            servable = {k: v for k, v in servable.items() if k[0] != view}
        else:
            clock.now += rng.uniform(0, MAX_TTL / 3)
        if policy == "tinylfu":  # the count the all-hit path trusts: live == current entries
            store = cache._store
            for v in views:
                table = store.tables.get(v, {})  # type: ignore[attr-defined]
                current = sum(1 for entry in table.values()
                              if entry[cache._generation_at] == cache._generation.get(v, 0))
                assert cache._live.get(v, 0) == current
    assert served > 1000
