"""A cluster of worker nodes of ``tests.integration.heartbeat_app`` under one Redis prefix.

Used by the visibility-heartbeat and liveness integration tests. A node may run under
its own host name (``unshare --uts``: a recovery across hosts cannot pass through the
same-host pid check) and its own clock (libfaketime).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import WorkerCluster
from tests.support.workers import WorkerNode, restore_sweeper, wait_until

from . import heartbeat_app as hb

VT = 4.0  # the visibility timeout of the heartbeat tests' clusters, seconds


def on_host(hostname: str) -> list[str]:
    """A command prefix running the rest under host name ``hostname`` (a UTS namespace)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to run a worker under its own host name")
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]


def skewed_clock(offset: str) -> list[str]:
    """A command prefix running the rest with its clock ``offset`` off (``+40s``, ``-10m``)."""
    if shutil.which("faketime") is None:
        pytest.fail("faketime (libfaketime) is needed for the clock-skew tests")
    return ["faketime", "-m", "-f", offset]


class HeartbeatCluster(WorkerCluster[WorkerNode]):
    """Nodes of one concurrency each sharing one queue and one Redis prefix, and a
    client app to publish."""

    def __init__(
        self,
        label: str,
        redis_url: str,
        logdir: Path,
        *,
        heartbeat: str,
        fast_sweep: bool,
        visibility_timeout: float = VT,
        settings: Mapping[str, str] = {},
    ) -> None:
        run = uuid.uuid4().hex[:10]
        prefix, queue = f"hbtest:{run}", f"hbtest.{run}"
        self.label = label
        env = {
            hb.PREFIX: prefix,
            hb.REDIS_URL: redis_url,
            hb.QUEUE: queue,
            hb.VISIBILITY_TIMEOUT: str(visibility_timeout),
            hb.HEARTBEAT: heartbeat,
            hb.FAST_SWEEP: "1" if fast_sweep else "0",
            **settings,
        }
        super().__init__(
            hb, prefix=prefix, queue=queue, redis_url=redis_url, logdir=logdir, env=env
        )

    def new_node(
        self, name: str, pool: str = "prefork", wrap: Sequence[str] = (), **env: str
    ) -> WorkerNode:
        return WorkerNode(
            hb,
            name,
            {**self.env, **env},
            self.logdir,
            queue=self.queue,
            pool=pool,
            concurrency=1,
            wrap=wrap,
            stop_timeout=self.stop_timeout,
        )

    def spawn(
        self, *pools: str, wrap: Sequence[str] = (), env: Mapping[str, str] = {}
    ) -> list[WorkerNode]:
        """Start one node per pool, not waiting; ``wrap`` prefixes their command
        (``on_host``, ``skewed_clock``), ``env`` adds to their environment."""
        started = []
        for pool in pools:
            name = f"{self.label}{len(self.nodes) + 1}-{pool}-{self.prefix[-6:]}"
            started += super().spawn(name, pool=pool, wrap=wrap, **env)
        return started

    def send(self, tag: str, seconds: float, **options: Any) -> str:
        """Publish ``hb.held``; return its task id."""
        return str(self.app.tasks["hb.held"].apply_async((tag, seconds), **options).id)

    def deliveries(self, task_id: str) -> int:
        """How many times the nodes received ``task_id`` (a copy suppressed as a
        duplicate does not start its body, but is received again)."""
        return self.received("hb.held", task_id)

    def starts(self, tag: str) -> list[tuple[str, float]]:
        """(node, time) of each start of test ``tag``'s body, in order; times are the
        Redis server's, whatever the node's clock."""
        rows = self.redis.lrange(self.records.key(tag, "starts"), 0, -1)
        return [(node, float(at)) for node, _pid, at in (row.split() for row in rows)]

    def completions(self, tag: str) -> list[str]:
        rows = self.redis.lrange(self.records.key(tag, "completions"), 0, -1)
        return [row.split()[0] for row in rows]

    def release_key(self, tag: str) -> str:
        return self.records.key(tag, "release")

    def release(self, tag: str, times: int = 1) -> None:
        self.redis.rpush(self.release_key(tag), *["go"] * times)

    def settled(self) -> bool:
        """Nothing queued and nothing unacked: no message can start a body any more."""
        return not self.redis.llen(self.broker_key(self.queue)) and not self.redis.hlen(
            self.broker_key("unacked")
        )

    def wait_completed(self, tag: str) -> None:
        """Wait until test ``tag``'s body completed and its message was acked."""
        wait_until(
            lambda: self.completions(tag) and self.settled(),
            "the task to complete and be acked",
            lambda: self.report(tag),
        )

    def sweeping(self) -> contextlib.AbstractContextManager[list[BaseException]]:
        """Run kombu's restore sweep every 0.25 s from this process; yields its errors."""
        return restore_sweeper(
            self.redis_url, hb.broker_options(self.env), 0.25, f"sweeper-{self.label}"
        )

    def report(self, *tags: str) -> str:
        lines = [f"cluster {self.label}: prefix {self.prefix}"]
        lines += [f"{tag}: starts={self.starts(tag)} done={self.completions(tag)}" for tag in tags]
        return "\n".join([*lines, *self.node_reports(60)])
