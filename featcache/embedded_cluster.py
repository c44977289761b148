"""A private Valkey Cluster for the tests and the demo: N primaries with R replicas each.

Every node is an :class:`~featcache.embedded.EmbeddedServer` (loopback only, its own temp
dir, killed with this process by ``PR_SET_PDEATHSIG``) started with ``--cluster-enabled yes``;
the cluster is formed by ``valkey-cli --cluster create``, the operator's own tool, so the
slot layout and replica assignment are the ones a real deployment gets. Each node's
``cluster-config-file`` (its node id, epoch and view of the cluster) lives in the cluster's
directory rather than the server's, so a killed node restarted on its ports comes back as the
same node, as a crashed server restarted by its supervisor does. The faults (SIGKILL,
``CLUSTER FAILOVER``, a slot migration half done or complete) are made with the commands an
operator uses, so the clients under test meet the real MOVED, ASK and failover behaviour.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

import redis
from redis.crc import key_slot

from featcache.embedded import (
    EmbeddedServer,
    Lifecycle,
    find_cli_binary,
    find_server_binary,
    free_port,
    wait_until,
)
from featcache.errors import EmbeddedServerError

__all__ = ["ClusterNode", "EmbeddedCluster", "NodeLine", "Role", "SlotMigration"]

SLOTS: Final = 16384
_HOST: Final = "127.0.0.1"
_PORT_ATTEMPTS: Final = 5
#: Flags with which a node reports another as unusable (CLUSTER NODES)
_UNHEALTHY: Final = frozenset({"fail", "fail?", "handshake", "noaddr"})

Role = Literal["primary", "replica"]


@dataclass(frozen=True)
class NodeLine:
    """One line of CLUSTER NODES: how the asking node sees one node."""

    node_id: str
    flags: frozenset[str]
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def role(self) -> Role:
        return "replica" if self.flags & {"slave", "replica"} else "primary"

    @classmethod
    def parse(cls, line: str) -> NodeLine:
        node_id, _address, flags, primary, *_times, _link = line.split()[:8]
        slots = []
        for part in line.split()[8:]:
            if part.startswith("["):  # [slot->-id] / [slot-<-id]: a migration in progress
                continue
            start, _, end = part.partition("-")
            slots.append((int(start), int(end or start)))
        return cls(node_id, frozenset(flags.split(",")), None if primary == "-" else primary,
                   tuple(sorted(slots)))


def _text(reply: object) -> str:
    if not isinstance(reply, bytes):
        raise EmbeddedServerError(f"expected a text reply, got {reply!r}")
    return reply.decode()


class ClusterNode:
    """One node of an :class:`EmbeddedCluster`; the handle stays the same across a kill and a
    restart (same ports, same node id). ``role`` asks the node itself (``ROLE``)."""

    def __init__(self, index: int, config_file: str, args: tuple[str, ...], binary: str,
                 password: str | None) -> None:
        """Not started; :class:`EmbeddedCluster` makes its nodes."""
        self.index = index
        self.port = 0
        self.bus_port = 0
        self.node_id = ""
        self._config_file = config_file
        self._args = args
        self._binary = binary
        self._password = password
        self._server: EmbeddedServer | None = None
        self._admin: redis.Redis | None = None

    def __repr__(self) -> str:
        state = "" if self.alive else ", dead"
        return f"<ClusterNode {self.index} {self.address}{state}>"

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._server is not None and self._server.running

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        return self._server.pid if self._server is not None and self.alive else None

    @property
    def directory(self) -> str | None:
        """The server's own temp dir (unix socket, log) while it exists."""
        if self._server is None or not self.alive:
            return None
        return os.path.dirname(self._server.unix_socket)

    @property
    def role(self) -> Role:
        """What the node says it is now (raises EmbeddedServerError when it is down)."""
        return "replica" if self.primary_port is not None else "primary"

    @property
    def primary_port(self) -> int | None:
        """The port of the primary this node replicates now, None when it is a primary."""
        reply = self.execute("ROLE")
        if not isinstance(reply, list) or not reply:
            raise EmbeddedServerError(f"node {self.address}: ROLE answered {reply!r}")
        if reply[0] != b"slave":
            return None
        port = reply[2]
        if not isinstance(port, int | bytes):
            raise EmbeddedServerError(f"node {self.address}: ROLE answered {reply!r}")
        return int(port)

    def client(self, **kwargs: object) -> redis.Redis:
        """A new plain client of this node alone (it follows no redirect); the caller closes
        it. ``kwargs`` go to ``redis.Redis``."""
        options: dict[str, object] = {"password": self._password, **kwargs}
        return redis.Redis(host=_HOST, port=self.port, **options)  # type: ignore[arg-type]

    def execute(self, *args: str | bytes | int) -> object:
        """One command on this node, raw reply (bytes); redis-py's errors become
        EmbeddedServerError naming the node."""
        try:
            return self._client().execute_command(*args)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            raise EmbeddedServerError(f"node {self.address}: {' '.join(map(str, args[:3]))}: "
                                      f"{exc}") from exc

    def info(self, section: str) -> dict[str, object]:
        """``INFO section`` of this node, parsed."""
        info: dict[str, object] = self._client().info(section)
        return info

    def view(self) -> dict[str, NodeLine]:
        """CLUSTER NODES of this node: how it sees every node, by node id."""
        lines = (NodeLine.parse(text) for text in _text(self.execute("CLUSTER", "NODES"))
                 .splitlines() if text.strip())
        return {line.node_id: line for line in lines}

    def _client(self) -> redis.Redis:
        if self._admin is None:
            self._admin = self.client(socket_timeout=10, socket_connect_timeout=10)
        return self._admin

    def start_on_free_ports(self, taken: set[int]) -> None:
        """Start on ports the kernel says are free and not in ``taken`` (the other nodes'
        data and bus ports); another process may take one first, so a few tries."""
        error: EmbeddedServerError | None = None
        for _attempt in range(_PORT_ATTEMPTS):
            port, bus_port = free_port(), free_port()
            if port == bus_port or {port, bus_port} & taken:
                continue
            try:
                self.start(port, bus_port)
                return
            except EmbeddedServerError as exc:
                error = exc
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._config_file)
        raise EmbeddedServerError(f"cluster node {self.index} did not start: {error}")

    def start(self, port: int, bus_port: int) -> None:
        """Start the server on these ports with this node's cluster config file."""
        args = (*self._args, "--cluster-config-file", self._config_file,
                "--cluster-port", str(bus_port))
        server = EmbeddedServer(self._binary, extra_args=args, port=port).start()
        self._server, self.port, self.bus_port = server, port, bus_port

    def kill(self) -> None:
        """SIGKILL the server; the handle keeps its ports and config to be started again."""
        if self._server is not None:
            self._server.kill()

    def stop(self) -> None:
        """End the server and remove its temp dir (the cluster config file stays). By
        SIGKILL: it keeps no data, and a primary shut down gracefully waits up to a second
        for its replicas' acknowledgement first."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._server is not None:
            self._server.kill()
            self._server.stop()  # removes the temp dir
            self._server = None


class EmbeddedCluster(Lifecycle):
    """A private Valkey Cluster on loopback: ``primaries`` primaries with ``replicas``
    replicas each, every slot covered; ``stop()`` (or leaving the ``with`` block) ends every
    node and removes every temp dir, and every node dies with this process.

    ``node_timeout_ms`` is ``cluster-node-timeout``: how long a silent node takes to be
    failed over (plus about a second of election). ``extra_args`` go to every node's command
    line (``--cluster-require-full-coverage no``, ``--maxmemory 64mb``...); ``password`` sets
    ``requirepass`` and ``masterauth`` on every node.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 60.0,
    ) -> None:
        if primaries < 3:
            raise ValueError("a Valkey cluster needs at least 3 primaries")
        self.primaries_count = primaries
        self.replicas_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.server_binary = find_server_binary()
        self.cli_binary = find_cli_binary()
        self._dir: str | None = None
        self._nodes: list[ClusterNode] = []

    # -- lifecycle ------------------------------------------------------------------------

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="featcache-cluster-")
        args: tuple[str, ...] = (
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
        )
        if self.password is not None:
            args += ("--requirepass", self.password, "--masterauth", self.password)
        args += self.extra_args
        count = self.primaries_count * (1 + self.replicas_count)
        for index in range(count):
            config = os.path.join(self._dir, f"node-{index}.conf")
            node = ClusterNode(index, config, args, self.server_binary, self.password)
            node.start_on_free_ports({p for n in self._nodes for p in (n.port, n.bus_port)})
            self._nodes.append(node)
        self._create()
        for node in self._nodes:
            node.node_id = _text(node.execute("CLUSTER", "MYID"))
        wait_until(lambda: self._problem(complete=True), self.start_timeout,
                   "cluster with every slot covered and every replica in sync")

    def _create(self) -> None:
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password  # not on the command line, where ps shows it
        command = [self.cli_binary, "--cluster", "create",
                   *(node.address for node in self._nodes),
                   "--cluster-replicas", str(self.replicas_count), "--cluster-yes"]
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, binary we located
                command, capture_output=True, text=True, timeout=self.start_timeout,
                stdin=subprocess.DEVNULL, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"valkey-cli --cluster create did not finish within "
                                      f"{self.start_timeout:g}s") from exc
        if done.returncode != 0 or f"All {SLOTS} slots covered" not in done.stdout:
            output = (done.stdout + done.stderr).strip()[-800:]
            raise EmbeddedServerError(f"valkey-cli --cluster create failed "
                                      f"(exit {done.returncode}): {output}")

    def stop(self) -> None:
        """End every node and remove every temp dir; safe to call twice."""
        for node in self._nodes:
            node.stop()
        self._nodes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- what it is -----------------------------------------------------------------------

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node, dead ones included, in creation order."""
        return list(self._nodes)

    @property
    def directory(self) -> str | None:
        """The cluster's temp dir (the nodes' cluster config files)."""
        return self._dir

    @property
    def seeds(self) -> list[str]:
        """``127.0.0.1:port`` of every node: any of them serves a client the slot map."""
        return [node.address for node in self._nodes]

    @property
    def urls(self) -> list[str]:
        """``redis://127.0.0.1:port`` of the primaries as they are now."""
        return [node.url for node in self.primaries()]

    def primaries(self) -> list[ClusterNode]:
        """The live nodes that are primaries now."""
        return [node for node in self._nodes if node.alive and node.role == "primary"]

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live nodes replicating ``primary`` now."""
        return [node for node in self._nodes
                if node.alive and node is not primary and node.primary_port == primary.port]

    def primary_of(self, replica: ClusterNode) -> ClusterNode:
        """The node ``replica`` replicates now."""
        port = replica.primary_port
        if port is None:
            raise ValueError(f"{replica} is a primary")
        return self._node_at(port)

    def primary_for_slot(self, slot: int) -> ClusterNode:
        """The primary that owns ``slot`` in the slot map of the first live node."""
        view = self._any_live().view()
        for line in view.values():
            if line.role == "primary" and any(a <= slot <= b for a, b in line.slots):
                return self._node_with_id(line.node_id)
        raise EmbeddedServerError(f"no node owns slot {slot}")

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The primary that owns ``key``'s slot."""
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    # -- faults -----------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL ``node``, as a crash would; its replica takes over after the node timeout."""
        node.kill()

    def restart(self, node: ClusterNode) -> None:
        """Start ``node`` again on its ports with its cluster config (SIGKILLing it first if
        it runs): it rejoins as the same node, with no data. Wait with :meth:`wait_ok`."""
        node.stop()
        node.start(node.port, node.bus_port)

    def failover(self, replica: ClusterNode,
                 mode: Literal["default", "force", "takeover"] = "default",
                 timeout: float = 30.0) -> None:
        """``CLUSTER FAILOVER`` on ``replica``; returns once it is the primary, its old
        primary (when alive) replicates it, and every node agrees (:meth:`wait_ok`)."""
        old = self.primary_of(replica)
        replica.execute("CLUSTER", "FAILOVER", *([mode.upper()] if mode != "default" else []))

        def switched() -> str | None:
            if replica.primary_port is not None:
                return f"{replica} is still a replica"
            if old.alive and old.primary_port != replica.port:
                return f"{old} does not replicate {replica} yet"
            return None

        wait_until(switched, timeout, f"failover to {replica}")
        self.wait_ok(timeout)

    def heal(self, timeout: float = 60.0) -> None:
        """Restart every dead node and wait for the full shape: every node up, every slot
        covered, each slot-owning primary with its replicas in sync (roles may have moved)."""
        for node in self._nodes:
            if not node.alive:
                self.restart(node)
        wait_until(lambda: self._problem(complete=True), timeout, "healed cluster")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok`` with all slots ok, all of
        them see the same topology with no live node failed, every slot is owned by a live
        primary, and every live replica's link to its primary is up."""
        wait_until(lambda: self._problem(complete=False), timeout, "cluster_state ok")

    # -- slot migration -----------------------------------------------------------------------

    def begin_migration(self, slot: int, to_node: ClusterNode) -> SlotMigration:
        """Mark ``slot`` IMPORTING on ``to_node`` and MIGRATING on its owner; no key moves
        yet. Until :meth:`SlotMigration.finish`, a key moved answers ASK on the owner."""
        source = self.primary_for_slot(slot)
        if source is to_node:
            raise ValueError(f"slot {slot} is already on {to_node}")
        if to_node.role != "primary":
            raise ValueError(f"{to_node} is not a primary")
        to_node.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", to_node.node_id)
        return SlotMigration(self, slot, source, to_node)

    def migrate_slot(self, slot: int, to_node: ClusterNode, timeout: float = 30.0) -> int:
        """Move ``slot`` and its keys to ``to_node``, the way ``valkey-cli --cluster reshard``
        does; returns how many keys moved."""
        migration = self.begin_migration(slot, to_node)
        moved = migration.move_keys()
        migration.finish(timeout)
        return moved

    # -- internals ------------------------------------------------------------------------

    def _any_live(self) -> ClusterNode:
        for node in self._nodes:
            if node.alive:
                return node
        raise EmbeddedServerError("no cluster node is running")

    def _node_at(self, port: int) -> ClusterNode:
        for node in self._nodes:
            if node.port == port:
                return node
        raise EmbeddedServerError(f"no node of this cluster listens on {port}")

    def _node_with_id(self, node_id: str) -> ClusterNode:
        for node in self._nodes:
            if node.node_id == node_id:
                return node
        raise EmbeddedServerError(f"no node of this cluster has id {node_id}")

    def _problem(self, complete: bool) -> str | None:
        """Why the cluster is not ok yet (see :meth:`wait_ok`), or None; ``complete`` also
        wants every node up and the shape it was created with."""
        live = {node.node_id: node for node in self._nodes if node.alive}
        if complete and len(live) < len(self._nodes):
            return "dead nodes: " + ", ".join(str(n) for n in self._nodes if not n.alive)
        try:
            topology = self._agreed_topology(live)
            if isinstance(topology, str):
                return topology
            for node_id, (role, primary_id, _slots) in topology.items():
                if role == "replica":
                    link = live[node_id].info("replication").get("master_link_status")
                    if primary_id not in live or link != "up":
                        return f"{live[node_id]}'s link to its primary is {link}"
        except EmbeddedServerError as exc:
            return str(exc)
        if complete:
            owners = [i for i, (role, _, slots) in topology.items() if role == "primary" and slots]
            if len(owners) != self.primaries_count:
                return f"{len(owners)} primaries own slots, not {self.primaries_count}"
            for owner in owners:
                count = sum(1 for _, (role, primary_id, _s) in topology.items()
                            if role == "replica" and primary_id == owner)
                if count != self.replicas_count:
                    return f"{live[owner]} has {count} replicas, not {self.replicas_count}"
        return None

    def _agreed_topology(
        self, live: dict[str, ClusterNode]
    ) -> dict[str, tuple[Role, str | None, tuple[tuple[int, int], ...]]] | str:
        """The live nodes' roles, primaries and slots when every live node sees the same and
        says the cluster is ok, else why not."""
        agreed = None
        for node in live.values():
            info = _text(node.execute("CLUSTER", "INFO"))
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(SLOTS):
                return (f"{node} says cluster_state:{fields.get('cluster_state')}, "
                        f"{fields.get('cluster_slots_ok')} slots ok")
            view = node.view()
            for node_id, other in live.items():
                line = view.get(node_id)
                if line is None or line.flags & _UNHEALTHY:
                    flags = ",".join(sorted(line.flags)) if line else "unknown"
                    return f"{node} sees {other} as {flags}"
            topology = {i: (view[i].role, view[i].primary_id, view[i].slots) for i in live}
            owned = sum(end - start + 1 for role, _, slots in topology.values()
                        if role == "primary" for start, end in slots)
            if owned != SLOTS:
                return f"{node} sees live primaries owning {owned} of {SLOTS} slots"
            if agreed is None:
                agreed = topology
            elif topology != agreed:
                return f"{node} sees another topology than {next(iter(live.values()))}"
        return agreed if agreed is not None else "no cluster node is running"


