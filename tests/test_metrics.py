"""Prometheus metrics scraped for real over HTTP and parsed with prometheus_client's parser:
the cache's counters after real reads (Redis, SQLite, an L1), the warmer's job health after
real cycles, and ``featcache warmer --metrics-port`` serving both until SIGTERM."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from featcache.jobs.warmer import Warmer, WarmerCollector
from featdata import STATS_FEATURES, T0, insert, make_cache, make_table, make_view, stats_row
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from servers import SqlTarget
from warmerenv import (
    CLI,
    FAST_WARMER,
    cv_env,
    stop_warmer,
    wait_for,
    warmer_process,
    write_config,
)

from featcache import (
    ChangeQuery,
    ConfigError,
    FeatureCache,
    FollowChangesConfig,
    WarmerConfig,
    load_config,
)
from featcache.metrics import CacheCollector, new_registry, serve_metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(url: str) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def l1_cache(sqlite_target: SqlTarget, redis_url: str, key_prefix: str) -> Iterator[FeatureCache]:
    engine = sqlite_target.engine()
    table = make_table(engine, None, "stats", STATS_FEATURES)
    insert(engine, table, [stats_row(i) for i in range(1, 4)])
    view = make_view("stats", "stats", None)
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    l1_policy="lru", l1_max_entries=100) as cache:
        yield cache


def test_scraped_cache_metrics_match_stats_after_real_reads(l1_cache: FeatureCache) -> None:
    cache = l1_cache
    cache.get_features([1, 2, 99], ["clicks"])  # 1, 2 filled from SQL; 99 absent
    cache.get_features([1, 2], ["clicks"])  # from the L1
    cache.get_features([3], ["clicks"])
    ranker = cache.model("ranker", version="v1")
    for _ in range(3):  # computed, then from the L1 twice
        ranker.get_or_compute([1.0, 2.0], compute=lambda xs: [2 * x for x in xs])
    with _served(new_registry(CacheCollector(cache))) as url:
        samples = _scrape(url)
    model = cache.model_stats()[("ranker", "v1")]
    assert model["computed"] == 2 and model["compute_calls"] == 1 and model["hits_l1"] == 4
    for event, count in model.items():
        assert _get(samples, "featcache_model_events_total", model="ranker", version="v1",
                    event=event) == count
    stats = cache.stats()["stats"]
    assert stats["filled"] >= 3 and stats["hit_l1"] >= 2 and stats["absent"] == 1
    for event, count in stats.items():
        assert _get(samples, "featcache_events_total", view="stats", event=event) == count
    l1 = cache.l1
    assert l1 is not None
    for event, count in l1.stats().items():
        name = f"featcache_l1_{event}" if event in ("entries", "max_entries") else None
        if name is not None:
            assert _get(samples, name) == count
        else:
            assert _get(samples, "featcache_l1_events_total", event=event) == count
    assert _get(samples, "featcache_l1_max_entries") == 100
    assert _get(samples, "featcache_invalidation_stream_connected") == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)


def test_a_cache_without_l1_exposes_only_its_counters(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str
) -> None:
    engine = sqlite_target.engine()
    insert(engine, make_table(engine, None, "stats", STATS_FEATURES), [stats_row(1)])
    with make_cache([make_view("stats", "stats", None)], redis_url, sqlite_target.url,
                    key_prefix) as cache:
        cache.get_features([1], ["clicks"])
        cache.get_features([1], ["clicks"])
        registry = new_registry(CacheCollector(cache), process=False)
        with _served(registry) as url:
            samples = _scrape(url)
    assert _get(samples, "featcache_events_total", view="stats", event="hit_redis") == 1
    assert _get(samples, "featcache_events_total", view="stats", event="filled") == 1
    assert not any(name.startswith(("featcache_l1_", "featcache_invalidation_"))
                   for name, _ in samples)
    assert not any(name.startswith("process_") for name, _ in samples)


def test_warmer_health_metrics_after_real_cycles(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as env:
        cache: FeatureCache = env["cache"]
        settings = cache.config.replace(warmer=WarmerConfig(follow_changes=FollowChangesConfig(
            rewrite="all", start="all", change_queries={"plain": ChangeQuery(
                "SELECT entity_id, event_ts AS updated_at FROM no_such_table "
                "WHERE event_ts >= :watermark")}))).warmer
        warmer = Warmer(cache, settings)
        try:
            warmer.follow("cv")  # five rows written
            warmer.follow("cv")  # nothing new
            warmer.warm("cv")  # nobody read anything: nothing to warm
            warmer.follow("plain")  # fails: no such table
        finally:
            warmer.release()
        now = T0.timestamp() + 90.0
        collector = WarmerCollector(warmer, clock=lambda: now)
        with _served(new_registry(collector, process=False)) as url:
            samples = _scrape(url)
    jobs = warmer.job_metrics()

    def metric(name: str, view: str, job: str | None = "changes") -> float | None:
        labels = {"view": view} if job is None else {"view": view, "job": job}
        return _get(samples, f"featcache_warmer_{name}", **labels)

    assert metric("runs_total", "cv") == 2 and metric("runs_total", "cv", "warm") == 1
    assert metric("rows_warmed_total", "cv") == 5 == warmer.health["cv/changes"]["rows_total"]
    assert metric("rows_warmed_total", "cv", "warm") == 0
    assert metric("changed_entities_total", "cv", None) == 5
    assert metric("errors_total", "cv") == 0 and metric("leader", "cv") == 1
    assert metric("watermark_timestamp_seconds", "cv", None) == T0.timestamp()
    assert metric("lag_seconds", "cv", None) == 90.0
    assert metric("last_success_timestamp_seconds", "cv") == jobs["cv", "changes"].last_success_s
    assert metric("last_run_timestamp_seconds", "cv") == jobs["cv", "changes"].last_run_s
    # the failed job: counted, with its run time and no success
    assert metric("errors_total", "plain") == 1 and metric("runs_total", "plain") == 1
    assert metric("last_run_timestamp_seconds", "plain") is not None
    assert metric("last_success_timestamp_seconds", "plain") is None
    assert metric("lag_seconds", "plain", None) is None
    assert warmer.health["plain/changes"]["errors_total"] == 1


@pytest.mark.parametrize(("warmer", "message"), [
    ("warmer: {metrics_port: 70000}\n", "TCP port"),
    ("warmer: {metrics_port: http}\n", "TCP port"),
    ("warmer: {metrics_port: 9108, metrics_addr: ''}\n", "address"),
])
def test_bad_metrics_settings_fail_at_start_with_the_path(
    tmp_path: Path, redis_url: str, key_prefix: str, warmer: str, message: str
) -> None:
    path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, "sqlite://", warmer)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert caught.value.path.startswith("warmer.metrics_")


def test_the_warmer_command_serves_metrics_until_sigterm(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as env:
        path = write_config(tmp_path / "run.yaml", redis_url, key_prefix, env["url"],
                            FAST_WARMER)
        port = _free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        with warmer_process(path, "--metrics-port", str(port)) as proc:
            def warmed() -> bool:
                try:
                    samples = _scrape(url)
                except OSError:
                    return proc.poll() is not None
                rows = _get(samples, "featcache_warmer_rows_warmed_total", view="cv",
                            job="changes")
                return rows == 5
            assert wait_for(warmed), "no cycle ran"
            samples = _scrape(url)
            assert _get(samples, "featcache_warmer_leader", view="cv", job="changes") == 1
            assert (_get(samples, "featcache_warmer_lag_seconds", view="cv") or 0) > 0
            # the warmer's own cache counters: the rows it wrote
            assert _get(samples, "featcache_events_total", view="cv", event="rows_written") == 5
            err = stop_warmer(proc)
        assert proc.returncode == 0, err
        assert f"metrics url=http://127.0.0.1:{port}/metrics" in err
        with pytest.raises(OSError):
            _scrape(url)  # the endpoint went away with the warmer


def test_a_busy_metrics_port_fails_the_start(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as env, \
            socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*CLI, "warmer", "--config", str(env["path"]), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 78, done.stderr  # a ConfigError: pick another port
    assert f"--metrics-port: cannot serve metrics on 127.0.0.1:{port}" in done.stderr


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _served(registry: CollectorRegistry) -> Iterator[str]:
    """A real ``/metrics`` endpoint on a free port (port 0) for the block; yields its URL."""
    server = serve_metrics(registry, 0)
    try:
        yield server.url
    finally:
        server.close()
