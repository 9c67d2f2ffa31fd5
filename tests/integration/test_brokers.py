"""What both brokers must give: exclusion, a killed child's task run again once, the
crash budget, and a redelivered copy of a done task suppressed.

Each test runs on the module's two nodes on a Redis broker, then on RabbitMQ (Redis
for results and coordination: the ``broker_cluster`` fixture; RabbitMQ being down
skips, or under CI fails, only that half). The brokers get there differently: RabbitMQ requeues a
rejected message itself (``reject_on_worker_lost``) and redelivers it with its
``redelivered`` flag set, where kombu's Redis transport emulates acks; the gate's
counters, not the broker, are what stop a poison message and suppress a duplicate on
both. RabbitMQ does not tell a client how many messages are delivered but unacked, so
"settled" there means: no message of the queue is ready, and after a grace period the
body did not start again (``Cluster.wait_until_settled``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from celery_resilience import CrashBudgetExceeded, headers

from .harness import Cluster, check_lock_exclusion

pytestmark = pytest.mark.integration


def test_tasks_on_the_same_lock_key_never_overlap_across_two_nodes(broker_cluster: Cluster) -> None:
    """40 tasks over 3 lock keys on 2 nodes x 2 children all succeed, never overlapping."""
    check_lock_exclusion(broker_cluster, tasks=40, keys=3)


def test_a_child_killed_mid_task_runs_the_task_again_to_one_completion(
    broker_cluster: Cluster,
) -> None:
    """A pool child SIGKILLed mid-task: the task is redelivered, runs again and completes once."""
    cluster, tag = broker_cluster, broker_cluster.tag()
    result = cluster.send("crt.blocks_until_released", tag)
    try:
        (victim,) = cluster.wait_for_starts(tag, 1, result)
        os.kill(int(victim), signal.SIGKILL)
        cluster.wait_for_starts(tag, 2, result)
    finally:
        cluster.release(tag)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the killed task")
    cluster.wait_until_settled(result, tag)

    report = cluster.report(result)
    assert state == "SUCCESS", report
    assert result.result == "released", report
    starts = cluster.starts(tag)
    assert len(starts) == 2, f"body started {len(starts)} times: {starts}\n{report}"
    assert starts[0] == victim, report
    assert starts[1] != victim, report
    assert cluster.records_of(tag, "completions") == [starts[1]], report
    events = cluster.events(result.id)
    assert events.count("redelivery_seen") == 1, report
    assert "duplicate_suppressed" not in events, report
    assert cluster.dead_letters(result.id) == [], report


def test_a_task_that_kills_its_worker_every_time_stops_after_the_crash_budget(
    broker_cluster: Cluster,
) -> None:
    """A poison message (SIGKILLs its child) runs max_crashes=3 times, then fails for good
    (its one worker_lost dead letter: test_dlq.py)."""
    cluster, tag = broker_cluster, broker_cluster.tag()
    result = cluster.send("crt.kills_its_worker", tag)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the poison message")
    cluster.wait_until_settled(result, tag)

    report = cluster.report(result)
    assert state == "FAILURE", report
    assert isinstance(result.result, CrashBudgetExceeded), report
    assert "max_crashes=3" in str(result.result), report
    starts = cluster.starts(tag)
    assert len(starts) == 3, f"body started {len(starts)} times: {starts}\n{report}"
    assert len(set(starts)) == 3, f"each start should be in a fresh child: {starts}\n{report}"
    time.sleep(0.5)  # grace period: the message is acked, so nothing may start it again
    assert len(cluster.starts(tag)) == 3, cluster.report(result)
    assert cluster.events(result.id)[-2:] == ["crash_budget_spent", "gave_up:worker_lost"], report


def test_a_redelivered_copy_of_a_succeeded_task_is_acked_without_running(
    broker_cluster: Cluster,
) -> None:
    """A copy of a succeeded task's message (same publish) is acked, counted, not run; the
    result is kept."""
    cluster, tag = broker_cluster, broker_cluster.tag()
    message = {headers.PUBLISH: f"publish-{tag}"}  # what a redelivered copy carries
    first = cluster.send("crt.doubles", tag, 21, headers=message)
    assert cluster.wait_for_state(first, {"SUCCESS", "FAILURE"}, "the first run") == "SUCCESS"
    assert first.result == 42

    copy = cluster.send("crt.doubles", tag, 21, task_id=first.id, headers=message)
    assert copy.id == first.id
    events = cluster.wait_until_event(first, "duplicate_suppressed")
    cluster.wait_until_settled(first, tag)

    report = cluster.report(first)
    assert events.count("duplicate_suppressed") == 1, report
    assert len(cluster.starts(tag)) == 1, report
    fresh = cluster.result(first.id)
    assert fresh.state == "SUCCESS", report
    assert fresh.result == 42, report
