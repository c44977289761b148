"""A private Sentinel set for the tests: one primary, one replica, three sentinels.

Every process is an :class:`~featcache.embedded.EmbeddedServer` (loopback only, its own temp
dir, killed with this process by ``PR_SET_PDEATHSIG``); the sentinels are ``valkey-server
<conf> --sentinel`` with a generated config each (Sentinel rewrites its config as it learns,
so each has its own writable file in the set's directory). The set is handed out only once
the sentinels know the replica and each other, so a failover can start at once: a sentinel
alone counts no quorum and learns a replica only from the primary's ``INFO``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from typing import Final

import redis

from featcache.embedded import EmbeddedServer, Lifecycle, find_server_binary, wait_until
from featcache.errors import EmbeddedServerError

__all__ = ["EmbeddedSentinel"]

_HOST: Final = "127.0.0.1"
_SENTINEL_DOWN: Final = frozenset({"s_down", "o_down", "disconnected"})


def _address(server: EmbeddedServer) -> str:
    return f"{_HOST}:{server.port}"


class EmbeddedSentinel(Lifecycle):
    """A private Sentinel set on loopback: a primary, a replica of it, and ``sentinels``
    sentinels monitoring it as ``master_name`` with ``quorum``; ``stop()`` (or leaving the
    ``with`` block) ends every process and removes every temp dir.

    ``down_after_ms`` is how long a silent primary takes to be subjectively down, and
    ``failover_timeout_ms`` bounds one failover attempt (Sentinel's settings of those names).
    ``password`` sets ``requirepass``/``masterauth`` on the data servers and ``auth-pass`` in
    the sentinels; the sentinels themselves take no password.
    """

    def __init__(
        self,
        master_name: str = "featcache",
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        password: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if not master_name.isidentifier():
            raise ValueError(f"master name {master_name!r}: letters, digits and _ only")
        self.master_name = master_name
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.start_timeout = start_timeout
        self.binary = find_server_binary()
        self._dir: str | None = None
        self._data: list[EmbeddedServer] = []
        self._sentinels: list[EmbeddedServer] = []
        self._clients: dict[int, redis.Redis] = {}
        self._killed: tuple[str, float] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="featcache-sentinel-")
        primary = self._data_server(None, replica_of=None)
        self._data = [primary, self._data_server(None, replica_of=primary.port)]
        # Replica in sync before the sentinels start: they find replicas in the primary's
        # INFO, asked at once on connecting and then only every 10 s.
        wait_until(self._replicas_problem, self.start_timeout, "replica in sync")
        for index in range(self.sentinel_count):
            self._sentinels.append(self._sentinel_server(index, primary.port))
        wait_until(self._sentinels_problem, self.start_timeout,
                   "sentinels that know the replica and each other")

    def _data_server(self, port: int | None, replica_of: int | None) -> EmbeddedServer:
        args: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
        if replica_of is not None:
            args += ("--replicaof", _HOST, str(replica_of))
        if self.password is not None:
            args += ("--requirepass", self.password, "--masterauth", self.password)
        return EmbeddedServer(self.binary, extra_args=args, port=port).start()

    def _sentinel_server(self, index: int, primary_port: int) -> EmbeddedServer:
        assert self._dir is not None
        name = self.master_name
        lines = [
            f"sentinel monitor {name} {_HOST} {primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        config = os.path.join(self._dir, f"sentinel-{index}.conf")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write("\n".join(lines) + "\n")
        return EmbeddedServer(self.binary, extra_args=("--sentinel",), config_file=config).start()

    def stop(self) -> None:
        """End every process and remove every temp dir; safe to call twice."""
        for client in self._clients.values():
            client.close()
        self._clients = {}
        for server in (*self._sentinels, *self._data):
            # SIGKILL first: no data is kept, and a primary shut down gracefully waits up
            # to a second for its replica's acknowledgement
            server.kill()
            server.stop()
        self._sentinels, self._data = [], []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- what it is -----------------------------------------------------------------------

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every sentinel, as ``redis.sentinel.Sentinel`` takes them."""
        return [(_HOST, server.port) for server in self._sentinels]

    @property
    def sentinel_url(self) -> str:
        """``redis+sentinel://host:port,.../<master name>/0``."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    @property
    def servers(self) -> list[EmbeddedServer]:
        """The data servers (first the one started as primary), killed ones included."""
        return list(self._data)

    @property
    def sentinel_servers(self) -> list[EmbeddedServer]:
        return list(self._sentinels)

    @property
    def directory(self) -> str | None:
        """The set's temp dir (the sentinels' config files)."""
        return self._dir

    def primary(self) -> str:
        """``host:port`` of the primary as most running sentinels report it now."""
        reports = Counter(self._reports().values())
        if not reports:
            raise EmbeddedServerError("no sentinel answers")
        return reports.most_common(1)[0][0]

    # -- faults -----------------------------------------------------------------------------

    def kill_primary(self) -> str:
        """SIGKILL the data server the sentinels report as primary; returns its address."""
        address = self.primary()
        self._server_at(address).kill()
        self._killed = (address, time.monotonic())
        return address

    def wait_for_new_primary(self, timeout: float = 30.0) -> tuple[str, float]:
        """Wait until every running sentinel reports a primary other than the one
        :meth:`kill_primary` killed and that server says it is a primary; returns its address
        and the seconds since the kill."""
        if self._killed is None:
            raise ValueError("kill_primary() was not called")
        old, killed_at = self._killed

        def promoted() -> str | None:
            reports = self._reports()
            addresses = set(reports.values())
            if len(addresses) != 1 or old in addresses or not reports:
                return f"sentinels report {reports}"
            (address,) = addresses
            role = self._role(address)
            return None if role == "master" else f"{address} says it is a {role}"

        wait_until(promoted, timeout, f"a primary other than {old}")
        return self.primary(), time.monotonic() - killed_at

    def heal(self, timeout: float = 30.0) -> None:
        """Restart every killed data server on its port as a replica of the primary the
        sentinels report, and wait until it is in sync and every sentinel sees it up."""
        if any(not server.running for server in self._data):
            primary = self.primary()
            if not self._server_at(primary).running:
                raise EmbeddedServerError(f"the sentinels still report the dead {primary}")
            primary_port = int(primary.rpartition(":")[2])
            self._data = [server if server.running else
                          self._restart_as_replica(server, primary_port)
                          for server in self._data]
        wait_until(self._replicas_problem, timeout, "replica in sync")
        wait_until(self._sentinels_problem, timeout, "sentinels that see every replica up")

    def _restart_as_replica(self, server: EmbeddedServer, primary_port: int) -> EmbeddedServer:
        port = server.port
        server.stop()
        self._forget(port)
        return self._data_server(port, replica_of=primary_port)

    # -- internals ------------------------------------------------------------------------

    def _client(self, port: int) -> redis.Redis:
        if port not in self._clients:
            password = None if port in {s.port for s in self._sentinels} else self.password
            self._clients[port] = redis.Redis(host=_HOST, port=port, password=password,
                                              decode_responses=True, socket_timeout=5,
                                              socket_connect_timeout=5)
        return self._clients[port]

    def _forget(self, port: int) -> None:
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def _server_at(self, address: str) -> EmbeddedServer:
        for server in self._data:
            if _address(server) == address:
                return server
        raise EmbeddedServerError(f"{address} is none of this set's data servers")

    def _role(self, address: str) -> object:
        try:
            reply = self._client(self._server_at(address).port).execute_command(  # type: ignore[no-untyped-call]
                "ROLE")
        except redis.RedisError as exc:
            return f"unreachable ({exc})"
        return reply[0] if isinstance(reply, list) and reply else reply

    def _reports(self) -> dict[int, str]:
        """What each running sentinel answers for the primary's address, by sentinel port."""
        reports = {}
        for server in self._sentinels:
            if not server.running:
                continue
            try:
                reply = self._client(server.port).sentinel_get_master_addr_by_name(
                    self.master_name)
            except redis.RedisError:
                continue
            if isinstance(reply, tuple) and isinstance(reply[0], str):
                reports[server.port] = f"{reply[0]}:{reply[1]}"
        return reports

    def _replicas_problem(self) -> str | None:
        for server in self._data:
            if not server.running:
                return f"{_address(server)} is down"
            try:
                info = self._client(server.port).info("replication")
            except redis.RedisError as exc:
                return f"{_address(server)}: {exc}"
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return f"{_address(server)}'s link to its primary is down"
            if info.get("role") == "master":
                # WAIT counts only replicas the primary has put online, which it does a moment
                # after the replica reports its link up
                states = [entry.get("state") for key, entry in info.items()
                          if key.startswith("slave") and isinstance(entry, dict)]
                if states.count("online") != len(self._data) - 1:
                    return f"the primary {_address(server)} has its replicas in {states}"
        return None

    def _sentinels_problem(self) -> str | None:
        """Why a failover could not start at once (None when it could): every sentinel must
        see the primary and every replica up, and know every other sentinel."""
        for server in self._sentinels:
            client = self._client(server.port)
            try:
                primary = client.sentinel_master(self.master_name)
                replicas = client.sentinel_slaves(self.master_name)
            except redis.RedisError as exc:
                return f"sentinel {_address(server)}: {exc}"
            if not isinstance(primary, dict) or not isinstance(replicas, list):
                return f"sentinel {_address(server)} answered {primary!r}, {replicas!r}"
            if set(str(primary.get("flags", "")).split(",")) & _SENTINEL_DOWN:
                return f"sentinel {_address(server)} sees the primary as {primary['flags']}"
            others = int(primary.get("num-other-sentinels", 0))
            if others != self.sentinel_count - 1:
                return f"sentinel {_address(server)} knows {others} other sentinels"
            up = [r for r in replicas if not set(str(r.get("flags", "")).split(",")) &
                  _SENTINEL_DOWN and r.get("master-link-status") == "ok"]
            if len(up) != len(self._data) - 1:
                return f"sentinel {_address(server)} sees {len(up)} replicas up"
        return None
