"""Collapse concurrent fetches of the same key into one.

When a popular entity expires, every thread serving it misses Redis at the same moment and each
would query SQL for the same row. ``SingleFlight`` makes the first caller the leader for that key
and the rest wait for its answer, so SQL sees one query per key however many threads asked.
It is not a cache: once the leader's answer is handed out the key is forgotten, and the next
caller starts a new fetch.

``do_many`` is the form the batched read path needs: a batch's keys are split, under one lock
acquisition, into keys nobody is fetching (this caller leads them, with one call of ``fn``) and
keys another caller is already fetching (this caller waits for those). The leader runs its own
fetch before waiting for anyone else's, so two batches waiting on each other's keys cannot
deadlock.

``do_many_steps`` is ``do_many`` as steps (``featcache.steps``): its fetch is steps too, and it
yields a ``FlightWaits`` when the caller must wait for other callers' fetches; the driver
resumes it once they are done, having waited its own way (``run_blocking`` blocks the thread,
as ``do_many`` does; the asyncio client awaits on its event loop, holding no thread).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Container, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

from featcache.errors import FeatcacheError
from featcache.steps import Steps, no_steps, run_blocking

__all__ = ["BUSY", "MISSING", "FlightWaits", "Missing", "SingleFlight", "SingleFlightTimeout"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Missing(enum.Enum):
    """The type of ``MISSING`` and ``BUSY``: an enum so that ``value is MISSING`` narrows types."""

    MISSING = "MISSING"
    BUSY = "BUSY"

    def __repr__(self) -> str:
        return self.value


#: In ``do_many`` results: the fetch for this key returned no value for it. Distinct from
#: ``None``, which may be a legitimate value.
MISSING: Final = Missing.MISSING
#: In ``do_many`` results: a ``no_wait`` key that another caller was already fetching. This
#: caller neither fetched it nor waited for it.
BUSY: Final = Missing.BUSY


class SingleFlightTimeout(FeatcacheError, TimeoutError):
    """Waiting for another caller's fetch took longer than ``wait_timeout``.

    Only the wait timed out: the other caller's fetch goes on and will finish (and be cleaned
    up) on its own. ``pending`` are the keys this caller did not get; ``partial`` holds the
    results it did get (``MISSING`` included), so the caller can fetch just the rest itself,
    raise, or serve what it has. It is a ``FeatcacheError`` so a whole call can still be guarded
    by one ``except``, and a ``TimeoutError`` for code that handles timeouts generically.
    """

    def __init__(self, pending: Sequence[Hashable], partial: Mapping[Any, Any], timeout: float):
        self.pending = tuple(pending)
        self.partial = dict(partial)
        self.timeout = timeout
        super().__init__(
            f"gave up after {timeout:g}s waiting for another caller to fetch "
            f"{len(self.pending)} key(s)"
        )


_NO_RESULTS: Final[Mapping[Any, Any]] = {}


class _Flight(Generic[K, V]):
    """One leader's fetch, shared by every key it covers.

    ``results`` and ``error`` are written by the leader before ``done`` is set (under the
    table lock) and ``event`` is set; waiters read them only after. ``event`` is created by the
    first waiter (under the table lock), so a fetch nobody waits for never allocates one;
    ``callbacks`` (``FlightWaits.on_each_done``), likewise, are called once after it is set.
    """

    __slots__ = ("callbacks", "done", "error", "event", "results")

    def __init__(self) -> None:
        self.results: Mapping[K, V] = _NO_RESULTS
        self.error: BaseException | None = None
        self.event: threading.Event | None = None
        self.done = False
        self.callbacks: list[Callable[[], None]] | None = None


class FlightWaits:
    """The fetches of other callers that a ``do_many_steps`` caller waits for, and when it
    gives up on them (``deadline``, ``time.monotonic()``; None: never)."""

    __slots__ = ("_flights", "_lock", "deadline")

    def __init__(self, lock: threading.Lock, flights: list[_Flight[Any, Any]],
                 deadline: float | None) -> None:
        self._lock = lock
        self._flights = flights
        self.deadline = deadline

    def block(self) -> None:
        """Wait in this thread until every fetch is done or the deadline passes."""
        for flight in self._flights:
            if not _wait(flight, self.deadline):
                return

    def on_each_done(self, callback: Callable[[], None]) -> int:
        """Have ``callback()`` called once for each fetch not yet done, by the thread that
        finishes it (so it must be quick and must not raise); the number of those calls to
        expect (0: every fetch is done already)."""
        with self._lock:
            pending = [flight for flight in self._flights if not flight.done]
            for flight in pending:
                if flight.callbacks is None:
                    flight.callbacks = []
                flight.callbacks.append(callback)
        return len(pending)


class SingleFlight(Generic[K, V]):
    """Deduplicates concurrent fetches by key. Thread-safe; one instance per kind of fetch
    (keys in one instance must mean the same thing to every ``fn`` passed to it).

    The leader path takes the lock twice per call whatever the number of keys (register the
    keys, then publish the outcome and forget them); a waiter takes it once. The in-flight
    table is empty whenever no call is running, also after ``fn`` raised or a wait timed out.

    An exception from ``fn`` is raised in the leader and in every caller waiting on any of the
    keys it was fetching; it is the same exception object in each (as ``concurrent.futures``
    does). A ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``) is raised
    only in the leader; waiters get a ``RuntimeError`` caused by it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, _Flight[K, V]] = {}
        self._led = 0
        self._joined = 0

    def do(self, key: K, fn: Callable[[], V], *, wait_timeout: float | None = None) -> V:
        """``fn()``, run once for all concurrent callers of the same ``key``.

        A caller that joins a ``do_many`` fetch whose ``fn`` returned nothing for ``key`` gets
        ``KeyError(key)``: ``do`` has no ``MISSING`` in its return type.
        """
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                self._led += 1
                leading = True
            else:
                self._joined += 1
                if flight.event is None:
                    flight.event = threading.Event()
                leading = False
        if leading:
            try:
                value = fn()
            except BaseException as exc:
                self._finish(flight, (key,), _NO_RESULTS, exc)
                raise
            self._finish(flight, (key,), {key: value}, None)
            return value
        deadline = _deadline(wait_timeout)
        if not _wait(flight, deadline):
            assert wait_timeout is not None
            raise SingleFlightTimeout((key,), {}, wait_timeout)
        if flight.error is not None:
            raise _for_waiter(flight.error)
        got = flight.results.get(key, MISSING)
        if isinstance(got, Missing):  # results never hold BUSY; this narrows the type
            raise KeyError(key)
        return got

    def do_many(
        self,
        keys: Sequence[K],
        fn: Callable[[list[K]], Mapping[K, V]],
        *,
        wait_timeout: float | None = None,
        no_wait: Container[K] = (),
    ) -> dict[K, V | Missing]:
        """Results for every distinct key in ``keys``, in request order.

        ``fn`` is called at most once, with the keys nobody else is fetching (deduplicated, in
        request order; never with an empty list) and returns whatever it found; a key it leaves
        out maps to ``MISSING``, here and for every waiter. ``fn`` must not mutate the mapping
        after returning it: waiters read it afterwards.

        ``wait_timeout`` bounds the total time spent waiting for other callers' fetches (not
        this caller's own ``fn``); None waits as long as they take. On timeout this raises
        ``SingleFlightTimeout`` after its own fetch has finished and been published.

        ``no_wait`` keys are fetched when nobody else is fetching them, and otherwise map to
        ``BUSY`` at once: for a caller that already holds a usable answer and only offers to
        refresh it (an XFetch early refresh), waiting would add latency for nothing.
        """
        return run_blocking(self.do_many_steps(keys, lambda own: no_steps(fn(own)),
                                               wait_timeout=wait_timeout, no_wait=no_wait))

    def do_many_steps(
        self,
        keys: Sequence[K],
        fn: Callable[[list[K]], Steps[Mapping[K, V]]],
        *,
        wait_timeout: float | None = None,
        no_wait: Container[K] = (),
    ) -> Steps[dict[K, V | Missing]]:
        """``do_many`` as steps: ``fn`` returns steps (it yields what its fetch waits for,
        and returns the mapping), and once this caller's own fetch is done and published a
        ``FlightWaits`` is yielded instead of blocking while other callers' fetches run. The
        driver resumes it when it has waited for them (or given up at their ``deadline``:
        the fetches still running then raise ``SingleFlightTimeout``)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        mine: _Flight[K, V] = _Flight()
        own: list[K] = []
        waits: list[tuple[K, _Flight[K, V]]] = []
        busy: list[K] = []
        with self._lock:
            flights = self._flights
            for key in wanted:
                flight = flights.get(key)
                if flight is None:
                    flights[key] = mine
                    own.append(key)
                elif key in no_wait:
                    busy.append(key)
                else:
                    if flight.event is None:
                        flight.event = threading.Event()
                    waits.append((key, flight))
            self._led += len(own)
            self._joined += len(waits)
        out: dict[K, V | Missing] = dict.fromkeys(wanted, MISSING)
        for key in busy:
            out[key] = BUSY
        if own:
            try:
                got = yield from fn(own)
            except BaseException as exc:
                self._finish(mine, wanted, _NO_RESULTS, exc)
                raise
            self._finish(mine, wanted, got, None)
            for key in own:
                out[key] = got.get(key, MISSING)
        if waits:
            if not all(flight.done for _, flight in waits):
                yield FlightWaits(self._lock, list({id(f): f for _, f in waits}.values()),
                                  _deadline(wait_timeout))
            pending: list[K] = []
            for key, flight in waits:
                if not flight.done:
                    pending.append(key)
                elif flight.error is not None:
                    raise _for_waiter(flight.error)
                else:
                    out[key] = flight.results.get(key, MISSING)
            if pending:
                late = set(pending)
                partial = {k: v for k, v in out.items() if k not in late}
                raise SingleFlightTimeout(pending, partial, wait_timeout or 0.0)
        return out

    def _finish(
        self,
        flight: _Flight[K, V],
        keys: Iterable[K],
        results: Mapping[K, V],
        error: BaseException | None,
    ) -> None:
        flight.results = results
        flight.error = error
        with self._lock:
            flights = self._flights
            for key in keys:
                # Only this flight's own keys: ``keys`` may include keys led by someone else.
                if flights.get(key) is flight:
                    del flights[key]
            flight.done = True
            event = flight.event
            callbacks = flight.callbacks
        if event is not None:
            event.set()
        if callbacks is not None:
            for callback in callbacks:
                callback()

    @property
    def in_flight(self) -> int:
        """Keys being fetched right now; 0 whenever no call is running."""
        return len(self._flights)

    @property
    def led(self) -> int:
        """Keys this instance handed to an ``fn`` (counted when the fetch starts)."""
        return self._led

    @property
    def joined(self) -> int:
        """Key requests answered by waiting on another caller's fetch (counted when the
        caller starts waiting): the fetches saved."""
        return self._joined


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _wait(flight: _Flight[Any, Any], deadline: float | None) -> bool:
    event = flight.event
    assert event is not None  # created under the lock when this caller joined
    if deadline is None:
        return event.wait()
    return event.wait(max(0.0, deadline - time.monotonic()))


def _for_waiter(error: BaseException) -> BaseException:
    if isinstance(error, Exception):
        return error
    wrapped = RuntimeError(f"the call fetching this key was interrupted ({error!r})")
    wrapped.__cause__ = error
    return wrapped
