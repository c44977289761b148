"""Connecting to Redis: unix sockets, ACL users, TLS, timeouts; secrets never in messages."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from featdata import STATS_FEATURES, insert, make_cache, make_table, make_view, stats_row
from servers import unavailable

import featcache
from featcache import (
    CacheConfig,
    CacheConfigError,
    ConfigError,
    FeatureCache,
    OfflineStoreConfig,
    RedisConfig,
    Status,
)
from featcache.embedded import EmbeddedServer
from featcache.errors import EmbeddedServerError


@pytest.fixture
def private_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def table_url(sqlite_target: Any) -> str:
    table = make_table(sqlite_target.engine(), None, "conn", STATS_FEATURES)
    insert(sqlite_target.engine(), table, [stats_row(1, clicks=3)])
    return str(sqlite_target.url)


def _cache(redis_url: str, sql_url: str, **options: Any) -> FeatureCache:
    return make_cache([make_view("conn", "conn", None)], redis_url, sql_url, "fct-conn",
                      **options)


def test_unix_socket_url(private_server: EmbeddedServer, table_url: str) -> None:
    with _cache(f"unix://{private_server.unix_socket}?db=0", table_url) as fc:
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS


def test_acl_user_and_password(private_server: EmbeddedServer, table_url: str) -> None:
    admin = redis.Redis.from_url(private_server.url)
    admin.acl_setuser("app", enabled=True, passwords=["+s3cr3t-pw"], keys=["fct-conn:*"],
                      commands=["+@all"])
    port = private_server.port
    with _cache(f"redis://app:s3cr3t-pw@127.0.0.1:{port}/0", table_url) as fc:
        fc.get_features([1], ["clicks"])
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS
    admin.close()


def _acl_user(server: EmbeddedServer, name: str, password: str, *rules: str) -> str:
    """An ACL user on the private server; returns the URL that logs in as it."""
    admin = redis.Redis.from_url(server.url)
    try:
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    finally:
        admin.close()
    return f"redis://{name}:{password}@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("url_of", [
    pytest.param(lambda s: f"redis://app:wrong-pw@127.0.0.1:{s.port}/0", id="wrong-password"),
    pytest.param(lambda s: f"redis://nobody:wrong-pw@127.0.0.1:{s.port}/0", id="unknown-user"),
    pytest.param(lambda s: f"redis://127.0.0.1:{s.port}/99", id="database-out-of-range"),
    pytest.param(lambda s: _acl_user(s, "others", "pw-o", "~other:*", "+@all"),
                 id="keys-not-permitted"),
    pytest.param(lambda s: _acl_user(s, "nomget", "pw-m", "~fct-conn:*", "+@all", "-mget"),
                 id="read-not-permitted"),
])
def test_a_refused_configuration_fails_at_construction(
    private_server: EmbeddedServer, table_url: str, url_of: Any
) -> None:
    """Wrong credentials, ACL rules that forbid what featcache needs, a database the server
    does not have: configuration errors, raised at once with the URL masked, instead of a
    cache that sends every call to SQL for its whole life."""
    _acl_user(private_server, "app", "s3cr3t-pw", "~fct-conn:*", "+@all")
    url = url_of(private_server)
    with pytest.raises(CacheConfigError) as err:
        _cache(url, table_url)
    assert isinstance(err.value, ConfigError) and err.value.path == "redis.url"
    assert "wrong-pw" not in str(err.value) and "pw-" not in str(err.value)
    if "nomget" in url:  # invalidating needs no MGET: the ETL hook may run as this user
        assert featcache.invalidate("conn", [1], config=_config(url, table_url)).entities == 1
    else:
        with pytest.raises(CacheConfigError):
            featcache.invalidate("conn", [1], config=_config(url, table_url))


def test_a_password_changed_under_a_running_cache_fails_every_call(
    private_server: EmbeddedServer, table_url: str
) -> None:
    """Met mid-life (the password rotated, the ACL changed), the refusal is raised by the
    calls that meet it, reads included: not answered from SQL as an outage would be."""
    url = _acl_user(private_server, "app", "s3cr3t-pw", "~fct-conn:*", "+@all")
    with _cache(url, table_url) as fc:
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        _acl_user(private_server, "app", "rotated-pw", "~fct-conn:*", "+@all")
        admin = redis.Redis.from_url(private_server.url)
        try:
            assert admin.execute_command("CLIENT", "KILL", "USER", "app") >= 1
        finally:
            admin.close()
        for _ in range(3):  # every call, not only the first: nothing degrades to SQL
            with pytest.raises(CacheConfigError):
                fc.get_features([1], ["clicks"])
        with pytest.raises(CacheConfigError):
            fc.invalidate("conn", [1])
        with pytest.raises(CacheConfigError):
            fc.put_rows("conn", [stats_row(1)])
        assert fc.stats()["conn"]["redis_errors"] == 0


@pytest.mark.parametrize("path", ["/abc", "/0x1", "/1/2", "/-1"])
def test_a_database_that_is_not_a_number_is_a_config_error(table_url: str, path: str) -> None:
    """redis-py reads ``/abc`` as database 0: featcache refuses it instead."""
    with pytest.raises(ConfigError, match="database number") as err:
        _cache(f"redis://user:topsecret@127.0.0.1:6379{path}", table_url)
    assert "topsecret" not in str(err.value)


def test_an_outage_at_construction_is_not_a_config_error(table_url: str) -> None:
    """Nothing listening: the cache starts and answers from SQL, as it does mid-life."""
    with _cache(f"redis://127.0.0.1:{_free_port()}/0", table_url,
                redis_connect_timeout=0.5) as fc:
        assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
        assert fc.stats()["conn"]["redis_errors"] == 1


def test_an_error_reply_to_the_read_is_redis_unavailable(
    private_server: EmbeddedServer, table_url: str
) -> None:
    """A server that answers the batch read with an error reply of a server that cannot serve
    now (BUSY: a script ran past busy-reply-threshold) is a Redis failure like a lost
    connection: the call answers from SQL and counts the error; nothing reads the error reply
    as values."""
    admin = redis.Redis.from_url(private_server.url)
    admin.config_set("busy-reply-threshold", 50)
    busy = redis.Redis.from_url(private_server.url)
    spinning = threading.Thread(
        target=lambda: _swallow(lambda: busy.eval("while true do end", 0)), daemon=True
    )
    try:
        with _cache(private_server.url, table_url) as fc:
            spinning.start()
            _wait_until_busy(private_server)
            result = fc.get_features([1], ["clicks"])
            assert result.status(1, "clicks") is Status.FILLED and result[1]["clicks"] == 3
            assert fc.stats()["conn"]["redis_errors"] == 1
    finally:
        killer = redis.Redis.from_url(private_server.url)
        _swallow(killer.script_kill)
        spinning.join(10)
        killer.close()
        busy.close()
        admin.close()


def _swallow(call: Any) -> None:
    with contextlib.suppress(redis.RedisError):
        call()


def _wait_until_busy(server: EmbeddedServer) -> None:
    probe = redis.Redis.from_url(server.url)
    try:
        for _ in range(200):
            try:
                probe.ping()
            except redis.exceptions.BusyLoadingError:
                continue
            except redis.ResponseError as exc:
                if "BUSY" in str(exc):
                    return
                raise
            time.sleep(0.01)
        raise AssertionError("the script never made the server BUSY")
    finally:
        probe.close()


def _config(redis_url: str, sql_url: str) -> CacheConfig:
    return CacheConfig(views=(make_view("conn", "conn", None),),
                       redis=RedisConfig(url=redis_url, key_prefix="fct-conn"),
                       offline_store=OfflineStoreConfig(url=sql_url))


def test_bad_scheme_is_a_config_error(table_url: str) -> None:
    with pytest.raises(ConfigError, match="redis://") as err:
        _cache("http://user:topsecret@localhost:6379", table_url)
    assert "topsecret" not in str(err.value)


def test_slow_redis_is_bounded_by_socket_timeout(private_server: EmbeddedServer,
                                                 table_url: str) -> None:
    """A stopped (SIGSTOP) server accepts nothing: the call falls back to SQL, no exception."""
    with _cache(private_server.url, table_url, redis_socket_timeout=0.2,
                redis_connect_timeout=0.2) as fc:
        fc.get_features([1], ["clicks"])
        os.kill(private_server.pid, signal.SIGSTOP)
        try:
            result = fc.get_features([1], ["clicks"])
        finally:
            os.kill(private_server.pid, signal.SIGCONT)
        assert result.status(1, "clicks") is Status.FILLED
        assert fc.stats()["conn"]["redis_errors"] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tls_server(tmp: Path) -> tuple[EmbeddedServer, int, Path]:
    """A private server of the machine's redis-server (or valkey-server) with a TLS port.

    The embedded Valkey is built without TLS, so out of the box this skips; where the run
    requires redis (CI's second run, on a machine with its own Redis) a missing or TLS-less
    binary fails the test instead."""
    redis_server = shutil.which("redis-server") or shutil.which("valkey-server")
    openssl = shutil.which("openssl")
    if not redis_server or not openssl:
        unavailable("redis", "the TLS test needs openssl and a redis-server/valkey-server "
                             "built with TLS on PATH")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    tls_port = _free_port()
    server = EmbeddedServer(
        binary=redis_server,
        extra_args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-auth-clients", "no"),
    )
    try:
        server.start()
    except EmbeddedServerError as exc:  # a server built without TLS refuses the options
        unavailable("redis", f"{redis_server} cannot serve TLS: {exc}")
    return server, tls_port, cert


@pytest.mark.machine
def test_rediss_tls_url(tmp_path: Path, table_url: str) -> None:
    server, tls_port, cert = _tls_server(tmp_path)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        with _cache(url, table_url) as fc:
            assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
            assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS
        # without trusting the certificate the TLS handshake fails: reads fall back to SQL
        with _cache(f"rediss://127.0.0.1:{tls_port}/0", table_url,
                    redis_connect_timeout=1.0) as fc:
            assert fc.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
            assert fc.stats()["conn"]["redis_errors"] == 1
    finally:
        server.stop()
