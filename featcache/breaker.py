"""Failure isolation for the two backends: a circuit breaker for Redis, a concurrency cap for SQL.

When Redis is down every call would otherwise pay a connect timeout before falling back to SQL;
the breaker turns that into an immediate "skip Redis" for ``open_for`` seconds and then lets a
few probe calls find out whether it is back. While Redis is skipped every read goes to SQL, so
the limiter caps how many SQL queries this process runs at once: a database is better served by
some callers being refused quickly than by all of them queueing behind a saturated pool.

Both objects only decide; they never raise a featcache error themselves. The caller knows what
was being attempted and so which error (or which fallback) is right.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, Literal, TypeVar

from featcache.config_sections import DegradationConfig
from featcache.errors import CacheUnavailable, ConfigError, PartlyUnavailable

T = TypeVar("T")

__all__ = ["BreakerState", "CircuitBreaker", "ConcurrencyLimiter"]

BreakerState = Literal["closed", "open", "half_open"]

_CLOSED: Final = "closed"
_OPEN: Final = "open"
_HALF_OPEN: Final = "half_open"


class CircuitBreaker:
    """Closed -> open -> half-open, with failures counted in a sliding time window.

    The breaker opens when ``failure_threshold`` failures happen within ``window`` seconds
    (a true sliding window: only the newest ``failure_threshold`` failure times are kept, so
    memory is bounded however many calls fail). Successes in the closed state do not erase
    earlier failures: a backend failing five times in ten seconds is unhealthy even if it
    answered other calls in between.

    Open: ``allow()`` is False (and counted in ``rejected``) until ``open_for`` seconds have
    passed since it opened; then the breaker is half-open and admits up to
    ``half_open_probes`` calls at a time. The first success recorded while half-open closes
    it; a failure re-opens it for another ``open_for``. Outcomes recorded while open are
    ignored: they come from calls admitted before it opened and say nothing new.

    A probe whose outcome is never recorded would otherwise keep the breaker half-open and
    rejecting forever, so when all probe slots are taken and ``open_for`` has passed since the
    last one was granted, the slots are presumed lost and granted afresh. Callers should still
    record every admitted call's outcome (``try``/``except``/``else``), and ``open_for``
    should exceed the backend's own timeout, or a slow probe is presumed lost and one more
    probe is let through beside it.

    Thread-safe. The closed-state path of ``allow()`` and ``record_success()`` reads one
    attribute without taking the lock or reading the clock: the worst a race can do is admit a
    call just as the breaker opens, which is harmless.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        window: float = 10.0,
        open_for: float = 2.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError(f"must be >= 1, got {failure_threshold!r}", "failure_threshold")
        if not window > 0:
            raise ConfigError(f"must be > 0 seconds, got {window!r}", "window")
        if not open_for > 0:
            raise ConfigError(f"must be > 0 seconds, got {open_for!r}", "open_for")
        if half_open_probes < 1:
            raise ConfigError(f"must be >= 1, got {half_open_probes!r}", "half_open_probes")
        self.failure_threshold = failure_threshold
        self.window = window
        self.open_for = open_for
        self.half_open_probes = half_open_probes
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = _CLOSED
        self._failures: deque[float] = deque(maxlen=failure_threshold)
        self._opened_at = 0.0
        self._probes = 0  # probe slots granted since the breaker became half-open
        self._probe_at = 0.0  # when the latest probe slot was granted
        self._opened = 0
        self._rejected = 0

    @classmethod
    def from_config(cls, config: DegradationConfig) -> CircuitBreaker:
        """The breaker ``degradation`` describes (``breaker_failures`` within
        ``breaker_window`` seconds open it for ``breaker_open_for``)."""
        return cls(config.breaker_failures, config.breaker_window, config.breaker_open_for)

    def allow(self) -> bool:
        """Whether the caller may try the backend now. A True in the half-open state is a probe
        slot: the caller must report its outcome with ``record_success``/``record_failure``."""
        if self._state is _CLOSED:
            return True
        with self._lock:
            if self._state is _CLOSED:
                return True
            now = self._clock()
            if self._state is _OPEN:
                if now - self._opened_at < self.open_for:
                    self._rejected += 1
                    return False
                self._state = _HALF_OPEN
                self._probes = 0
            if self._probes >= self.half_open_probes:
                if now - self._probe_at < self.open_for:
                    self._rejected += 1
                    return False
                self._probes = 0  # the earlier probes never reported back: presume them lost
            self._probes += 1
            self._probe_at = now
            return True

    def record_success(self) -> None:
        if self._state is _CLOSED:
            return
        with self._lock:
            if self._state is _HALF_OPEN:
                self._state = _CLOSED  # with no failures: _open() cleared them
                self._probes = 0

    def redis_call(self, what: str, fn: Callable[[], T]) -> T:
        """One Redis round trip through the breaker; ``CacheUnavailable`` when it is open.
        A failure counts as ``redis_failed`` says."""
        if not self.allow():
            raise CacheUnavailable(f"Redis circuit open: {what} skipped")
        try:
            result = fn()
        except CacheUnavailable as exc:
            self.redis_failed(exc)
            raise
        self.record_success()
        return result

    def redis_failed(self, exc: CacheUnavailable) -> None:
        """A failed Redis round trip counts against the breaker unless only some nodes of a
        cluster failed (``PartlyUnavailable``): one shard down is not Redis down, and that
        node's own breaker counts it."""
        if not isinstance(exc, PartlyUnavailable):
            self.record_failure()

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            if self._state is _CLOSED:
                failures = self._failures
                failures.append(now)  # maxlen drops the oldest: only the newest N matter
                if len(failures) >= self.failure_threshold and now - failures[0] <= self.window:
                    self._open(now)
            elif self._state is _HALF_OPEN:
                self._open(now)
            # open: a late failure of a call admitted before opening must not extend open_for

    def _open(self, now: float) -> None:
        self._state = _OPEN
        self._opened_at = now
        self._opened += 1
        self._failures.clear()
        self._probes = 0

    @property
    def state(self) -> BreakerState:
        """The state ``allow()`` would act on now: an open breaker whose ``open_for`` has
        passed reports ``"half_open"`` even before the next ``allow()`` makes it so."""
        with self._lock:
            if self._state is _OPEN and self._clock() - self._opened_at >= self.open_for:
                return _HALF_OPEN
            return self._state

    @property
    def closed(self) -> bool:
        """Whether the breaker is closed, read without the lock (a hot path's check: a stale
        answer only picks another node once)."""
        return self._state is _CLOSED

    @property
    def opened(self) -> int:
        """Transitions into the open state, re-opens after a failed probe included."""
        return self._opened

    @property
    def rejected(self) -> int:
        """Calls ``allow()`` turned away."""
        return self._rejected


