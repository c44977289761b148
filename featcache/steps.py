"""A call written as steps: the waits it yields, and how a thread runs it.

A call's ``finish`` (``ReadPath.finish_steps``, ``ModelCache.finish_steps``) is a generator.
Where it would wait without working, it yields what it waits for instead: another caller's
fetch in this process (``featcache.singleflight.FlightWaits``) or a pause between two polls of
Redis for a row another process is filling (``Pause``). The driver waits its own way and
resumes it with ``send(None)``: ``run_blocking`` blocks the thread (the synchronous client);
``featcache.async_steps`` awaits on the event loop, holding no thread. One code path, two ways
to wait.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Protocol, TypeVar

__all__ = ["Pause", "Steps", "Wait", "no_steps", "run_blocking"]

T = TypeVar("T")


class Wait(Protocol):
    """What steps yield: something to wait for, which ``block()`` waits for in this thread."""

    def block(self) -> None: ...


class Pause:
    """Wait ``seconds`` (a poll's interval), then go on."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def block(self) -> None:
        time.sleep(self.seconds)

    def __repr__(self) -> str:
        return f"Pause({self.seconds:g})"


#: a call's steps: each wait yielded, resumed with ``send(None)`` once waited for
Steps = Generator[Wait, None, T]


def run_blocking(steps: Steps[T], waiting: Wait | None = None) -> T:
    """Run ``steps`` to their end in this thread, blocking on each wait (first on ``waiting``,
    where they stand suspended). If a wait is interrupted, ``steps`` is closed, so its
    cleanup runs here and now."""
    while True:
        if waiting is not None:
            try:
                waiting.block()
            except BaseException:
                steps.close()
                raise
        try:
            waiting = steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def no_steps(value: T) -> Steps[T]:
    """``value`` as steps that wait for nothing."""
    return value
    yield  # unreachable: makes this a generator
