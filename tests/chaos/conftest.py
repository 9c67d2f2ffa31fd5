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
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery.result import AsyncResult

from celery_resilience import DeadLetter, DeadLetterQueue
from tests.support import services, workers
from tests.support.workers import WorkerNode

from . import app as chaos_app

T = TypeVar("T")

REDIS_URL = os.environ.get("CELERY_RESILIENCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# Bounds, not expectations (the machine may be shared and slow).
READY_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_LOG_TAIL_LINES = 60


def _kombu_sweeps_every_second() -> bool:
    """Whether kombu's own restore sweep can be set to every second (kombu >= 5.7)."""
    from kombu.transport import redis as kombu_redis

    return hasattr(kombu_redis.Channel, "unacked_restore_interval")


KOMBU_FAST_SWEEP = _kombu_sweeps_every_second()


def wait_until(
    predicate: Callable[[], T],
    what: str,
    diagnostics: Callable[[], str],
    timeout: float = WAIT_TIMEOUT_S,
    poll: float = workers.POLL_S,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with diagnostics if never."""
    return workers.wait_until(predicate, what, diagnostics, timeout, poll)


class Node(WorkerNode):
    """One ``celery worker`` node (prefork, concurrency 2) in its own process group."""

    def __init__(self, name: str, base: str, env: dict[str, str], logdir: Path) -> None:
        super().__init__(
            chaos_app, name, env, logdir, queue=env[chaos_app.QUEUE], stop_timeout=STOP_TIMEOUT_S
        )
        self.base = base  # the role it plays in its cluster ("n1"), kept by a replacement

    def received(self, task_name: str, task_id: str) -> int:
        """How many times this node received a message of ``task_id``."""
        return self.text().count(f"{task_name}[{task_id}] received")

    def report(self, lines: int = _LOG_TAIL_LINES, output_lines: int = 20) -> str:
        return super().report(lines, output_lines)


class ChaosCluster:
    """Worker nodes sharing one queue and one Redis prefix, and a client app to publish."""

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
    ) -> None:
        """``resilience_url``: a coordination Redis of its own (default: ``redis_url``);
        ``settings``: Celery settings of the workers' app (JSON values), set last."""
        run = uuid.uuid4().hex[:10]
        self.label = label
        self.prefix = f"chaos:{run}"
        self.queue = f"chaos.{run}"
        self.redis_url = redis_url
        self.logdir = logdir
        self.visibility_timeout = visibility_timeout
        self.env = {
            **workers.inherited_environment(),
            chaos_app.PREFIX: self.prefix,
            chaos_app.REDIS_URL: redis_url,
            chaos_app.QUEUE: self.queue,
            chaos_app.VISIBILITY_TIMEOUT: str(visibility_timeout),
            chaos_app.FAST_SWEEP: "1" if fast_sweep else "0",
        }
        if resilience_url is not None:
            self.env[chaos_app.RESILIENCE_URL] = resilience_url
        if settings:
            self.env[chaos_app.SETTINGS] = json.dumps(settings)
        self.app = chaos_app.create_app(self.env)
        self.records = chaos_app.Records(self.prefix, redis_url)
        self.redis: redis.Redis[str] = redis.Redis.from_url(redis_url, decode_responses=True)
        self.nodes: list[Node] = []
        self._dlq: DeadLetterQueue | None = None
        self._generation = 0

    # -- processes -------------------------------------------------------

    def spawn(self, *names: str) -> list[Node]:
        """Start nodes ``names`` (without waiting for them)."""
        started = [
            Node(f"{self.label}-{name}-{self.prefix[-6:]}", name, self.env, self.logdir)
            for name in names
        ]
        self.nodes += started
        return started

    def start(self, *names: str) -> list[Node]:
        """Start nodes ``names`` together and wait until each logs ``ready.``."""
        started = self.spawn(*names)
        for node in started:
            self.wait_ready(node)
        return started

    def wait_ready(self, node: Node) -> None:
        node.wait_ready(READY_TIMEOUT_S, self.report)

    def replace(self, node: Node) -> Node:
        """Start a fresh node in place of ``node`` (a new pod after one died)."""
        self._generation += 1
        (fresh,) = self.spawn(f"{node.base}r{self._generation}")
        return fresh

    def node(self, name: str) -> Node:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def close(self) -> None:
        for node in self.nodes:  # all asked at once, then waited for
            node.terminate()
        for node in self.nodes:
            node.stop()
        if self._dlq is not None:
            self._dlq.backend.close()
        workers.delete_keys(self.redis, f"{self.prefix}:*")
        self.redis.close()
        self.records.close()
        self.app.close()

    # -- tasks -----------------------------------------------------------

    def send_locked(self, key: str, seconds: float) -> AsyncResult:
        return self.app.tasks["chaos.locked"].apply_async((key, seconds))

    def send_held(self, tag: str, seconds: float) -> AsyncResult:
        return self.app.tasks["chaos.held"].apply_async((tag, seconds))

    def release(self, tag: str, times: int = 1) -> None:
        self.redis.rpush(self.records.release(tag), *["go"] * times)

    def result(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)

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

    def received(self, task_name: str, task_id: str) -> int:
        return sum(node.received(task_name, task_id) for node in self.nodes)

    @property
    def dlq(self) -> DeadLetterQueue:
        if self._dlq is None:
            self._dlq = DeadLetterQueue(self.app)
        return self._dlq

    def dead_letters(self) -> list[DeadLetter]:
        return list(self.dlq.iter())

    def broker_counts(self) -> tuple[int, int]:
        """(queued, unacked) messages in the Redis broker, in one snapshot."""
        broker = f"{self.prefix}:broker:"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(broker + self.queue)
            pipe.hlen(broker + "unacked")
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

    def report(self, *task_ids: str, lines: int = _LOG_TAIL_LINES) -> str:
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
        parts += [node.report(lines) for node in self.nodes]
        return "\n".join(parts)

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


@pytest.fixture
def chaos_clusters(
    chaos_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ChaosCluster]]:
    """A factory of clusters (``label, visibility_timeout=, fast_sweep=, resilience_url=,
    settings=``), all closed after."""
    made: list[ChaosCluster] = []

    def make(
        label: str,
        *,
        visibility_timeout: float,
        fast_sweep: bool = False,
        resilience_url: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> ChaosCluster:
        cluster = ChaosCluster(
            label,
            chaos_redis_url,
            tmp_path_factory.mktemp(f"chaos-{label}"),
            visibility_timeout=visibility_timeout,
            fast_sweep=fast_sweep,
            resilience_url=resilience_url,
            settings=settings,
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


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
