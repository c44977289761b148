"""Logging of a backend outage as changes of state, not as one line per failed call.

Under load a down Redis fails every call: a WARNING per call was about 10,000 lines in 7 s from
four threads, which buries everything else in the log and costs the serving path a formatted
record per call. ``OutageLog`` writes one WARNING when a backend starts failing, one summary at
most every ``every`` seconds while it keeps failing (how many failures since the last line, and
the latest error), and one INFO line when a call succeeds again (how long it lasted, how many
failures in all). The per-call cost while healthy is one attribute read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["OutageLog"]


class OutageLog:
    """The log of one backend's outages (``what``: ``"Redis redis://host:6379/0"``)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False  # read without the lock by ok(): a stale read only delays a line
        self._since = 0.0
        self._last_line = 0.0
        self._total = 0
        self._unlogged = 0

    @property
    def down(self) -> bool:
        """Whether the last outcome recorded was a failure."""
        return self._down

    def failed(self, consequence: str, error: object) -> None:
        """A call failed; ``consequence`` says what the caller does about it ("answering from
        SQL"). Logs on the first failure and then at most every ``every`` seconds."""
        with self._lock:
            now = self._clock()
            self._total += 1
            if not self._down:
                self._down, self._since, self._last_line = True, now, now
                self._total, self._unlogged = 1, 0
                self._log.warning("%s unavailable, %s: %s", self._what, consequence, error)
                return
            self._unlogged += 1
            if now - self._last_line < self._every:
                return
            count, self._unlogged, self._last_line = self._unlogged, 0, now
        self._log.warning(
            "%s still unavailable after %.0f s (%d more failures since the last report), "
            "%s: %s", self._what, now - self._since, count, consequence, error,
        )

    def ok(self) -> None:
        """A call succeeded: ends an outage, with one line saying how long it lasted."""
        if not self._down:
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            lasted, total = self._clock() - self._since, self._total
        self._log.info("%s available again after %.1f s (%d failed calls)",
                       self._what, lasted, total)
