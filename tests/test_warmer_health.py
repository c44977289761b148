"""The warmer's health with several warmers on one view: the view's record shows its leader
and the outcome of the leader's last cycle (a standby's skipped cycle never hides it), every
warmer has its own entry, and a dead warmer's entry expires; the Prometheus collector says the
same; two ``featcache warmer`` processes show up as leader and standby in ``--health``."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from featcache.jobs.warmer import Warmer, WarmerCollector, health
from servers import SqlTarget
from warmerenv import CLI, FAST_WARMER, cv_env, stop_warmer, wait_for, warmer_process, write_config

from featcache import FeatureCache, FollowChangesConfig, WarmerConfig
from featcache.config import CacheConfig


@pytest.fixture
def env(sqlite_target: SqlTarget, redis_url: str, key_prefix: str,
        tmp_path: Path) -> Iterator[dict[str, Any]]:
    with cv_env(sqlite_target, redis_url, key_prefix, tmp_path) as built:
        built["config"] = built["cache"].config.replace(warmer=WarmerConfig(
            views=("cv",), follow_changes=FollowChangesConfig(rewrite="all", start="all")))
        yield built


def _warmer(env: dict[str, Any], **options: Any) -> Warmer:
    return Warmer(env["cache"], env["config"].warmer, **options)


def _when(iso_and_more: str) -> dt.datetime:
    """The time of a health time field (``last_error`` is the time, then the error)."""
    return dt.datetime.fromisoformat(iso_and_more.split(" ", 1)[0])


def _samples(collector: WarmerCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}


def test_the_view_shows_its_leader_and_the_outcome_of_the_leaders_last_cycle(
    env: dict[str, Any]
) -> None:
    config: CacheConfig = env["config"]
    leader, standby = _warmer(env), _warmer(env)
    try:
        leader.follow("cv")  # takes the lease: five rows rewritten
        standby.follow("cv")  # skipped: the view has a leader
        view = health(config)["cv"]
        assert view["leader"] == leader.id
        assert view["jobs"]["changes"]["warmer"] == leader.id
        assert (view["jobs"]["changes"]["rows_last"], view["jobs"]["changes"]["rows_total"],
                view["jobs"]["changes"]["ok"]) == (5, 5, True)
        own = view["warmers"]
        assert set(own) == {leader.id, standby.id}
        assert (own[leader.id]["jobs"]["changes"]["leader"],
                own[leader.id]["jobs"]["changes"]["rows_total"]) == (True, 5)
        assert (own[standby.id]["jobs"]["changes"]["leader"],
                own[standby.id]["jobs"]["changes"]["rows_total"]) == (False, 0)

        # the leader now fails every cycle (its SQL table is gone); the standby keeps
        # skipping, successfully, in between
        with env["engine"].begin() as conn:
            conn.execute(sa.text("ALTER TABLE cv RENAME TO cv_gone"))
        for _ in range(2):
            leader.follow("cv")
            standby.follow("cv")
        view = health(config)["cv"]
        changes = view["jobs"]["changes"]
        assert view["leader"] == leader.id and changes["warmer"] == leader.id
        assert changes["ok"] is False and changes["errors_total"] == 2
        assert _when(changes["last_error"]) > _when(changes["last_success"])
        assert changes["rows_total"] == 5
        # what a reader of one warmer's entry would have seen: the standby's fresh success
        mine = view["warmers"][standby.id]["jobs"]["changes"]
        assert mine["ok"] is True and _when(mine["last_success"]) > _when(changes["last_error"])
        assert view["warmers"][leader.id]["jobs"]["changes"]["errors_total"] == 2

        # Prometheus, the same story: the max over warmers of the leader success is stale
        led, skipped = _samples(WarmerCollector(leader)), _samples(WarmerCollector(standby))
        labels = (("job", "changes"), ("view", "cv"))
        name = "featcache_warmer_leader_last_success_timestamp_seconds"
        assert (name, labels) not in skipped
        assert led[name, labels] < led["featcache_warmer_last_error_timestamp_seconds", labels]
        assert skipped["featcache_warmer_last_success_timestamp_seconds", labels] > led[
            "featcache_warmer_last_error_timestamp_seconds", labels]
        assert led["featcache_warmer_info", (("warmer", leader.id),)] == 1
    finally:
        leader.release()
        standby.release()


def test_a_warmers_own_entry_has_a_ttl_and_a_dead_warmers_entry_goes(
    env: dict[str, Any], redis_client: redis.Redis
) -> None:
    cache: FeatureCache = env["cache"]
    live = _warmer(env, health_ttl_s=3.0)
    dead = _warmer(env, health_ttl_s=0.5)  # never released: as if killed
    own = cache.layout.warmer_key("cv", live.id)
    registry = cache.layout.warmers_key("cv")
    try:
        live.follow("cv")
        dead.follow("cv")
        assert 0 < redis_client.pttl(own) <= 3000
        assert 2000 < redis_client.pttl(registry) <= 3000  # the longest entry's, not the last
        assert redis_client.pttl(cache.layout.health_key("cv")) == -1
        listed = health(env["config"])["cv"]["warmers"]
        assert set(listed) == {live.id, dead.id}
        assert listed[live.id]["started"] == live.started

        # the dead warmer's entry expires; the live one's writes drop its id from the list
        def only_live() -> bool:
            live.heartbeat()
            return (set(health(env["config"])["cv"]["warmers"]) == {live.id}
                    and redis_client.zscore(registry, dead.id) is None)

        assert wait_for(only_live, 15.0)
        assert redis_client.zscore(registry, live.id) is not None
    finally:
        live.release()
    # a clean stop removes its own entry at once; the view's record stays
    assert not redis_client.exists(own)
    view = health(env["config"])["cv"]
    assert view["warmers"] == {} and view["leader"] is None
    assert view["jobs"]["changes"]["warmer"] == live.id  # it led: it came first


def test_two_warmer_processes_show_as_leader_and_standby(
    env: dict[str, Any], tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    path = write_config(tmp_path / "run.yaml", redis_url, key_prefix, env["url"], FAST_WARMER)

    def both_ran() -> bool:
        view = health(env["config"])["cv"]
        warmers = view["warmers"].values()
        return len(view["warmers"]) == 2 and all(
            "changes" in w["jobs"] and "warm" in w["jobs"] for w in warmers)

    with warmer_process(path) as first, warmer_process(path) as second:
        assert wait_for(lambda: both_ran() or first.poll() is not None
                        or second.poll() is not None), "the two warmers did not both run"
        done = subprocess.run([*CLI, "warmer", "--health", "--config", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
        errors = [stop_warmer(first), stop_warmer(second)]
    assert done.returncode == 0, (done.stderr, errors)
    view = json.loads(done.stdout)["views"]["cv"]
    leader = view["leader"]
    assert leader in view["warmers"] and leader.split(":")[1] in (
        str(first.pid), str(second.pid))
    assert view["jobs"]["changes"]["warmer"] == leader
    assert view["jobs"]["changes"]["rows_total"] == 5  # the rows, whoever wrote them
    standby = next(w for w in view["warmers"] if w != leader)
    assert view["warmers"][leader]["jobs"]["changes"]["leader"] is True
    assert view["warmers"][standby]["jobs"]["changes"]["leader"] is False
    assert view["warmers"][standby]["jobs"]["changes"]["rows_total"] == 0
