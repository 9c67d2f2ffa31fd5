"""Every observer hook, triggered through the library as a user's task triggers it.

One test per hook spec, named after the hook: tests/test_hooks_documented.py finds
them by name and fails when a hook has none. Tasks run eagerly (Celery's own
tracer) on the in-memory backends, so these run without any service (but
``resilience_node_lost``, which needs a Redis broker's nodes); the same
paths against real Redis and real workers are in tests/test_gate.py,
tests/test_dlq.py and tests/integration. The provider hooks are exercised through
real entry points in tests/test_plugins.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, Task

from celery_resilience import (
    Backoff,
    CrashBudgetExceeded,
    DeadLetterQueue,
    GiveUp,
    LockContended,
    fetch,
    headers,
    resilient,
)
from celery_resilience.heartbeat import Ticker
from celery_resilience.liveness.node import adopt
from celery_resilience.runtime import runtime
from celery_resilience.testing import HookRecorder, eager_app, record_hooks
from tests.support.admissions import hold, lost_deliveries
from tests.support.broker import Broker

FAST = Backoff(base=0.01, factor=2, cap=0.05, jitter="none")


@pytest.fixture
def observer() -> Iterator[HookRecorder]:
    """A HookRecorder registered with the process' plugin manager for one test."""
    with record_hooks() as recorder:
        yield recorder


@pytest.fixture
def app() -> Iterator[Celery]:
    """An eager app on private in-memory backends that stores eager results (for replay)."""
    with eager_app(task_store_eager_result=True, result_backend="cache+memory://") as app:
        yield app


def held_by_another(app: Celery, lock_key: str, lease_ttl: float = 30.0) -> None:
    """Take ``lock_key`` for another (live, remote-looking) owner."""
    hold(app, "other-task", "other-host:1:1:x", lock_key, ttl=lease_ttl)


