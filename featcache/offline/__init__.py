"""The SQL store: the one package that runs SQL, and translates its errors (``store.translate``).

* ``store``: ``OfflineStore`` (engine, reflection at first use, the latest-row query of each
  view, ``BoundView``), the conversion of driver values, and ``translate``;
* ``bulk``: the warmer's chunked reads of many entities (``materialize``, ``warm``);
* ``arrow``: the same reads through ADBC as Arrow columns, an accelerator ``bulk`` falls back
  from;
* ``changes``: the change poll's query (a view's ``updated_at`` column, or a configured change
  query wrapped as a subquery);
* ``text``: the bound parameters of a SQL text, for the configuration's check of a change
  query.

The names below are the store's, resolved on first use (PEP 562): importing the package loads
none of its modules, so the configuration checks a change query with ``text`` without loading
the store (which imports the configuration: no circle), and ``bulk`` and ``arrow`` (pyarrow,
the ADBC drivers) load only where a bulk read runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featcache.offline.store import (
        INSTALLED_DRIVERS,
        EventWindow,
        OfflineStore,
        RowColumns,
        SqlRow,
        create_engine,
        engine_url,
        safe_url,
    )

__all__ = [
    "INSTALLED_DRIVERS",
    "EventWindow",
    "OfflineStore",
    "RowColumns",
    "SqlRow",
    "create_engine",
    "engine_url",
    "safe_url",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'featcache.offline' has no attribute {name!r}")
    value = getattr(importlib.import_module("featcache.offline.store"), name)
    globals()[name] = value  # resolved once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
