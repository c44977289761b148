"""``featcache demo``: its options, light enough for the command line's ``--help``.

The demo itself (``featcache.demo.run``: rich tables, a private Valkey, a sample SQLite store
built by ``featcache.demo.data``) lives apart from the serving core and is imported only when
the demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CALLS", "DEFAULT_USERS", "QUICK_CALLS", "QUICK_USERS", "DemoOptions"]

DEFAULT_USERS = 100_000
DEFAULT_CALLS = 15_000
QUICK_USERS = 20_000
QUICK_CALLS = 4_000


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's knobs; ``None`` URLs mean "start/create a private one"."""

    redis_url: str | None = None
    offline_url: str | None = None
    users: int = DEFAULT_USERS
    calls: int = DEFAULT_CALLS
    batch: int = 32
    zipf: float = 1.1
    seed: int = 1
    phases: int = 5
