"""The visibility heartbeat with real workers on a Redis broker with a 4 s visibility timeout.

Three clusters of two worker nodes each (``tests.integration.heartbeat_app``), all
started at once for the module, every key under the cluster's own prefix:

- ``on``: heartbeat on, one prefork node and one solo node (the heartbeat runs in the
  event loop of the first and in a thread of the second);
- ``off``: heartbeat off, two prefork nodes, to show the first test can fail;
- ``kill``: heartbeat on, two prefork nodes, kombu's restore sweep at its default.

For ``on`` and ``off`` the restore sweep runs at its fastest: kombu's own every second
where kombu supports it (>= 5.7), and, on every kombu version, a sweeper in the test
process calling kombu's ``restore_visible`` every 0.25 s, as a worker with the fastest
sweep would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from .harness import wait_until
from .heartbeat_cluster import HeartbeatCluster

pytestmark = [pytest.mark.integration, pytest.mark.kombu]

VT = 4.0  # the visibility timeout of every cluster, seconds
HELD_S = 3 * VT  # how long the held tasks run, or wait for their ETA
READY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def clusters(
    integration_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, HeartbeatCluster]]:
    """The ``on``, ``off`` and ``kill`` clusters, all nodes started together."""
    logdir = tmp_path_factory.mktemp("heartbeat-workers")
    made = {
        "on": HeartbeatCluster(
            "on", integration_redis_url, logdir, heartbeat="on", fast_sweep=True
        ),
        "off": HeartbeatCluster(
            "off", integration_redis_url, logdir, heartbeat="off", fast_sweep=True
        ),
        "kill": HeartbeatCluster(
            "kill", integration_redis_url, logdir, heartbeat="on", fast_sweep=False
        ),
    }
    try:
        made["on"].spawn("prefork", "solo")
        made["off"].spawn("prefork", "prefork")
        made["kill"].spawn("prefork", "prefork")
        for cluster in made.values():
            for node in cluster.nodes:
                node.wait_ready(READY_TIMEOUT_S)
        yield made
    finally:
        for cluster in made.values():  # all shut down at once, then waited for
            for node in cluster.nodes:
                node.terminate()
        for cluster in made.values():
            cluster.close()


def test_tasks_held_longer_than_the_visibility_timeout_start_once_with_the_heartbeat(
    clusters: dict[str, HeartbeatCluster],
) -> None:
    """12 s under a 4 s timeout, sweeps every 0.25 s: running (prefork and solo) and
    ETA-waiting tasks each start exactly once."""
    cluster = clusters["on"]
    eta, first, second = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("eta", "a", "b"))
    with cluster.sweeping() as sweep_errors:
        ids = [
            cluster.send(eta, 0, countdown=HELD_S),  # first, so a node still has room for it
            cluster.send(first, HELD_S),
            cluster.send(second, HELD_S),
        ]
        wait_until(
            lambda: all(cluster.completions(tag) for tag in (eta, first, second)),
            "three held tasks to complete",
            lambda: cluster.report(eta, first, second),
            timeout=HELD_S + 15,
        )
        wait_until(cluster.settled, "every message acked", lambda: cluster.report(eta))

    report = cluster.report(eta, first, second)
    assert sweep_errors == [], report
    for tag, task_id in zip((eta, first, second), ids, strict=True):
        assert len(cluster.starts(tag)) == 1, f"{tag} started more than once\n{report}"
        assert len(cluster.completions(tag)) == 1, report
        assert cluster.deliveries(task_id) == 1, f"{tag} delivered more than once\n{report}"
    runners = {cluster.starts(tag)[0][0] for tag in (first, second)}
    assert runners == {node.name for node in cluster.nodes}, report
    prefork, solo = cluster.nodes
    started = "liveness sweep every 1 s, visibility refresh every 1 s in"
    assert f"{started} the event loop (visibility timeout 4 s, reliable fetch on)" in prefork.text()
    assert f"{started} a thread (visibility timeout 4 s, reliable fetch on)" in solo.text()


def test_without_the_heartbeat_a_task_held_longer_than_the_timeout_is_delivered_again(
    clusters: dict[str, HeartbeatCluster],
) -> None:
    """With resilience_visibility_heartbeat=False the message is delivered twice; the task
    id's run lease keeps the copy from starting a second body while the first runs."""
    cluster, tag = clusters["off"], f"off-{uuid.uuid4().hex[:6]}"
    with cluster.sweeping():
        task_id = cluster.send(tag, HELD_S)
        try:
            wait_until(
                lambda: cluster.deliveries(task_id) >= 2,
                "a second delivery",
                lambda: cluster.report(tag),
                timeout=HELD_S + 10,
            )
            assert len(cluster.starts(tag)) == 1, cluster.report(tag)
        finally:
            cluster.release(tag, times=5)
    assert "visibility heartbeat off" in cluster.nodes[0].text(), cluster.report(tag)


def test_a_killed_nodes_task_runs_again_on_the_other_node_within_a_few_timeouts(
    clusters: dict[str, HeartbeatCluster],
) -> None:
    """SIGKILL a whole node mid-task: the other node runs it again, completing once."""
    cluster, tag = clusters["kill"], f"kill-{uuid.uuid4().hex[:6]}"
    cluster.send(tag, 60)
    ((victim_name, _),) = wait_until(
        lambda: cluster.starts(tag), "the first start", lambda: cluster.report(tag)
    )
    time.sleep(VT / 2)  # let the victim's heartbeat run at least once
    victim = cluster.node(victim_name)
    victim.kill()
    killed_at = time.time()
    try:
        starts = wait_until(
            lambda: s if len(s := cluster.starts(tag)) >= 2 else None,
            "the killed node's task to start again",
            lambda: cluster.report(tag),
            timeout=6 * VT,
        )
    finally:
        cluster.release(tag)
    recovery = starts[1][1] - killed_at
    print(f"\nrecovery after SIGKILL: {recovery:.2f} s (visibility timeout {VT:g} s)")
    cluster.wait_completed(tag)

    report = cluster.report(tag)
    assert [node for node, _ in cluster.starts(tag)] == [victim_name, starts[1][0]], report
    assert starts[1][0] != victim_name, report
    assert cluster.completions(tag) == [starts[1][0]], report
    assert recovery < 6 * VT, report
