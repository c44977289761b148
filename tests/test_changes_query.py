"""Follow changes through a configured change query (``warmer.follow_changes.views.<view>
.change_query``) on every SQL dialect: it drives the rewrites and the L1 notifications instead
of the view's ``updated_at``, keeps the rows of the watermark's timestamp, survives a restart,
and a bad query fails at start (or, for its columns, at first use) naming its config key."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import sqlalchemy as sa
import yaml
from apscheduler.schedulers.background import BackgroundScheduler
from featcache.jobs.changes import ChangeQuery, follow_changes, load_watermark
from featcache.jobs.warmer import Warmer, build_scheduler
from featdata import T0, TIMESTAMP, insert, stats_row, with_options
from servers import SqlTarget
from warmerenv import CLI, HOUR, cv_env, write_config

from featcache import (
    ConfigError,
    FeatureCache,
    FollowChangesConfig,
    SchemaError,
    Status,
    WarmerConfig,
    load_config,
)
from featcache.keys import KeyLayout

QUERY_PATH = "warmer.follow_changes.views.cv.change_query"


@pytest.fixture
def audit_env(sql_target: SqlTarget, redis_url: str, key_prefix: str,
              tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``cv_env`` plus an audit table ``cv_audit(entity_id, changed_at)`` the ETL appends to."""
    with cv_env(sql_target, redis_url, key_prefix, tmp_path) as env:
        audit = sa.Table("cv_audit", sa.MetaData(schema=sql_target.schema),
                         sa.Column("entity_id", sa.BigInteger()),
                         sa.Column("changed_at", TIMESTAMP))
        audit.create(env["engine"])
        qualified = f"{sql_target.schema}.cv_audit" if sql_target.schema else "cv_audit"
        env.update(audit=audit, audit_name=qualified)
        yield env


def _query(env: dict[str, Any], select: str = "entity_id, changed_at AS updated_at") -> str:
    return f"SELECT {select} FROM {env['audit_name']} WHERE changed_at >= :watermark"


def _settings_query(env: dict[str, Any], view: str = "cv", **select: str) -> ChangeQuery:
    """The query as the warmer gets it: from the ``warmer:`` section of its config."""
    config = env["cache"].config.replace(warmer=WarmerConfig(
        follow_changes=FollowChangesConfig(change_queries={view: ChangeQuery(
            _query(env, **select))})))
    assert config.warmer.follow_changes is not None
    return config.warmer.follow_changes.change_queries[view]


def _changed_sql(env: dict[str, Any], entity: int, clicks: int) -> None:
    """Change a row *without* bumping updated_at: only the audit table can reveal it."""
    table = env["table"]
    with env["engine"].begin() as conn:
        conn.execute(table.update().where(table.c.entity_id == entity).values(clicks=clicks))


def _audit(env: dict[str, Any], *changes: tuple[int, dt.datetime]) -> None:
    insert(env["engine"], env["audit"], [{"entity_id": e, "changed_at": t} for e, t in changes])


