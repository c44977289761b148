"""CircuitBreaker transitions on an injected clock, and ConcurrencyLimiter under threads.

Pure and in-process: no servers. Threads wait on events and bounded polls, never on sleeps
that assume how fast the machine is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from featcache.breaker import CircuitBreaker, ConcurrencyLimiter
from featcache.errors import ConfigError

JOIN = 30.0  # seconds; only reached when something deadlocked


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    clock: FakeClock,
    *,
    failure_threshold: int = 3,
    window: float = 10.0,
    open_for: float = 2.0,
    half_open_probes: int = 1,
) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold, window, open_for, half_open_probes, clock=clock)


def state(b: CircuitBreaker) -> str:
    """``b.state`` widened to ``str``, so mypy does not narrow it across calls that change it."""
    return b.state


def trip(b: CircuitBreaker) -> None:
    for _ in range(b.failure_threshold):
        assert b.allow()
        b.record_failure()
    assert state(b) == "open"


def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


# -- CircuitBreaker ---------------------------------------------------------------------------


def test_starts_closed_and_allows() -> None:
    b = make(FakeClock())
    assert state(b) == "closed"
    assert all(b.allow() for _ in range(100))
    b.record_success()
    assert (state(b), b.opened, b.rejected) == ("closed", 0, 0)


def test_opens_at_threshold_within_window() -> None:
    clock = FakeClock()
    b = make(clock)
    b.record_failure()
    clock.advance(4)
    b.record_failure()
    assert state(b) == "closed"  # two of three
    clock.advance(4)
    b.record_failure()  # third within 8s <= 10s
    assert state(b) == "open"
    assert b.opened == 1


def test_open_rejects_until_open_for_elapsed() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    assert not b.allow()
    clock.advance(1.999)
    assert not b.allow()
    assert state(b) == "open"
    assert b.rejected == 2
    clock.advance(0.001)
    assert state(b) == "half_open"
    assert b.allow()


def test_failures_outside_window_do_not_count() -> None:
    clock = FakeClock()
    b = make(clock)
    b.record_failure()
    b.record_failure()
    clock.advance(10.5)  # both now older than the window
    b.record_failure()
    assert state(b) == "closed"
    clock.advance(1)
    b.record_failure()
    assert state(b) == "closed"  # failures at 10.5 and 11.5, plus one at 0 that is too old
    clock.advance(1)
    b.record_failure()  # three within 2s
    assert state(b) == "open"


def test_window_boundary_is_inclusive() -> None:
    clock = FakeClock()
    b = make(clock)
    b.record_failure()
    clock.advance(5)
    b.record_failure()
    clock.advance(5)  # exactly `window` after the first
    b.record_failure()
    assert state(b) == "open"


def test_successes_in_closed_state_do_not_erase_failures() -> None:
    clock = FakeClock()
    b = make(clock)
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert state(b) == "open"


def test_half_open_admits_exactly_n_probes() -> None:
    clock = FakeClock()
    b = make(clock, half_open_probes=3)
    trip(b)
    clock.advance(2)
    granted = [b.allow() for _ in range(10)]
    assert granted == [True] * 3 + [False] * 7
    assert state(b) == "half_open"
    assert b.rejected == 7


def test_probe_success_closes() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(2)
    assert b.allow()
    assert not b.allow()
    b.record_success()
    assert state(b) == "closed"
    assert all(b.allow() for _ in range(10))
    # a closed breaker starts counting afresh: the failures that opened it are gone
    b.record_failure()
    b.record_failure()
    assert state(b) == "closed"


def test_probe_failure_reopens_for_open_for_again() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(2)
    assert b.allow()
    b.record_failure()
    assert state(b) == "open"
    assert b.opened == 2
    clock.advance(1.5)
    assert not b.allow()  # open_for counts from the re-open, not the first open
    clock.advance(0.5)
    assert b.allow()
    assert state(b) == "half_open"


def test_outcomes_while_open_are_ignored() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(1)
    b.record_success()  # a call admitted before the breaker opened
    assert state(b) == "open"
    b.record_failure()  # must not push the re-close further out
    clock.advance(1)
    assert b.allow()
    assert b.opened == 1


def test_lost_probe_slots_are_regranted_after_open_for() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(2)
    assert b.allow()  # a probe that never reports back
    clock.advance(1.9)
    assert not b.allow()
    clock.advance(0.1)
    assert b.allow()
    b.record_success()
    assert state(b) == "closed"


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window": 0.0}, "window"),
        ({"window": float("nan")}, "window"),
        ({"open_for": 0.0}, "open_for"),
        ({"open_for": -1.0}, "open_for"),
        ({"half_open_probes": 0}, "half_open_probes"),
    ],
)
def test_breaker_rejects_bad_arguments(kw: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        CircuitBreaker(**kw)
    assert err.value.path == path
    assert isinstance(err.value, ValueError)


def test_breaker_counts_are_consistent_under_threads() -> None:
    """Many threads hammer a breaker whose half-open admits 2 probes: at no moment are more
    than 2 probes granted, and the lock keeps the counters exact."""
    clock = FakeClock()
    b = make(clock, half_open_probes=2)
    trip(b)
    clock.advance(2)
    n = 32
    start = threading.Barrier(n)
    granted: list[bool] = []
    guard = threading.Lock()

    def probe() -> None:
        start.wait(JOIN)
        ok = b.allow()
        with guard:
            granted.append(ok)

    threads = [threading.Thread(target=probe) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert len(granted) == n
    assert granted.count(True) == 2
    assert b.rejected == n - 2


# -- ConcurrencyLimiter -----------------------------------------------------------------------


def test_limiter_respects_limit_under_16_threads() -> None:
    limit, n = 4, 16
    lim = ConcurrencyLimiter(limit, acquire_timeout=JOIN)
    start = threading.Barrier(n)
    go = threading.Event()
    guard = threading.Lock()
    inside = 0
    most_inside = 0
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal inside, most_inside
        try:
            start.wait(JOIN)
            with lim.slot() as ok:
                assert ok
                with guard:
                    inside += 1
                    most_inside = max(most_inside, inside)
                go.wait(JOIN)
                with guard:
                    inside -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    wait_until(lambda: lim.in_flight == limit, "the first holders")
    with guard:
        assert inside == limit  # the other 12 are queued, not inside
    go.set()
    for t in threads:
        t.join(JOIN)
    assert not errors
    assert most_inside == limit
    assert lim.peak_in_flight == limit
    assert lim.in_flight == 0
    assert (lim.admitted, lim.rejected) == (n, 0)


def test_limiter_timeout_returns_false() -> None:
    lim = ConcurrencyLimiter(1, acquire_timeout=0.05)
    assert lim.acquire()
    assert not lim.acquire()  # waits 50ms, then gives up
    assert not lim.acquire(timeout=0)
    with lim.slot() as ok:
        assert not ok
    assert lim.rejected == 3
    assert lim.in_flight == 1  # the refused attempts did not take or free a slot
    lim.release()
    with lim.slot() as ok:
        assert ok
        assert lim.in_flight == 1
    assert lim.in_flight == 0
    assert lim.peak_in_flight == 1


def test_limiter_timeout_from_another_thread() -> None:
    lim = ConcurrencyLimiter(2, acquire_timeout=0.02)
    assert lim.acquire()
    assert lim.acquire()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lim.acquire()))
    t.start()
    t.join(JOIN)
    assert got == [False]
    lim.release()
    t = threading.Thread(target=lambda: got.append(lim.acquire()))
    t.start()
    t.join(JOIN)
    assert got == [False, True]


def test_limiter_slot_releases_on_exception() -> None:
    lim = ConcurrencyLimiter(1, acquire_timeout=0)
    with pytest.raises(RuntimeError), lim.slot() as ok:
        assert ok
        raise RuntimeError("query failed")
    assert lim.in_flight == 0
    assert lim.acquire()


def test_limiter_over_release_raises() -> None:
    lim = ConcurrencyLimiter(2, acquire_timeout=0)
    with pytest.raises(ValueError, match="released more"):
        lim.release()
    assert lim.acquire()
    lim.release()
    with pytest.raises(ValueError, match="released more"):
        lim.release()
    assert lim.in_flight == 0


@pytest.mark.parametrize(("limit", "timeout"), [(0, 1.0), (1, -0.1), (1, float("nan"))])
def test_limiter_rejects_bad_arguments(limit: int, timeout: float) -> None:
    with pytest.raises(ConfigError):
        ConcurrencyLimiter(limit, timeout)
