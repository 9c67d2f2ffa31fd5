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
import redis

from tests.support.workers import (
    WorkerNode,
    delete_keys,
    inherited_environment,
    restore_sweeper,
)

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


class HeartbeatCluster:
    """Two nodes sharing one queue and one Redis prefix, and a client app to publish."""

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
        self.label = label
        self.prefix = f"hbtest:{run}"
        self.env = {
            **inherited_environment(),
            hb.PREFIX: self.prefix,
            hb.REDIS_URL: redis_url,
            hb.QUEUE: f"hbtest.{run}",
            hb.VISIBILITY_TIMEOUT: str(visibility_timeout),
            hb.HEARTBEAT: heartbeat,
            hb.FAST_SWEEP: "1" if fast_sweep else "0",
            **settings,
        }
        self.redis_url = redis_url
        self.logdir = logdir
        self.app = hb.create_app(self.env)
        self.redis: redis.Redis[str] = redis.Redis.from_url(redis_url, decode_responses=True)
        self.nodes: list[WorkerNode] = []

    def spawn(
        self, *pools: str, wrap: Sequence[str] = (), env: Mapping[str, str] = {}
    ) -> list[WorkerNode]:
        """Start one node per pool; ``wrap`` prefixes their command (``on_host``,
        ``skewed_clock``), ``env`` adds to their environment."""
        started = []
        for pool in pools:
            name = f"{self.label}{len(self.nodes) + 1}-{pool}-{self.prefix[-6:]}"
            node = WorkerNode(
                hb,
                name,
                {**self.env, **env},
                self.logdir,
                queue=self.env[hb.QUEUE],
                pool=pool,
                concurrency=1,
                wrap=wrap,
            )
            self.nodes.append(node)
            started.append(node)
        return started

    def node(self, name: str) -> WorkerNode:
        (node,) = [n for n in self.nodes if n.name == name]
        return node

    def send(self, tag: str, seconds: float, **options: Any) -> str:
        """Publish ``hb.held``; return its task id."""
        return str(self.app.tasks["hb.held"].apply_async((tag, seconds), **options).id)

    def deliveries(self, task_id: str) -> int:
        """How many times the nodes received ``task_id`` (a copy suppressed as a
        duplicate does not start its body, but is received again)."""
        return sum(node.text().count(f"hb.held[{task_id}] received") for node in self.nodes)

    def starts(self, tag: str) -> list[tuple[str, float]]:
        """(node, time) of each start of test ``tag``'s body, in order; times are the
        Redis server's, whatever the node's clock."""
        rows = self.redis.lrange(hb.record_key(self.prefix, tag, "starts"), 0, -1)
        return [(node, float(at)) for node, _pid, at in (row.split() for row in rows)]

    def completions(self, tag: str) -> list[str]:
        rows = self.redis.lrange(hb.record_key(self.prefix, tag, "completions"), 0, -1)
        return [row.split()[0] for row in rows]

    def release(self, tag: str, times: int = 1) -> None:
        self.redis.rpush(hb.record_key(self.prefix, tag, "release"), *["go"] * times)

    def settled(self) -> bool:
        """Nothing queued and nothing unacked: no message can start a body any more."""
        broker = f"{self.prefix}:broker:"
        queue = self.env[hb.QUEUE]
        return not self.redis.llen(broker + queue) and not self.redis.hlen(broker + "unacked")

    def sweeping(self) -> contextlib.AbstractContextManager[list[BaseException]]:
        """Run kombu's restore sweep every 0.25 s from this process; yields its errors."""
        return restore_sweeper(
            self.redis_url, hb.broker_options(self.env), 0.25, f"sweeper-{self.label}"
        )

    def report(self, *tags: str) -> str:
        lines = [f"cluster {self.label}: prefix {self.prefix}"]
        lines += [f"{tag}: starts={self.starts(tag)} done={self.completions(tag)}" for tag in tags]
        return "\n".join([*lines, *(node.report(60) for node in self.nodes)])

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        delete_keys(self.redis, f"{self.prefix}:*")
        self.redis.close()
        self.app.close()
