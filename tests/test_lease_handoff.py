"""A reader waiting on another reader's lease learns at once that the fill will not land.

The holder's fill can be fenced out (an invalidation replaced the row by a tombstone while the
holder read SQL), abandoned, or never come (the holder died). The lease goes with it (the fill
script deletes the lease whatever it writes), and a waiter that sees the lease gone with no
usable row takes the lease over and reads SQL itself, instead of sleeping out ``lease_wait``
(docs/consistency.md, "No stampede"). Real Valkey, real SQLite; the points where each reader
acts are named by the commands they send (``wire.hooked_client``), not by sleeps.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from featdata import T0, insert, key_layout, make_cache, make_table, make_view
from wire import hooked_client, is_command

from featcache import Feature, FeatureResult, Status
from featcache.redis_store import CONDITIONAL_SET, SET_IF_ABSENT

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

FEATURES = (Feature("clicks", "int", "1h"),)
VIEW = "handoff"
WAIT_S = 30.0
#: long enough that a waiter sleeping it out would show in the counters, not only in the time
LEASE_WAIT = 10.0


def _table(target: Any) -> Any:
    engine = target.engine()
    table = make_table(engine, target.schema, VIEW, FEATURES)
    insert(engine, table, [{"entity_id": i, "event_ts": T0, "updated_at": T0, "clicks": i}
                           for i in (1, 2)])
    return make_view(VIEW, VIEW, target.schema, FEATURES)


def _is_fill(packed: bytes) -> bool:
    return is_command(packed, "EVALSHA") and any(
        script.sha.encode() in packed for script in (SET_IF_ABSENT, CONDITIONAL_SET))


@pytest.mark.one_server
def test_a_waiter_takes_the_lease_over_when_the_holders_fill_is_fenced_out(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    view = _table(sqlite_target)
    layout = key_layout(key_prefix)
    row_key, lease_key = layout.row_key(VIEW, 1), layout.lease_keys(VIEW, [1])[0]
    a_client, a_hooks = hooked_client(redis_url)
    b_client, b_hooks = hooked_client(redis_url)
    options: dict[str, Any] = {"lease_wait": LEASE_WAIT}
    url = sqlite_target.url
    b_polling = threading.Event()
    b_answer: list[FeatureResult] = []
    b_thread: list[threading.Thread] = []
    try:
        with make_cache([view], redis_url, url, key_prefix, redis_client=a_client,
                        **options) as a, \
             make_cache([view], redis_url, url, key_prefix, redis_client=b_client,
                        **options) as b, \
             make_cache([view], redis_url, url, key_prefix) as etl:

            def b_before_send(packed: Any) -> None:
                if len(packed) == 1 and is_command(packed[0], "MGET", [row_key, lease_key]):
                    b_polling.set()  # B waits on A's lease

            def a_before_send(packed: Any) -> None:
                # A read SQL under its lease and is about to write its fill: B starts, finds
                # A's lease and waits on it; then the ETL invalidates the row, so A's fill
                # (fenced by what A saw before SQL) will be refused
                if b_thread or not any(map(_is_fill, packed)):
                    return
                thread = threading.Thread(
                    target=lambda: b_answer.append(b.get_features([1], ["clicks"])))
                b_thread.append(thread)
                thread.start()
                assert b_polling.wait(WAIT_S), "B never waited on A's lease"
                etl.invalidate(VIEW, [1])

            b_hooks.before_send = b_before_send
            a_hooks.before_send = a_before_send
            assert a.get_features([1], ["clicks"]).status(1, "clicks") is Status.FILLED
            assert b_thread, "A never wrote its fill"
            b_thread[0].join(WAIT_S * 2)
            assert not b_thread[0].is_alive()
            assert a.stats()[VIEW]["fills_fenced"] == 1  # A's fill was refused...
            assert redis_client.get(lease_key) is None  # ...and its lease went with it
            b_stats = b.stats()[VIEW]
            # B took the lease over at once instead of sleeping out lease_wait
            assert (b_stats["lease_waits"], b_stats["lease_takeovers"],
                    b_stats["lease_timeouts"]) == (1, 1, 0), b_stats
            assert b_answer[0].status(1, "clicks") is Status.FILLED
            assert b_answer[0][1]["clicks"] == 1
            # B's fill, fenced by the tombstone it saw before its own SQL read, landed
            assert etl.get_features([1], ["clicks"]).status(1, "clicks") is Status.HIT_REDIS
    finally:
        a_client.close()
        b_client.close()


def test_a_waiter_takes_over_the_lease_of_a_holder_that_died(
    sqlite_target: Any, redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """The holder's lease expires (``lease_ttl``) with no fill: the waiter takes the lease over
    as soon as it is gone, not at the end of ``lease_wait``."""
    view = _table(sqlite_target)
    lease_key = key_layout(key_prefix).lease_keys(VIEW, [2])[0]
    with make_cache([view], redis_url, sqlite_target.url, key_prefix,
                    lease_wait=LEASE_WAIT) as fc:
        # long enough that the call still finds it on a loaded machine, far below the wait
        assert redis_client.set(lease_key, "a-reader-that-dies", px=2000)
        result = fc.get_features([2], ["clicks"])
        assert result.status(2, "clicks") is Status.FILLED and result[2]["clicks"] == 2
        stats = fc.stats()[VIEW]
        assert (stats["lease_waits"], stats["lease_takeovers"], stats["lease_timeouts"]) == (
            1, 1, 0), stats
        assert redis_client.get(lease_key) is None  # taken over, then released by the fill
        assert fc.get_features([2], ["clicks"]).status(2, "clicks") is Status.HIT_REDIS
