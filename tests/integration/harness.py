"""The integration suite's worker cluster: nodes of ``tests.integration.app``.

Nothing here mocks anything: workers are ``celery -A tests.integration.app worker``
subprocesses (prefork pool) in their own session, so a test can SIGKILL a pool child
and teardown can kill the whole process group (the base, ``tests.support.cluster``, is
shared with the chaos suite). Every wait is bounded and fails with the worker logs
attached.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import redis
from celery.result import AsyncResult

from tests.support.cluster import WorkerCluster
from tests.support.workers import WorkerNode, wait_until

from . import app as app_module

__all__ = ["Cluster", "check_lock_exclusion", "wait_until"]

# RabbitMQ: long enough for a stray requeued copy to be delivered and started on an idle node.
AMQP_GRACE_S = 1.0


class Cluster(WorkerCluster[WorkerNode]):
    """Worker nodes sharing one queue and one Redis prefix, and a client app to publish."""

    def __init__(
        self,
        *,
        redis_url: str,
        logdir: Path,
        broker_url: str | None = None,
        resilience_url: str | None = None,
        dlq_url: str | None = None,
        visibility_timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """``settings``: Celery settings of the workers' app (JSON values), set last."""
        self.run_id = uuid.uuid4().hex[:12]
        prefix, queue = f"crtest:{self.run_id}", f"crtest.{self.run_id}"
        self.broker_url = broker_url or redis_url
        # RabbitMQ (anything not Redis) cannot be looked into as the Redis broker can.
        self.amqp = not self.broker_url.startswith(("redis://", "rediss://"))
        env = {
            app_module.PREFIX: prefix,
            app_module.BROKER_URL: self.broker_url,
            app_module.RESULT_URL: redis_url,
            app_module.RECORD_URL: redis_url,
            app_module.RESILIENCE_URL: resilience_url or redis_url,
            app_module.QUEUE: queue,
        }
        if dlq_url is not None:
            env[app_module.DLQ_URL] = dlq_url
        if visibility_timeout is not None:
            env[app_module.VISIBILITY_TIMEOUT] = str(visibility_timeout)
        if settings:
            env[app_module.SETTINGS] = json.dumps(dict(settings))
        super().__init__(
            app_module, prefix=prefix, queue=queue, redis_url=redis_url, logdir=logdir, env=env
        )
        # The broker's own Redis, where it is not the main one (a private server).
        self.broker_redis: redis.Redis[str] = (
            self.redis
            if self.amqp or self.broker_url == redis_url
            else redis.Redis.from_url(self.broker_url, decode_responses=True, socket_timeout=5)
        )

    @property
    def workers(self) -> list[WorkerNode]:
        """The nodes started so far (the integration tests' name for them)."""
        return self.nodes

    # -- processes -------------------------------------------------------

    def new_node(self, name: str, **options: Any) -> WorkerNode:
        return WorkerNode(
            app_module,
            f"{name}-{self.run_id}",
            self.env,
            self.logdir,
            queue=self.queue,
            stop_timeout=self.stop_timeout,
            **options,
        )

    def clean_up(self) -> None:
        super().clean_up()
        self.broker_redis.close()
        if self.amqp:
            # An AMQP broker keeps the queue (and its exchange) after the workers left.
            with self.app.connection_for_write() as connection:
                channel = connection.default_channel
                channel.queue_delete(self.queue)
                channel.exchange_delete(self.queue)

    # -- what happened ---------------------------------------------------

    def release_key(self, tag: str) -> str:
        """``crt.blocks_until_released`` takes one go-ahead: one body of ``tag`` ends."""
        return self.records.key(tag, "release")

    def records_of(self, tag: str, *parts: object) -> list[str]:
        """The list a task body of test ``tag`` recorded under ``parts``, in order."""
        return self.redis.lrange(self.records.key(tag, *parts), 0, -1)

    def starts(self, tag: str) -> list[str]:
        """The pids that started the body of the test ``tag``'s task, in order."""
        return self.records_of(tag, "starts")

    def wait_for_starts(self, tag: str, count: int, *results: AsyncResult) -> list[str]:
        """Wait until the body of test ``tag`` started at least ``count`` times."""
        return wait_until(
            lambda: starts if len(starts := self.starts(tag)) >= count else None,
            f"{count} body start(s) of {tag}",
            lambda: self.report(*results),
        )

    def wait_until_settled(self, result: AsyncResult, tag: str | None = None) -> None:
        """Wait until the broker no longer holds any message of ``result`` (acked).

        RabbitMQ does not tell a client how many messages are delivered but unacked, so
        there it means: no message of the queue is ready, and after a grace period no
        body of the test ``tag`` started again (``tag`` is required on RabbitMQ).
        """
        if not self.amqp:
            wait_until(
                lambda: not self.broker_holds(result.id),
                f"the broker to drop every message of {result.id}",
                lambda: self.report(result),
            )
            return
        if tag is None:
            raise TypeError("wait_until_settled on RabbitMQ needs the test's tag")
        wait_until(
            lambda: self.ready_messages() == 0,
            "the RabbitMQ queue to be empty",
            lambda: self.report(result),
        )
        before = self.starts(tag)
        time.sleep(AMQP_GRACE_S)
        after = self.starts(tag)
        assert after == before, (
            f"the body started again after the outcome: {before} -> {after}\n" + self.report(result)
        )
        assert self.ready_messages() == 0, self.report(result)

    def wait_until_event(self, result: AsyncResult, event: str, count: int = 1) -> list[str]:
        """Wait until ``event`` was seen ``count`` times for ``result``; return all its events."""
        return wait_until(
            lambda: events if (events := self.events(result.id)).count(event) >= count else None,
            f"{count} x {event!r} for {result.id}",
            lambda: self.report(result),
        )

    def events(self, task_id: str) -> list[str]:
        """The celery-resilience observer events seen for ``task_id``, in order."""
        return self.redis.lrange(self.records.events_key(task_id), 0, -1)

    def ready_messages(self) -> int:
        """Messages waiting in the cluster's RabbitMQ queue (not counting unacked ones)."""
        with self.app.connection_for_write() as connection:
            declared = connection.default_channel.queue_declare(self.queue, passive=True)
            return int(declared.message_count)

    def broker_holds(self, task_id: str) -> bool:
        """Whether the Redis broker still has a message of ``task_id`` (queued or unacked).

        A message a worker just popped is in neither place for an instant, so this is
        only meaningful once the task reached its outcome and nothing is in flight.
        """
        assert not self.amqp, "RabbitMQ does not show a client its unacked messages"
        needle = json.dumps(task_id)
        with self.broker_redis.pipeline(transaction=True) as pipe:  # one snapshot of both
            pipe.lrange(self.broker_key(self.queue), 0, -1)
            pipe.hvals(self.broker_key("unacked"))
            queued, unacked = pipe.execute()
        return any(needle in message for message in [*queued, *unacked])

    def wait_for_state(self, result: AsyncResult, states: Iterable[str], what: str) -> str:
        wanted = set(states)
        return wait_until(
            lambda: result.state if result.state in wanted else None,
            f"{what} to reach {'/'.join(sorted(wanted))}",
            lambda: self.report(result),
        )

    def report(self, *results: AsyncResult) -> str:
        """What a person debugging a failure needs: task states, events, worker logs."""
        parts = [f"run {self.prefix}, queue {self.queue}, broker {self.broker_url}"]
        for result in results:
            parts.append(
                f"task {result.id}: state={result.state} result={result.result!r} "
                f"events={self.events(result.id)}"
            )
        return "\n".join([*parts, *self.node_reports()])


