"""Recovery by liveness with real workers on a Redis broker, on default settings.

The visibility timeout is kombu's default (3600 s) and the node TTL ours (6 s): a
killed node's task back within seconds can only come from liveness. The killed node
runs under its own host name (``unshare --uts``), so the same-host pid check cannot
free its leases; its lock lease is 60 s, so its TTL cannot either.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import heartbeat_app as hb
from .harness import wait_until
from .heartbeat_cluster import HeartbeatCluster, on_host, skewed_clock

pytestmark = [pytest.mark.integration, pytest.mark.kombu]

READY_TIMEOUT_S = 30.0
DEFAULT_VT = 3600.0
# Expected: node TTL 6 s + sweep 1 s + a fetch. Generous for a shared machine, and far
# below what the lock lease (60 s after its last renewal) or the timeout would give.
RECOVERY_BOUND_S = 25.0


@pytest.fixture
def cluster(integration_redis_url: str, tmp_path: Path) -> Iterator[HeartbeatCluster]:
    made = HeartbeatCluster(
        "live",
        integration_redis_url,
        tmp_path,
        heartbeat="on",
        fast_sweep=False,
        visibility_timeout=DEFAULT_VT,
    )
    try:
        yield made
    finally:
        made.close()


def lost_nodes(cluster: HeartbeatCluster) -> list[dict[str, object]]:
    """What ``resilience nodes`` lists as recently lost (newest first)."""
    key = f"{cluster.prefix}:broker:{cluster.prefix}:res:lost"
    return [json.loads(row) for row in cluster.redis.lrange(key, 0, -1)]


def test_a_killed_node_on_another_host_has_its_locked_task_back_within_seconds(
    cluster: HeartbeatCluster,
) -> None:
    """SIGKILL a node on another host mid-task: the survivor runs it again within the
    node TTL and a sweep, its lock freed because the holder's presence expired."""
    tag, key, host = f"k-{uuid.uuid4().hex[:6]}", f"lock-{uuid.uuid4().hex[:6]}", "pod-victim"
    (victim,) = cluster.spawn("prefork", wrap=on_host(host))
    victim.wait_ready(READY_TIMEOUT_S)
    cluster.app.tasks["hb.locked"].apply_async((tag, key, 120))
    wait_until(lambda: cluster.starts(tag), "the first start", lambda: cluster.report(tag))
    (survivor,) = cluster.spawn("prefork")
    survivor.wait_ready(READY_TIMEOUT_S)

    killed_at = victim.kill()
    try:
        starts = wait_until(
            lambda: s if len(s := cluster.starts(tag)) >= 2 else None,
            "the killed node's task to start again",
            lambda: cluster.report(tag),
            timeout=RECOVERY_BOUND_S + 15,
        )
    finally:
        cluster.release(tag)
    recovery = starts[1][1] - killed_at
    print(f"\nrecovery after SIGKILL on another host: {recovery:.2f} s (node TTL 6 s)")
    cluster.wait_completed(tag)

    report = cluster.report(tag)
    assert [node for node, _ in starts] == [victim.name.split("@")[0], survivor.name], report
    assert cluster.completions(tag) == [survivor.name], report
    assert recovery < RECOVERY_BOUND_S, report
    (lost,) = lost_nodes(cluster)
    assert lost["hostname"] == host, lost
    assert sum(lost["recovered"].values()) == 1, lost  # type: ignore[union-attr]


def test_a_message_fetched_while_the_node_is_busy_is_delivered_once(
    integration_redis_url: str, tmp_path: Path
) -> None:
    """visibility_timeout=2: a message the node fetched while busy (kombu >= 5.7 parks it
    for want of prefetch credit) is held too, and never restored while the node lives."""
    cluster = HeartbeatCluster(
        "park", integration_redis_url, tmp_path, heartbeat="on", fast_sweep=True,
        visibility_timeout=2,
    )  # fmt: skip
    try:
        (node,) = cluster.spawn("prefork")
        node.wait_ready(READY_TIMEOUT_S)
        first, second = f"p1-{uuid.uuid4().hex[:6]}", f"p2-{uuid.uuid4().hex[:6]}"
        ids = [cluster.send(first, 8), cluster.send(second, 0)]
        wait_until(
            lambda: cluster.completions(first) and cluster.completions(second),
            "both tasks to complete",
            lambda: cluster.report(first, second),
            timeout=40,
        )
        time.sleep(3)  # a stray copy restored late would be received by now
        report = cluster.report(first, second)
        assert [cluster.deliveries(task_id) for task_id in ids] == [1, 1], report
        assert len(cluster.starts(first)) == len(cluster.starts(second)) == 1, report
    finally:
        cluster.close()


def test_the_node_ttl_setting_is_what_the_worker_runs_with(
    integration_redis_url: str, tmp_path: Path
) -> None:
    cluster = HeartbeatCluster(
        "ttl", integration_redis_url, tmp_path, heartbeat="on", fast_sweep=False,
        visibility_timeout=DEFAULT_VT, settings={hb.NODE_TTL: "3"},
    )  # fmt: skip
    try:
        (node,) = cluster.spawn("solo")
        node.wait_ready(READY_TIMEOUT_S)
        assert "presence TTL 3 s, liveness sweep every 0.5 s" in node.text()
    finally:
        cluster.close()


def test_a_node_whose_clock_is_40s_ahead_redelivers_nothing_under_a_30s_timeout(
    integration_redis_url: str, tmp_path: Path
) -> None:
    """A node 40 s ahead, with Celery's default remote control (so kombu's periodic
    restore may sweep from its pidbox channel) and kombu's sweep every second, beside a
    node running a 25 s task: the task is delivered once."""
    cluster = HeartbeatCluster(
        "skew", integration_redis_url, tmp_path, heartbeat="on", fast_sweep=True,
        visibility_timeout=30,
    )  # fmt: skip
    try:
        (steady,) = cluster.spawn("prefork")
        steady.wait_ready(READY_TIMEOUT_S)
        tag = f"s-{uuid.uuid4().hex[:6]}"
        task_id = cluster.send(tag, 25)
        wait_until(lambda: cluster.starts(tag), "the start", lambda: cluster.report(tag))
        (ahead,) = cluster.spawn("prefork", wrap=skewed_clock("+40s"), env={hb.REMOTE_CONTROL: "1"})
        ahead.wait_ready(READY_TIMEOUT_S)
        wait_until(
            lambda: cluster.completions(tag),
            "the task to complete",
            lambda: cluster.report(tag),
            timeout=40,
        )
        time.sleep(2)
        report = cluster.report(tag)
        assert cluster.deliveries(task_id) == 1, report
        assert len(cluster.starts(tag)) == 1, report
    finally:
        cluster.close()
