"""One body per task id at a time, under concurrent copies and coordination faults.

Real ``celery worker`` nodes (prefork, concurrency 2) on a Redis broker; the bodies
record their own spans (start and end times) in the main Redis, and the tests check
what a user would: no two bodies of one task id at once, the task's state, its dead
letters. The fault tests stall or stop a private ``redis-server`` (the broker or the
coordination backend) by its pid; the machine's shared Redis is never signalled.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.support import workers
from tests.support.redis_server import RedisServer
from tests.support.workers import redis_broker_options

from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration

BODY_S = 2.0
# Bodies outlive the broker stall, so a copy redelivered on resume meets a running one.
BROKER_STALL_S = 15.0
BROKER_VISIBILITY_TIMEOUT_S = 30.0
STALLED_BODY_S = 22.0
# Another consumer's restore sweep (a node without the heartbeat, kombu's own sweep).
SWEEP_EVERY_S = 0.25
# Longer than the coordination client's 5 s socket timeout.
COORDINATION_STALL_S = 9.0
# The contract is 2 s (checked in the chaos suite's timing); a loaded 2-core machine
# gets more here.
START_AFTER_RESUME_BOUND_S = 5.0
SETTLE_TIMEOUT_S = 90.0


def spans(cluster: Cluster, tag: str) -> list[dict[str, Any]]:
    """The bodies of test ``tag`` that ran to their end: id, pid, retries, start, end."""
    return [json.loads(line) for line in cluster.records_of(tag, "bodies")]


def overlapping(bodies: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The pairs of bodies of one task id that ran at the same time, as (start, start)."""
    return [
        (a["start"], b["start"])
        for a, b in itertools.combinations(bodies, 2)
        if a["id"] == b["id"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]


def most_at_once(bodies: list[dict[str, Any]]) -> int:
    """The largest number of bodies of one task id running at one moment."""
    edges = sorted(
        [(b["start"], 1, b["id"]) for b in bodies] + [(b["end"], -1, b["id"]) for b in bodies],
        key=lambda edge: (edge[0], edge[1]),
    )
    running: dict[str, int] = {}
    most = 0
    for _, step, task_id in edges:
        running[task_id] = running.get(task_id, 0) + step
        most = max(most, running[task_id])
    return most


def wait_until_settled(cluster: Cluster, tag: str, results: list[AsyncResult]) -> None:
    """Wait until every result is stored, the broker holds none of their messages
    (queued, unacked or waiting for a countdown) and every started body ended; twice
    in a row a second apart."""

    def quiet() -> bool:
        return (
            all(r.state in {"SUCCESS", "FAILURE"} for r in results)
            and not any(cluster.broker_holds(r.id) for r in results)
            and len(cluster.starts(tag)) == len(spans(cluster, tag))
        )

    def twice() -> bool:
        if not quiet():
            return False
        time.sleep(1.0)
        return quiet()

    wait_until(
        twice, "every copy to be done with", lambda: cluster.report(*results), SETTLE_TIMEOUT_S
    )


def check_one_body_at_a_time(cluster: Cluster, tag: str, results: list[AsyncResult]) -> None:
    """Every task SUCCESS, none dead-lettered, no two bodies of one id at once."""
    bodies = spans(cluster, tag)
    tasks = list({r.id: r for r in results}.values())  # one per task id
    report = f"bodies {bodies}\n" + cluster.report(*tasks)
    print(
        f"{len(results)} publish(es) of {len(tasks)} task id(s): {len(bodies)} bodies, at "
        f"most {most_at_once(bodies)} of one id at once, {len(overlapping(bodies))} "
        f"overlapping pair(s), {sum(len(cluster.dead_letters(t.id)) for t in tasks)} dead "
        f"letter(s), states {[t.state for t in tasks]}"
    )
    assert overlapping(bodies) == [], f"bodies of one task id overlapped\n{report}"
    for result in tasks:
        assert result.state == "SUCCESS", report
        assert cluster.dead_letters(result.id) == [], f"{result.id} dead-lettered\n{report}"
        assert any(b["id"] == result.id for b in bodies), f"{result.id} never ran\n{report}"


@pytest.mark.parametrize("copies", [2, 4])
def test_the_same_task_id_published_concurrently_runs_one_body_at_a_time(
    redis_cluster: Cluster, copies: int
) -> None:
    """One task id published 2x / 4x at once, no lock: bodies never overlap, SUCCESS, no DLQ."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    task_id = f"same-{tag}"
    results = [
        cluster.send("crt.records_its_body", tag, BODY_S, task_id=task_id) for _ in range(copies)
    ]
    wait_until_settled(cluster, tag, results)
    check_one_body_at_a_time(cluster, tag, results)


def wait_for_a_heartbeat(cluster: Cluster, visibility_timeout: float) -> None:
    """Wait until a node's visibility heartbeat just refreshed a held message.

    It marks the message delivered half a timeout ago; a stall that starts now leaves
    it unrefreshed for the whole stall, and its next tick meets the server stopped.
    """
    index = f"{cluster.prefix}:broker:unacked_index"

    def refreshed() -> bool:
        scores = cluster.broker_redis.zrange(index, 0, -1, withscores=True)
        half = time.time() - visibility_timeout / 2
        return any(abs(score - half) < 0.2 for _, score in scores)

    wait_until(refreshed, "a visibility heartbeat", cluster.report, visibility_timeout)


def test_a_broker_stall_under_the_visibility_timeout_redelivers_nothing(
    integration_redis_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    """Broker Redis SIGSTOPped 15 s (visibility timeout 30 s) mid-task, just after a
    heartbeat, a plain kombu consumer sweeping: the nodes' presence survives the stall
    and their refresh is on the server's clock, so nothing is restored; SUCCESS, no DLQ.

    Before liveness, the refresh was scored with the worker's clock at send time and
    this stall redelivered copies (the run lease then kept them from starting a
    second body; that case is tested with the heartbeat off in test_heartbeat.py)."""
    cluster = Cluster(
        redis_url=integration_redis_url,
        broker_url=private_redis.url,
        visibility_timeout=BROKER_VISIBILITY_TIMEOUT_S,
        logdir=tmp_path,
    )
    with cluster.running("stall1", "stall2"):
        tag = cluster.tag()
        results = [cluster.send("crt.records_its_body", tag, STALLED_BODY_S) for _ in range(2)]
        cluster.wait_for_starts(tag, len(results), *results)
        options = redis_broker_options(
            cluster.prefix, BROKER_VISIBILITY_TIMEOUT_S, fast_sweep=False
        )
        with workers.restore_sweeper(private_redis.url, options, SWEEP_EVERY_S, "sweeper"):
            wait_for_a_heartbeat(cluster, BROKER_VISIBILITY_TIMEOUT_S)
            private_redis.pause()
            try:
                time.sleep(BROKER_STALL_S)
            finally:
                private_redis.resume()
            wait_until_settled(cluster, tag, results)
        received = [cluster.received("crt.records_its_body", r.id) for r in results]
        print(f"deliveries per task after the stall: {received}")
        assert received == [1, 1], cluster.report(*results)
        assert not any("is gone (no presence" in w.text() for w in cluster.workers), cluster.report(
            *results
        )
        check_one_body_at_a_time(cluster, tag, results)


@pytest.mark.parametrize("task_name", ["crt.records_its_body", "crt.locked_records_its_body"])
def test_a_task_whose_admit_outlived_a_coordination_stall_starts_soon_after_resume(
    integration_redis_url: str, private_redis: RedisServer, tmp_path: Path, task_name: str
) -> None:
    """Coordination Redis SIGSTOPped 9 s (> the 5 s socket timeout) with an admit in
    flight: the task starts soon after SIGCONT, on its first attempt, and max_crashes=1
    does not dead-letter it."""
    cluster = Cluster(
        redis_url=integration_redis_url,
        resilience_url=private_redis.url,
        settings={"resilience_max_crashes": 1},
        logdir=tmp_path,
    )
    with cluster.running("admit1"):
        # A task first, as in production: the server knows the backend's scripts, so
        # the admit the client gives up on is one the server can run on resume.
        warm_up = cluster.send(task_name, cluster.tag(), 0.0)
        cluster.wait_for_state(warm_up, {"SUCCESS"}, "a first task")
        tag = cluster.tag()
        private_redis.pause()
        try:
            result = cluster.send(task_name, tag, 0.1)
            time.sleep(COORDINATION_STALL_S)
        finally:
            private_redis.resume()
        resumed_at = time.time()
        wait_until_settled(cluster, tag, [result])
        bodies = spans(cluster, tag)
        report = f"bodies {bodies}\n{cluster.report(result)}\n{private_redis.report()}"
        starts = [b["start"] - resumed_at for b in bodies]
        print(
            f"{task_name}: state {result.state}, body starts {[f'{s:+.2f}' for s in starts]} s "
            f"after resume, retries {[b['retries'] for b in bodies]}, dead letters "
            f"{len(cluster.dead_letters(result.id))}, events {cluster.events(result.id)}"
        )
        assert result.state == "SUCCESS", report
        assert cluster.dead_letters(result.id) == [], report
        assert len(bodies) == 1, report
        assert starts[0] <= START_AFTER_RESUME_BOUND_S, report
        # The stall is an outage: it spends none of the task's retries.
        assert bodies[0]["retries"] == 0, report
