"""The dead-letter queue with real prefork workers, on each broker in turn.

Every test runs on a Redis broker and on RabbitMQ (the ``broker_url`` fixture). The
two worker nodes keep their dead letters in a private redis-server (the
``resilience_dlq_url`` setting), which one test stops and restarts; results and
coordination stay on the main Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from celery_resilience import UnknownEntry
from tests.support.redis_server import RedisServer

from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(
    integration_redis_url: str,
    broker_url: str,
    dlq_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Two worker nodes (prefork, concurrency 2) on ``broker_url`` whose DLQ is ``dlq_server``."""
    cluster = Cluster(
        redis_url=integration_redis_url,
        broker_url=broker_url,
        dlq_url=dlq_server.url,
        logdir=tmp_path_factory.mktemp("workers"),
    )
    with cluster.running("dlq1", "dlq2"):
        yield cluster


def fail_for_good(cluster: Cluster, tag: str) -> str:
    """Run ``crt.fails_until_fixed(tag, 7, label="nightly")`` until it gives up; its task id."""
    result = cluster.send("crt.fails_until_fixed", tag, 7, kwargs={"label": "nightly"})
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the failing task")
    cluster.wait_until_settled(result, tag)
    assert state == "FAILURE", cluster.report(result)
    return str(result.id)


def test_a_task_out_of_retries_is_one_entry_with_its_arguments_error_and_attempts(
    cluster: Cluster,
) -> None:
    """max_retries=2 spent: one entry with args, kwargs, the error and 3 attempts; acked."""
    tag = cluster.tag()
    task_id = fail_for_good(cluster, tag)

    report = cluster.report(cluster.result(task_id))
    entries = cluster.dead_letters(task_id)
    assert len(entries) == 1, f"{entries}\n{report}"
    entry = entries[0]
    assert entry.task_name == "crt.fails_until_fixed", report
    assert (entry.args, entry.kwargs) == ([tag, 7], {"label": "nightly"}), report
    assert entry.reason == "max_retries", report
    assert entry.exception_type == "builtins.ConnectionError", report
    assert entry.exception_message == f"upstream refused 7 of {tag}", report
    assert entry.attempts == 3, report
    assert entry.deliveries == 1, report
    assert entry.queue == cluster.queue, report
    assert entry.hostname is not None
    assert entry.hostname.split("@")[0] in {w.name for w in cluster.workers}, report
    assert len(cluster.records_of(tag, "runs")) == 3, report


def test_replaying_through_the_cli_reruns_the_task_with_its_arguments_to_success(
    cluster: Cluster,
) -> None:
    """`celery resilience dlq replay ID` after a fix: same task id and args, SUCCESS, no entry."""
    tag = cluster.tag()
    task_id = fail_for_good(cluster, tag)
    [entry] = cluster.dead_letters(task_id)
    cluster.redis.set(cluster.records.key(tag, "fixed"), "1")

    replay = cluster.celery("resilience", "dlq", "replay", entry.id)
    assert replay.returncode == 0, f"stdout:\n{replay.stdout}\nstderr:\n{replay.stderr}"

    # The stored FAILURE stays until the replay finishes; a replay failing again would
    # record more runs, so stop waiting then too.
    wait_until(
        lambda: (
            cluster.result(task_id).state == "SUCCESS" or len(cluster.records_of(tag, "runs")) > 4
        ),
        "the replayed task to succeed",
        lambda: cluster.report(cluster.result(task_id)),
    )
    result = cluster.result(task_id)
    cluster.wait_until_settled(result, tag)
    report = cluster.report(result)
    assert result.state == "SUCCESS", report
    assert result.result == "nightly-7", report
    runs = [json.loads(run) for run in cluster.records_of(tag, "runs")]
    assert runs[3:] == [[tag, 7, "nightly", 0]], report  # same arguments, fresh retry budget
    assert cluster.dead_letters(task_id) == [], report
    with pytest.raises(UnknownEntry):
        cluster.dlq.get(entry.id)


def test_a_poison_task_ends_as_one_worker_lost_entry_and_stops_running(cluster: Cluster) -> None:
    """A task that SIGKILLs its child is stored once with reason worker_lost, then never runs."""
    tag = cluster.tag()
    result = cluster.send("crt.kills_its_worker", tag)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the poison message")
    cluster.wait_until_settled(result, tag)

    report = cluster.report(result)
    assert state == "FAILURE", report
    entries = cluster.dead_letters(result.id)
    assert len(entries) == 1, f"{entries}\n{report}"
    entry = entries[0]
    assert entry.reason == "worker_lost", report
    assert entry.exception_type == "celery_resilience.errors.CrashBudgetExceeded", report
    assert "max_crashes=3" in entry.exception_message, report
    assert entry.args == [tag], report
    assert (entry.attempts, entry.deliveries) == (1, 4), report
    assert len(cluster.starts(tag)) == 3, report


def test_a_dead_letter_that_cannot_be_stored_keeps_its_message_until_the_dlq_is_back(
    cluster: Cluster, dlq_server: RedisServer
) -> None:
    """DLQ down when a task gives up: not acked, not FAILURE; DLQ back: stored exactly once."""
    tag = cluster.tag()
    dlq_server.stop()
    try:
        result = cluster.send("crt.fails_terminally", tag)
        wait_until(
            lambda: cluster.logged(f"[{result.id}] gave up (error) but its dead letter could not"),
            "the worker to fail storing the dead letter",
            lambda: cluster.report(result) + "\n" + dlq_server.report(),
        )
        if not cluster.amqp:
            # The worker pauses before it requeues: the message is still unacked now.
            assert cluster.broker_holds(result.id), cluster.report(result)
        # RabbitMQ shows no unacked message to a client; on either broker the body
        # starting again proves the message was requeued, not acked.
        cluster.wait_for_starts(tag, 2, result)
        report = cluster.report(result)
        assert result.state == "PENDING", report  # not FAILURE: the task is not over
    finally:
        dlq_server.start()

    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the task after the outage")
    cluster.wait_until_settled(result, tag)
    report = cluster.report(result) + "\n" + dlq_server.report()
    assert state == "FAILURE", report
    assert isinstance(result.result, ValueError), report
    entries = cluster.dead_letters(result.id)
    assert len(entries) == 1, f"stored {len(entries)} times: {entries}\n{report}"
    assert (entries[0].reason, entries[0].args) == ("error", [tag]), report
