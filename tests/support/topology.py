"""Real Redis HA topologies on loopback ports: Sentinel, and Cluster.

A :class:`SentinelTopology` is a primary, its replica and three sentinels watching
them; a :class:`ClusterTopology` is six cluster nodes, three primaries with a replica
each. Every process is a :class:`RedisServer` of the test alone, so faults (SIGKILL of a
primary) go to the pid the test started and the machine's shared Redis is never
signalled. Every wait is bounded and fails with the topology's log tails.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.sentinel import Sentinel

from tests.support import workers
from tests.support.redis_server import RedisServer
from tests.support.services import unavailable

ServerT = TypeVar("ServerT", bound=RedisServer)
SelfT = TypeVar("SelfT", bound="_Topology")

SUITE = "topology"
READY_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0
CLUSTER_SLOTS = 16384
# A primary sends a new replica its data at once (not after the default 5 s wait for
# more replicas to share one transfer).
PROMPT_SYNC = ("--repl-diskless-sync-delay", "0")
# A sentinel's INFO of the servers every second instead of 10, its hello to the others
# every 0.5 s instead of 2 (it also reconfigures a returning old primary after 4 hellos,
# 2 s). ``SENTINEL DEBUG`` sets them (Redis >= 7.0), for the running process only.
SENTINEL_PERIODS = ("info-period", "1000", "publish-period", "500")


def _client(port: int) -> redis.Redis:
    """A client of ``127.0.0.1:port`` that gives up on a silent server within a second."""
    return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1, decode_responses=True)


def _ask(port: int, ask: Callable[[redis.Redis], Any]) -> Any:
    """``ask(client)`` of the server on ``port``; ``None`` if it does not answer."""
    client = _client(port)
    try:
        return ask(client)
    except redis.RedisError:
        return None
    finally:
        client.close()


def _distinct(make: Callable[[], ServerT], taken: set[int]) -> ServerT:
    """A server from ``make`` on a port not in ``taken`` (made again until it is); the
    port is added to ``taken``."""
    while True:
        server = make()
        if server.port not in taken:
            taken.add(server.port)
            return server


def _executable(name: str) -> str:
    """The path of ``name`` on PATH; skips (fails under CI) if it is missing."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not on PATH", SUITE)
    assert path is not None
    return path


class _Topology:
    """Servers started in order and stopped all together, also after a failed start."""

    servers: list[RedisServer]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every server this topology started (each one even if another fails)."""
        with contextlib.ExitStack() as stack:
            for server in self.servers:
                stack.callback(server.stop)

    @contextlib.contextmanager
    def running(self: SelfT) -> Iterator[SelfT]:
        """Start the topology; stop it when the block ends."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def _started(self, start: Callable[[], None]) -> None:
        """Run ``start``; if it fails halfway, stop what it started before re-raising."""
        try:
            start()
        except BaseException:
            self.stop()
            raise

    def report(self) -> str:
        """The log tails of every server, and what each answers right now."""
        return "\n".join(
            f"{server.report()}\n(state: {self._state(server)})" for server in self.servers
        )

    def _state(self, server: RedisServer) -> str:
        if server.process is None:
            return "not running"
        role = _ask(server.port, lambda client: client.execute_command("ROLE"))
        return "not answering" if role is None else f"ROLE {role!r}"


def _role(server: RedisServer) -> str | None:
    """``master`` or ``slave`` as the running ``server`` reports it; ``None`` if silent."""
    if server.process is None:
        return None
    info = _ask(server.port, lambda client: client.info("replication"))
    return None if info is None else str(info["role"])


def _replica_linked(server: RedisServer, primary_port: int | None = None) -> bool:
    """Whether ``server`` is a replica (of ``primary_port``, if given) with its link up."""
    if server.process is None:
        return False
    info = _ask(server.port, lambda client: client.info("replication"))
    return (
        info is not None
        and info["role"] == "slave"
        and info.get("master_link_status") == "up"
        and (primary_port is None or int(info["master_port"]) == primary_port)
    )


