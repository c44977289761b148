"""The L1 that ``bench l1``, ``bench stampede`` and ``bench invalidation`` give their caches:
the policy and size a serving process would run (``FeatureCache``'s recommended ``tinylfu``)."""

from __future__ import annotations

from featcache import CacheConfig, L1Config

L1_POLICY = "tinylfu"
L1_MAX_ENTRIES = 100_000
#: stampede and invalidation: long enough that only an invalidation drops a row
PROCESS_L1_MAX_TTL = 600.0


def l1_config(base: CacheConfig, max_ttl: float) -> CacheConfig:
    """``base`` with the L1 of ``L1_POLICY`` and ``L1_MAX_ENTRIES``, entries living ``max_ttl``."""
    return base.replace(l1=L1Config(L1_POLICY, L1_MAX_ENTRIES, max_ttl))
