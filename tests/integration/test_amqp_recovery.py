"""Worker-death recovery with a RabbitMQ broker (Redis for results and coordination).

The guarantees of ``test_redis_broker.py`` on the other broker: RabbitMQ requeues a
rejected message itself (``reject_on_worker_lost``) and redelivers with its
``redelivered`` flag set, so the gate's counters, not kombu's emulated acks, are what
stop a poison message and suppress a duplicate here.

RabbitMQ does not tell a client how many messages are delivered but unacked, so
"settled" here means: no message of the queue is ready, and after a grace period the
body did not start again (``Cluster.wait_until_settled``).
"""

from __future__ import annotations

import os
import signal

import pytest

from celery_resilience import CrashBudgetExceeded, headers

from .harness import Cluster

pytestmark = pytest.mark.integration


def test_a_child_killed_mid_task_runs_the_task_again_to_one_completion_on_rabbitmq(
    amqp_cluster: Cluster,
) -> None:
    """A pool child SIGKILLed mid-task: RabbitMQ redelivers, the task runs again, once."""
    cluster, tag = amqp_cluster, amqp_cluster.tag()
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


def test_a_task_that_kills_its_worker_every_time_stops_after_the_crash_budget_on_rabbitmq(
    amqp_cluster: Cluster,
) -> None:
    """A poison message runs max_crashes=3 times, then FAILURE and one worker_lost entry."""
    cluster, tag = amqp_cluster, amqp_cluster.tag()
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
    assert cluster.events(result.id)[-2:] == ["crash_budget_spent", "gave_up:worker_lost"], report
    entries = cluster.dead_letters(result.id)
    assert len(entries) == 1, f"{entries}\n{report}"
    (entry,) = entries
    assert entry.reason == "worker_lost", report
    assert entry.task_name == "crt.kills_its_worker", report
    assert entry.exception_type.endswith("CrashBudgetExceeded"), report
    assert entry.deliveries == 4, report  # three lost, the fourth gave up
    assert entry.queue == cluster.queue, report


def test_a_redelivered_copy_of_a_succeeded_task_is_acked_without_running_on_rabbitmq(
    amqp_cluster: Cluster,
) -> None:
    """A copy of a succeeded task's message (same publish) is suppressed: body not run,
    result kept."""
    cluster, tag = amqp_cluster, amqp_cluster.tag()
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
