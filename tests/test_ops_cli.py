"""The operator's commands on real servers: ``featcache purge`` (one server and the private
cluster: a view's keys or the whole prefix go, nothing outside it; a question on a terminal,
a refusal without one), ``featcache get`` (what get_features answers, and what Redis held) and
``materialize``'s progress bar on a terminal."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from clienv import featcache, featcache_on_a_terminal, write_config
from featdata import STATS_FEATURES, insert, make_table, stats_row
from servers import SqlTarget

from featcache import FeatureCache
from featcache.embedded_cluster import EmbeddedCluster
from featcache.keys import KeyLayout

EX_USAGE, EX_DATAERR, EX_CONFIG = 2, 65, 78
IDS = range(1, 41)


def _two_views(tmp_path: Path, redis_url: str, prefix: str, target: SqlTarget,
               mode: str = "standalone") -> Path:
    """Views cv and ov (tables of the same name, ids 1-40), every read counted."""
    engine = target.engine()
    for name in ("cv", "ov"):
        insert(engine, make_table(engine, None, name, STATS_FEATURES),
               [stats_row(i) for i in IDS])
    view = {"entity": {"column": "entity_id", "type": "int"}, "event_timestamp": "event_ts",
            "features": {"clicks": "int, 1h"}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "key_prefix": prefix, "mode": mode},
        "offline_store": {"url": target.url},
        "popularity": {"sample_rate": 1},
        "views": {name: {"table": name, **view} for name in ("cv", "ov")},
    }))
    return path


def _fill(path: Path) -> None:
    """Rows, a negative entry (id 999), epochs, popularity counts, tombstones and the
    invalidation stream, for both views."""
    with FeatureCache.from_config(path) as cache:
        for name in ("cv", "ov"):
            cache.get_features([*IDS, 999], [f"{name}:clicks"])
        cache.invalidate("cv", [1, 2])


def _keys(clients: Iterable[redis.Redis], patterns: Iterable[str]) -> set[bytes]:
    return {key for client in clients for pattern in patterns
            for key in client.scan_iter(match=pattern, count=1000)}


def _report(output: str) -> dict[str, Any]:
    """The JSON line of a purge in ``output`` (on a terminal it follows the bar's frames)."""
    start = output.find('{"key_prefix"')
    assert start >= 0, output
    report: dict[str, Any] = json.JSONDecoder().raw_decode(output, start)[0]
    return report


def _purge_and_check(path: Path, prefix: str, clients: list[redis.Redis], cluster: bool,
                     foreign: list[bytes]) -> None:
    layout = KeyLayout.for_mode(prefix, "cluster" if cluster else "standalone")
    cv = _keys(clients, layout.scan_patterns("cv"))
    ov = _keys(clients, layout.scan_patterns("ov"))
    everything = _keys(clients, layout.scan_patterns())
    stream = layout.stream_key().encode()
    # what a view owns: rows, tombstones, the negative entry, epoch, popularity counts
    assert {layout.row_key("cv", i).encode() for i in (*IDS, 999)} <= cv
    assert {layout.epoch_key("cv").encode(), stream} <= everything
    assert any(b":pop:" in key for key in cv), cv
    assert cv.isdisjoint(ov)
    shared = everything - cv - ov  # the stream, and whatever else is the prefix's own
    assert stream in shared and not any(b"cv" in key for key in shared), shared

    done = featcache("purge", "--config", str(path), "--view", "cv", "--yes")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["view"], report["deleted"], report["cancelled"]) == ("cv", len(cv), False)
    assert report["nodes"] == len(clients)
    assert _keys(clients, layout.scan_patterns("cv")) == set()
    assert _keys(clients, layout.scan_patterns()) == ov | shared
    assert all(client_has(clients, key) for key in foreign)

    done = featcache("purge", "--config", str(path), "--all", "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == len(ov) + len(shared)
    assert _keys(clients, layout.scan_patterns()) == set()
    assert all(client_has(clients, key) for key in foreign)


def client_has(clients: list[redis.Redis], key: bytes) -> bool:
    """Whether a primary holds ``key`` (a scan: a node answers others' keys with MOVED)."""
    return bool(_keys(clients, [key.decode()]))


# ---------------------------------------------------------------------------- purge


def test_purge_a_view_then_the_prefix_and_nothing_else(
    redis_url: str, key_prefix: str, sqlite_target: SqlTarget, tmp_path: Path
) -> None:
    path = _two_views(tmp_path, redis_url, key_prefix, sqlite_target)
    _fill(path)
    # keys of other prefixes that a careless pattern would reach
    foreign = [f"{key_prefix}x:cv:1".encode(), f"{key_prefix}-cv:~cv:epoch".encode(),
               f"other:{key_prefix}:cv:1".encode()]
    client = redis.Redis.from_url(redis_url)
    try:
        for key in foreign:
            client.set(key, b"not featcache's")
        _purge_and_check(path, key_prefix, [client], False, foreign)
    finally:
        client.delete(*foreign)
        client.close()


def test_purge_on_a_cluster_deletes_from_every_primary(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, sqlite_target: SqlTarget,
    tmp_path: Path,
) -> None:
    url = f"redis://{redis_cluster.seeds[0]}/0"
    path = _two_views(tmp_path, url, cluster_key_prefix, sqlite_target, mode="cluster")
    _fill(path)
    foreign = [f"{cluster_key_prefix}x:{{cv:01}}:1".encode(),
               f"other:{cluster_key_prefix}:cv:1".encode()]
    router = redis.RedisCluster.from_url(url)
    clients = [node.client() for node in redis_cluster.primaries()]
    try:
        for key in foreign:
            router.set(key, b"not featcache's")
        layout = KeyLayout.for_mode(cluster_key_prefix, "cluster")
        holding = [c for c in clients if _keys([c], layout.scan_patterns("cv"))]
        assert len(holding) >= 2, "the view's keys should span several primaries"
        _purge_and_check(path, cluster_key_prefix, clients, True, foreign)
    finally:
        for key in foreign:
            router.delete(key)
        router.close()
        for client in clients:
            client.close()


def test_purge_without_a_terminal_needs_yes(
    redis_url: str, key_prefix: str, sqlite_target: SqlTarget, tmp_path: Path,
    redis_client: redis.Redis,
) -> None:
    path = _two_views(tmp_path, redis_url, key_prefix, sqlite_target)
    _fill(path)
    before = _keys([redis_client], [f"{key_prefix}:*"])
    done = featcache("purge", "--config", str(path), "--view", "cv", stdin="")
    assert (done.returncode, done.stdout) == (EX_USAGE, ""), done.stderr
    assert done.stderr.startswith("featcache: error: ") and done.stderr.count("\n") == 1
    assert "pass --yes" in done.stderr
    assert _keys([redis_client], [f"{key_prefix}:*"]) == before
    done = featcache("purge", "--config", str(path), "--yes")
    assert done.returncode == EX_USAGE and "one of the arguments --view --all" in done.stderr
    done = featcache("purge", "--config", str(path), "--view", "nope", "--yes")
    assert done.returncode == EX_CONFIG and "unknown feature view 'nope'" in done.stderr


def test_purge_on_a_terminal_asks_with_the_count_and_shows_a_bar(
    redis_url: str, key_prefix: str, sqlite_target: SqlTarget, tmp_path: Path,
    redis_client: redis.Redis,
) -> None:
    path = _two_views(tmp_path, redis_url, key_prefix, sqlite_target)
    _fill(path)
    cv = _keys([redis_client], KeyLayout(key_prefix).scan_patterns("cv"))
    status, output = featcache_on_a_terminal("purge", "--config", str(path), "--view", "cv",
                                             answer="n")
    assert status == 0, output
    assert f"Delete {len(cv)} keys of view cv on " in output and "? [y/N]" in output
    assert "purge cancelled, nothing deleted" in output
    assert _keys([redis_client], KeyLayout(key_prefix).scan_patterns("cv")) == cv
    status, output = featcache_on_a_terminal("purge", "--config", str(path), "--view", "cv",
                                             answer="yes")
    assert status == 0, output
    assert _report(output)["deleted"] == len(cv)
    assert f"{len(cv)}/{len(cv)}" in output  # the bar's last frame: done of the total
    assert _keys([redis_client], KeyLayout(key_prefix).scan_patterns("cv")) == set()


# ---------------------------------------------------------------------------- get


@pytest.fixture
def one_view(redis_url: str, key_prefix: str, sqlite_target: SqlTarget, tmp_path: Path) -> Path:
    engine = sqlite_target.engine()
    insert(engine, make_table(engine, None, "cv", STATS_FEATURES),
           [stats_row(i, clicks=i) for i in range(1, 6)])
    return write_config(tmp_path / "featcache.yaml", redis_url, key_prefix, sqlite_target.url)


def _get(path: Path, *args: str) -> dict[str, Any]:
    done = featcache("get", "--config", str(path), "--view", "cv", *args, "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_get_shows_each_answer_and_what_redis_held(one_view: Path) -> None:
    first = _get(one_view, "--ids", "1,2,99,1")
    one, two, absent = first["entities"]  # once each, in the order given
    assert (one["id"], one["status"], one["tier"]) == (1, "FILLED", "sql")
    assert one["values"] == {"ctr": 0.25, "clicks": 1} and two["values"]["clicks"] == 2
    assert one["redis_before"] == {"state": "no key"}
    assert 0 <= one["age_s"] < 30 and one["event_timestamp"] == "2026-01-01T00:00:00+00:00"
    assert (absent["status"], absent["tier"], absent["values"]) == (
        "ABSENT", "sql", {"ctr": None, "clicks": None})

    again = _get(one_view, "--ids", "1,99", "--features", "clicks")
    one, absent = again["entities"]
    assert (one["status"], one["tier"], one["values"]) == ("HIT_REDIS", "redis", {"clicks": 1})
    held = one["redis_before"]
    assert (held["state"], held["epoch"]) == ("row", "current")
    assert held["event_timestamp"] == "2026-01-01T00:00:00+00:00"
    assert held["ttl_s"] > 0 and held["loaded_at"].startswith("20")
    assert one["age_s"] >= 0
    assert (absent["status"], absent["tier"]) == ("ABSENT", "redis")
    assert absent["redis_before"]["state"] == "negative entry"

    # after an invalidation: a tombstone, then a read from SQL; the text form says so
    assert featcache("invalidate", "--config", str(one_view), "--view", "cv",
                     "--ids", "1").returncode == 0
    done = featcache("get", "--config", str(one_view), "--view", "cv", "--ids", "1")
    assert done.returncode == 0, done.stderr
    assert "1  FILLED  tier sql  age " in done.stdout
    assert "    clicks  1" in done.stdout
    assert "    redis before the call: tombstone" in done.stdout


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--view", "nope", "--ids", "1"], EX_CONFIG, "unknown feature view 'nope'"),
        (["--view", "cv", "--ids", "1,x"], EX_DATAERR, "'x' is not an integer id"),
        (["--view", "cv", "--ids", ","], EX_DATAERR, "no ids given"),
        (["--view", "cv", "--ids", "1", "--features", "nope"], EX_DATAERR, "nope"),
        (["--view", "cv"], EX_USAGE, "the following arguments are required: --ids"),
    ],
)
def test_get_errors_are_one_line(one_view: Path, args: list[str], status: int,
                                 message: str) -> None:
    done = featcache("get", "--config", str(one_view), *args)
    assert (done.returncode, done.stdout) == (status, ""), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- materialize


def test_materialize_on_a_terminal_shows_a_total(redis_url: str, key_prefix: str,
                                                  sqlite_target: SqlTarget,
                                                  tmp_path: Path) -> None:
    engine = sqlite_target.engine()
    insert(engine, make_table(engine, None, "cv", STATS_FEATURES),
           [stats_row(i) for i in range(1, 3001)])
    path = write_config(tmp_path / "featcache.yaml", redis_url, key_prefix, sqlite_target.url)
    status, output = featcache_on_a_terminal("materialize", "--config", str(path), "--view",
                                             "cv", "--all", "--chunk-rows", "100")
    assert status == 0, output
    assert "3000/3000" in output, output  # counted in the background, shown by the bar
    found = re.search(r'\{"view": "cv".*?\}', output)
    assert found is not None, output
    assert json.loads(found.group(0))["rows_written"] == 3000


@pytest.mark.parametrize("command", ["validate", "get", "purge"])
def test_help(command: str) -> None:
    done = featcache(command, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: featcache " + command)
