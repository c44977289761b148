"""The long-running warmer on real servers: its settings, follow_changes (watermark, boundary
timestamps, restart, L1 notifications, leader lease), the scheduler's jobs and health, and
``featcache warmer`` stopped by SIGTERM."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from featcache.jobs.changes import follow_changes, load_watermark
from featcache.jobs.warmer import build_scheduler, health
from featdata import (
    STATS_FEATURES,
    T0,
    insert,
    key_layout,
    make_cache,
    make_table,
    make_view,
    stats_row,
)
from servers import SqlTarget
from warmerenv import (
    CLI,
    FAST_WARMER,
    HOUR,
    cv_env,
    stop_warmer,
    update,
    wait_for,
    warmer_process,
    write_config,
)

from featcache import (
    ConfigError,
    FeatureCache,
    FollowChangesConfig,
    ScheduleConfig,
    Status,
    WarmerConfig,
    load_config,
)
from featcache.leader import ViewLeader

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology


@pytest.fixture
def env(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
        tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The views on SQLite, for what does not depend on the dialect."""
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as built:
        yield built


@pytest.fixture
def any_env(sql_target: SqlTarget, redis_url: str, key_prefix: str,
            tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The views on every SQL dialect (``sql_target``: SQLite, PostgreSQL, MariaDB/MySQL)."""
    with cv_env(sql_target, redis_url, key_prefix, tmp_path) as built:
        yield built


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("warmer", "path", "message"), [
    ("warmer: {views: [cv, nope]}\n", "warmer.views.nope", "unknown view"),
    ("warmer: {schedule: {cron: '61 * * * *'}}\n", "warmer.schedule.cron",
     "bad cron expression"),
    ("warmer: {schedule: {cron: '* * *'}}\n", "warmer.schedule.cron", "bad cron expression"),
    ("warmer: {jitter: soon}\n", "warmer.jitter", "expected a duration"),
    ("warmer: {schedule: {interval: 0}}\n", "warmer.schedule.interval", "greater than zero"),
    ("warmer: {follow_changes: {interval: -1s}}\n", "warmer.follow_changes.interval",
     "expected a duration"),
    ("warmer: {follow_changes: {rewrite: some}}\n", "warmer.follow_changes.rewrite",
     "'cached' or 'all'"),
    ("warmer: {k: 0}\n", "warmer.k", "integer >= 1"),
    ("warmer: {kk: 3}\n", "warmer.kk", "unknown key"),
    ("warmer: {schedule: {interval: 5s, cron: '* * * * *'}}\n", "warmer.schedule", "not both"),
])
def test_bad_settings_fail_at_start_with_the_path(
    tmp_path: Path, redis_url: str, key_prefix: str, warmer: str, path: str, message: str
) -> None:
    config_path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, "sqlite://", warmer)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config_path)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{config_path}: {path}: ")
    # the command fails the same way, before touching any server
    done = subprocess.run(
        [*CLI, "warmer", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 78 and f"{path}: " in done.stderr and message in done.stderr


def test_settings_defaults_and_values(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", redis_url, key_prefix, "sqlite://"))
    s = config.warmer
    assert (s.views_among(v.name for v in config.views), s.schedule.interval, s.schedule.cron,
            s.k, s.horizon, s.follow_changes) == (("cv", "plain"), 60.0, None, 1000, 60.0, None)
    config = load_config(write_config(
        tmp_path / "d.yaml", redis_url, key_prefix, "sqlite://",
        "warmer:\n  schedule: {cron: '*/5 * * * *'}\n  jitter: 5s\n  misfire_grace: 30s\n"
        "  k: 10000\n  horizon: 5m\n  lease_ttl: 30s\n  views: [cv]\n"
        "  follow_changes: {interval: 30s, rewrite: all}\n",
    ))
    s = config.warmer
    assert (s.views, s.schedule.interval, s.schedule.cron, s.jitter, s.misfire_grace, s.k,
            s.horizon, s.lease_ttl) == (("cv",), None, "*/5 * * * *", 5.0, 30.0, 10000, 300.0, 30.0)
    assert s.follow_changes is not None and (
        s.follow_changes.interval, s.follow_changes.rewrite) == (30.0, "all")


# ----------------------------------------------------------------------------- follow_changes


def test_an_update_reaches_get_features_after_one_poll(
    any_env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    cache: FeatureCache = any_env["cache"]
    first = follow_changes(cache, "cv", start="all")  # every entity, none cached
    assert (first.leader, first.changed, first.rewritten, first.not_cached) == (True, 5, 0, 5)
    assert [cache.get_features([i], ["clicks"]).status(i, "clicks") for i in (1, 2)] == [
        Status.FILLED, Status.FILLED]
    update(any_env["engine"], any_env["table"], 2, T0 + HOUR, clicks=999)
    update(any_env["engine"], any_env["table"], 3, T0 + HOUR, clicks=333)  # not cached
    stream = key_layout(key_prefix).stream_key()
    before = redis_client.xlen(stream)

    report = follow_changes(cache, "cv")
    assert (report.changed, report.rewritten, report.not_cached) == (2, 1, 1)
    result = cache.get_features([1, 2, 3], ["clicks"])
    assert result.status(2, "clicks") is Status.HIT_REDIS and result[2]["clicks"] == 999
    assert result.status(3, "clicks") is Status.FILLED and result[3]["clicks"] == 333
    assert result[1]["clicks"] == 7
    # the L1s were told, in the invalidation stream's format, without a tombstone
    entries = redis_client.xrange(stream)[before:]
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"v"] == b"cv" and fields[b"k"] == b"ids"
    assert sorted(msgpack.unpackb(fields[b"ids"])) == [2, 3]
    assert report.watermark == (T0 + HOUR).isoformat() and report.lag_s is not None


def test_rewrite_all_writes_uncached_entities(env: dict[str, Any]) -> None:
    cache: FeatureCache = env["cache"]
    report = follow_changes(cache, "cv", rewrite="all", start="all")
    assert (report.changed, report.rewritten, report.not_cached) == (5, 5, 0)
    result = cache.get_features([1, 5], ["clicks"])
    assert {result.status(i, "clicks") for i in (1, 5)} == {Status.HIT_REDIS}


def test_rows_sharing_the_watermark_timestamp_are_not_lost(
    any_env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    cache: FeatureCache = any_env["cache"]
    follow_changes(cache, "cv", start="all")  # past the initial rows
    t1 = T0 + 2 * HOUR + dt.timedelta(microseconds=123_457)  # sub-second: no dialect rounds it
    insert(any_env["engine"], any_env["table"],
           [stats_row(i, T0 + HOUR, updated_at=t1) for i in (11, 12, 13)])
    report = follow_changes(cache, "cv", rewrite="all")
    assert (report.changed, report.rewritten) == (3, 3)
    mark = load_watermark(cache, "cv")
    assert mark is not None and mark.when == t1 and mark.ids == {11, 12, 13}

    insert(any_env["engine"], any_env["table"], [stats_row(14, T0 + HOUR, updated_at=t1)])
    redis_client.delete(*key_layout(key_prefix).row_keys("cv", [11, 12, 13]))
    report = follow_changes(cache, "cv", rewrite="all")
    assert (report.changed, report.rewritten) == (1, 1)  # only 14; 11-13 not reprocessed
    assert [bool(redis_client.exists(key_layout(key_prefix).row_key("cv", i)))
            for i in (11, 12, 13, 14)] == [False, False, False, True]
    mark = load_watermark(cache, "cv")
    assert mark is not None and mark.ids == {11, 12, 13, 14}
    assert follow_changes(cache, "cv").changed == 0


def test_the_watermark_survives_a_restart(any_env: dict[str, Any]) -> None:
    with FeatureCache.from_config(any_env["path"]) as first:
        assert follow_changes(first, "cv", start="all").changed == 5
        mark = load_watermark(first, "cv")
    with FeatureCache.from_config(any_env["path"]) as second:  # a new process, in effect
        assert load_watermark(second, "cv") == mark
        assert follow_changes(second, "cv").changed == 0
        update(any_env["engine"], any_env["table"], 4, T0 + HOUR, clicks=44)
        assert follow_changes(second, "cv").changed == 1


def test_string_ids_differing_only_in_case_or_trailing_spaces_are_separate_changes(
    sql_target: SqlTarget, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    engine = sql_target.engine()
    table = make_table(engine, sql_target.schema, "sv", STATS_FEATURES, entity_type="str")
    ids = ["a", "A", "a "]  # one entity under MariaDB's default collation, unless grouped
    insert(engine, table, [stats_row(e, T0 + i * HOUR) for i, e in enumerate(ids)])
    view = make_view("sv", "sv", sql_target.schema, entity_type="str")
    stream = key_layout(key_prefix).stream_key()
    with make_cache([view], redis_url, sql_target.url, key_prefix) as cache:
        report = follow_changes(cache, "sv", start="all")
        assert (report.changed, report.not_cached) == (3, 3)
        entries = redis_client.xrange(stream)
        assert sorted(msgpack.unpackb(entries[-1][1][b"ids"])) == sorted(ids)
        mark = load_watermark(cache, "sv")
        assert mark is not None and mark.ids == {"a "} and mark.when == T0 + 2 * HOUR


def test_a_poll_waits_for_the_leader_lease(env: dict[str, Any]) -> None:
    cache: FeatureCache = env["cache"]
    other = ViewLeader(cache.store, cache.layout, "cv", ttl_s=30, owner="another-warmer")
    assert other.acquire()
    report = follow_changes(cache, "cv")
    assert (report.leader, report.changed) == (False, 0)
    assert load_watermark(cache, "cv") is None
    other.release()
    assert follow_changes(cache, "cv", start="all").changed == 5


# ----------------------------------------------------------------------------- scheduler


def test_build_scheduler_creates_the_jobs(tmp_path: Path, env: dict[str, Any],
                                          redis_url: str, key_prefix: str) -> None:
    config = load_config(write_config(
        tmp_path / "w.yaml", redis_url, key_prefix, env["url"],
        "warmer:\n  schedule: {interval: 60s}\n  jitter: 5s\n  misfire_grace: 30s\n"
        "  follow_changes: {interval: 30s}\n",
    ))
    settings = config.warmer
    scheduler = build_scheduler(env["cache"], settings, BackgroundScheduler)
    jobs = {job.id: job for job in scheduler.get_jobs()}
    # plain has no updated_at; the heartbeat keeps the warmer's health entries alive
    assert set(jobs) == {"warm:cv", "warm:plain", "changes:cv", "heartbeat"}
    for job in jobs.values():
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 30)
        assert isinstance(job.trigger, IntervalTrigger)
        assert job.trigger.jitter == (None if job.id == "heartbeat" else 5.0)
    assert jobs["heartbeat"].trigger.interval == dt.timedelta(
        seconds=scheduler.featcache_warmer.health_ttl_s / 3)
    assert jobs["warm:cv"].trigger.interval == dt.timedelta(seconds=60)
    assert jobs["changes:cv"].trigger.interval == dt.timedelta(seconds=30)

    cron = config.replace(warmer=WarmerConfig(schedule=ScheduleConfig(cron="*/5 * * * *"))).warmer
    jobs = {job.id: job for job in build_scheduler(env["cache"], cron,
                                                   BackgroundScheduler).get_jobs()}
    assert set(jobs) == {"warm:cv", "warm:plain", "heartbeat"}
    assert isinstance(jobs["warm:cv"].trigger, CronTrigger)


def test_a_started_scheduler_runs_cycles_and_records_health(
    env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    cache: FeatureCache = env["cache"]
    config = cache.config.replace(warmer=WarmerConfig(
        schedule=ScheduleConfig(interval="200ms"), views=("cv",),
        follow_changes=FollowChangesConfig(interval="200ms", rewrite="all", start="all"),
    ))
    scheduler = build_scheduler(cache, config.warmer, BackgroundScheduler)
    scheduler.start()
    try:
        assert wait_for(lambda: "cv/changes" in scheduler.featcache_warmer.health
                         and "cv/warm" in scheduler.featcache_warmer.health)
    finally:
        scheduler.shutdown(wait=True)
    scheduler.featcache_warmer.release()
    memory = scheduler.featcache_warmer.health
    assert memory["cv/changes"]["rows_total"] == 5 and "last_success" in memory["cv/changes"]
    stored = health(config)
    jobs = stored["cv"]["jobs"]
    assert jobs["changes"]["rows_total"] == 5 and jobs["changes"]["ok"] is True
    assert jobs["changes"]["lag_s"] > 0
    assert jobs["warm"]["warmer"] == scheduler.featcache_warmer.id
    assert "last_error" not in jobs["warm"]
    assert stored["plain"] == {"leader": None, "jobs": {}, "warmers": {}}
    assert stored["cv"]["warmers"] == {}  # removed by the release
    assert not redis_client.exists(key_layout(key_prefix).leader_key("cv"))


def test_the_warmer_command_stops_cleanly_on_sigterm(
    env: dict[str, Any], tmp_path: Path, redis_url: str, key_prefix: str,
    redis_client: redis.Redis,
) -> None:
    path = write_config(tmp_path / "run.yaml", redis_url, key_prefix, env["url"], FAST_WARMER)
    with warmer_process(path) as proc:
        key = key_layout(key_prefix).health_key("cv")
        assert wait_for(lambda: redis_client.hexists(key, "changes.last_success")
                         or proc.poll() is not None), "no cycle ran"
        err = stop_warmer(proc)
    assert proc.returncode == 0, err
    assert "warmer stopped" in err and "Traceback" not in err
    assert not redis_client.exists(key_layout(key_prefix).leader_key("cv"))
    assert env["cache"].get_features([3], ["clicks"]).status(3, "clicks") is Status.HIT_REDIS

    done = subprocess.run([*CLI, "warmer", "--health", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    views = json.loads(done.stdout)["views"]
    jobs = views["cv"]["jobs"]
    assert jobs["changes"]["rows_total"] == 5 and "last_success" in jobs["warm"]
    assert views["cv"]["leader"] is None and views["cv"]["warmers"] == {}  # stopped cleanly


class _TakenOverAfterFirstChunk(ViewLeader):
    """A leader whose lease another warmer takes (for real, in Redis) once it has done one
    chunk: its next renew fails as it would in production."""

    renewals = 0

    def renew(self) -> bool:
        self.renewals += 1
        if self.renewals == 2:
            self._store.client.set(self.key, "another-warmer", px=self.ttl_ms)
        return super().renew()


def test_a_cycle_that_lost_its_lease_part_way_is_no_success_in_health(
    env: dict[str, Any], key_prefix: str
) -> None:
    cache: FeatureCache = env["cache"]
    config = cache.config.replace(warmer=WarmerConfig(
        views=("cv",), chunk_rows=1,
        follow_changes=FollowChangesConfig(interval="1s", start="all")))
    warmer = build_scheduler(cache, config.warmer, BackgroundScheduler).featcache_warmer
    store = warmer.leaders["cv"]._store
    warmer.leaders["cv"] = _TakenOverAfterFirstChunk(store, key_layout(key_prefix), "cv", 30.0)
    warmer.follow("cv")
    kept = warmer.health["cv/changes"]
    assert kept["complete"] is False and kept["leader"] is False
    assert kept["changed"] == 1 and "last_success" not in kept
    assert warmer.job_metrics()[("cv", "changes")].last_success_s is None
    stored = health(config)["cv"]
    # it led the view for a chunk: the view's record shows the cycle, unfinished
    assert stored["jobs"]["changes"]["complete"] is False
    assert "last_success" not in stored["jobs"]["changes"]
    assert stored["leader"] == "another-warmer"
    mine = stored["warmers"][warmer.id]["jobs"]["changes"]
    assert mine["complete"] is False and mine["leader"] is False
