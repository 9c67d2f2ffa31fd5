"""The coordination backend (a private redis-server) going away under a running worker.

Run on each broker (the ``broker_url`` fixture): a Redis broker, then RabbitMQ. The
result backend stays on the main Redis; only ``resilience_url`` points at the Redis
this module stops and restarts.
"""

from __future__ import annotations

import pytest

from tests.support.redis_server import RedisServer

from .harness import Cluster

pytestmark = pytest.mark.integration


def test_a_task_never_runs_unguarded_while_the_coordination_backend_is_down(
    flaky_backend_cluster: Cluster, flaky_backend: RedisServer
) -> None:
    """Coordination Redis down: the body does not run; back up: the task runs once and succeeds."""
    cluster, tag = flaky_backend_cluster, flaky_backend_cluster.tag()
    flaky_backend.stop()
    try:
        result = cluster.send("crt.doubles", tag, 21)
        # Twice postponed after its admission was refused for a lease TTL: kept, not
        # run, not lost, and no retry spent (the state never turns RETRY).
        events = cluster.wait_until_event(result, "retry_scheduled:backend_unavailable", count=2)
        report = cluster.report(result) + "\n" + flaky_backend.report()
        assert result.state == "PENDING", report
        assert cluster.starts(tag) == [], f"body ran without its coordination backend\n{report}"
        assert not any(e.startswith("gave_up") for e in events), report
    finally:
        flaky_backend.start()

    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the task after the outage")
    cluster.wait_until_settled(result, tag)
    report = cluster.report(result)
    assert state == "SUCCESS", report
    assert result.result == 42, report
    assert len(cluster.starts(tag)) == 1, report
    assert not [e for e in cluster.events(result.id) if e.startswith("retry_scheduled:exc")]
