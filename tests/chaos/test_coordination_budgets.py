"""Coordination faults with real nodes and a real redis-server: timing and budgets.

- the coordination Redis SIGSTOPped 9 s (longer than the client's 5 s socket timeout)
  with an ``admit`` in flight, then SIGCONT: the task starts within 2 s of resume and,
  with ``resilience_max_crashes=1``, is not dead-lettered;
- the coordination Redis (a private server) SIGKILLed for 60 s with a task published
  meanwhile: once it is back the task runs on its first attempt, no retry was spent
  on the outage and no delivery counted as lost;
- twenty tasks queued on one lock key with 2 s bodies and ``max_retries=3``: waiting
  for the lock is not failing, so all twenty run, one after another.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.redis_server import RedisServer

from .conftest import ChaosCluster, wait_until
from .test_scenarios import record

pytestmark = pytest.mark.chaos

OUTAGE_S = 60.0
OUTAGE_VT = 300.0  # the broker never redelivers the task during the outage
AFTER_OUTAGE_LIMIT_S = 150.0  # with the 60 s outage, within pytest-timeout (300 s)

STALL_S = 9.0
START_AFTER_RESUME_LIMIT_S = 2.0

QUEUED_TASKS = 20
QUEUED_BODY_S = 2.0
QUEUE_LIMIT_S = 240.0  # 20 x 2 s bodies need 40 s; within pytest-timeout (300 s)


def test_a_task_whose_admit_outlived_a_coordination_stall_starts_within_2s_of_resume(
    private_redis: RedisServer,  # first: set up before the clusters, torn down after them
    chaos_clusters: Callable[..., ChaosCluster],
    chaos_summary: dict[str, Any],
) -> None:
    """Coordination Redis SIGSTOPped 9 s while a locked task is admitted, then SIGCONT:
    its body starts <= 2 s after resume, on its first attempt, SUCCESS, not in the DLQ
    (``resilience_max_crashes=1``)."""
    server = private_redis
    cluster = chaos_clusters(
        "stall",
        visibility_timeout=OUTAGE_VT,
        resilience_url=server.url,
        settings={"resilience_max_crashes": 1},
    )
    cluster.start("a")
    # A task first, as in production: the server knows the backend's scripts, so the
    # admit the client gives up on is one the server can run on resume.
    warm_up = cluster.send_locked(f"warm-{uuid.uuid4().hex[:8]}", 0.0)
    wait_until(
        lambda: warm_up.state == "SUCCESS", "a first task", lambda: cluster.report(warm_up.id)
    )
    server.pause()
    try:
        result = cluster.send_locked(f"stall-{uuid.uuid4().hex[:8]}", 0.5)
        time.sleep(STALL_S)
    finally:
        server.resume()
    resumed_at = time.time()
    state, starts, dead = _outcome(cluster, result, server, "the task after the stall")
    after = [round(s["t"] - resumed_at, 2) for s in starts]
    record(
        chaos_summary,
        "admit outliving a 9 s coordination stall",
        [
            f"state {state}; body start(s) {after} s after resume (limit "
            f"{START_AFTER_RESUME_LIMIT_S:g} s), retries {[s['retries'] for s in starts]}",
            f"deliveries {[s['deliveries'] for s in starts]}; {len(dead)} dead letter(s); "
            f"events {cluster.events(result.id)}",
        ],
        start_after_resume_s=after,
        dead_letters=len(dead),
    )
    report = cluster.report(result.id)
    assert state == "SUCCESS", report
    assert dead == [], report
    assert len(starts) == 1, report
    assert after[0] <= START_AFTER_RESUME_LIMIT_S, report
    assert starts[0]["retries"] == 0, report


def _outcome(
    cluster: ChaosCluster, result: Any, server: RedisServer, what: str
) -> tuple[str, list[dict[str, Any]], list[Any]]:
    """Wait for ``result``'s final state once its backend is back; return the state, the
    body starts it recorded and its dead letters."""
    state = wait_until(
        lambda: result.state if result.state in {"SUCCESS", "FAILURE"} else None,
        what,
        lambda: cluster.report(result.id) + "\n" + server.report(),
        timeout=AFTER_OUTAGE_LIMIT_S,
    )
    cluster.wait_settled(lambda: cluster.report(result.id))
    dead = [entry for entry in cluster.dead_letters() if entry.task_id == result.id]
    return state, cluster.starts(result.id), dead


def test_a_60s_coordination_outage_spends_no_retries_and_no_crash_budget(
    private_redis: RedisServer,  # first: set up before the clusters, torn down after them
    chaos_clusters: Callable[..., ChaosCluster],
    chaos_summary: dict[str, Any],
) -> None:
    """Coordination Redis SIGKILLed 60 s, a task published meanwhile, then restarted on
    its port: the task's body runs once with ``request.retries == 0`` and one delivery,
    SUCCESS, no dead letter."""
    server = private_redis
    cluster = chaos_clusters("outage", visibility_timeout=OUTAGE_VT, resilience_url=server.url)
    cluster.start("a")
    server.kill()
    result = cluster.send_locked(f"outage-{uuid.uuid4().hex[:8]}", 0.5)
    time.sleep(OUTAGE_S)
    server.restart()
    back_at = time.time()
    state, starts, dead = _outcome(cluster, result, server, "the task after the outage")
    events = cluster.events(result.id)
    report = cluster.report(result.id)
    record(
        chaos_summary,
        "60 s coordination outage",
        [
            f"state {state}; {len(starts)} body start(s), retries spent "
            f"{[s['retries'] for s in starts]}, deliveries {[s['deliveries'] for s in starts]}",
            f"start {[round(s['t'] - back_at, 2) for s in starts]} s after the backend was back",
            f"events {events}; {len(dead)} dead letter(s)",
        ],
        retries=[s["retries"] for s in starts],
        backend_unavailable_retries=events.get("retry_scheduled:backend_unavailable", 0),
    )
    assert state == "SUCCESS", report
    assert dead == [], report
    assert len(starts) == 1, report
    assert starts[0]["retries"] == 0, f"the outage spent retries\n{report}"
    assert starts[0]["deliveries"] == 1, f"the outage counted as a lost delivery\n{report}"
    assert "crash_budget_spent" not in events, report


def test_twenty_tasks_queued_on_one_lock_key_all_run_one_after_another(
    chaos_clusters: Callable[..., ChaosCluster], chaos_summary: dict[str, Any]
) -> None:
    """Twenty 2 s tasks on one key, ``max_retries=3``, two nodes: all twenty SUCCESS,
    each body once, never two at once, no dead letter."""
    cluster = chaos_clusters("onekey", visibility_timeout=OUTAGE_VT)
    cluster.start("a", "b")
    key = f"onekey-{uuid.uuid4().hex[:8]}"
    task = cluster.app.tasks["chaos.locked_few_retries"]
    started = time.time()
    results = [task.apply_async((key, QUEUED_BODY_S)) for _ in range(QUEUED_TASKS)]
    ids = [r.id for r in results]

    def final() -> list[str] | None:
        states = [r.state for r in results]
        return states if set(states) <= {"SUCCESS", "FAILURE"} else None

    states = wait_until(
        final, "every task's outcome", lambda: cluster.report(*ids[:5]), QUEUE_LIMIT_S
    )
    cluster.wait_settled(lambda: cluster.report(*ids[:5]))
    took = time.time() - started
    completions = cluster.completions()
    dead = [entry for entry in cluster.dead_letters() if entry.task_id in set(ids)]
    overlaps = cluster.overlaps()
    record(
        chaos_summary,
        "twenty tasks on one lock key",
        [
            f"{states.count('SUCCESS')} of {QUEUED_TASKS} SUCCESS in {took:.1f} s; "
            f"{sum(completions.get(i, 0) for i in ids)} bodies completed",
            f"{len(dead)} dead letter(s) ({sorted({e.reason for e in dead})}); "
            f"{len(overlaps)} overlap(s)",
        ],
        seconds=round(took, 1),
        dead_letters=len(dead),
        overlaps=len(overlaps),
    )
    report = cluster.report(*ids[:5])
    assert overlaps == [], report
    assert dead == [], f"{len(dead)} dead letters: {[e.reason for e in dead]}\n{report}"
    assert states == ["SUCCESS"] * QUEUED_TASKS, report
    assert [completions.get(i, 0) for i in ids] == [1] * QUEUED_TASKS, report
