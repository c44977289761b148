"""The private servers really behave: they answer, clean up, and never outlive their owner.

Both the embedded Valkey (``featcache.embedded``, shipped to users for the demo) and the test
helpers in ``tests/servers.py`` promise that a crashed process leaves nothing running; a
leaked server would hold ports and memory on developer machines and CI runners forever, so
that promise is tested with a real SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa
from childproc import (
    eventually,
    kill_if_running,
    port_closed,
    process_gone,
    sigkill_and_reap,
    spawn_and_read_line,
    wait_gone,
)
from servers import PrivatePostgres, SqlTarget, unavailable, unlink_matching
from sqlalchemy.engine import make_url

from featcache.embedded import EmbeddedServer

_IPC_RMID = 0

# --------------------------------------------------------------------------------------------
# featcache.embedded
# --------------------------------------------------------------------------------------------


def test_embedded_server_answers_ping_over_tcp_and_unix_socket() -> None:
    with EmbeddedServer() as server:
        assert server.port > 0
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        tcp = redis.Redis.from_url(server.url)
        unix = redis.Redis(unix_socket_path=server.unix_socket)
        try:
            assert tcp.ping() is True
            assert unix.ping() is True
            # Both transports reach the same server, not two different ones.
            assert tcp.info("server")["process_id"] == server.pid
            assert unix.info("server")["process_id"] == server.pid
        finally:
            tcp.close()
            unix.close()


def test_embedded_server_stop_removes_process_and_temp_dir() -> None:
    server = EmbeddedServer().start()
    pid, port = server.pid, server.port
    created = psutil.Process(pid).create_time()
    temp_dir = Path(server.unix_socket).parent
    assert temp_dir.is_dir()
    try:
        server.stop()
        assert process_gone(pid, created), "stop() returned while the server still runs"
        assert not temp_dir.exists()
        assert port_closed(port)
        server.stop()  # idempotent: a second stop (e.g. from __exit__) must not raise
    finally:
        kill_if_running(pid, created)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_embedded_server_kill_ends_the_process() -> None:
    with EmbeddedServer() as server:
        pid, port = server.pid, server.port
        created = psutil.Process(pid).create_time()
        server.kill()
        assert process_gone(pid, created)
        assert port_closed(port)


_EMBEDDED_CHILD = textwrap.dedent(
    """
    import time
    from featcache.embedded import EmbeddedServer

    server = EmbeddedServer().start()
    print(server.pid, server.port, server.unix_socket, flush=True)
    time.sleep(600)
    """
)

# Linux's PR_SET_PDEATHSIG fires when the *thread* that forked the server ends: started from a
# thread that has finished (a request handler, a pool worker), the server must still run.
_EMBEDDED_CHILD_FROM_A_THREAD = textwrap.dedent(
    """
    import threading, time
    from featcache.embedded import EmbeddedServer

    started = []
    worker = threading.Thread(target=lambda: started.append(EmbeddedServer().start()))
    worker.start()
    worker.join()
    time.sleep(0.5)  # the death signal, had it been armed by the worker, has been delivered
    server = started[0]
    print(server.pid, server.port, server.unix_socket, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize(
    "child_code", [_EMBEDDED_CHILD, _EMBEDDED_CHILD_FROM_A_THREAD], ids=["main", "thread"]
)
def test_embedded_server_dies_when_its_owner_is_sigkilled(child_code: str) -> None:
    child, line = spawn_and_read_line(child_code)
    pid_text, port_text, unix_socket = line.split()
    pid, port = int(pid_text), int(port_text)
    created = psutil.Process(pid).create_time()
    try:
        probe = redis.Redis(host="127.0.0.1", port=port)
        try:
            assert probe.ping() is True  # it was a real, running server
        finally:
            probe.close()
        sigkill_and_reap(child)
        assert wait_gone(pid, created), f"server {pid} outlived its SIGKILLed owner"
        assert eventually(lambda: port_closed(port)), f"port {port} still accepts"
    finally:
        if child.poll() is None:
            sigkill_and_reap(child)
        kill_if_running(pid, created)
        # SIGKILL gives the owner no chance to remove its temp dir; that is ours to clean.
        temp_dir = Path(unix_socket).parent
        if temp_dir.name.startswith("featcache-valkey-"):
            shutil.rmtree(temp_dir, ignore_errors=True)


_FORKED_CHILD = textwrap.dedent(
    """
    import os, redis, signal
    from featcache.embedded import EmbeddedServer

    with EmbeddedServer() as first:  # the spawner thread now runs in this process...
        pid = os.fork()
        if pid == 0:  # ...but not in its forked child, which must start a server of its own
            signal.alarm(30)  # a child waiting on a spawner it lacks ends, and fails the test
            code = 1
            try:
                with EmbeddedServer() as second:
                    client = redis.Redis.from_url(second.url)
                    code = 0 if client.ping() and second.pid != first.pid else 1
                    client.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_embedded_server_starts_in_a_child_forked_after_one_started() -> None:
    child, line = spawn_and_read_line(_FORKED_CHILD)
    try:
        assert line.strip() == "0", f"the forked child's server failed: exit {line.strip()}"
        child.wait(timeout=30)
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            sigkill_and_reap(child)
        elif child.stdout is not None:
            child.stdout.close()


# --------------------------------------------------------------------------------------------
# tests/servers.py
# --------------------------------------------------------------------------------------------


@pytest.fixture
def private_postgres() -> PrivatePostgres:
    """A not yet started private server; tests own its lifecycle."""
    server = PrivatePostgres.find()
    if server is None:
        unavailable("postgresql", "no PostgreSQL server binaries (initdb, postgres) installed")
    return server


@pytest.mark.machine
def test_private_postgres_runs_unprivileged_on_loopback_and_stop_cleans_up(
    private_postgres: PrivatePostgres,
) -> None:
    server = private_postgres.start()
    pid, port, directory = server.pid, server.port, server.directory
    created = psutil.Process(pid).create_time()
    try:
        if os.geteuid() == 0:
            assert psutil.Process(pid).uids().real == pwd.getpwnam("nobody").pw_uid
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        engine = sa.create_engine(server.url, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW listen_addresses").scalar() == "127.0.0.1"
                assert conn.exec_driver_sql("SHOW fsync").scalar() == "off"
                assert conn.exec_driver_sql("SELECT current_user").scalar() == "postgres"
        finally:
            engine.dispose()
        server.stop()
        assert process_gone(pid, created)
        assert not directory.exists()
        assert port_closed(port)
        server.stop()  # idempotent
    finally:
        server.stop()
        kill_if_running(pid, created)


def _postgres_shmem_id(directory: Path) -> int | None:
    """The SysV shared memory id a postmaster records on line 7 of postmaster.pid.

    PostgreSQL removes its small SysV segment on a clean shutdown only; after a SIGKILL it
    stays behind, so a test that kills one must remove it itself.
    """
    try:
        lines = (directory / "data" / "postmaster.pid").read_text().splitlines()
        return int(lines[6].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _remove_shmem(shmem_id: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.shmctl(shmem_id, _IPC_RMID, None)  # fails harmlessly if already gone


_POSTGRES_CHILD = textwrap.dedent(
    """
    import time
    from servers import PrivatePostgres

    server = PrivatePostgres.find().start()
    print(server.pid, server.port, server.directory, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.machine
def test_private_postgres_dies_when_its_owner_is_sigkilled(
    private_postgres: PrivatePostgres,
) -> None:
    del private_postgres  # only for the skip: the child starts its own server
    child, line = spawn_and_read_line(_POSTGRES_CHILD)
    pid_text, port_text, directory = line.split()
    pid, port = int(pid_text), int(port_text)
    postmaster = psutil.Process(pid)
    # Backends and auxiliary processes must go too (they exit when the postmaster dies).
    family = [(pid, postmaster.create_time())]
    for member in postmaster.children():
        with contextlib.suppress(psutil.NoSuchProcess):  # short-lived workers come and go
            family.append((member.pid, member.create_time()))
    shmem_id = _postgres_shmem_id(Path(directory))
    try:
        assert not port_closed(port)
        sigkill_and_reap(child)
        for member_pid, member_created in family:
            assert wait_gone(member_pid, member_created), f"postgres {member_pid} survived"
        assert eventually(lambda: port_closed(port)), f"port {port} still accepts"
    finally:
        if child.poll() is None:
            sigkill_and_reap(child)
        for member_pid, member_created in family:
            kill_if_running(member_pid, member_created)
        if shmem_id is not None:
            _remove_shmem(shmem_id)
        if Path(directory).name.startswith("featcache-pg-"):
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def after_teardown() -> Iterator[list[Callable[[], None]]]:
    """Checks to run after every other fixture of the test has been torn down.

    A test must request this *before* the fixture whose teardown it checks: pytest sets up
    same-scoped fixtures in signature order and tears them down in reverse.
    """
    checks: list[Callable[[], None]] = []
    yield checks
    for check in checks:
        check()


def _namespace_exists(target: SqlTarget) -> bool:
    """Whether the target's schema (PG) or database (MySQL) exists, asked from outside it."""
    if target.name == "postgresql":
        url, query = target.url, "SELECT count(*) FROM pg_namespace WHERE nspname = :name"
        name = target.schema
    else:
        database = make_url(target.url).database
        url = make_url(target.url).set(database="information_schema").render_as_string(
            hide_password=False
        )
        query = "SELECT count(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :name"
        name = database
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text(query), {"name": name}).scalar())
    finally:
        engine.dispose()


def test_sql_target_can_create_a_table_and_teardown_drops_it(
    after_teardown: list[Callable[[], None]], sql_target: SqlTarget
) -> None:
    metadata = sa.MetaData(schema=sql_target.schema)
    probe = sa.Table(
        "probe",
        metadata,
        sa.Column("entity_id", sa.String(32), primary_key=True),
        sa.Column("score", sa.Float, nullable=False),
    )
    engine = sql_target.engine()
    assert sql_target.engine() is engine  # cached: one pool per test
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(probe.insert(), [{"entity_id": "u1", "score": 0.5}])
    with engine.connect() as conn:
        assert conn.execute(sa.select(probe.c.score)).scalar_one() == 0.5
    assert "probe" in sa.inspect(engine).get_table_names(schema=sql_target.schema)

    if sql_target.name == "sqlite":
        assert sql_target.schema is None
        return  # the file lives in tmp_path, which pytest removes
    if sql_target.name == "postgresql":
        assert sql_target.schema is not None and sql_target.schema.startswith("fct_")
        # Created inside the isolated schema, not in the shared public schema.
        assert "probe" not in sa.inspect(engine).get_table_names(schema="public")
    else:
        assert sql_target.schema is None
        assert str(make_url(sql_target.url).database).startswith("fct_")
    assert _namespace_exists(sql_target)

    def namespace_dropped() -> None:
        assert not _namespace_exists(sql_target), f"{sql_target} survived teardown"

    after_teardown.append(namespace_dropped)


def test_unlink_matching_deletes_only_matching_keys(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    victims = [f"{key_prefix}:victim:{i}" for i in range(1200)]  # several SCAN/UNLINK batches
    keep = [f"{key_prefix}:keep", f"{key_prefix}:victimless"]
    with redis_client.pipeline(transaction=False) as pipe:
        for key in [*victims, *keep]:
            pipe.set(key, b"x")
        pipe.execute()

    assert unlink_matching(redis_client, f"{key_prefix}:victim:*", batch_size=500) == 1200
    assert redis_client.exists(*victims) == 0
    assert redis_client.exists(*keep) == len(keep)  # key_prefix teardown removes these
