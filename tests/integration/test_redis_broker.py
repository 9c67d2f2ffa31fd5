"""Real workers on a Redis broker: re-publishes, chords, retries, contention, copies.

The two worker nodes start once for the module; each test works under its own tag
(records and lock keys), so the tests do not see each other's tasks. What RabbitMQ must
give as well (exclusion, a killed child, the crash budget, a suppressed copy) is in
``test_brokers.py``, on both brokers.
"""

from __future__ import annotations

import time

import pytest
from celery import chord

from celery_resilience import LockContended, headers

from .app import LOCK_TTL
from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration


def test_a_new_publish_of_a_succeeded_task_id_runs_again(redis_cluster: Cluster) -> None:
    """apply_async again with the same task id (a re-applied chord header) runs again."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    first = cluster.send("crt.doubles", tag, 21)
    assert cluster.wait_for_state(first, {"SUCCESS", "FAILURE"}, "the first run") == "SUCCESS"
    cluster.send("crt.doubles", tag, 22, task_id=first.id)
    # Celery's result backends (5.3-5.7) keep a stored SUCCESS: the second run's return
    # value is not stored over it, so count the runs.
    wait_until(
        lambda: len(cluster.starts(tag)) == 2, "the second run", lambda: cluster.report(first)
    )
    cluster.wait_until_settled(first)
    report = cluster.report(first)
    assert "duplicate_suppressed" not in cluster.events(first.id), report


def test_reapplying_a_frozen_chord_of_resilient_tasks_dispatches_its_body_again(
    redis_cluster: Cluster,
) -> None:
    """As Celery's own test_reapplying_frozen_chord_dispatches_body_again (5.7.0): a frozen
    chord applied twice sends its header task ids twice; they run again, so does the body."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    tasks = cluster.app.tasks
    header = [tasks["crt.doubles"].s(tag, 1), tasks["crt.doubles"].s(tag, 2)]
    frozen = chord(header, tasks["crt.collects"].s(tag))
    frozen.freeze()
    collected = cluster.records.key(tag, "collected")
    for applies in (1, 2):
        frozen.apply_async()
        wait_until(
            lambda n=applies: cluster.redis.llen(collected) >= n,
            f"the chord body after apply {applies}",
            lambda: cluster.report(),
        )
    report = cluster.report()
    assert cluster.redis.lrange(collected, 0, -1) == ["[2, 4]", "[2, 4]"], report
    assert len(cluster.starts(tag)) == 4, report


def test_an_always_failing_task_exhausts_max_retries_and_fails_with_its_own_error(
    redis_cluster: Cluster,
) -> None:
    """retry_on errors every run: max_retries=2 retries (3 runs), then FAILURE with that error."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    result = cluster.send("crt.always_fails", tag)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the failing task")
    cluster.wait_until_settled(result)

    report = cluster.report(result)
    assert state == "FAILURE", report
    assert isinstance(result.result, ConnectionError), report
    assert str(result.result) == f"upstream refused run 3 of {tag}", report
    assert len(cluster.starts(tag)) == 3, report
    assert cluster.events(result.id) == [
        "retry_scheduled:exception",
        "retry_scheduled:exception",
        "gave_up:max_retries",
    ], report


def test_lock_contention_across_workers_waits_until_lock_timeout_without_spending_retries(
    redis_cluster: Cluster,
) -> None:
    """A task whose lock a running task holds (past its TTL, renewed) waits, then gives up
    after lock_timeout (1.5 s), having waited more often than max_retries (1)."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    holder = cluster.send("crt.blocks_until_released", tag)
    try:
        cluster.wait_for_starts(tag, 1, holder)
        # Let the holder's lease outlive its TTL: only renewal keeps it held now.
        time.sleep(LOCK_TTL * 1.5)
        contender = cluster.send("crt.contends", tag)  # same lock key: held:{tag}
        state = cluster.wait_for_state(contender, {"SUCCESS", "FAILURE"}, "the contender")
    finally:
        cluster.release(tag)
    holder_state = cluster.wait_for_state(holder, {"SUCCESS", "FAILURE"}, "the lock holder")

    report = cluster.report(holder, contender)
    assert state == "FAILURE", report
    assert isinstance(contender.result, LockContended), report
    assert cluster.records_of(tag, "contender_starts") == [], report
    events = cluster.events(contender.id)
    waits = events.count("retry_scheduled:lock_contended")
    assert waits >= 2, report
    assert events == ["lock_contended", "retry_scheduled:lock_contended"] * waits + [
        "lock_contended",
        "gave_up:lock_contended",
    ], report
    assert holder_state == "SUCCESS", report
    assert holder.result == "released", report
    assert len(cluster.starts(tag)) == 1, report


def test_a_second_copy_of_a_running_task_waits_for_it_and_is_never_counted_as_lost(
    redis_cluster: Cluster,
) -> None:
    """A copy of a running task (as a visibility-timeout redelivery) never runs its body: it
    waits for the run to end, then is suppressed; it is not a lost delivery."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    message = {headers.PUBLISH: f"publish-{tag}"}  # the copy is the same message
    original = cluster.send("crt.blocks_until_released", tag, headers=message)
    try:
        cluster.wait_for_starts(tag, 1, original)
        cluster.send("crt.blocks_until_released", tag, task_id=original.id, headers=message)
        # The copy is postponed while the original runs; no RETRY state is stored.
        cluster.wait_until_event(original, "retry_scheduled:running", count=3)
        assert cluster.result(original.id).state == "PENDING", cluster.report(original)
    finally:
        cluster.release(tag)
    events = cluster.wait_until_event(original, "duplicate_suppressed")
    cluster.wait_until_settled(original)

    report = cluster.report(original)
    assert len(cluster.starts(tag)) == 1, report
    assert cluster.result(original.id).result == "released", report
    assert "redelivery_seen" not in events, f"a concurrent copy was counted as lost\n{report}"
    assert "lock_contended" not in events, report


def test_a_child_killed_while_storing_the_result_leaves_the_task_with_a_result(
    redis_cluster: Cluster,
) -> None:
    """A child killed after the body returned, before the result was stored: no result lost."""
    cluster, tag = redis_cluster, redis_cluster.tag()
    result = cluster.send("crt.killed_while_storing_its_result", tag)
    serializations = cluster.records.key(tag, "serializations")
    wait_until(
        lambda: cluster.redis.llen(serializations) >= 1,
        "the child to die while storing the result",
        lambda: cluster.report(result),
    )
    # The redelivery either runs the task again (and stores its result) or is
    # suppressed as a duplicate: wait for whichever happens.
    wait_until(
        lambda: (
            result.state in {"SUCCESS", "FAILURE"}
            or "duplicate_suppressed" in cluster.events(result.id)
        ),
        "the redelivered task to be run or suppressed",
        lambda: cluster.report(result),
    )
    cluster.wait_until_settled(result)

    # Regression: the completion record was once written when the body returned,
    # before Celery stored the result, so this redelivery was suppressed as a
    # duplicate and the task stayed PENDING for ever.
    report = cluster.report(result)
    assert result.state == "SUCCESS", f"task left {result.state} with nothing queued\n{report}"
    assert result.result == "stored", report
