"""Freshness decisions: pure functions of times in milliseconds, trivial to test.

A cached value is fresh when ``now - loaded_at <= max_age`` of its feature (DESIGN section 2.4);
``loaded_at`` is when the row was read from SQL (the start of that read, so the age is never
understated) or written by ``put_rows``. A row is fresh for a call when it is fresh for the
strictest ``max_age`` among the features the call asked for of that view.
"""

from __future__ import annotations

import math

__all__ = [
    "fresh_since", "is_fresh", "refresh_early", "servable_stale", "xfetch_delta",
    "xfetch_delta_floor",
]


def is_fresh(loaded_ms: int, now_ms: int, max_age_ms: int) -> bool:
    return now_ms - loaded_ms <= max_age_ms


def servable_stale(loaded_ms: int, now_ms: int, stale_window_ms: int) -> bool:
    """Past ``max_age`` but within ``max_age + stale_if_error``: may be served as ``STALE``,
    and only when SQL failed."""
    return now_ms - loaded_ms <= stale_window_ms


def fresh_since(now_ms: int, max_age_ms: int) -> int:
    """The oldest ``loaded_at`` that is still fresh: ``is_fresh(x, now, age) == (x >= this)``.

    Lets a batch compare one integer per row instead of calling ``is_fresh`` per row.
    """
    return now_ms - max_age_ms


def refresh_early(
    loaded_ms: int, now_ms: int, max_age_ms: int, fill_ms: int, beta: float, rand: float
) -> bool:
    """XFetch (Vattani et al., "Optimal probabilistic cache stampede prevention"): refresh a
    still-fresh row early with a probability that grows as its expiry nears and with how long
    its SQL read took: ``now - delta * beta * ln(rand) >= expiry``, ``rand`` uniform in (0, 1].

    ``delta`` is floored (``xfetch_delta``) so that rows whose reads take a few milliseconds
    still get refreshed before they expire rather than by a hard miss.
    """
    if beta <= 0.0:
        return False
    delta = xfetch_delta(fill_ms, max_age_ms)
    return now_ms - delta * beta * math.log(rand) >= loaded_ms + max_age_ms


def xfetch_delta(fill_ms: int, max_age_ms: int) -> int:
    """The ``delta`` of XFetch: the row's fill time, but at least ``xfetch_delta_floor``."""
    return max(fill_ms, xfetch_delta_floor(max_age_ms))


def xfetch_delta_floor(max_age_ms: int) -> int:
    """The smallest ``delta``: 2% of ``max_age`` (40 ms for 2 s), at least 1 ms.

    With the fill time alone, a fast SQL read (a few ms) opens a refresh window of a few ms
    before expiry, which a row read every 5 ms often misses: a hard miss. The chance that no
    read of a row read every ``p`` ms draws a refresh before expiry is the product of
    ``1 - exp(-k * p / delta)`` over its reads; at ``p`` = 5 ms it is 2.5e-3 per ``max_age``
    window with a 1% floor (20 ms, a hard miss in one 20 s run out of 40) and 4e-6 with 2%,
    for about 1.06 refreshes per window instead of 1.02 (docs/consistency.md).
    """
    return max(max_age_ms // 50, 1)
