"""The coordination backend on Redis Sentinel, and on Redis Cluster, losing a primary
while locked tasks run.

The broker and the result backend are the main Redis; only ``resilience_url`` is the
topology, one of whose primaries is SIGKILLed mid-run (the broker's Redis and the
coordination store are separate concerns: killing one loses nothing of the other).
Real ``celery worker`` nodes run ``crt.exclusive`` (a short critical section per lock
key that records overlapping bodies and its fencing token). On the cluster the primary
killed is the one serving the slot of the first lock key.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Cluster
from tests.support.services import REDIS_URL, reachable_redis
from tests.support.topology import ClusterTopology, SentinelTopology
from tests.support.workers import wait_until

pytestmark = pytest.mark.integration

TASKS, KEYS = 200, 4
LOCK = "exclusive:{tag}:{key}"  # crt.exclusive's lock template


@pytest.fixture(params=[0, 1], ids=["lock_replicas=0", "lock_replicas=1"])
def replicas(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _workers(url: str, settings: dict[str, Any], logdir: Path) -> Cluster:
    redis_url = reachable_redis(REDIS_URL, "topology")
    return Cluster(redis_url=redis_url, resilience_url=url, settings=settings, logdir=logdir)


def _run_through(
    cluster: Cluster, fault: Callable[[str], float], replicas: int, where: str
) -> dict[str, Any]:
    """Publish TASKS locked tasks over KEYS keys, run ``fault(tag)`` (kill a primary,
    return seconds to failover) after a quarter ran, wait for all; check and return the
    figures."""
    tag = cluster.tag()
    lock_keys = [f"key{i}" for i in range(KEYS)]
    done = cluster.records.key(tag, "done")
    started = time.monotonic()
    results = [cluster.send("crt.exclusive", tag, lock_keys[n % KEYS], n) for n in range(TASKS)]

    def report() -> str:
        unfinished = [r for r in results if r.state != "SUCCESS"]
        return f"{len(unfinished)} not SUCCESS\n{cluster.report(*unfinished[:3])}"

    wait_until(lambda: cluster.redis.llen(done) >= TASKS // 4, "a quarter to run", report)
    done_at_kill = cluster.redis.llen(done)
    failover = fault(tag)
    done_at_failover = cluster.redis.llen(done)
    wait_until(
        lambda: all(r.state in {"SUCCESS", "FAILURE"} for r in results),
        f"{TASKS} tasks to end",
        report,
        120,
    )
    elapsed = time.monotonic() - started
    lost = [r.id for r in results if r.state != "SUCCESS"]
    bodies = sorted(map(int, cluster.records_of(tag, "done")))
    overlaps = cluster.records_of(tag, "overlaps")
    tokens = {key: [int(t) for t in cluster.records_of(tag, "tokens", key)] for key in lock_keys}
    out_of_order = {
        key: [(a, b) for a, b in itertools.pairwise(seen) if not a < b]
        for key, seen in tokens.items()
    }
    figures = {
        "lock_replicas": replicas,
        "tasks": TASKS,
        "lost": len(lost),
        "bodies": len(bodies),
        "overlaps": len(overlaps),
        "tokens_out_of_order": sum(map(len, out_of_order.values())),
        "done_at_kill": done_at_kill,
        "done_at_failover": done_at_failover,
        "postponed_for_the_backend": sum(
            event == "retry_scheduled:backend_unavailable"
            for r in results
            for event in cluster.events(r.id)
        ),
        "failover_s": round(failover, 2),
        "run_s": round(elapsed, 2),
    }
    print(f"{where} failover:", json.dumps(figures))
    assert done_at_kill < TASKS * 3 // 4, "the primary died after most tasks had run"
    assert lost == [], report()
    assert bodies == list(range(TASKS)), f"bodies ran twice or not at all\n{report()}"
    assert all(not pairs for pairs in out_of_order.values()), out_of_order
    if replicas:
        assert overlaps == [], overlaps
    return figures


@pytest.fixture
def workers_on_sentinel(
    fresh_sentinel_topology: SentinelTopology, replicas: int, tmp_path: Path
) -> Iterator[Cluster]:
    settings = {
        "resilience_transport_options": {"master_name": fresh_sentinel_topology.master_name},
        "resilience_lock_replicas": replicas,
    }
    with _workers(fresh_sentinel_topology.url, settings, tmp_path).running("s1", "s2") as made:
        yield made


def test_a_sentinel_primary_killed_mid_run_loses_no_task_and_tokens_keep_order(
    workers_on_sentinel: Cluster, fresh_sentinel_topology: SentinelTopology, replicas: int
) -> None:
    topology = fresh_sentinel_topology

    def fault(tag: str) -> float:
        killed = topology.kill_primary()
        failover = topology.wait_for_failover(killed.port)
        if replicas:  # WAIT 1 needs a replica again: the old primary comes back as one
            topology.restart_old_primary(killed)
        return failover

    _run_through(workers_on_sentinel, fault, replicas, "sentinel")


@pytest.fixture
def workers_on_cluster(
    fresh_redis_cluster: ClusterTopology, replicas: int, tmp_path: Path
) -> Iterator[Cluster]:
    settings = {"resilience_lock_replicas": replicas}
    with _workers(fresh_redis_cluster.url, settings, tmp_path).running("c1", "c2") as made:
        yield made


def test_a_cluster_primary_killed_mid_run_loses_no_task_and_tokens_keep_order(
    workers_on_cluster: Cluster, fresh_redis_cluster: ClusterTopology, replicas: int
) -> None:
    topology = fresh_redis_cluster

    def fault(tag: str) -> float:
        slot_key = "{lock:" + LOCK.format(tag=tag, key="key0") + "}"
        killed = topology.kill_primary_of(slot_key)
        failover = topology.wait_for_failover(slot_key, killed.port)
        if replicas:  # the slot's new primary has no replica until the old one is back
            topology.restart_node(killed)
        return failover

    _run_through(workers_on_cluster, fault, replicas, "cluster")
