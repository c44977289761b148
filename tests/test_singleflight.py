"""SingleFlight: one fetch per key however many threads ask at once.

Pure and in-process. "Exactly once" is only a fair expectation if every caller arrived while
the fetch was still running, so the fetch functions here block on an event that the test sets
once the SingleFlight's own counters show every caller has registered; nothing depends on how
fast threads happen to be scheduled.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from featcache.errors import FeatcacheError
from featcache.singleflight import (
    BUSY,
    MISSING,
    FlightWaits,
    Missing,
    SingleFlight,
    SingleFlightTimeout,
)
from featcache.steps import Pause, Steps, no_steps, run_blocking

JOIN = 30.0  # seconds; only reached when something deadlocked


class Boom(Exception):
    pass


def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def run_threads(targets: list[Callable[[], Any]]) -> list[Any]:
    """Start one thread per target and join them; each slot holds the return value or the
    exception its target raised."""
    out: list[Any] = [None] * len(targets)

    def runner(i: int) -> None:
        try:
            out[i] = targets[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive(), "a thread is stuck"
    return out


class Started:
    """Run ``targets`` in threads in the background; ``finish()`` joins them."""

    def __init__(self, targets: list[Callable[[], Any]]) -> None:
        self.results: list[Any] = []
        self._thread = threading.Thread(target=lambda: self.results.extend(run_threads(targets)))
        self._thread.start()

    def finish(self) -> list[Any]:
        self._thread.join(JOIN * 2)
        assert not self._thread.is_alive()
        return self.results


def parked_batch(sf: SingleFlight[int, int], keys: list[int]) -> tuple[Started, threading.Event]:
    """A ``do_many`` of ``keys`` (answering ``-k``) running in the background, registered and
    parked in its fetch until the returned event is set."""
    release = threading.Event()

    def slow(keys: list[int]) -> Mapping[int, int]:
        release.wait(JOIN)
        return {k: -k for k in keys}

    batch = Started([lambda: sf.do_many(keys, slow)])
    wait_until(lambda: sf.in_flight == len(keys), "the parked batch to register")
    return batch, release


# -- do ---------------------------------------------------------------------------------------


def test_64_threads_same_key_run_fn_once() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    n = 64
    calls = Counter[str]()
    release = threading.Event()
    start = threading.Barrier(n)

    def fetch() -> int:
        calls["user:1"] += 1
        release.wait(JOIN)
        return 42

    def caller() -> int:
        start.wait(JOIN)
        return sf.do("user:1", fetch)

    running = Started([caller] * n)
    wait_until(lambda: sf.joined == n - 1, "63 waiters")
    assert sf.in_flight == 1
    release.set()
    results = running.finish()
    assert results == [42] * n
    assert calls == {"user:1": 1}
    assert (sf.led, sf.joined, sf.in_flight) == (1, n - 1, 0)


def test_exception_propagates_to_every_waiter() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    n = 64
    calls = 0
    release = threading.Event()
    start = threading.Barrier(n)

    def fetch() -> int:
        nonlocal calls
        calls += 1
        release.wait(JOIN)
        raise Boom("sql down")

    def caller() -> int:
        start.wait(JOIN)
        return sf.do("k", fetch)

    running = Started([caller] * n)
    wait_until(lambda: sf.joined == n - 1, "63 waiters")
    release.set()
    results = running.finish()
    assert calls == 1
    assert all(isinstance(r, Boom) for r in results)
    assert len({id(r) for r in results}) == 1  # the leader's exception, raised in each
    assert sf.in_flight == 0


def test_different_keys_run_independently() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    n = 8
    gate = threading.Barrier(n)  # passes only if all n fetches run at the same time

    def caller(i: int) -> Callable[[], int]:
        def fetch() -> int:
            gate.wait(JOIN)
            return i * 10

        return lambda: sf.do(i, fetch)

    assert run_threads([caller(i) for i in range(n)]) == [i * 10 for i in range(n)]
    assert (sf.led, sf.joined, sf.in_flight) == (n, 0, 0)


def test_sequential_calls_are_not_cached() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    values = iter([1, 2])
    assert sf.do("k", lambda: next(values)) == 1
    assert sf.do("k", lambda: next(values)) == 2
    assert sf.in_flight == 0


def test_leader_exception_leaves_table_empty() -> None:
    sf: SingleFlight[str, int] = SingleFlight()

    def fail() -> int:
        raise Boom

    with pytest.raises(Boom):
        sf.do("k", fail)
    assert sf.in_flight == 0
    assert sf.do("k", lambda: 7) == 7


def test_do_timeout_then_leader_still_finishes() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    release = threading.Event()

    def slow() -> int:
        release.wait(JOIN)
        return 5

    leader = Started([lambda: sf.do("k", slow)])
    wait_until(lambda: sf.in_flight == 1, "the leader")
    with pytest.raises(SingleFlightTimeout) as err:
        sf.do("k", slow, wait_timeout=0.02)
    assert isinstance(err.value, TimeoutError)
    assert isinstance(err.value, FeatcacheError)
    assert err.value.pending == ("k",)
    assert err.value.partial == {}
    assert sf.in_flight == 1  # the leader's fetch is untouched by a waiter giving up
    release.set()
    assert leader.finish() == [5]
    assert sf.in_flight == 0


def test_keyboard_interrupt_in_leader_reaches_waiters_as_runtime_error() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    release = threading.Event()

    def interrupted() -> int:
        release.wait(JOIN)
        raise KeyboardInterrupt

    running = Started([lambda: sf.do("k", interrupted), lambda: sf.do("k", interrupted)])
    wait_until(lambda: sf.joined == 1, "the waiter")
    release.set()
    results = running.finish()
    assert sorted(type(r).__name__ for r in results) == ["KeyboardInterrupt", "RuntimeError"]
    wrapped = next(r for r in results if isinstance(r, RuntimeError))
    assert isinstance(wrapped.__cause__, KeyboardInterrupt)
    assert sf.in_flight == 0


# -- do_many ----------------------------------------------------------------------------------


def test_do_many_uncontended() -> None:
    sf: SingleFlight[int, str | None] = SingleFlight()
    seen: list[list[int]] = []

    def fetch(keys: list[int]) -> Mapping[int, str | None]:
        seen.append(list(keys))
        return {k: (None if k == 3 else f"v{k}") for k in keys if k != 2}

    got = sf.do_many([3, 1, 2, 1, 3], fetch)
    assert seen == [[3, 1, 2]]  # deduplicated, request order, one call
    assert list(got) == [3, 1, 2]
    assert got == {3: None, 1: "v1", 2: MISSING}  # None is a value, MISSING is absence
    assert repr(got[2]) == "MISSING"
    assert isinstance(got[2], Missing)
    assert sf.in_flight == 0


def test_do_many_empty_does_not_call_fn() -> None:
    sf: SingleFlight[int, int] = SingleFlight()

    def fetch(keys: list[int]) -> Mapping[int, int]:
        raise AssertionError("called")

    assert sf.do_many([], fetch) == {}


def test_do_many_fn_raising_leaves_table_empty() -> None:
    sf: SingleFlight[int, int] = SingleFlight()

    def fetch(keys: list[int]) -> Mapping[int, int]:
        keys.clear()  # even a fn that mutates its argument must not leak entries
        raise Boom

    with pytest.raises(Boom):
        sf.do_many([1, 2, 3], fetch)
    assert sf.in_flight == 0


def one_overlapping_round(sf: SingleFlight[int, str], rnd: int) -> None:
    n_threads, universe = 24, 60
    # overlapping, different-sized, unordered key sets; some with duplicates
    batches = [
        [(i * 7 + j * (rnd + 3)) % universe for j in range(5 + (i % 9))] + [i % universe]
        for i in range(n_threads)
    ]
    requested = [list(dict.fromkeys(b)) for b in batches]
    total = sum(len(r) for r in requested)
    guard = threading.Lock()
    fetched = Counter[int]()
    release = threading.Event()
    start = threading.Barrier(n_threads)
    led0, joined0 = sf.led, sf.joined

    def fetch(keys: list[int]) -> Mapping[int, str]:
        with guard:
            fetched.update(keys)
        release.wait(JOIN)
        return {k: f"r{rnd}:{k}" for k in keys if k % 10 != 0}  # multiples of 10: absent

    def caller(keys: list[int]) -> Callable[[], dict[int, str | Missing]]:
        def call() -> dict[int, str | Missing]:
            start.wait(JOIN)
            return sf.do_many(keys, fetch)

        return call

    running = Started([caller(b) for b in batches])
    wait_until(lambda: sf.led - led0 + sf.joined - joined0 == total, "every caller to register")
    release.set()
    results = running.finish()

    wanted_keys = {k for r in requested for k in r}
    assert len(wanted_keys) < total  # the batches do overlap
    assert fetched == Counter(dict.fromkeys(wanted_keys, 1))
    assert sf.led - led0 == len(wanted_keys)
    for keys, got in zip(requested, results, strict=True):
        assert not isinstance(got, BaseException), got
        assert list(got) == keys
        assert got == {k: (MISSING if k % 10 == 0 else f"r{rnd}:{k}") for k in keys}
    assert sf.in_flight == 0


def test_do_many_overlapping_batches_fetch_each_key_once_per_round() -> None:
    sf: SingleFlight[int, str] = SingleFlight()
    for rnd in range(5):
        one_overlapping_round(sf, rnd)


def test_do_many_waiter_leads_its_own_keys_and_gets_the_leaders_error() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    release = threading.Event()
    b_fetched: list[list[int]] = []

    def a_fetch(keys: list[int]) -> Mapping[int, int]:
        release.wait(JOIN)
        raise Boom("a failed")

    def b_fetch(keys: list[int]) -> Mapping[int, int]:
        b_fetched.append(list(keys))
        return {k: k for k in keys}

    a = Started([lambda: sf.do_many([1, 2, 3], a_fetch)])
    wait_until(lambda: sf.in_flight == 3, "A to register")
    b = Started([lambda: sf.do_many([2, 3, 4], b_fetch)])
    wait_until(lambda: sf.joined == 2 and bool(b_fetched), "B to fetch 4 and wait for 2, 3")
    # B published key 4 before waiting: a third caller can see it is no longer in flight
    wait_until(lambda: sf.in_flight == 3, "B to publish key 4")
    release.set()
    (a_result,) = a.finish()
    (b_result,) = b.finish()
    assert b_fetched == [[4]]
    assert isinstance(a_result, Boom)
    assert b_result is a_result
    assert sf.in_flight == 0


def test_do_many_results_of_others_are_shared() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    release = threading.Event()

    def a_fetch(keys: list[int]) -> Mapping[int, int]:
        release.wait(JOIN)
        return {1: 100, 3: 300}  # 2 is absent

    def b_fetch(keys: list[int]) -> Mapping[int, int]:
        assert keys == [4]
        return {4: 400}

    a = Started([lambda: sf.do_many([1, 2, 3], a_fetch)])
    wait_until(lambda: sf.in_flight == 3, "A to register")
    b = Started([lambda: sf.do_many([4, 2, 1], b_fetch)])
    wait_until(lambda: sf.joined == 2, "B to join")
    release.set()
    assert a.finish() == [{1: 100, 2: MISSING, 3: 300}]
    (b_result,) = b.finish()
    assert list(b_result) == [4, 2, 1]
    assert b_result == {4: 400, 2: MISSING, 1: 100}
    assert sf.in_flight == 0


def test_do_many_timeout_reports_pending_and_partial() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    a, release = parked_batch(sf, [1, 2])
    with pytest.raises(SingleFlightTimeout) as err:
        sf.do_many([3, 1, 4], lambda keys: {3: 3}, wait_timeout=0.02)
    assert err.value.pending == (1,)
    assert err.value.partial == {3: 3, 4: MISSING}
    assert sf.in_flight == 2  # this caller's own keys were published and forgotten
    release.set()
    assert a.finish() == [{1: -1, 2: -2}]
    assert sf.in_flight == 0


def test_do_many_no_wait_keys_in_flight_are_busy_at_once() -> None:
    """An early refresh offers to fetch: a key someone else is fetching comes back BUSY without
    waiting (while the same call still waits for its other keys), a free key is fetched."""
    sf: SingleFlight[int, int] = SingleFlight()
    a, release = parked_batch(sf, [1, 2])
    fetched: list[list[int]] = []

    def mine(keys: list[int]) -> Mapping[int, int]:
        fetched.append(keys)
        return {k: k for k in keys}

    # nothing to wait for: 1 is busy and 3 is ours, so this returns while A still runs
    assert sf.do_many([1, 3], mine, no_wait={1, 3}) == {1: BUSY, 3: 3}
    assert fetched == [[3]]
    assert sf.joined == 0 and sf.in_flight == 2
    b = Started([lambda: sf.do_many([1, 2], mine, no_wait={1})])
    wait_until(lambda: sf.joined == 1, "B to wait for 2 only")
    release.set()
    assert a.finish() == [{1: -1, 2: -2}]
    assert b.finish() == [{1: BUSY, 2: -2}]
    assert fetched == [[3]]
    assert sf.in_flight == 0
    assert repr(BUSY) == "BUSY" and repr(MISSING) == "MISSING"


def test_do_joining_a_batch_that_lacks_the_key_raises_key_error() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    release = threading.Event()

    def batch(keys: list[int]) -> Mapping[int, int]:
        release.wait(JOIN)
        return {1: 10}

    a = Started([lambda: sf.do_many([1, 2], batch)])
    wait_until(lambda: sf.in_flight == 2, "the batch")
    b = Started([lambda: sf.do(1, lambda: -1), lambda: sf.do(2, lambda: -1)])
    wait_until(lambda: sf.joined == 2, "both do() callers to join")
    release.set()
    a.finish()
    one, two = b.finish()
    assert one == 10
    assert isinstance(two, KeyError)
    assert sf.in_flight == 0


# -- do_many_steps: waiting elsewhere ----------------------------------------------------------


def test_steps_yield_a_wait_only_for_other_callers_fetches_and_resume_with_their_results(
) -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    assert run_blocking(sf.do_many_steps([1, 2], lambda ks: no_steps({k: k for k in ks}))
                        ) == {1: 1, 2: 2}
    batch, release = parked_batch(sf, [2, 3])
    fetched: list[list[int]] = []

    def mine(keys: list[int]) -> Steps[Mapping[int, int]]:
        fetched.append(keys)
        return no_steps({k: k * 10 for k in keys})

    steps = sf.do_many_steps([1, 2, 3], mine)
    waits = next(steps)  # its own fetch done and published, then the wait, without blocking
    assert isinstance(waits, FlightWaits)
    assert fetched == [[1]]
    assert sf.in_flight == 2  # the parked batch's keys only: key 1 is published
    called: list[str] = []
    assert waits.on_each_done(lambda: called.append(threading.current_thread().name)) == 1
    release.set()
    batch.finish()
    # called once, for the one fetch, by the thread that finished it
    assert len(called) == 1 and called[0] != threading.current_thread().name
    assert waits.on_each_done(lambda: called.append("late")) == 0  # done: nothing to await
    assert run_blocking(steps) == {1: 10, 2: -2, 3: -3}
    assert sf.joined == 2 and sf.in_flight == 0


def test_steps_resumed_before_the_deadline_passed_raise_the_timeout_for_what_is_running(
) -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    batch, release = parked_batch(sf, [2])
    steps = sf.do_many_steps([1, 2], lambda ks: no_steps({k: k for k in ks}), wait_timeout=0.01)
    waits = next(steps)
    assert waits.deadline is not None
    waits.block()  # returns at the deadline: the parked fetch goes on
    with pytest.raises(SingleFlightTimeout) as info:
        steps.send(None)
    assert info.value.pending == (2,) and info.value.partial == {1: 1}
    release.set()
    batch.finish()
    assert sf.in_flight == 0


def test_run_blocking_closes_the_steps_when_a_wait_is_interrupted() -> None:
    sf: SingleFlight[int, int] = SingleFlight()
    batch, release = parked_batch(sf, [5])
    cleaned: list[str] = []

    def call() -> Any:
        try:
            return (yield from sf.do_many_steps([5], lambda ks: no_steps({})))
        finally:
            cleaned.append("cleanup")

    class Interrupting(FlightWaits):
        def block(self) -> None:
            raise KeyboardInterrupt

    steps = call()
    waits = next(steps)
    with pytest.raises(KeyboardInterrupt):
        run_blocking(steps, Interrupting(threading.Lock(), [], None))
    assert cleaned == ["cleanup"]  # run now, in this thread, not whenever the GC gets to it
    release.set()
    batch.finish()
    assert waits.on_each_done(lambda: None) == 0


def test_a_fetch_written_as_steps_passes_its_waits_up_and_holds_its_keys_meanwhile() -> None:
    sf: SingleFlight[int, int] = SingleFlight()

    def polling(keys: list[int]) -> Steps[Mapping[int, int]]:
        yield Pause(0.001)  # as a lease wait pauses between its polls of Redis
        return {k: k + 1 for k in keys}

    leader = sf.do_many_steps([1, 2], polling)
    assert isinstance(next(leader), Pause)
    assert sf.in_flight == 2  # its keys stay in flight while it pauses: others join them
    joiner = sf.do_many_steps([2], lambda ks: no_steps({}))
    waits = next(joiner)
    assert isinstance(waits, FlightWaits)
    assert run_blocking(leader) == {1: 2, 2: 3}
    assert run_blocking(joiner, waits) == {2: 3}
    assert sf.in_flight == 0 and sf.joined == 1