class SlotMigration:
    """A slot between IMPORTING/MIGRATING and its final ``SETSLOT NODE``: keys moved so far
    live on the target, and the source answers ASK for them (MOVED after :meth:`finish`)."""

    def __init__(self, cluster: EmbeddedCluster, slot: int, source: ClusterNode,
                 target: ClusterNode) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = source
        self.target = target

    def move_keys(self, keys: Iterable[str | bytes] | None = None, batch: int = 100) -> int:
        """``MIGRATE`` ``keys`` (every key of the slot still on the source when None) to the
        target in batches; returns how many moved."""
        moved = 0
        if keys is not None:
            pending = list(keys)
            for start in range(0, len(pending), batch):
                moved += self._migrate(pending[start:start + batch])
            return moved
        while True:
            found = self.source.execute("CLUSTER", "GETKEYSINSLOT", self.slot, batch)
            assert isinstance(found, list)
            if not found:
                return moved
            moved += self._migrate(found)

    def _migrate(self, keys: list[str | bytes]) -> int:
        present = self.source.execute("EXISTS", *keys)
        if not present:
            return 0
        auth = ("AUTH", self.cluster.password) if self.cluster.password is not None else ()
        self.source.execute("MIGRATE", _HOST, self.target.port, "", 0, 10_000, *auth,
                            "KEYS", *keys)
        return int(str(present))

    def finish(self, timeout: float = 30.0) -> None:
        """Move the keys left, give the slot to the target on the target, the source and
        every other primary (the documented order), and wait until every node agrees."""
        self.move_keys()
        others = [node for node in self.cluster.primaries()
                  if node is not self.source and node is not self.target]
        for node in (self.target, self.source, *others):
            node.execute("CLUSTER", "SETSLOT", self.slot, "NODE", self.target.node_id)

        def owned_by_target() -> str | None:
            owner = self.cluster.primary_for_slot(self.slot)
            return None if owner is self.target else f"slot {self.slot} is on {owner}"

        wait_until(owned_by_target, timeout, f"slot {self.slot} on {self.target}")
        self.cluster.wait_ok(timeout)