def check_lock_exclusion(cluster: Cluster, *, tasks: int, keys: int) -> None:
    """Run ``tasks`` ``crt.exclusive`` tasks over ``keys`` lock keys and check exclusion.

    Every task must succeed exactly once, no two bodies on one key may overlap, the
    fencing tokens of each key must strictly increase in the order its bodies ran, and
    every worker node of the cluster must have run some of them.
    """
    tag = cluster.tag()
    lock_keys = [f"key{i}" for i in range(keys)]
    results = [cluster.send("crt.exclusive", tag, lock_keys[n % keys], n) for n in range(tasks)]
    done_key = cluster.records.key(tag, "done")

    def report() -> str:
        unfinished = [r for r in results if r.state != "SUCCESS"]
        return f"{len(unfinished)} of {tasks} tasks not SUCCESS\n" + cluster.report(*unfinished[:5])

    wait_until(
        lambda: cluster.redis.llen(done_key) >= tasks or any(r.state == "FAILURE" for r in results),
        f"{tasks} exclusive tasks to complete",
        report,
    )

    def final_states() -> list[str] | None:
        states = [r.state for r in results]
        return states if set(states) <= {"SUCCESS", "FAILURE"} else None

    states = wait_until(final_states, "every result to be stored", report)
    assert states == ["SUCCESS"] * tasks, report()
    assert [r.result for r in results] == list(range(tasks)), report()
    assert sorted(map(int, cluster.records_of(tag, "done"))) == list(range(tasks)), report()

    overlaps = cluster.records_of(tag, "overlaps")
    assert overlaps == [], f"bodies overlapped on a lock key: {overlaps}\n{report()}"

    for index, key in enumerate(lock_keys):
        tokens = [int(t) for t in cluster.records_of(tag, "tokens", key)]
        runs_expected = len(range(index, tasks, keys))
        assert len(tokens) == runs_expected, (
            f"{key}: {len(tokens)} bodies ran for {runs_expected} tasks\n{report()}"
        )
        decreasing = [(a, b) for a, b in itertools.pairwise(tokens) if not a < b]
        assert decreasing == [], (
            f"{key}: fencing tokens not strictly increasing in run order: {decreasing}"
        )

    nodes = {host.split("@")[0] for host in cluster.records_of(tag, "hosts")}
    assert nodes == {w.name for w in cluster.nodes}, (
        f"expected every node to run tasks, ran on {nodes}\n{report()}"
    )
