"""The base of the worker clusters the integration and chaos suites start.

A cluster is real ``celery -A <app module> worker`` nodes (:class:`WorkerNode`) sharing
one queue and one Redis prefix, the same app built in the test process to publish and
read results, and the records the task bodies write under that prefix. The app module
gives ``create_app(env)`` and ``Records(prefix, url)``; a suite's subclass says how to
name and start a node, where its bodies wait for the test's go-ahead, and what its
records mean.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import redis
from celery import Celery
from celery.result import AsyncResult

from celery_resilience import DeadLetter, DeadLetterQueue
from tests.support import workers
from tests.support.workers import WorkerNode

NodeT = TypeVar("NodeT", bound=WorkerNode)
SelfT = TypeVar("SelfT", bound="WorkerCluster[Any]")

# How long ``celery -A <app> ...`` (the CLI, as a user runs it) may take at most.
COMMAND_TIMEOUT_S = 60.0


class WorkerCluster(Generic[NodeT]):
    """Worker nodes of ``app_module`` sharing ``queue`` and every Redis key under ``prefix``.

    ``env`` (the app module's variables) is added to this process's environment without
    its celery-resilience settings; the nodes and the test process's app get the same.
    """

    # Bounds, not expectations: a healthy run is far below each of them.
    ready_timeout: ClassVar[float] = 30.0
    stop_timeout: ClassVar[float] = 10.0
    log_tail_lines: ClassVar[int] = 80

    def __init__(
        self,
        app_module: ModuleType,
        *,
        prefix: str,
        queue: str,
        redis_url: str,
        logdir: Path,
        env: Mapping[str, str],
    ) -> None:
        self.app_module = app_module
        self.prefix = prefix
        self.queue = queue
        self.redis_url = redis_url
        self.logdir = logdir
        self.env: dict[str, str] = {**workers.inherited_environment(), **env}
        self.app: Celery = app_module.create_app(self.env)
        self.records = app_module.Records(prefix, redis_url)
        # The records' client of this process (decoded strings).
        self.redis: redis.Redis[str] = self.records.client()
        self.nodes: list[NodeT] = []
        self._dlq: DeadLetterQueue | None = None

    # -- processes -------------------------------------------------------

    def new_node(self, name: str, **options: Any) -> NodeT:
        """Start node ``name`` of this cluster (without waiting for it)."""
        raise NotImplementedError

    def spawn(self, *names: str, **options: Any) -> list[NodeT]:
        """Start nodes ``names`` (``options`` as :meth:`new_node` takes them), not waiting."""
        started = [self.new_node(name, **options) for name in names]
        self.nodes += started
        return started

    def start(self, *names: str, **options: Any) -> list[NodeT]:
        """Start nodes ``names`` together and wait until each logs ``ready.``."""
        started = self.spawn(*names, **options)
        for node in started:
            self.wait_ready(node)
        return started

    def wait_ready(self, node: NodeT) -> None:
        node.wait_ready(self.ready_timeout, self.report)

    @contextlib.contextmanager
    def running(self: SelfT, *names: str) -> Iterator[SelfT]:
        """Start nodes ``names``; close the cluster when the block ends."""
        try:
            self.start(*names)
            yield self
        finally:
            self.close()

    def node(self, name: str) -> NodeT:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def close(self) -> None:
        """Stop every node, then :meth:`clean_up` and close the app."""
        for node in self.nodes:  # all asked at once, then waited for
            node.terminate()
        for node in self.nodes:
            node.stop()
        self.clean_up()
        self.app.close()

    def clean_up(self) -> None:
        """Delete every key of this cluster and close its clients (the nodes are gone)."""
        if self._dlq is not None:
            self._dlq.backend.close()
        workers.delete_keys(self.redis, f"{self.prefix}:*")
        self.records.client.close()

    def celery(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A <the nodes' app> *argv`` as a user would, with the nodes' env."""
        return subprocess.run(
            workers.celery_command(self.app_module, *argv),
            env=workers.command_environment(self.app_module, self.env),
            cwd=workers.import_root(self.app_module),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )

    # -- tasks -----------------------------------------------------------

    def send(self, task_name: str, *args: Any, **options: Any) -> AsyncResult:
        """Publish ``task_name`` through its task object, as a user would."""
        result: AsyncResult = self.app.tasks[task_name].apply_async(args, **options)
        return result

    def result(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)

    def tag(self) -> str:
        """A fresh namespace for one test's records and lock keys."""
        return uuid.uuid4().hex[:10]

    def release_key(self, tag: str) -> str:
        """The list the bodies of test ``tag`` wait on for the test's go-ahead."""
        raise NotImplementedError

    def release(self, tag: str) -> None:
        """Push one go-ahead for the bodies of test ``tag`` (how many it lets go: the app's)."""
        self.redis.rpush(self.release_key(tag), "go")

    # -- what happened ---------------------------------------------------

    @property
    def dlq(self) -> DeadLetterQueue:
        """The dead-letter queue of the nodes' app."""
        if self._dlq is None:
            self._dlq = DeadLetterQueue(self.app)
        return self._dlq

    def dead_letters(self, task_id: str | None = None) -> list[DeadLetter]:
        """The DLQ entries (of ``task_id`` only, if given), newest first."""
        return [e for e in self.dlq.iter() if task_id is None or e.task_id == task_id]

    def logged(self, text: str) -> bool:
        """Whether any node's log file contains ``text``."""
        return any(text in node.text() for node in self.nodes)

    def received(self, task_name: str, task_id: str) -> int:
        """How many times the nodes received a message of ``task_id``."""
        return sum(node.received(task_name, task_id) for node in self.nodes)

    def broker_key(self, name: str) -> str:
        """The Redis broker's key ``name`` (a queue, ``unacked``) of this cluster."""
        return f"{self.prefix}:broker:{name}"

    def node_reports(self, lines: int | None = None) -> list[str]:
        """Every node's state and log tail."""
        return [node.report(lines or self.log_tail_lines) for node in self.nodes]

    def report(self) -> str:
        """What a person debugging a failure needs (the suites add task states)."""
        return "\n".join([f"prefix {self.prefix}, queue {self.queue}", *self.node_reports()])