def test_a_change_query_drives_rewrites_and_l1_notifications(
    audit_env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    env = audit_env
    cache: FeatureCache = env["cache"]
    query = _settings_query(env)
    first = follow_changes(cache, "cv", change_query=query, start="all")  # nothing audited
    assert (first.leader, first.changed, first.watermark) == (True, 0, None)
    assert [cache.get_features([i], ["clicks"]).status(i, "clicks") for i in (1, 2)] == [
        Status.FILLED, Status.FILLED]
    _changed_sql(env, 2, 222)
    _changed_sql(env, 3, 333)
    t1 = T0 + HOUR
    _audit(env, (2, T0 + dt.timedelta(minutes=5)), (2, t1), (3, t1))  # 2 twice: latest wins
    stream = KeyLayout(key_prefix).stream_key()
    before = redis_client.xlen(stream)

    report = follow_changes(cache, "cv", change_query=query, start="all")  # still none
    assert (report.changed, report.rewritten, report.not_cached) == (2, 1, 1)
    assert report.watermark == t1.isoformat()
    result = cache.get_features([1, 2, 3], ["clicks"])
    assert result.status(2, "clicks") is Status.HIT_REDIS and result[2]["clicks"] == 222
    assert result.status(3, "clicks") is Status.FILLED and result[3]["clicks"] == 333
    assert result.status(1, "clicks") is Status.HIT_REDIS and result[1]["clicks"] == 7
    entries = redis_client.xrange(stream)[before:]
    assert len(entries) == 1 and entries[0][1][b"k"] == b"ids"
    assert sorted(msgpack.unpackb(entries[0][1][b"ids"])) == [2, 3]
    # the view's own updated_at did not move, and is not what was polled
    assert follow_changes(cache, "cv", change_query=query).changed == 0


def test_a_deletion_reported_by_the_change_query_is_invalidated_in_redis(
    audit_env: dict[str, Any]
) -> None:
    """An audit table can report what an updated_at poll cannot see, a deleted entity: its
    cached row is invalidated, so readers get ABSENT from SQL instead of the deleted values
    until the row's TTL."""
    env = audit_env
    cache: FeatureCache = env["cache"]
    query = _settings_query(env)
    follow_changes(cache, "cv", change_query=query, start="all")
    assert cache.get_features([1, 2], ["clicks"]).status(1, "clicks") is Status.FILLED
    table = env["table"]
    with env["engine"].begin() as conn:
        conn.execute(table.delete().where(table.c.entity_id == 1))
    _audit(env, (1, T0 + HOUR), (2, T0 + HOUR))
    report = follow_changes(cache, "cv", change_query=query, start="all")  # still none
    assert (report.changed, report.rewritten, report.deleted) == (2, 1, 1)
    result = cache.get_features([1, 2], ["clicks"])
    assert result.status(1, "clicks") is Status.ABSENT and result[1]["clicks"] is None
    assert result.status(2, "clicks") is Status.HIT_REDIS


def test_a_change_query_keeps_rows_sharing_the_watermark_timestamp(
    audit_env: dict[str, Any], redis_client: redis.Redis, key_prefix: str
) -> None:
    env = audit_env
    query = _settings_query(env)
    t1 = T0 + 2 * HOUR + dt.timedelta(microseconds=654_321)
    _audit(env, (11, t1), (12, t1))
    insert(env["engine"], env["table"], [stats_row(i, T0 + HOUR) for i in (11, 12, 13)])
    with FeatureCache.from_config(env["path"]) as cache:
        report = follow_changes(cache, "cv", rewrite="all", change_query=query, start="all")
        assert (report.changed, report.rewritten) == (2, 2)
        mark = load_watermark(cache, "cv")
        assert mark is not None and mark.when == t1 and mark.ids == {11, 12}

    _audit(env, (13, t1), (11, t1))  # committed later at the same time; 11 already done
    redis_client.delete(KeyLayout(key_prefix).row_key("cv", 11))
    with FeatureCache.from_config(env["path"]) as restarted:  # resumes from Redis
        report = follow_changes(restarted, "cv", rewrite="all", change_query=query)
        assert (report.changed, report.rewritten) == (1, 1)  # only 13
        assert not redis_client.exists(KeyLayout(key_prefix).row_key("cv", 11))
        mark = load_watermark(restarted, "cv")
        assert mark is not None and mark.when == t1 and mark.ids == {11, 12, 13}
        assert follow_changes(restarted, "cv", change_query=query).changed == 0


@pytest.mark.parametrize(("select", "message"), [
    ("entity_id AS id, changed_at AS updated_at", "it must return entity_id and updated_at"),
    ("'nope' AS entity_id, changed_at AS updated_at", "expected an entity id"),
])
def test_a_change_query_with_wrong_columns_fails_at_first_use_with_the_path(
    audit_env: dict[str, Any], select: str, message: str
) -> None:
    env = audit_env
    _audit(env, (1, T0 + HOUR))
    query = _settings_query(env, select=select)
    with pytest.raises(SchemaError, match=message) as caught:
        follow_changes(env["cache"], "cv", change_query=query, start="all")
    assert caught.value.path == QUERY_PATH
    assert load_watermark(env["cache"], "cv") is None


@pytest.mark.parametrize(("query", "path", "message"), [
    ("SELECT entity_id, updated_at FROM cv", QUERY_PATH, "no :watermark parameter"),
    ("SELECT entity_id, updated_at FROM cv WHERE updated_at >= :since", QUERY_PATH,
     "no :watermark parameter"),
    ("SELECT entity_id, updated_at FROM cv WHERE updated_at >= :watermark AND x = :other",
     QUERY_PATH, "unknown parameters :other"),
    ("DELETE FROM cv WHERE updated_at >= :watermark", QUERY_PATH, "single SELECT"),
    ("SELECT 1 AS entity_id, :watermark AS updated_at; DROP TABLE cv", QUERY_PATH,
     "one SELECT statement"),
    ("", QUERY_PATH, "expected a SELECT statement"),
    (None, QUERY_PATH, "expected a SELECT statement"),
])
def test_a_bad_change_query_fails_at_start_with_the_path(
    tmp_path: Path, redis_url: str, key_prefix: str, query: str | None, path: str, message: str
) -> None:
    warmer = yaml.safe_dump({"warmer": {"follow_changes": {"views": {"cv": {
        "change_query": query}}}}})
    config_path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, "sqlite://", warmer)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config_path)
    assert caught.value.path == path


