"""A real SQL outage for the caches of one test: the store stops answering, then answers again.

* **PostgreSQL**: the caches connect as a login role of the test's own (``fct_<hex>``, allowed
  to read the test's schema). ``down()`` sets the role ``NOLOGIN`` and terminates its sessions,
  as an operator locking an application out (or a failover cutting its connections) does:
  every pooled connection is dead and every new one is refused, while the server goes on
  serving everyone else, so the session's private server (or CI's shared one) stays usable.
* **SQLite**, which has no server: ``down()`` puts a directory where the file was (opening it
  fails, and no empty database is created in its place) and drops the caches' pooled
  connections, which would otherwise go on reading the moved file.

``is_down()`` checks with a brand-new connection of the caches' own URL (``refuses``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from servers import SqlTarget

from featcache import FeatureCache

__all__ = ["SqlOutage", "refuses", "sql_outage"]


class SqlOutage:
    """Takes the SQL store of ``target`` down for the caches built on ``url``, and back up."""

    def __init__(self, target: SqlTarget) -> None:
        if target.name not in ("sqlite", "postgresql"):
            raise ValueError(f"no outage for {target.name}: sqlite and postgresql only")
        self.target = target
        self.url = target.url
        self._role = ""
        if target.name == "postgresql":
            self._role = f"fct_{secrets.token_hex(6)}"
            password = secrets.token_hex(12)
            with self._admin() as conn:
                conn.exec_driver_sql(
                    f"CREATE ROLE {self._role} LOGIN PASSWORD '{password}'")
                schema = conn.dialect.identifier_preparer.quote(target.schema or "public")
                conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {self._role}")
                # tables the test creates later (as the admin) are readable too
                conn.exec_driver_sql(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} "
                                     f"GRANT SELECT ON TABLES TO {self._role}")
                conn.exec_driver_sql(
                    f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {self._role}")
            self.url = sa.engine.make_url(target.url).set(
                username=self._role, password=password
            ).render_as_string(hide_password=False)

    @contextlib.contextmanager
    def _admin(self) -> Iterator[sa.Connection]:
        with self.target.engine().begin() as conn:
            yield conn

    def down(self, *caches: FeatureCache) -> None:
        """From now on every SQL read of ``caches`` fails (``OfflineStoreUnavailable``)."""
        if self._role:
            with self._admin() as conn:
                conn.exec_driver_sql(f"ALTER ROLE {self._role} NOLOGIN")
                conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     f"WHERE usename = '{self._role}'")
            return
        path = self._sqlite_path()
        os.replace(path, path.with_name(path.name + ".away"))
        path.mkdir()
        for cache in caches:
            cache.engine.dispose()

    def up(self) -> None:
        """SQL answers again; nothing in the caches is reset."""
        if self._role:
            with self._admin() as conn:
                conn.exec_driver_sql(f"ALTER ROLE {self._role} LOGIN")
            return
        path = self._sqlite_path()
        path.rmdir()
        os.replace(path.with_name(path.name + ".away"), path)

    def is_down(self) -> bool:
        return refuses(self.url)

    def close(self) -> None:
        """Drop the role (its privileges first); the namespace goes with ``target``."""
        if not self._role:
            return
        with self._admin() as conn:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE usename = '{self._role}'")
            conn.exec_driver_sql(f"DROP OWNED BY {self._role}")
            conn.exec_driver_sql(f"DROP ROLE {self._role}")

    def _sqlite_path(self) -> Path:
        database = sa.engine.make_url(self.url).database
        assert database, self.url
        return Path(database)


def refuses(url: str, query: str = "SELECT 1") -> bool:
    """Whether a brand-new connection to ``url`` fails to run ``query`` (checked without
    featcache, so a test can state that SQL really was down)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(query)
        return False
    except sa.exc.OperationalError:
        return True
    finally:
        engine.dispose()


@contextlib.contextmanager
def sql_outage(target: SqlTarget) -> Iterator[SqlOutage]:
    outage = SqlOutage(target)
    try:
        yield outage
    finally:
        outage.close()
