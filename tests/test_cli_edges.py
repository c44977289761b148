"""Edges of the CLI, the demo, the embedded server, metrics and URL masking; each test failed
before its fix (the 2026-11-27 review). Real servers only (the private Valkey of the fixtures,
SQLite files); nothing listens on the closed loopback ports used as "down"."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.cli import main
from featdata import STATS_FEATURES, insert, make_cache, make_table, make_view, stats_row
from prometheus_client.registry import CollectorRegistry
from servers import SqlTarget

import featcache.embedded
from featcache import CacheConfig, FeatureCache, OfflineStoreConfig
from featcache.embedded import EmbeddedServer, find_server_binary
from featcache.errors import EmbeddedServerError, OfflineStoreError
from featcache.metrics import CacheCollector

SECRET = "ab/cd"  # a password SQLAlchemy accepts unencoded (its URL grammar stops at '@')


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------- URL masking


def test_config_repr_masks_an_offline_password_containing_a_slash() -> None:
    url = f"postgresql+psycopg://reader:{SECRET}@127.0.0.1:{_closed_port()}/features"
    assert sa.engine.make_url(url).password == SECRET  # SQLAlchemy really uses it as password
    config = CacheConfig(views=(make_view("stats", "stats", None),),
                         offline_store=OfflineStoreConfig(url=url))
    assert SECRET not in repr(config), repr(config)


def test_offline_store_error_masks_a_password_containing_a_slash(
    redis_url: str, key_prefix: str
) -> None:
    url = f"postgresql+psycopg://reader:{SECRET}@127.0.0.1:{_closed_port()}/features"
    with make_cache([make_view("stats", "stats", None)], redis_url, url, key_prefix,
                    sql_connect_timeout=1) as cache, \
            pytest.raises(OfflineStoreError) as caught:
        cache.get_features([1], ["clicks"])
    assert SECRET not in str(caught.value), str(caught.value)


def test_demo_prints_an_offline_password_containing_a_slash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql+psycopg://reader:{SECRET}@127.0.0.1:{_closed_port()}/features"
    assert main(["demo", "--users", "50", "--calls", "5", "--offline-url", url]) == 75
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err, captured.out + captured.err


# ---------------------------------------------------------------------------- CLI errors


def test_demo_offline_url_with_a_bad_port_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # errors.md: a non-numeric port is a ConfigError; the demo lets SQLAlchemy's ValueError out
    assert main(["demo", "--offline-url", "postgresql://u:s3cret@h:badport/db"]) == 78
    err = capsys.readouterr().err
    assert err.startswith("featcache: error: --offline-url: ")
    assert "s3cret" not in err


def test_demo_with_a_large_zipf_exponent_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo draws its curve in the current directory
    # --zipf accepts any finite number; 2.0 ** 2000 overflowed in ZipfSampler (a traceback
    # after the server had started): such a rank is now as good as never drawn
    status = main(["demo", "--users", "50", "--calls", "5", "--zipf", "2000"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Traceback" not in captured.out + captured.err


def test_warmer_health_with_redis_down_is_one_line(
    tmp_path: Path, sqlite_target: SqlTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    make_table(sqlite_target.engine(), None, "stats", STATS_FEATURES)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"redis: {{url: 'redis://:s3cret@127.0.0.1:{_closed_port()}/0', key_prefix: rv}}\n"
        f"offline_store: {{url: '{sqlite_target.url}'}}\n"
        "views:\n  stats:\n    table: stats\n    entity: {column: entity_id, type: int}\n"
        "    event_timestamp: event_ts\n    features:\n      clicks: int, 1h\n"
    )
    assert main(["warmer", "--health", "--config", str(path)]) == 75
    err = capsys.readouterr().err
    assert err.startswith("featcache: error: ") and "s3cret" not in err


# ---------------------------------------------------------------------------- embedded server


def test_embedded_start_on_a_taken_port_does_not_report_success() -> None:
    with EmbeddedServer() as other:
        mine = EmbeddedServer(port=other.port)
        try:
            with contextlib.suppress(EmbeddedServerError):
                mine.start()
                time.sleep(0.3)
                client = redis.Redis.from_url(mine.url)
                try:
                    answered_by = client.info("server")["process_id"]
                finally:
                    client.close()
                # start() returned: the URL must reach the server it started
                assert answered_by == mine.pid, (
                    f"start() succeeded but {mine.url} is pid {answered_by}'s server; "
                    f"ours (pid {mine.pid}) exited"
                )
        finally:
            mine.stop()


def test_embedded_start_retries_when_the_free_port_was_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race start() retries for: another server binds the port free_port() returned.
    with EmbeddedServer() as other:
        ports = iter([other.port])
        real = featcache.embedded.free_port
        monkeypatch.setattr(featcache.embedded, "free_port", lambda: next(ports, None) or real())
        with EmbeddedServer() as mine:
            time.sleep(0.3)
            client = redis.Redis.from_url(mine.url)
            try:
                assert client.info("server")["process_id"] == mine.pid
            finally:
                client.close()


@pytest.fixture
def slow_binary(tmp_path: Path) -> Iterator[str]:
    """A server binary that takes 3 s to come up, so an interrupt lands inside start()."""
    script = tmp_path / "slow-valkey-server"
    script.write_text(f"#!/bin/sh\nsleep 3\nexec {find_server_binary()} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    yield str(script)


@pytest.fixture
def own_tempdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp root of the test's own for ``tempfile`` (the embedded server's directory goes
    there): other runs on the machine create ``featcache-valkey-*`` in the shared one. Short,
    so the server's unix socket path stays within the 108-byte limit."""
    root = Path(tempfile.mkdtemp(prefix="fct-"))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    try:
        yield root
    finally:
        monkeypatch.undo()
        for leftover in sorted(root.rglob("*"), reverse=True):
            (leftover.rmdir if leftover.is_dir() else leftover.unlink)()
        root.rmdir()


