"""Driving a call's ``Steps`` from an event loop: the work in a thread pool, the waits on the loop.

A call's ``finish`` (``ReadPath.finish_steps``, ``ModelCache.finish_steps``) blocks on SQL,
on Redis and on a model's compute: that work runs in the asyncio client's pool. Where it would
wait without working, the steps yield the wait (``featcache.steps``), and the coroutine awaits
it here, on the loop, while the thread goes back to the pool: rows another caller of this
process is reading (``FlightWaits``), and the pause between two polls for rows another process
is filling (``Pause``). So a stampede of coroutines on one cold row holds one thread (the
reader's), not one per coroutine, a wait for another process's fill holds none between its
polls, and fills of other rows keep their threads.

A call cancelled while it runs never leaves its steps half done: what is left of them runs to
its end in the pool (the fill lands and the leases are released, as a thread's call would), so
cancelling a request never costs the next caller its fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from featcache.singleflight import FlightWaits
from featcache.steps import Pause, Steps, Wait, run_blocking

__all__ = ["run_steps"]

T = TypeVar("T")


class _Finished(Generic[T]):
    """What a stretch of steps returned when they ran to their end."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


async def run_steps(steps: Steps[T], pool: ThreadPoolExecutor) -> T:
    """``steps``' value: each stretch of work in ``pool`` (with this task's context variables),
    each wait (another caller's fetch, a poll's pause) awaited on this loop."""
    waited: Wait | None = None  # the wait the steps stand at (None: not started)
    while True:
        stretch = pool.submit(contextvars.copy_context().run, _advance, steps)
        try:
            outcome = await asyncio.wrap_future(stretch)
        except asyncio.CancelledError:
            stretch.add_done_callback(functools.partial(_after_cancel, steps, pool, waited))
            raise
        if isinstance(outcome, _Finished):
            return outcome.value
        try:
            if isinstance(outcome, Pause):
                await asyncio.sleep(outcome.seconds)
            elif isinstance(outcome, FlightWaits):
                await _until_done(outcome)
            else:  # a wait this driver does not know: in the pool, as a thread waits
                await asyncio.wrap_future(pool.submit(outcome.block))
        except asyncio.CancelledError:
            _rest_in_pool(steps, pool, outcome)
            raise
        waited = outcome


def _advance(steps: Steps[T]) -> Wait | _Finished[T]:
    """Run ``steps`` to their next wait or to their end."""
    try:
        return steps.send(None)
    except StopIteration as done:
        return _Finished(done.value)


async def _until_done(waits: FlightWaits) -> None:
    """Return when every fetch of ``waits`` is done or its deadline has passed."""
    loop = asyncio.get_running_loop()
    settled: asyncio.Future[None] = loop.create_future()
    remaining = 0

    def one_done() -> None:  # on the loop
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not settled.done():
            settled.set_result(None)

    def from_thread() -> None:  # in the thread that finished a fetch
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(one_done)

    remaining = waits.on_each_done(from_thread)
    if remaining == 0:
        return
    if waits.deadline is None:
        await settled
        return
    with contextlib.suppress(TimeoutError):  # the steps raise for the fetches still running
        await asyncio.wait_for(settled, max(0.0, waits.deadline - time.monotonic()))


def _after_cancel(steps: Steps[T], pool: ThreadPoolExecutor, waited: Wait | None,
                  stretch: Future[Wait | _Finished[T]]) -> None:
    """A cancelled call's stretch is over or will never run: the rest of its steps in the
    pool, from where they stand."""
    if stretch.cancelled():  # it never ran: the steps stand where the stretch found them
        if waited is None:
            steps.close()  # never started: nothing to finish or clean up
        else:
            _rest_in_pool(steps, pool, waited)
    elif stretch.exception() is None:
        outcome = stretch.result()
        if not isinstance(outcome, _Finished):
            _rest_in_pool(steps, pool, outcome)
    # else the steps ended with their exception, their cleanup done


def _rest_in_pool(steps: Steps[T], pool: ThreadPoolExecutor, waits: Wait) -> None:
    try:
        pool.submit(run_blocking, steps, waits)
    except RuntimeError:  # the pool is shut down: give up the steps (their cleanup runs)
        steps.close()
