"""The coordination backend on Redis Sentinel losing its primary while locked tasks run.

The broker and the result backend are the main Redis; only ``resilience_url`` is the
Sentinel topology, whose primary is SIGKILLed mid-run (the broker's Redis and the
coordination store are separate concerns: killing one loses nothing of the other).
Real ``celery worker`` nodes run ``crt.exclusive`` (a short critical section per lock
key that records overlapping bodies and its fencing token).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Cluster
from tests.support.services import REDIS_URL, reachable_redis
from tests.support.topology import SentinelTopology
from tests.support.workers import wait_until

pytestmark = pytest.mark.integration

TASKS, KEYS = 200, 4


@pytest.fixture(params=[0, 1], ids=["lock_replicas=0", "lock_replicas=1"])
def replicas(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def workers_on_sentinel(
    fresh_sentinel_topology: SentinelTopology, replicas: int, tmp_path: Path
) -> Iterator[Cluster]:
    settings = {
        "resilience_transport_options": {"master_name": fresh_sentinel_topology.master_name},
        "resilience_lock_replicas": replicas,
    }
    cluster = Cluster(
        redis_url=reachable_redis(REDIS_URL, "topology"),
        resilience_url=fresh_sentinel_topology.url,
        settings=settings,
        logdir=tmp_path,
    )
    with cluster.running("sentinel1", "sentinel2"):
        yield cluster


def test_a_primary_killed_mid_run_loses_no_task_and_tokens_keep_order(
    workers_on_sentinel: Cluster, fresh_sentinel_topology: SentinelTopology, replicas: int
) -> None:
    cluster, topology = workers_on_sentinel, fresh_sentinel_topology
    tag = cluster.tag()
    lock_keys = [f"key{i}" for i in range(KEYS)]
    done = cluster.records.key(tag, "done")
    started = time.monotonic()
    results = [cluster.send("crt.exclusive", tag, lock_keys[n % KEYS], n) for n in range(TASKS)]

    def report() -> str:
        unfinished = [r for r in results if r.state != "SUCCESS"]
        return f"{len(unfinished)} not SUCCESS\n{cluster.report(*unfinished[:3])}\n" + (
            topology.report()
        )

    wait_until(lambda: cluster.redis.llen(done) >= TASKS // 4, "a quarter to run", report)
    killed = topology.kill_primary()
    done_at_kill = cluster.redis.llen(done)
    failover = topology.wait_for_failover(killed.port)
    done_at_failover = cluster.redis.llen(done)
    if replicas:  # WAIT 1 needs a replica again: the old primary comes back as one
        topology.restart_old_primary(killed)

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
    print("sentinel failover:", json.dumps(figures))
    assert done_at_kill < TASKS * 3 // 4, "the primary died after most tasks had run"
    assert lost == [], report()
    assert bodies == list(range(TASKS)), f"bodies ran twice or not at all\n{report()}"
    assert all(not pairs for pairs in out_of_order.values()), out_of_order
    if replicas:
        assert overlaps == [], overlaps