def test_embedded_start_interrupted_leaves_no_process(slow_binary: str, own_tempdir: Path
                                                      ) -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    server = EmbeddedServer(binary=slow_binary)
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            server.start()  # Ctrl-C while waiting for the server
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(3.5)  # the server is up by now, if it was left running
    left = [(c.pid, c.create_time()) for c in me.children(recursive=True)
            if c.pid not in before]
    try:
        assert not [pid for pid, created in left if _alive(pid, created)], left
        assert not list(own_tempdir.glob("featcache-valkey-*"))
    finally:
        for pid, created in left:
            if _alive(pid, created):
                os.kill(pid, signal.SIGKILL)  # our own child, by pid
        server.stop()


# ---------------------------------------------------------------------------- metrics


@pytest.fixture
def l1_cache(sqlite_target: SqlTarget, redis_url: str, key_prefix: str) -> Iterator[FeatureCache]:
    engine = sqlite_target.engine()
    insert(engine, make_table(engine, None, "stats", STATS_FEATURES), [stats_row(1)])
    with make_cache([make_view("stats", "stats", None)], redis_url, sqlite_target.url,
                    key_prefix, l1_policy="lru", l1_max_entries=100) as cache:
        yield cache


def test_stream_lag_is_not_exported_as_a_counter_event(l1_cache: FeatureCache) -> None:
    cache = l1_cache
    cache.get_features([1], ["clicks"])
    deadline = time.monotonic() + 10
    while cache.subscriber_stats().get("lag_ms") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.subscriber_stats()["lag_ms"] is not None
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))
    events = {
        sample.labels["event"]
        for family in registry.collect()
        if family.name == "featcache_invalidation_stream_events"
        for sample in family.samples
    }
    documented = {"entries_applied", "views_applied", "ids_applied", "gaps", "resets",
                  "reconnects", "undecodable", "callback_errors"}
    assert events <= documented, f"not counters: {sorted(events - documented)}"
