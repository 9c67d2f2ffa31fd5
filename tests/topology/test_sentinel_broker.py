"""The broker on Redis Sentinel (kombu's ``sentinel://`` transport), with no
``resilience_url``: the coordination and DLQ backends take the broker's URL and master
name. Its primary is SIGKILLed while tasks run; then a worker node under its own host
name is SIGKILLed, and liveness brings its tasks back on the new primary.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.result import AsyncResult

from tests.integration.harness import Cluster
from tests.integration.heartbeat_cluster import on_host
from tests.support.services import REDIS_URL, reachable_redis
from tests.support.topology import SentinelTopology
from tests.support.workers import wait_until

pytestmark = pytest.mark.integration

NODE_TTL = 3
RECOVERY_BOUND_S = 20.0  # node TTL 3 s + a sweep + a fetch, generous for a shared machine


@pytest.fixture
def cluster(fresh_sentinel_topology: SentinelTopology, tmp_path: Path) -> Iterator[Cluster]:
    topology = fresh_sentinel_topology
    made = Cluster(
        redis_url=reachable_redis(REDIS_URL, "topology"),
        broker_url=topology.url,
        settings={
            "broker_transport_options": {"master_name": topology.master_name},
            "resilience_url": None,  # the broker's, as a user who sets nothing gets
            "resilience_node_ttl": NODE_TTL,
        },
        logdir=tmp_path,
    )
    try:
        yield made
    finally:
        made.close()


def _ended(results: list[AsyncResult]) -> bool:
    return all(r.state in {"SUCCESS", "FAILURE"} for r in results)


def _bodies(cluster: Cluster, tag: str) -> Counter[str]:
    return Counter(json.loads(row)["id"] for row in cluster.records_of(tag, "bodies"))


def test_tasks_survive_the_brokers_failover_and_a_dead_node_after_it(
    cluster: Cluster, fresh_sentinel_topology: SentinelTopology
) -> None:
    topology = fresh_sentinel_topology
    (victim,) = cluster.start("victim", wrap=on_host("pod-victim"))
    assert "presence TTL 3 s" in victim.text(), victim.report()  # heartbeat and liveness
    assert "reliable fetch on" in victim.text(), victim.report()

    # The broker's primary dies under six running and queued tasks.
    tag = cluster.tag()
    results = [cluster.send("crt.records_its_body", tag, 1.5) for _ in range(6)]
    wait_until(lambda: cluster.starts(tag), "a first body", cluster.report)
    killed = topology.kill_primary()
    failover = topology.wait_for_failover(killed.port)
    wait_until(
        lambda: _ended(results), "the six tasks to end", lambda: cluster.report(*results), 90
    )
    report = cluster.report(*results) + topology.report()
    assert [r.state for r in results] == ["SUCCESS"] * 6, report
    assert _bodies(cluster, tag) == Counter({r.id: 1 for r in results}), report

    # After the failover: a node on another host dies mid-task; liveness recovers it.
    tag = cluster.tag()
    held = [cluster.send("crt.records_its_body", tag, 6) for _ in range(2)]
    wait_until(lambda: len(cluster.starts(tag)) == 2, "both bodies on the victim", cluster.report)
    (survivor,) = cluster.start("survivor")
    killed_at = victim.kill()
    wait_until(lambda: len(cluster.starts(tag)) == 4, "the bodies again", cluster.report, 60)
    recovery = time.time() - killed_at
    wait_until(lambda: _ended(held), "the two tasks to end", lambda: cluster.report(*held), 60)
    print(
        f"\nbroker on Sentinel: failover {failover:.2f} s; a dead node's 2 tasks started "
        f"again {recovery:.2f} s after its SIGKILL (node TTL {NODE_TTL} s)"
    )
    report = cluster.report(*held) + topology.report()
    assert [r.state for r in held] == ["SUCCESS"] * 2, report
    assert _bodies(cluster, tag) == Counter({r.id: 1 for r in held}), report
    assert recovery < RECOVERY_BOUND_S, report
    assert survivor.alive
