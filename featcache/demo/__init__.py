"""``featcache demo``: its options, light enough for the command line's ``--help``.

The demo itself (``featcache.demo.run``: rich tables, a private Valkey server or cluster, a
sample SQLite store built by ``featcache.demo.data``) lives apart from the serving core and is
imported only when the demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLUSTER_PRIMARIES", "CLUSTER_REPLICAS", "DEFAULT_CALLS", "DEFAULT_CURVE",
           "DEFAULT_USERS", "QUICK_CALLS", "QUICK_USERS", "DemoOptions"]

DEFAULT_USERS = 100_000
DEFAULT_CALLS = 15_000
QUICK_USERS = 20_000
QUICK_CALLS = 4_000
#: the private cluster of ``--cluster``: the fewest primaries a Valkey Cluster accepts, and
#: no replicas: the demo makes no failover for one to take over, and on a small machine the
#: replicas' share of the cores is taken from the load being measured (a replica per primary
#: costs a ``--quick`` run about 10% more CPU)
CLUSTER_PRIMARIES = 3
CLUSTER_REPLICAS = 0
#: the picture of the run's hit rate against cache size, in the current directory
DEFAULT_CURVE = "featcache-demo-curve.png"


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's knobs; ``None`` URLs mean "start/create a private one". ``cluster``: Redis
    is a cluster (``redis.mode: cluster``): a private one of ``CLUSTER_PRIMARIES`` primaries,
    or the one ``redis_url`` is a node of. ``curve_path``: where the PNG of the run's hit
    rate against cache size goes (a temporary directory if that cannot be written); ``None``:
    no picture."""

    redis_url: str | None = None
    cluster: bool = False
    offline_url: str | None = None
    users: int = DEFAULT_USERS
    calls: int = DEFAULT_CALLS
    batch: int = 32
    zipf: float = 1.1
    seed: int = 1
    phases: int = 5
    #: phases of the same length after those, with the warmer's jobs running beside the load
    #: (``featcache.demo.warming``); 0: no warmer
    warm_phases: int = 2
    curve_path: str | None = DEFAULT_CURVE
