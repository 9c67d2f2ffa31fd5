"""Harness of the chaos suite: real worker nodes on a Redis broker, real signals.

Each test builds its clusters through the ``chaos_clusters`` factory: worker nodes
(``celery -A tests.chaos.app worker``, prefork, concurrency 2) in their own process
groups, so a test can SIGKILL one pool child, SIGKILL or SIGTERM a whole node, and
teardown can kill what is left. Every wait is bounded and fails with diagnostics.

The suite is not collected by a bare ``pytest`` (``norecursedirs`` in pyproject);
run it with ``pytest tests/chaos`` or ``tox -e chaos``. What it measures (recovery
times, duplicates, lost tasks) is printed at the end of the run and written to
``chaos-summary.json`` in pytest's base temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_resilience import liveness
from celery_resilience.settings import load_settings
from tests.support import services, workers
from tests.support.cluster import WorkerCluster
from tests.support.services import REDIS_URL
from tests.support.workers import WorkerNode, wait_until

from . import app as chaos_app

__all__ = ["KOMBU_FAST_SWEEP", "ChaosCluster", "Node", "record", "wait_until"]

# Bounds, not expectations (the machine may be shared and slow).
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_LOG_TAIL_LINES = 60


def _kombu_sweeps_every_second() -> bool:
    """Whether kombu's own restore sweep can be set to every second (kombu >= 5.7)."""
    from kombu.transport import redis as kombu_redis

    return hasattr(kombu_redis.Channel, "unacked_restore_interval")


KOMBU_FAST_SWEEP = _kombu_sweeps_every_second()


class Node(WorkerNode):
    """One ``celery worker`` node (prefork, concurrency 2 by default) in its own process
    group; ``wrap`` prefixes its command (``on_host``, ``skewed_clock``), ``app_module``
    is the app it runs (``tests.chaos.app`` by default)."""

    def __init__(
        self,
        name: str,
        base: str,
        env: Mapping[str, str],
        logdir: Path,
        *,
        concurrency: int = 2,
        wrap: Sequence[str] = (),
        app_module: ModuleType = chaos_app,
    ) -> None:
        super().__init__(
            app_module,
            name,
            env,
            logdir,
            queue=env[chaos_app.QUEUE],
            concurrency=concurrency,
            stop_timeout=STOP_TIMEOUT_S,
            wrap=wrap,
        )
        self.base = base  # the role it plays in its cluster ("n1"), kept by a replacement
        self.gate = env.get(chaos_app.GATE)  # the list it waits on before consuming, if any

    def report(self, lines: int = _LOG_TAIL_LINES, output_lines: int = 20) -> str:
        return super().report(lines, output_lines)


