"""Simulated hit rates of the L1 policies (``lru``, ``lfu``, ``ttl``, ``tinylfu``) on a trace.

Each access goes through the ``featcache.l1.L1Cache`` that serves (``get_many`` of the one id,
``put_many`` on a miss, as the read path does), so the figure is that of the code that runs:
the libraries behind each policy and L1's own bookkeeping, with ``tinylfu`` recording the
share of its hits that ``l1.access_sample_rate`` gives it. The cache is given a clock that
stands still and a ``max_ttl`` out of reach: this is a study of eviction at a size, and
``max_ttl`` drops the same entries under every policy (the freshness ceiling bounds what
``max_age`` allows; ``featcache.analysis.ceiling``).

A trace of more than ``max_accesses`` accesses is simulated in miniature (Waldspurger et al.,
"Cache Modeling and Optimization using Miniature Simulations", USENIX ATC'17): spatially
sampled at a rate ``r`` that leaves about that many, with each cache scaled to ``r`` times its
size. A trace that is itself a sample at rate ``R`` is simulated at sizes scaled by ``R``.
Sizes whose miniature would hold fewer than ``MIN_MINIATURE`` entries are left out: too few
entries for the policy to behave as it does at full size. Which ids a sample holds moves its
figures: on a skewed trace a handful of ids take a large share of the reads, and a sample has
them or not. When the whole trace's length ``N`` is known (always, for a full trace sampled
here), a miniature's hits are corrected as SHARDS-adj corrects the LRU curve: the reads the
sample has fewer (or more) than ``R * N`` count as hits (or are taken off them), since the
ids that make the difference are the most read ones, whose reads nearly all hit; the rate is
then hits over ``R * N``. An LRU miniature so equals SHARDS-adj of the same sample at sizes
where ``R * S`` is whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from featcache.analysis.trace import Trace, sample
from featcache.config_sections import DEFAULT_L1_ACCESS_SAMPLE_RATE, L1_POLICIES, L1Config
from featcache.errors import InvalidRequest
from featcache.l1 import EntityId, L1Cache

__all__ = ["DEFAULT_MAX_ACCESSES", "MIN_MINIATURE", "PolicyCurve", "policy_curves",
           "simulate"]

#: accesses simulated per (policy, size) at most; longer traces are simulated in miniature
DEFAULT_MAX_ACCESSES = 100_000
MIN_MINIATURE = 16
_NO_EXPIRY = 1e12  # seconds: max_ttl out of reach, whatever the clock says


def _still() -> float:
    return 0.0


@dataclass(frozen=True)
class PolicyCurve:
    """One policy's simulated hit rates at ``sizes`` (entries of the whole trace's scale).

    ``exact``: every access of a full trace was simulated at the size itself; otherwise a
    miniature at ``simulated_rate`` (the sample's rate; each cache ``simulated_rate`` times
    the size).
    """

    policy: str
    sizes: tuple[int, ...]
    hit_rates: tuple[float, ...]
    exact: bool
    simulated_rate: float
    simulated_accesses: int
    adjusted: bool = False  # a miniature's hits corrected to R * N reads (see the module doc)


def simulate(
    trace: Trace,
    policy: str,
    max_entries: int,
    *,
    access_sample_rate: float = DEFAULT_L1_ACCESS_SAMPLE_RATE,
) -> float:
    """The hit rate of an L1 of ``max_entries`` entries read through along ``trace`` (at the
    trace's own scale: no scaling by its sampling rate here)."""
    return _hits(trace, policy, max_entries, access_sample_rate) / len(trace)


def _hits(trace: Trace, policy: str, max_entries: int, access_sample_rate: float) -> int:
    if policy not in L1_POLICIES:
        raise InvalidRequest(f"unknown L1 policy {policy!r}; expected one of "
                             f"{', '.join(L1_POLICIES)}")
    cache: L1Cache[bool] = L1Cache(
        L1Config(policy=policy, max_entries=max_entries, max_ttl=_NO_EXPIRY,
                 access_sample_rate=access_sample_rate),
        clock=_still,
    )
    get, put, view = cache.get_many, cache.put_many, trace.view
    ids: list[EntityId] = trace.ids.tolist()
    hits = 0
    for entity in ids:
        if get(view, (entity,)):
            hits += 1
        else:
            put(view, {entity: True})
    return hits


def policy_curves(
    trace: Trace,
    sizes: Iterable[int],
    policies: Sequence[str] = L1_POLICIES,
    *,
    max_accesses: int = DEFAULT_MAX_ACCESSES,
    access_sample_rate: float = DEFAULT_L1_ACCESS_SAMPLE_RATE,
) -> list[PolicyCurve]:
    """Each policy's hit rate at each size (entries of the whole trace: a sampled trace's
    caches are scaled down by its rate), simulated in miniature past ``max_accesses``, and
    corrected to the whole trace's length when it is known."""
    simulated = trace
    if len(trace) > max_accesses:
        simulated = sample(trace, max_accesses / len(trace))
    rate = simulated.sampling_rate
    exact = simulated.is_full
    scaled: dict[int, int] = {}
    for size in sorted(set(sizes)):
        mini = size if exact else round(size * rate)
        if size >= 1 and (exact or mini >= MIN_MINIATURE):
            scaled[size] = mini
    reads = len(simulated)
    adjusted = not exact and simulated.full_accesses is not None
    expected = rate * simulated.full_accesses if simulated.full_accesses is not None else reads

    def hit_rate(hits: int) -> float:
        if not adjusted:
            return hits / reads
        return min(1.0, max(0.0, (hits + expected - reads) / expected))

    curves = []
    for policy in policies:
        by_mini: dict[int, float] = {}
        for mini in scaled.values():
            if mini not in by_mini:
                by_mini[mini] = hit_rate(_hits(simulated, policy, mini, access_sample_rate))
        curves.append(PolicyCurve(
            policy,
            tuple(scaled),
            tuple(by_mini[mini] for mini in scaled.values()),
            exact,
            rate,
            reads,
            adjusted,
        ))
    return curves
