"""Follow changes behind the watermark and from where a first poll starts: a transaction that
commits after a poll moved the watermark past the ``updated_at`` it wrote is found by the
lookback window (a real open transaction on PostgreSQL), each change is applied once however
often the window re-reads it, a commit later than the lookback is missed (the documented
bound), and a new warmer's first poll reads the last ``lookback`` only unless told ``start:
all``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.changes import DEFAULT_LOOKBACK_S, follow_changes, load_watermark
from featcache.jobs.warmer import Warmer
from featdata import T0, insert, stats_row
from servers import SqlTarget
from warmerenv import cv_env, update

from featcache import (
    ConfigError,
    FeatureCache,
    FollowChangesConfig,
    InvalidRequest,
    Status,
    WarmerConfig,
    load_config,
)
from featcache.convert import timestamp_to_us

MINUTE = dt.timedelta(minutes=1)
#: the injected "now" of the tests that need an exact one: well after the T0 rows
NOW = T0 + dt.timedelta(days=10)


@pytest.fixture
def env(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
        tmp_path: Path) -> Iterator[dict[str, Any]]:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as built:
        yield built


def _clocked(env: dict[str, Any], now: dt.datetime = NOW) -> FeatureCache:
    """A cache on ``env``'s config whose clock says ``now``."""
    return FeatureCache(load_config(env["path"]), clock=now.timestamp)


def _applied_key(cache: FeatureCache) -> str:
    return cache.layout.applied_changes_key("cv")


# ----------------------------------------------------------------------------- 9. late commits


