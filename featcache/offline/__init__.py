"""The SQL store: the one package that runs SQL, and translates its errors (``store.translate``).

* ``store``: ``OfflineStore`` (engine, reflection at first use, the latest-row query of each
  view, ``BoundView``), the conversion of driver values, and ``translate``;
* ``bulk``: the warmer's chunked reads of many entities (``materialize``, ``warm``);
* ``arrow``: the same reads through ADBC as Arrow columns, an accelerator ``bulk`` falls back
  from.

Importing the package loads ``store`` only: ``bulk`` and ``arrow`` bring pyarrow and the ADBC
drivers, which a serving process never needs.
"""

from featcache.offline.store import (
    INSTALLED_DRIVERS,
    OfflineStore,
    RowColumns,
    SqlRow,
    create_engine,
    engine_url,
    safe_url,
)

__all__ = [
    "INSTALLED_DRIVERS",
    "OfflineStore",
    "RowColumns",
    "SqlRow",
    "create_engine",
    "engine_url",
    "safe_url",
]
