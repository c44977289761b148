"""SQL text as SQLAlchemy binds it: the names of its bound parameters (``:name``).

Its own module, importing nothing of featcache: the configuration checks a change query
(``featcache.config_warmer.ChangeQuery``) with the parser that later binds it
(``featcache.offline.changes``), at load time and without a database.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["bound_parameters"]


def bound_parameters(sql: str) -> set[str]:
    """The names of the bound parameters in ``sql``, as ``sqlalchemy.text`` reads them when
    it binds the query (a ``:name`` inside a string literal too)."""
    return set(sa.text(sql).compile().params)