class ConcurrencyLimiter:
    """At most ``limit`` holders at once; a caller waits at most ``acquire_timeout`` seconds.

    A refused caller gets False, not an exception: the limiter does not know whether the caller
    should raise (``OfflineStoreUnavailable`` or an overload error), serve stale rows, or
    degrade some other way. Use ``slot()``::

        with limiter.slot() as admitted:
            if not admitted:
                raise ...  # the caller's decision
            run_the_query()

    or ``acquire()``/``release()`` in ``try``/``finally``. ``release()`` without a matching
    successful ``acquire()`` raises ``ValueError`` rather than silently raising the limit.
    """

    def __init__(self, limit: int, acquire_timeout: float) -> None:
        if limit < 1:
            raise ConfigError(f"must be >= 1, got {limit!r}", "limit")
        if not acquire_timeout >= 0:
            raise ConfigError(f"must be >= 0 seconds, got {acquire_timeout!r}", "acquire_timeout")
        self.limit = limit
        self.acquire_timeout = acquire_timeout
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()  # the counters only; never held while waiting
        self._in_flight = 0
        self._peak = 0
        self._admitted = 0
        self._rejected = 0

    @classmethod
    def from_config(cls, config: DegradationConfig) -> ConcurrencyLimiter:
        """The SQL limit ``degradation`` describes (``sql_concurrency`` queries, waiting at most
        ``sql_queue_timeout`` seconds)."""
        return cls(config.sql_concurrency, config.sql_queue_timeout)

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds (default ``acquire_timeout``; 0 does
        not wait). False when none freed up in time; the caller must not ``release()`` then."""
        wait = self.acquire_timeout if timeout is None else timeout
        ok = self._sem.acquire(timeout=wait)
        with self._lock:
            if ok:
                self._admitted += 1
                self._in_flight += 1
                self._peak = max(self._peak, self._in_flight)
            else:
                self._rejected += 1
        return ok

    def release(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                raise ValueError("ConcurrencyLimiter released more times than acquired")
            self._in_flight -= 1
        self._sem.release()

    @contextmanager
    def slot(self, timeout: float | None = None) -> Iterator[bool]:
        """Yield whether a slot was acquired, and release it on exit only if it was."""
        ok = self.acquire(timeout)
        try:
            yield ok
        finally:
            if ok:
                self.release()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most holders ever at once; shows how close to ``limit`` the load came."""
        return self._peak

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def rejected(self) -> int:
        """Acquisitions that timed out."""
        return self._rejected