# the transaction must stay open while another one commits: PostgreSQL's row locks allow it,
# and its now() is the transaction's start, the stamp of the issue; SQLite has one writer
@pytest.mark.parametrize("sql_target", ["postgresql"], indirect=True)
def test_a_transaction_committed_after_the_watermark_passed_its_updated_at_is_followed(
    sql_target: SqlTarget, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    with cv_env(sql_target, redis_url, key_prefix, tmp_path) as env:
        cache: FeatureCache = env["cache"]
        engine: sa.Engine = env["engine"]
        table: sa.Table = env["table"]
        ids = [1, 2, 3, 4, 5]
        follow_changes(cache, "cv")  # the warmer is running
        first = cache.get_features(ids, ["clicks"])
        assert {first.status(i, "clicks") for i in ids} == {Status.FILLED}
        assert {first[i]["clicks"] for i in ids} == {7}

        with engine.connect() as etl:
            transaction = etl.begin()
            # a long ETL transaction: stamps its rows with now(), the transaction's start
            etl.execute(table.update().where(table.c.entity_id.in_(ids))
                        .values(clicks=1000 + table.c.entity_id, updated_at=sa.func.now()))
            stamped = etl.execute(sa.select(sa.func.now())).scalar_one()
            # meanwhile another writer commits a change, and a poll moves the watermark on
            with engine.begin() as conn:
                conn.execute(table.insert().values({**stats_row(6, T0),
                                                    "updated_at": sa.func.now()}))
            assert follow_changes(cache, "cv").changed == 1
            mark = load_watermark(cache, "cv")
            assert mark is not None and mark.when > stamped  # the premise of the defect
            # still not committed: the poll could not see it, the cache serves the old rows
            held = cache.get_features(ids, ["clicks"])
            assert {held.status(i, "clicks") for i in ids} == {Status.HIT_REDIS}
            transaction.commit()

        with engine.connect() as conn:  # committed behind the watermark
            behind = conn.execute(sa.select(sa.func.max(table.c.updated_at))
                                  .where(table.c.entity_id.in_(ids))).scalar_one()
        assert behind == stamped and behind < mark.when

        report = follow_changes(cache, "cv")
        result = cache.get_features(ids, ["clicks"])
        assert [result[i]["clicks"] for i in ids] == [1001, 1002, 1003, 1004, 1005]
        assert {result.status(i, "clicks") for i in ids} == {Status.HIT_REDIS}  # rewritten
        assert (report.changed, report.late, report.rewritten) == (5, 5, 5)
        mark_after = load_watermark(cache, "cv")
        assert mark_after is not None and mark_after.ts_us == mark.ts_us  # it never moves back


def test_the_lookback_applies_each_change_once(
    env: dict[str, Any], redis_client: redis.Redis
) -> None:
    """The window is re-read at every poll; what was applied at the same updated_at is
    skipped: no second tombstone, stream entry or rewrite."""
    cache: FeatureCache = env["cache"]
    engine, table = env["engine"], env["table"]
    follow_changes(cache, "cv", start="all")
    cache.get_features([1, 2, 3], ["clicks"])
    t1 = T0 + dt.timedelta(hours=1)
    update(engine, table, 2, t1, clicks=22)
    update(engine, table, 3, t1 - MINUTE, clicks=33)  # behind 2's, committed with it
    stream = cache.layout.stream_key()
    assert follow_changes(cache, "cv").changed == 2
    entries = redis_client.xlen(stream)
    for _ in range(3):
        report = follow_changes(cache, "cv")
        assert (report.changed, report.rewritten, report.published) == (0, 0, 0)
    assert redis_client.xlen(stream) == entries
    result = cache.get_features([2, 3], ["clicks"])
    assert [result[i]["clicks"] for i in (2, 3)] == [22, 33]
    assert {result.status(i, "clicks") for i in (2, 3)} == {Status.HIT_REDIS}
    # changed again, later: applied again, once
    update(engine, table, 3, t1 + MINUTE, clicks=333)
    assert follow_changes(cache, "cv").changed == 1
    assert follow_changes(cache, "cv").changed == 0


def test_a_commit_later_than_the_lookback_is_missed_and_the_applied_set_is_pruned(
    env: dict[str, Any], redis_client: redis.Redis
) -> None:
    """The documented bound: behind the watermark by less than ``lookback``, found; by more,
    not. And the applied set keeps one window of entries, not every change ever applied."""
    cache: FeatureCache = env["cache"]
    engine, table = env["engine"], env["table"]
    lookback = 10 * MINUTE

    def poll() -> Any:
        return follow_changes(cache, "cv", lookback_s=lookback.total_seconds())

    follow_changes(cache, "cv", start="all")
    cache.get_features([2, 3], ["clicks"])
    mark = T0 + dt.timedelta(hours=1)
    update(engine, table, 1, mark)
    assert poll().changed == 1
    update(engine, table, 2, mark - lookback + MINUTE, clicks=22)  # within: found
    update(engine, table, 3, mark - lookback - MINUTE, clicks=33)  # beyond: missed
    report = poll()
    assert (report.changed, report.late) == (1, 1)
    result = cache.get_features([2, 3], ["clicks"])
    assert (result[2]["clicks"], result[3]["clicks"]) == (22, 7)  # 3: the old row, until
    assert result.status(3, "clicks") is Status.HIT_REDIS         # its max_age
    assert redis_client.zscore(_applied_key(cache), "2") == timestamp_to_us(
        mark - lookback + MINUTE)
    assert redis_client.zscore(_applied_key(cache), "3") is None

    # the watermark moves more than lookback on: 1 and 2 leave the applied set
    later = mark + 2 * lookback
    update(engine, table, 4, later)
    assert poll().changed == 1
    assert redis_client.zrange(_applied_key(cache), 0, -1, withscores=True) == [
        (b"4", float(timestamp_to_us(later)))]
    assert poll().changed == 0


def test_a_lookback_of_zero_keeps_the_rows_of_the_watermark_timestamp(
    env: dict[str, Any]
) -> None:
    cache: FeatureCache = env["cache"]
    follow_changes(cache, "cv", start="all", lookback_s=0)
    update(env["engine"], env["table"], 4, T0 - dt.timedelta(microseconds=1))
    insert(env["engine"], env["table"], [stats_row(7, T0, clicks=77)])  # committed later
    report = follow_changes(cache, "cv", lookback_s=0)
    assert (report.changed, report.late) == (1, 0)  # 7 only
    assert cache.get_features([7], ["clicks"])[7]["clicks"] == 77


def test_a_version_1_watermark_is_resumed(env: dict[str, Any]) -> None:
    """A watermark stored as {"v": 1, "ts_us", "ids"}: its ids count as applied at its time."""
    cache: FeatureCache = env["cache"]
    t0_us = timestamp_to_us(T0)
    cache.redis.set(cache.layout.watermark_key("cv"),
                    f'{{"v":1,"ts_us":{t0_us},"ids":[1,2,3]}}')
    mark = load_watermark(cache, "cv")
    assert mark is not None and (mark.ts_us, mark.ids) == (t0_us, {1, 2, 3})
    report = follow_changes(cache, "cv")
    assert (report.changed, report.late) == (2, 0)  # 4 and 5, at the watermark's time
    mark = load_watermark(cache, "cv")
    assert mark is not None and (mark.ts_us, mark.ids) == (t0_us, {1, 2, 3, 4, 5})
    assert follow_changes(cache, "cv").changed == 0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_lookback_is_refused(env: dict[str, Any], bad: float) -> None:
    with pytest.raises(InvalidRequest, match="lookback_s"):
        follow_changes(env["cache"], "cv", lookback_s=bad)


# ----------------------------------------------------------------------------- 10. first poll


def test_a_first_poll_starts_at_now_minus_the_lookback(
    env: dict[str, Any], redis_client: redis.Redis
) -> None:
    """A new warmer on a table with history reads the last ``lookback`` of it only: no scan
    of everything, no tombstone for every entity not cached."""
    recent = NOW - MINUTE
    insert(env["engine"], env["table"], [stats_row(6, recent, clicks=66)])
    with _clocked(env) as cache:
        report = follow_changes(cache, "cv", rewrite="all")
        assert (report.changed, report.rewritten) == (1, 1)  # 6 only
        layout = cache.layout
        assert [redis_client.exists(layout.row_key("cv", i)) for i in range(1, 7)] == [
            0, 0, 0, 0, 0, 1]
        mark = load_watermark(cache, "cv")
        assert mark is not None and mark.when == NOW  # the start, saved
        assert report.watermark == NOW.isoformat() and report.lag_s == 0.0
        # an older change committed now, within the lookback of the start, is still found
        update(env["engine"], env["table"], 2, NOW - 2 * MINUTE, clicks=22)
        again = follow_changes(cache, "cv", rewrite="all")
        assert (again.changed, again.late) == (1, 1)
        assert cache.get_features([2], ["clicks"])[2]["clicks"] == 22


def test_the_start_is_saved_even_when_the_first_poll_finds_nothing(env: dict[str, Any]) -> None:
    """Otherwise every idle poll would start from its own now, and a change stamped more than
    ``lookback`` before a later poll would never be read."""
    with _clocked(env) as cache:
        assert follow_changes(cache, "cv").changed == 0
        mark = load_watermark(cache, "cv")
        assert mark is not None and mark.when == NOW
    update(env["engine"], env["table"], 3, NOW + MINUTE, clicks=33)
    with _clocked(env, NOW + dt.timedelta(hours=1)) as later:  # an hour on: past the lookback
        assert follow_changes(later, "cv").changed == 1


def test_start_all_reads_the_whole_history(env: dict[str, Any]) -> None:
    with _clocked(env) as cache:
        report = follow_changes(cache, "cv", start="all")
        assert report.changed == 5 and report.watermark == T0.isoformat()
        with pytest.raises(InvalidRequest, match="start must be"):
            follow_changes(cache, "cv", start="beginning")  # type: ignore[arg-type]


def test_the_warmer_takes_lookback_and_start_from_its_config(env: dict[str, Any]) -> None:
    config = env["cache"].config
    follow = config.replace(warmer=WarmerConfig()).warmer.follow_changes
    assert follow is None
    settings = config.replace(warmer=WarmerConfig(follow_changes=FollowChangesConfig())).warmer
    assert settings.follow_changes is not None
    assert (settings.follow_changes.lookback, settings.follow_changes.start) == (
        DEFAULT_LOOKBACK_S, "now")
    settings = config.replace(warmer=WarmerConfig(
        views=("cv",), follow_changes=FollowChangesConfig(lookback="15m", start="all"))).warmer
    assert settings.follow_changes is not None
    assert (settings.follow_changes.lookback, settings.follow_changes.start) == (900.0, "all")

    with _clocked(env) as cache:
        warmer = Warmer(cache, settings)
        try:
            warmer.follow("cv")
        finally:
            warmer.release()
        assert warmer.health["cv/changes"]["changed"] == 5  # start: all


@pytest.mark.parametrize(("follow", "path", "message"), [
    ({"lookback": "soon"}, "warmer.follow_changes.lookback", "expected a duration"),
    ({"lookback": "-5m"}, "warmer.follow_changes.lookback", "expected a duration"),
    ({"start": "yesterday"}, "warmer.follow_changes.start", "'now' or 'all'"),
])
def test_bad_lookback_or_start_settings_fail_with_the_path(
    follow: dict[str, str], path: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        FollowChangesConfig(**follow)  # type: ignore[arg-type]
    assert caught.value.path == path


def test_the_example_config_parses_with_its_warmer_section() -> None:
    config = load_config(Path(__file__).parent.parent / "config" / "featcache.yaml")
    follow = config.warmer.follow_changes
    assert follow is not None
    assert (follow.lookback, follow.start) == (DEFAULT_LOOKBACK_S, "now")