class SentinelServer(RedisServer):
    """``redis-server <sentinel.conf> --sentinel`` monitoring ``master_name`` at
    ``primary_port`` with quorum 2 and second-scale timeouts and periods
    (``SENTINEL_PERIODS``, set again at each start).

    The configuration is written in ``directory`` on the first start only: the sentinel
    rewrites it with what it learns (its id, the replicas, the other sentinels, a new
    primary), so a restarted sentinel resumes from there.
    """

    def __init__(
        self, directory: Path, executable: str, *, master_name: str, primary_port: int
    ) -> None:
        super().__init__(directory, executable, suite=SUITE)
        self.master_name = master_name
        self.primary_port = primary_port
        self.config = directory / f"sentinel-{self.port}.conf"
        self.log = directory / f"sentinel-{self.port}.log"

    def start(self) -> None:
        """Start the sentinel (again, from its rewritten config) and wait until it answers."""
        assert self.process is None, f"sentinel :{self.port} is already running"
        name = self.master_name
        if not self.config.exists():
            self.config.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {self.log}\n"
                f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        self.process = subprocess.Popen(
            [self.executable, str(self.config), "--sentinel"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        workers.wait_until(self.answers, f"sentinel on port {self.port}", self.report)
        client = _client(self.port)
        try:
            client.execute_command("SENTINEL", "DEBUG", *SENTINEL_PERIODS)
        finally:
            client.close()

    def report(self) -> str:
        return f"--- sentinel :{self.port} log ---\n{workers.tail(self.log, 30)}"


class SentinelTopology(_Topology):
    """A primary, one replica of it, and three sentinels that fail over between them.

    ``primary`` and ``replica`` are the servers as started; after a failover their roles
    are swapped, so ask :meth:`current_primary` (a restart keeps a server's start options:
    ``replica`` would come back as a replica of ``primary``'s port). ``url`` is the
    sentinel list in the form Celery's result backend takes
    (``sentinel://h:p;sentinel://h:p;...``).
    """

    master_name = "resilience-test"

    def __init__(self, directory: Path) -> None:
        executable = _executable("redis-server")
        self.directory = directory
        taken: set[int] = set()
        self.primary = _distinct(
            lambda: RedisServer(directory, executable, options=PROMPT_SYNC, suite=SUITE), taken
        )
        primary_port = self.primary.port
        self.replica = _distinct(
            lambda: RedisServer(
                directory,
                executable,
                options=[*PROMPT_SYNC, "--replicaof", "127.0.0.1", str(primary_port)],
                suite=SUITE,
            ),
            taken,
        )
        self.sentinels = [
            _distinct(
                lambda: SentinelServer(
                    directory, executable, master_name=self.master_name, primary_port=primary_port
                ),
                taken,
            )
            for _ in range(3)
        ]
        self.servers = [self.primary, self.replica, *self.sentinels]
        self.sentinel_ports = [sentinel.port for sentinel in self.sentinels]
        self.url = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as ``redis.sentinel.Sentinel`` takes them."""
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def start(self) -> None:
        """Start the servers, then the sentinels; return once every sentinel knows the
        primary, its replica (linked) and the two other sentinels."""
        self._started(self._start)

    def _start(self) -> None:
        self.primary.start()
        self.replica.start()
        workers.wait_until(
            lambda: _replica_linked(self.replica, self.primary.port),
            f"replica :{self.replica.port} to sync from :{self.primary.port}",
            self.report,
            READY_TIMEOUT_S,
        )
        for sentinel in self.sentinels:
            sentinel.start()
        workers.wait_until(
            self._sentinels_agree, "every sentinel to see the whole topology", self.report,
            READY_TIMEOUT_S,
        )  # fmt: skip

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            state = _ask(port, lambda client: client.sentinel_master(self.master_name))
            if not (
                state
                and state["port"] == self.primary.port
                and state["num-other-sentinels"] == 2
                and state["num-slaves"] == 1
                and not (state.get("is_sdown") or state.get("is_odown"))
            ):
                return False
        return True

    @contextlib.contextmanager
    def client(self, **options: Any) -> Iterator[Sentinel]:
        """A ``redis.sentinel.Sentinel`` of the three sentinels, closed after the block;
        ``options`` go to the clients of the servers it hands out."""
        sentinel = Sentinel(
            self.sentinel_addresses,
            socket_timeout=1,
            socket_connect_timeout=1,
            sentinel_kwargs={"socket_timeout": 1, "socket_connect_timeout": 1},
            **options,
        )
        try:
            yield sentinel
        finally:
            for client in sentinel.sentinels:
                client.close()

    def current_primary(self) -> RedisServer:
        """The server the sentinels name as primary now (``discover_master``)."""
        with self.client() as sentinel:
            _host, port = sentinel.discover_master(self.master_name)
        return self._server(port)

    def _server(self, port: int) -> RedisServer:
        for server in (self.primary, self.replica):
            if server.port == port:
                return server
        raise AssertionError(f"the sentinels name :{port}, not a server of this topology")

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary by its pid; return it (to restart it later)."""
        server = self.current_primary()
        server.kill()
        return server

    def wait_for_failover(self, old_port: int, timeout: float = FAILOVER_TIMEOUT_S) -> float:
        """Seconds from the call until every sentinel names a primary other than
        ``old_port`` and that server answers as a master."""
        started = time.monotonic()
        workers.wait_until(
            lambda: self._failed_over(old_port),
            f"the sentinels to fail over from :{old_port}",
            self.report,
            timeout,
        )
        return time.monotonic() - started

    def _failed_over(self, old_port: int) -> bool:
        named = {
            _ask(port, lambda client: client.sentinel_get_master_addr_by_name(self.master_name))
            for port in self.sentinel_ports
        }
        if len(named) != 1 or None in named:
            return False
        (address,) = named
        port = int(address[1])
        return port != old_port and _role(self._server(port)) == "master"

    def restart_old_primary(self, server: RedisServer, timeout: float = FAILOVER_TIMEOUT_S) -> None:
        """Start a killed former primary again; return once the sentinels have made it a
        replica of the current primary and its link is up (Sentinel waits 4 hello
        periods, 2 s here, before it reconfigures a returning primary)."""
        server.restart()
        primary = self.current_primary()
        workers.wait_until(
            lambda: _replica_linked(server, primary.port),
            f"the sentinels to make :{server.port} a replica of :{primary.port}",
            self.report,
            timeout,
        )


class ClusterTopology(_Topology):
    """Six cluster nodes, three primaries with one replica each, all 16384 slots served.

    Each node has its own directory (its ``nodes.conf`` survives a restart) and a cluster
    bus port of its own. ``url`` names the first three nodes
    (``redis+cluster://h:p,h:p,h:p``); ``startup_nodes`` are the same as pairs.
    """

    node_timeout_ms = 2000

    def __init__(self, directory: Path) -> None:
        executable = _executable("redis-server")
        self.cli = _executable("redis-cli")
        self.directory = directory
        self.create_log = directory / "cluster-create.log"
        taken: set[int] = set()
        self.nodes = [
            self._node(directory / f"node-{index}", executable, taken) for index in range(6)
        ]
        self.servers = list(self.nodes)
        self.startup_nodes = [("127.0.0.1", node.port) for node in self.nodes[:3]]
        self.url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def _node(self, directory: Path, executable: str, taken: set[int]) -> RedisServer:
        """A node in ``directory`` with a cluster bus port of its own (not port + 10000,
        which may be past 65535)."""
        directory.mkdir(parents=True, exist_ok=True)
        bus_port = workers.free_port()
        while bus_port in taken:
            bus_port = workers.free_port()
        taken.add(bus_port)
        options = [
            *PROMPT_SYNC,
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(bus_port),
        ]  # fmt: skip
        return _distinct(
            lambda: RedisServer(directory, executable, options=options, suite=SUITE), taken
        )

    def start(self) -> None:
        """Start the nodes, ``redis-cli --cluster create`` them (one replica per primary);
        return once every node says ``cluster_state:ok`` with all slots assigned, six known
        nodes and three primaries, and every replica's link is up."""
        self._started(self._start)

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        with self.create_log.open("wb") as log:
            result = subprocess.run(
                [self.cli, "--cluster", "create",
                 *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                timeout=READY_TIMEOUT_S, check=False,
            )  # fmt: skip
        assert result.returncode == 0, f"redis-cli --cluster create failed\n{self.report()}"
        workers.wait_until(
            self._healthy, "every cluster node to be ok, with its replicas linked", self.report,
            READY_TIMEOUT_S,
        )  # fmt: skip

    def _healthy(self) -> bool:
        for node in self.nodes:
            info = _ask(node.port, lambda client: client.cluster("INFO"))
            if not (
                info
                and info["cluster_state"] == "ok"
                and int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
                and int(info["cluster_known_nodes"]) == len(self.nodes)
                and int(info["cluster_size"]) == len(self.nodes) // 2
            ):
                return False
            if _role(node) == "slave" and not _replica_linked(node):
                return False
        return True

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        return [node for node in self.nodes if _role(node) == "master"]

    def _live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def _node_of(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise AssertionError(f"the cluster names :{port}, not a node of this topology")

    def slot_of(self, key: str) -> int:
        """The hash slot of ``key`` (``CLUSTER KEYSLOT``, asked of a running node)."""
        for node in self._live():
            slot = _ask(node.port, lambda client: client.cluster("KEYSLOT", key))
            if slot is not None:
                return int(slot)
        raise AssertionError(f"no cluster node answers\n{self.report()}")

    def _owners(self, slot: int) -> set[int | None]:
        """The primary port each running node says serves ``slot`` (``None``: no answer)."""
        owners: set[int | None] = set()
        for node in self._live():
            ranges = _ask(node.port, lambda client: client.execute_command("CLUSTER SLOTS"))
            owner = None
            for first, last, primary, *_replicas in ranges or ():
                if first <= slot <= last:
                    owner = int(primary[1])
            owners.add(owner)
        return owners

    def primary_of(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now, as every running node agrees."""
        owners = self._owners(self.slot_of(key))
        assert len(owners) == 1, f"the nodes disagree on the slot of {key!r}: {owners}"
        (port,) = owners
        assert port is not None, f"no node serves the slot of {key!r}\n{self.report()}"
        return self._node_of(port)

    def kill_primary_of(self, key: str) -> RedisServer:
        """SIGKILL (by pid) the primary serving ``key``'s slot; return it."""
        node = self.primary_of(key)
        node.kill()
        return node

    def wait_for_failover(
        self, key: str, old_port: int, timeout: float = FAILOVER_TIMEOUT_S
    ) -> float:
        """Seconds from the call until every running node says ``cluster_state:ok`` and
        that ``key``'s slot is served by a running primary other than ``old_port``."""
        slot = self.slot_of(key)
        started = time.monotonic()
        workers.wait_until(
            lambda: self._failed_over(slot, old_port),
            f"the cluster to fail slot {slot} over from :{old_port}",
            self.report,
            timeout,
        )
        return time.monotonic() - started

    def _failed_over(self, slot: int, old_port: int) -> bool:
        owners = self._owners(slot)
        if len(owners) != 1 or None in owners or old_port in owners:
            return False
        (port,) = owners
        assert port is not None
        return _role(self._node_of(port)) == "master" and self._all_ok()

    def restart_node(self, node: RedisServer, timeout: float = FAILOVER_TIMEOUT_S) -> None:
        """Start a killed node again from its ``nodes.conf``; return once it is a replica
        with its link up (a failed-over primary comes back as one) and the cluster is ok."""
        node.restart()
        workers.wait_until(
            lambda: _replica_linked(node) and self._all_ok(),
            f"node :{node.port} to rejoin as a replica",
            self.report,
            timeout,
        )

    def _all_ok(self) -> bool:
        for node in self._live():
            info = _ask(node.port, lambda client: client.cluster("INFO"))
            if not (info and info["cluster_state"] == "ok"):
                return False
        return True

    def report(self) -> str:
        return f"--- redis-cli --cluster create ---\n{workers.tail(self.create_log, 30)}\n" + (
            super().report()
        )
