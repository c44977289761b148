"""The Redis store's maintenance operations (``featcache validate``, ``purge``, ``stats``),
apart from the ``RedisStore`` interface because serving never sends them: ``INFO`` and
``SCAN`` on each server, and ``UNLINK`` of what a scan found.

``SCAN`` and ``INFO`` concern one server each, not a key, so they run on the redis-py client of
each primary (``store.client``; on a cluster the client of each primary its slot map names);
their errors are translated by ``featcache.redis_store.translate`` as every Redis error is.
``UNLINK`` goes through ``RedisStore.execute``, one command per hash slot on a cluster (a
command's keys must share one; the keys one node's scan returns rarely do), so a slot moved
meanwhile is followed as for any command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from featcache.keys import slot_of
from featcache.redis_store.base import Command, RedisStore
from featcache.redis_store.errors import ERRORS, translate

__all__ = ["Node", "key_count", "memory_usage", "primaries", "redis_errors", "replicas",
           "scan", "server_info", "slot_owners", "unlink"]


@dataclass(frozen=True, slots=True)
class Node:
    """One server: its address (or the store's description, password masked) and a redis-py
    client of that server alone."""

    name: str
    client: Any


@contextlib.contextmanager
def redis_errors(where: str) -> Iterator[None]:
    """redis-py's errors as featcache's (``translate``); ``where`` names the server, already
    without a password."""
    try:
        yield
    except ERRORS as exc:
        raise translate(exc, where) from exc


def primaries(store: RedisStore, mode: str) -> list[Node]:
    """The servers that hold the keys: each primary of a cluster (by its slot map), else the
    one server the store talks to (for Sentinel, the primary the Sentinels name)."""
    client = store.client  # a cluster client is built here: its errors come translated
    if mode != "cluster":
        return [Node(store.url, client)]
    with redis_errors(store.url):
        return [Node(node.name, client.get_redis_connection(node))
                for node in client.get_primaries()]


def slot_owners(store: RedisStore) -> dict[str, int]:
    """On a cluster: how many slots each primary owns, by the client's slot map."""
    owners: dict[str, int] = {}
    for nodes in store.client.nodes_manager.slots_cache.values():
        if nodes:
            owners[nodes[0].name] = owners.get(nodes[0].name, 0) + 1
    return owners


def replicas(info: dict[str, Any]) -> list[str]:
    """The replicas a primary's ``INFO replication`` lists, as ``host:port``."""
    out = []
    for n in range(int(info.get("connected_slaves") or 0)):
        entry = info.get(f"slave{n}")
        if isinstance(entry, dict):
            out.append(f"{entry.get('ip')}:{entry.get('port')}")
    return out


def server_info(node: Node) -> dict[str, Any]:
    """``INFO`` of one server (its default sections: server, memory, replication, cluster...):
    needs no more than what a read needs, where ``CONFIG GET`` is often refused (ACL users,
    managed services)."""
    with redis_errors(node.name):
        info: dict[str, Any] = node.client.info()
    return info


def scan(node: Node, pattern: str, count: int = 1000) -> Iterator[list[str]]:
    """The keys of ``node`` matching ``pattern``, one ``SCAN`` step (about ``count`` keys
    examined) at a time. A key that is not UTF-8 is not one featcache wrote (its view names,
    prefixes and string ids are text): it is left out."""
    cursor = 0
    while True:
        with redis_errors(node.name):
            cursor, found = node.client.scan(cursor=cursor, match=pattern, count=count)
        keys = []
        for raw in found:
            try:
                keys.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            except UnicodeDecodeError:
                continue
        yield keys
        if int(cursor) == 0:
            return


def key_count(node: Node) -> int:
    """``DBSIZE`` of one server."""
    with redis_errors(node.name):
        return int(node.client.dbsize())


def memory_usage(node: Node, keys: Sequence[str]) -> list[int]:
    """``MEMORY USAGE`` of each key on one server (0 for a key gone meanwhile), one round
    trip."""
    with redis_errors(node.name):
        pipe = node.client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
        return [int(n or 0) for n in pipe.execute()]


def unlink(store: RedisStore, keys: Sequence[str], cluster: bool) -> int:
    """``UNLINK`` of ``keys`` in one round trip per server (one command per slot on a
    cluster); how many of them existed."""
    if not keys:
        return 0
    if cluster:
        by_slot: dict[int, list[str]] = {}
        for key in keys:
            by_slot.setdefault(slot_of(key), []).append(key)
        groups = list(by_slot.values())
    else:
        groups = [list(keys)]
    replies = store.execute([Command("UNLINK", group[0], tuple(group[1:])) for group in groups])
    return sum(int(n) for n in replies)