@pytest.mark.parametrize(("follow", "path", "message"), [
    ("{views: {nope: {change_query: 'SELECT 1'}}}", "warmer.follow_changes.views.nope",
     "not a view this warmer runs"),
    ("{views: {cv: {query: 'SELECT 1'}}}", "warmer.follow_changes.views.cv.query",
     "unknown key"),
    ("{views: {cv: {change_query: 'SELECT entity_id FROM cv'}}}", QUERY_PATH,
     "no :watermark parameter"),
])
def test_the_warmer_command_rejects_a_bad_change_query_before_touching_a_server(
    tmp_path: Path, redis_url: str, key_prefix: str, follow: str, path: str, message: str
) -> None:
    config_path = write_config(tmp_path / "c.yaml", redis_url, key_prefix, "sqlite://",
                               f"warmer: {{follow_changes: {follow}}}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config_path)
    assert caught.value.path == path
    done = subprocess.run(
        [*CLI, "warmer", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 78 and f"{config_path}: {path}: " in done.stderr


def test_a_view_without_updated_at_is_followed_through_its_change_query(
    sqlite_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as env:
        insert(env["engine"], env["plain"], [stats_row(i, ctr=0.5) for i in (1, 2)])
        plain = env["plain"].name
        config = env["cache"].config.replace(warmer=WarmerConfig(
            views=("plain",), follow_changes=FollowChangesConfig(
                rewrite="all", start="all", change_queries={"plain": ChangeQuery(
                    f"SELECT entity_id, event_ts AS updated_at FROM {plain} "
                    "WHERE event_ts >= :watermark")})))
        settings = config.warmer
        jobs = {job.id for job in build_scheduler(env["cache"], settings,
                                                  BackgroundScheduler).get_jobs()}
        assert jobs == {"warm:plain", "changes:plain", "heartbeat"}
        warmer = Warmer(env["cache"], settings)
        try:
            warmer.follow("plain")
        finally:
            warmer.release()
        health = warmer.health["plain/changes"]
        assert (health["rows_total"], health["changed"]) == (2, 2), health
        assert health["watermark"] == T0.isoformat() and "last_error" not in health
        result = env["cache"].get_features([1, 2], ["ctr"])
        assert {result.status(i, "ctr") for i in (1, 2)} == {Status.HIT_REDIS}


def _in_session_time_zone(target: SqlTarget, zone: str) -> str:
    """``target``'s URL with every session in ``zone``, to show no comparison depends on it."""
    url = sa.engine.make_url(target.url)
    if target.name == "postgresql":
        url = url.update_query_dict({"options": f"-c TimeZone={zone}"})
    elif target.name == "mysql":
        url = url.update_query_dict({"init_command": "SET time_zone = '+09:00'"})
    else:  # pragma: no cover - the test runs on the server dialects only
        raise AssertionError(f"{target.name} has no session time zone")
    return url.render_as_string(hide_password=False)


# SQLite has no session time zone: the test is not generated for it (rather than skipped)
@pytest.mark.parametrize("sql_target", ["postgresql", "mysql"], indirect=True)
def test_polls_do_not_depend_on_the_session_time_zone(
    audit_env: dict[str, Any], sql_target: SqlTarget
) -> None:
    env = audit_env
    config = with_options(env["cache"].config,
                          offline_url=_in_session_time_zone(sql_target, "Asia/Tokyo"))
    query = _settings_query(env)
    t1 = T0 + HOUR + dt.timedelta(microseconds=1)
    lookback = dt.timedelta(minutes=5)
    with FeatureCache(config) as cache:
        assert follow_changes(cache, "cv", start="all").changed == 5
        insert(env["engine"], env["table"], [stats_row(7, T0, updated_at=t1)])
        report = follow_changes(cache, "cv")
        assert (report.changed, report.watermark) == (1, t1.isoformat())
        assert follow_changes(cache, "cv").changed == 0  # only 7, at the boundary, again

        cache.redis.delete(cache.layout.watermark_key("cv"))
        _audit(env, (3, t1))
        report = follow_changes(cache, "cv", change_query=query, start="all")
        assert (report.changed, report.watermark) == (1, t1.isoformat())
        # the window re-read behind the watermark starts exactly lookback before it: a shift
        # by the session's offset would take in, or leave out, one of these two
        _audit(env, (4, t1 - lookback - dt.timedelta(microseconds=1)),
               (5, t1 - lookback))
        report = follow_changes(cache, "cv", change_query=query,
                                lookback_s=lookback.total_seconds())
        assert (report.changed, report.late) == (1, 1)
        assert follow_changes(cache, "cv", change_query=query).changed == 0