def test_resilience_retry_scheduled_reports_attempt_reason_and_countdown(
    app: Celery, observer: HookRecorder
) -> None:
    """Each retry the gate publishes is reported with its attempt, reason and countdown."""

    @resilient(max_retries=3, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(bind=True, shared=False)
    def flaky(self: Task) -> str:
        if self.request.retries < 2:
            raise ConnectionError("upstream")
        return "done"

    result = flaky.delay()
    assert result.get() == "done"
    assert observer.of("retry_scheduled") == [
        {"task_name": flaky.name, "task_id": result.id, "attempt": 0, "reason": "exception",
         "countdown": 0.01},
        {"task_name": flaky.name, "task_id": result.id, "attempt": 1, "reason": "exception",
         "countdown": 0.02},
    ]  # fmt: skip


def test_resilience_lock_contended_names_the_key_and_the_lease_left(
    app: Celery, observer: HookRecorder
) -> None:
    """An attempt that finds its lock held reports the key and the holder's remaining lease."""
    ran: list[int] = []

    @resilient(max_retries=0, lock="report:{account}", lock_timeout=0.05, backoff=FAST)
    @app.task(shared=False)
    def report(account: int) -> None:
        ran.append(account)

    held_by_another(app, "report:7", lease_ttl=20.0)
    result = report.delay(7)
    with pytest.raises(LockContended):
        result.get()
    assert ran == []
    calls = observer.of("lock_contended")
    assert len(calls) >= 2  # it waited before giving up
    assert {(c["task_name"], c["task_id"], c["lock_key"]) for c in calls} == {
        (report.name, result.id, "report:7")
    }
    assert all(0 < c["lease_remaining"] <= 20.0 for c in calls)
    retries = observer.of("retry_scheduled")
    assert [r["reason"] for r in retries] == ["lock_contended"] * (len(calls) - 1)


def test_resilience_redelivery_seen_counts_the_deliveries_of_the_attempt(
    app: Celery, observer: HookRecorder
) -> None:
    """A delivery of an attempt whose earlier delivery was lost is reported, then runs."""

    @resilient(max_crashes=3)
    @app.task(shared=False)
    def survivor() -> str:
        return "ran"

    task_id = uuid.uuid4().hex
    lost_deliveries(app, task_id, 1)
    assert survivor.apply_async(task_id=task_id).get() == "ran"
    assert observer.of("redelivery_seen") == [
        {"task_name": survivor.name, "task_id": task_id, "attempt": 0, "deliveries": 2}
    ]
    assert observer.of("crash_budget_spent") == []


def test_resilience_crash_budget_spent_comes_before_the_give_up(
    app: Celery, observer: HookRecorder
) -> None:
    """max_crashes lost deliveries: reported with the budget, then a worker_lost give-up."""
    ran: list[int] = []

    @resilient(max_crashes=2)
    @app.task(shared=False)
    def poison() -> None:
        ran.append(1)

    task_id = uuid.uuid4().hex
    lost_deliveries(app, task_id, 2)
    with pytest.raises(CrashBudgetExceeded):
        poison.apply_async(task_id=task_id).get()
    assert ran == []
    assert observer.of("crash_budget_spent") == [
        {"task_name": poison.name, "task_id": task_id, "attempt": 0, "deliveries": 3,
         "max_crashes": 2}
    ]  # fmt: skip
    names = observer.names()
    assert names.index("crash_budget_spent") < names.index("task_gave_up")
    (gave_up,) = observer.of("task_gave_up")
    assert gave_up["outcome"].reason == "worker_lost"


@pytest.mark.kombu
def test_resilience_node_lost_when_a_nodes_presence_expires(
    redis_url: str, key_prefix: str, observer: HookRecorder
) -> None:
    """A live node's heartbeat tick puts back what a node that stopped renewing held, and
    reports it once, with the count per queue (real Redis broker, kombu consumers)."""
    dead, live = (Broker(redis_url, key_prefix, node_ttl=0.5) for _ in range(2))
    try:
        for broker in (dead, live):
            adopt(broker.channel, broker.node)
            fetch.install(broker.channel, broker.node)
            broker.node.renew(broker.raw)  # as the heartbeat does when the consumer starts
        dead.publish(1, 2)
        dead.consume(2)
        app = Celery(f"n{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.conf.update(broker_url=redis_url, resilience_url="memory://")
        tick = Ticker(runtime(app), live.node, visibility_timeout=60)
        deadline = time.monotonic() + 5
        while not observer.of("node_lost") and time.monotonic() < deadline:
            tick(live.channel)
            time.sleep(0.05)
        for _ in range(10):  # later ticks report nothing more
            tick(live.channel)
        assert observer.of("node_lost") == [
            {"node": dead.node.id, "nodename": f"test@{key_prefix}", "recovered": {"hbq": 2}}
        ]
        assert live.raw.llen(live.key("hbq")) == 2
    finally:
        dead.close()
        live.close()


def test_resilience_duplicate_suppressed_when_a_succeeded_task_id_comes_again(
    app: Celery, observer: HookRecorder
) -> None:
    """A second delivery of a publish that succeeded is reported and does not run."""
    runs: list[int] = []

    @resilient()
    @app.task(shared=False)
    def once(x: int) -> int:
        runs.append(x)
        return x

    task_id = uuid.uuid4().hex
    copy = {headers.PUBLISH: "publish-1"}  # a redelivered copy carries its publish id
    assert once.apply_async((1,), task_id=task_id, headers=copy).get() == 1
    assert observer.of("duplicate_suppressed") == []
    assert once.apply_async((1,), task_id=task_id, headers=copy).state == "IGNORED"
    assert runs == [1]
    assert observer.of("duplicate_suppressed") == [{"task_name": once.name, "task_id": task_id}]


def test_resilience_call_deduplicated_when_a_queued_task_holds_the_key(
    app: Celery, observer: HookRecorder
) -> None:
    """A call made while a task of its dedup key is queued publishes nothing, is reported
    once, and returns the queued task's result."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int) -> int:
        return repoid

    app.conf.task_always_eager = False  # published to the memory broker, nobody runs it
    queued = sync.delay(7)
    again = sync.delay(repoid=7)
    other = sync.delay(8)
    assert again.id == queued.id
    assert other.id != queued.id
    assert observer.of("call_deduplicated") == [
        {"task_name": sync.name, "task_id": queued.id, "dedup_key": "sync:7"}
    ]


def test_resilience_task_gave_up_carries_the_outcome(app: Celery, observer: HookRecorder) -> None:
    """Retries spent: one give-up with reason, arguments, attempts and the exception."""

    @resilient(max_retries=1, retry_on=(TimeoutError,), backoff=FAST, dlq=False)
    @app.task(shared=False)
    def slow(n: int, *, label: str = "x") -> None:
        raise TimeoutError(f"slow {n}")

    result = slow.delay(5, label="y")
    with pytest.raises(TimeoutError):
        result.get()
    (call,) = observer.of("task_gave_up")
    outcome = call["outcome"]
    assert isinstance(outcome, GiveUp)
    assert (outcome.task_name, outcome.task_id, outcome.reason) == (
        slow.name,
        result.id,
        "max_retries",
    )
    assert (outcome.args, outcome.kwargs, outcome.attempts) == ((5,), {"label": "y"}, 2)
    assert outcome.exception_type == "builtins.TimeoutError"
    assert "slow 5" in outcome.traceback
    # dlq=False: the give-up is still reported, but nothing is stored.
    assert observer.of("dead_letter_stored") == []


def test_resilience_dead_letter_stored_reports_the_entry_and_what_the_cap_trimmed(
    app: Celery, observer: HookRecorder
) -> None:
    """Each stored dead letter is reported before the give-up, with the entries it trimmed."""
    app.conf.resilience_dlq_max_entries = 1

    @resilient
    @app.task(shared=False)
    def fails(n: int) -> None:
        raise ValueError(n)

    first, second = fails.delay(1), fails.delay(2)
    calls = observer.of("dead_letter_stored")
    assert [(c["entry"].task_id, c["entry"].reason, c["trimmed"]) for c in calls] == [
        (first.id, "error", 0),
        (second.id, "error", 1),
    ]
    (kept,) = DeadLetterQueue(app).list(task_name=fails.name).entries
    assert calls[-1]["entry"] == kept
    names = observer.names()
    assert names.index("dead_letter_stored") < names.index("task_gave_up")


def test_resilience_dead_letter_replayed_reports_the_entry_before_the_replay(
    app: Celery, observer: HookRecorder
) -> None:
    """A replay reports the entry as it was stored and the task id it published."""
    attempts: list[int] = []

    @resilient
    @app.task(shared=False)
    def fails_once(n: int) -> int:
        attempts.append(n)
        if len(attempts) == 1:
            raise ValueError(n)
        return n * 2

    first = fails_once.delay(21)
    dlq = DeadLetterQueue(app)
    (entry,) = dlq.list().entries
    replayed = dlq.replay(entry.id)
    assert replayed.get() == 42
    assert observer.of("dead_letter_replayed") == [{"entry": entry, "task_id": first.id}]
    assert entry.replays == 0
    assert dlq.count() == 0
    # A replay removes its entry without reporting a delete.
    assert observer.of("dead_letter_deleted") == []


def test_resilience_dead_letter_deleted_names_the_entry(
    app: Celery, observer: HookRecorder
) -> None:
    """DeadLetterQueue.delete reports the id it removed."""

    @resilient
    @app.task(shared=False)
    def fails() -> None:
        raise KeyError("gone")

    fails.delay()
    dlq = DeadLetterQueue(app)
    (entry,) = dlq.list().entries
    dlq.delete(entry.id)
    assert observer.of("dead_letter_deleted") == [{"entry_id": entry.id}]
    assert dlq.count() == 0


def test_resilience_dead_letters_purged_reports_task_name_and_count(
    app: Celery, observer: HookRecorder
) -> None:
    """purge(task_name=...) and purge() each report what they removed."""

    @resilient
    @app.task(shared=False)
    def first(n: int) -> None:
        raise ValueError(n)

    @resilient
    @app.task(shared=False)
    def second(n: int) -> None:
        raise ValueError(n)

    for n in range(3):
        first.delay(n)
    second.delay(0)
    dlq = DeadLetterQueue(app)
    assert dlq.purge(task_name=first.name) == 3
    assert dlq.purge() == 1
    assert observer.of("dead_letters_purged") == [
        {"task_name": first.name, "count": 3},
        {"task_name": None, "count": 1},
    ]
    assert observer.of("dead_letter_deleted") == []