class ChaosCluster(WorkerCluster[Node]):
    """Worker nodes sharing one queue and one Redis prefix, and a client app to publish."""

    ready_timeout = READY_TIMEOUT_S
    stop_timeout = STOP_TIMEOUT_S
    log_tail_lines = _LOG_TAIL_LINES

    def __init__(
        self,
        label: str,
        redis_url: str,
        logdir: Path,
        *,
        visibility_timeout: float,
        fast_sweep: bool = False,
        resilience_url: str | None = None,
        settings: dict[str, Any] | None = None,
        lock_ttl: float | None = None,
    ) -> None:
        """``resilience_url``: a coordination Redis of its own (default: ``redis_url``);
        ``settings``: Celery settings of the workers' app (JSON values, e.g.
        ``resilience_node_ttl``), set last; ``lock_ttl``: the lock leases' TTL (default
        ``app.LOCK_TTL``)."""
        run = uuid.uuid4().hex[:10]
        prefix, queue = f"chaos:{run}", f"chaos.{run}"
        self.label = label
        self.visibility_timeout = visibility_timeout
        env = {
            chaos_app.PREFIX: prefix,
            chaos_app.REDIS_URL: redis_url,
            chaos_app.QUEUE: queue,
            chaos_app.VISIBILITY_TIMEOUT: str(visibility_timeout),
            chaos_app.FAST_SWEEP: "1" if fast_sweep else "0",
        }
        if resilience_url is not None:
            env[chaos_app.RESILIENCE_URL] = resilience_url
        if settings:
            env[chaos_app.SETTINGS] = json.dumps(settings)
        if lock_ttl is not None:
            env[chaos_app.LOCK_TTL_S] = str(lock_ttl)
        super().__init__(
            chaos_app, prefix=prefix, queue=queue, redis_url=redis_url, logdir=logdir, env=env
        )
        self._generation = 0

    # -- processes -------------------------------------------------------

    def new_node(
        self,
        name: str,
        *,
        concurrency: int = 2,
        wrap: Sequence[str] = (),
        gated: bool = False,
        app_module: ModuleType = chaos_app,
    ) -> Node:
        """``gated``: the node waits, once imported, until :meth:`ungate` (it consumes
        nothing before); ``app_module``: the app it runs instead of ``tests.chaos.app``."""
        full = f"{self.label}-{name}-{self.prefix[-6:]}"
        env = dict(self.env)
        if gated:
            env[chaos_app.GATE] = self.records.key("gate", full)
        return Node(
            full, name, env, self.logdir, concurrency=concurrency, wrap=wrap, app_module=app_module
        )

    def ungate(self, node: Node) -> None:
        """Let a gated node go on with its start (a cold start is over by then)."""
        assert node.gate is not None, f"{node.name} was not spawned gated"
        self.redis.rpush(node.gate, "go")

    def wait_gated(self, node: Node) -> None:
        """Wait until a gated node is imported and waiting at its gate."""
        assert node.gate is not None, f"{node.name} was not spawned gated"
        key = node.gate + ":waiting"
        what = f"{node.name} at its gate"
        wait_until(lambda: self.redis.exists(key), what, self.report, self.ready_timeout)

    def replace(self, node: Node) -> Node:
        """Start a fresh node in place of ``node`` (a new pod after one died)."""
        self._generation += 1
        (fresh,) = self.spawn(f"{node.base}r{self._generation}")
        return fresh

    # -- tasks -----------------------------------------------------------

    def send_locked(self, key: str, seconds: float) -> AsyncResult:
        return self.send("chaos.locked", key, seconds)

    def send_held(self, tag: str, seconds: float) -> AsyncResult:
        return self.send("chaos.held", tag, seconds)

    def send_unlocked(self, seconds: float) -> AsyncResult:
        return self.send("chaos.unlocked", seconds)

    def release_key(self, tag: str) -> str:
        """``chaos.held`` never uses its go-ahead up: every body of ``tag``, now and later, ends."""
        return str(self.records.release(tag))

    # -- what happened ---------------------------------------------------

    def log(self, start: int = 0) -> list[dict[str, Any]]:
        """The bodies' start/end records from index ``start`` on."""
        return [json.loads(line) for line in self.redis.lrange(self.records.log, start, -1)]

    def starts(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.log() if e["ev"] == "start" and e["id"] == task_id]

    def completions(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.records.completions).items()}

    def overlaps(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.redis.lrange(self.records.overlaps, 0, -1)]

    def events(self, task_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.records.events(task_id)).items()}

    def start_counts(self) -> dict[str, int]:
        """Bodies started per task id, of the tasks that count only (``chaos.trivial``)."""
        return {k: int(v) for k, v in self.redis.hgetall(self.records.starts).items()}

    @property
    def liveness_keys(self) -> liveness.keys.Keys:
        return liveness.keys_of(self.app.conf, load_settings(self.app.conf, {}))

    def lost_nodes(self) -> list[dict[str, Any]]:
        """The nodes recently presumed dead, newest first (what ``resilience nodes``
        lists): node id, nodename, hostname, pid, lost_at, recovered {queue: n}."""
        rows = self.redis.lrange(self.liveness_keys.lost, 0, -1)
        return [json.loads(row) for row in rows]

    def present_nodes(self) -> list[dict[str, Any]]:
        """The info of every worker node with a presence now (nodename, hostname...)."""
        return [json.loads(v) for v in self.redis.hvals(self.liveness_keys.info)]

    def sweeper_host(self) -> str | None:
        """The host name of the node sweeping for the fleet now (its presence id's
        ``node/host/pid/random``), or ``None`` while no node holds the sweeper lease."""
        holder = self.redis.get(self.liveness_keys.sweeper)
        return None if holder is None else str(holder).split("/")[1]

    def broker_counts(self) -> tuple[int, int]:
        """(queued, unacked) messages in the Redis broker, in one snapshot."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(self.broker_key(self.queue))
            pipe.hlen(self.broker_key("unacked"))
            queued, unacked = pipe.execute()
        return int(queued), int(unacked)

    def settled(self) -> bool:
        """Nothing queued and nothing unacked: no message can start a body any more."""
        return self.broker_counts() == (0, 0)

    def wait_settled(self, diagnostics: Callable[[], str]) -> None:
        """Settled twice in a row 0.2 s apart (a popped message is briefly nowhere)."""

        def twice() -> bool:
            if not self.settled():
                return False
            time.sleep(0.2)
            return self.settled()

        wait_until(twice, "every message acked", diagnostics)

    def report(self, *task_ids: str, lines: int | None = None) -> str:
        """Task states, their events and records, broker counts, every node's log tail."""
        queued, unacked = self.broker_counts()
        parts = [
            f"cluster {self.label}: prefix {self.prefix}, queue {self.queue}, "
            f"visibility timeout {self.visibility_timeout:g} s; broker: {queued} queued, "
            f"{unacked} unacked"
        ]
        completions = self.completions()
        log = self.log()
        for task_id in task_ids:
            result = self.result(task_id)
            mine = [
                f"{e['ev']}:{e['node']}/{e['pid']}@{e['t']:.2f}" for e in log if e["id"] == task_id
            ]
            parts.append(
                f"task {task_id}: state={result.state} result={result.result!r} "
                f"completions={completions.get(task_id, 0)} events={self.events(task_id)} "
                f"bodies={mine}"
            )
        overlaps = self.overlaps()
        if overlaps:
            parts.append(f"overlaps: {overlaps}")
        return "\n".join([*parts, *self.node_reports(lines)])

    def sweeping(
        self, every: float = 0.25
    ) -> contextlib.AbstractContextManager[list[BaseException]]:
        """Run kombu's restore sweep every ``every`` s from this process; yields its errors.

        The fastest sweep kombu < 5.7 can be made to run (those versions have no option
        for it), as tests/integration/test_heartbeat.py does.
        """
        options = chaos_app.broker_options(self.env)
        return workers.restore_sweeper(self.redis_url, options, every, f"sweeper-{self.label}")


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def chaos_redis_url() -> str:
    """The real Redis used as broker, result backend and coordination backend."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the chaos suite needs Linux (process groups, /proc)")
    return services.reachable_redis(REDIS_URL, "the chaos suite's")


@contextlib.contextmanager
def _cluster_factory(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ChaosCluster]]:
    made: list[ChaosCluster] = []

    def make(label: str, *, visibility_timeout: float, **options: Any) -> ChaosCluster:
        cluster = ChaosCluster(
            label,
            redis_url,
            tmp_path_factory.mktemp(f"chaos-{label}"),
            visibility_timeout=visibility_timeout,
            **options,
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture
def chaos_clusters(
    chaos_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ChaosCluster]]:
    """A factory of clusters (``label, visibility_timeout=, fast_sweep=, resilience_url=,
    settings=, lock_ttl=``), all closed after."""
    with _cluster_factory(chaos_redis_url, tmp_path_factory) as make:
        yield make


@pytest.fixture(scope="module")
def chaos_module_clusters(
    chaos_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ChaosCluster]]:
    """``chaos_clusters`` for a module's fixtures: clusters a scenario starts in the
    background of other tests, closed when the module is done."""
    with _cluster_factory(chaos_redis_url, tmp_path_factory) as make:
        yield make


# -- the summary ---------------------------------------------------------------

_SUMMARY: dict[str, Any] = {}
_SUMMARY_FILE: list[Path] = []


@pytest.fixture(scope="session")
def chaos_summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dict each scenario adds its measurements to; written as JSON after the run."""
    path = tmp_path_factory.getbasetemp() / "chaos-summary.json"
    try:
        yield _SUMMARY
    finally:
        path.write_text(json.dumps(_SUMMARY, indent=2, sort_keys=True) + "\n")
        _SUMMARY_FILE.append(path)


def record(summary: dict[str, Any], name: str, lines: list[str], **figures: Any) -> None:
    """Print a scenario's measurements and add them to the summary under ``name``."""
    print("\n" + "\n".join(lines))
    summary[name] = {"lines": lines, **figures}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the scenarios measured, and where the JSON summary is."""
    if not _SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos summary")
    for name, section in _SUMMARY.items():
        write(f"{name}:")
        for line in section.get("lines", []):
            write(f"  {line}")
    if _SUMMARY_FILE:
        write(f"JSON summary: {_SUMMARY_FILE[0]}")
