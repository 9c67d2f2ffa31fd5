"""The gate on every delivery, run through Celery's own tracer (eager mode).

Each test runs against every built-in coordination backend (memory and real Redis).
Worker-process behaviour (kills, redelivery, overlap across nodes) is in
tests/integration.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, Task
from celery import _state as celery_state

from celery_resilience import (
    Backoff,
    CrashBudgetExceeded,
    LockContended,
    NoCurrentAttempt,
    current_attempt,
    headers,
    resilient,
)
from celery_resilience.backends.base import Admission
from celery_resilience.runtime import runtime
from celery_resilience.testing import HookRecorder, eager_app, record_hooks
from tests.support.admissions import hold, holder_of, lost_deliveries

FAST = Backoff(base=0.01, factor=2, cap=0.05, jitter="none")


@pytest.fixture
def app(backend_url: str, key_prefix: str) -> Iterator[Celery]:
    """An eager Celery app whose resilience backend is the parametrized one."""
    with eager_app(resilience_url=backend_url, resilience_key_prefix=key_prefix) as app:
        yield app


@pytest.fixture
def events() -> Iterator[HookRecorder]:
    with record_hooks() as recorder:
        yield recorder


def test_flaky_task_is_retried_with_backoff_until_it_succeeds(
    app: Celery, events: HookRecorder
) -> None:
    """A retry_on error retries; the retries header moves; the result is the body's."""
    seen: list[int] = []

    @resilient(max_retries=5, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(bind=True, shared=False)
    def flaky(self: Task, x: int) -> int:
        seen.append(self.request.retries)
        if len(seen) < 3:
            raise ConnectionError("flaky")
        return x + 1

    assert flaky.delay(41).get() == 42
    assert seen == [0, 1, 2]
    retries = events.of("retry_scheduled")
    assert [(r["attempt"], r["reason"]) for r in retries] == [(0, "exception"), (1, "exception")]
    assert [r["countdown"] for r in retries] == [0.01, 0.02]


def test_exhausted_retries_fail_with_the_original_exception(
    app: Celery, events: HookRecorder
) -> None:
    """After max_retries the state is FAILURE with what the body raised, reason max_retries."""
    runs: list[int] = []

    @resilient(max_retries=2, retry_on=(TimeoutError,), backoff=FAST)
    @app.task(shared=False)
    def always_times_out(n: int) -> None:
        runs.append(n)
        raise TimeoutError(f"gave up on {n}")

    result = always_times_out.delay(7)
    assert result.state == "FAILURE"
    with pytest.raises(TimeoutError, match="gave up on 7"):
        result.get()
    assert len(runs) == 3
    (gave_up,) = events.of("task_gave_up")
    outcome = gave_up["outcome"]
    assert (outcome.reason, outcome.attempts, outcome.args) == ("max_retries", 3, (7,))
    assert outcome.exception_type == "builtins.TimeoutError"
    assert "gave up on 7" in outcome.traceback


def test_error_outside_retry_on_is_terminal(app: Celery, events: HookRecorder) -> None:
    """An exception not in retry_on fails at once with reason error."""
    runs: list[int] = []

    @resilient(max_retries=5, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(shared=False)
    def broken() -> None:
        runs.append(1)
        raise KeyError("nope")

    with pytest.raises(KeyError):
        broken.delay().get()
    assert runs == [1]
    assert [e["outcome"].reason for e in events.of("task_gave_up")] == ["error"]


def test_contended_lock_never_runs_the_body_and_waits_without_spending_retries(
    app: Celery, events: HookRecorder
) -> None:
    """Held by another owner: the task waits (no retries spent) until lock_timeout."""
    ran: list[int] = []

    @resilient(max_retries=0, lock="upload:{repoid}", lock_timeout=0.2, backoff=FAST)
    @app.task(shared=False)
    def upload(repoid: int) -> None:
        ran.append(repoid)

    assert hold(app, "other", "other", "upload:1").admission is Admission.ADMITTED
    with pytest.raises(LockContended, match=r"upload:1.*lock_timeout=0.2 s"):
        upload.delay(1).get()
    assert ran == []
    waits = len(events.of("lock_contended"))
    assert waits >= 3  # with max_retries=0 it still waited
    assert [r["reason"] for r in events.of("retry_scheduled")] == ["lock_contended"] * (waits - 1)
    assert [e["outcome"].reason for e in events.of("task_gave_up")] == ["lock_contended"]
    upload.delay(2).get()
    assert ran == [2]


def test_contended_task_waits_the_shorter_of_lease_and_backoff_then_runs(
    app: Celery, events: HookRecorder
) -> None:
    """The wait after contention is min(remaining lease, backoff); then the body runs."""

    @resilient(max_retries=0, lock="k:{x}", backoff=Backoff(base=100, jitter="none"))
    @app.task(shared=False)
    def locked(x: int) -> str:
        return "ran"

    hold(app, "other", "o", "k:1", ttl=0.5)
    assert locked.delay(1).get() == "ran"
    (first, *_) = events.of("retry_scheduled")
    assert 0 < first["countdown"] <= 0.5


def test_lock_is_checked_on_every_delivery_not_only_the_first(app: Celery) -> None:
    """The origin bug: a retry must re-check the lock, and wait for it when it is held."""
    from celery_resilience import get_plugin_manager, hookimpl

    ran: list[int] = []

    class Intruder:
        """Takes the key between the first attempt and its retry."""

        @hookimpl
        def resilience_retry_scheduled(self, reason: str) -> None:
            if reason == "exception":
                hold(app, "intruder", "i", "k:1")

    @resilient(
        max_retries=3, lock="k:{x}", lock_timeout=0.1, retry_on=(ConnectionError,), backoff=FAST
    )
    @app.task(bind=True, shared=False)
    def retried(self: Task, x: int) -> None:
        ran.append(self.request.retries)
        raise ConnectionError("attempt fails")

    intruder = Intruder()
    get_plugin_manager().register(intruder)
    try:
        with pytest.raises(LockContended):
            retried.delay(1).get()
    finally:
        get_plugin_manager().unregister(intruder)
    assert ran == [0]


def test_new_publish_reusing_a_succeeded_task_id_runs_again(app: Celery) -> None:
    """apply_async with a task id that already succeeded is a new publish: it runs."""
    runs: list[int] = []

    @resilient()
    @app.task(shared=False)
    def republished(x: int) -> int:
        runs.append(x)
        return x

    task_id = uuid.uuid4().hex
    assert republished.apply_async((1,), task_id=task_id).get() == 1
    assert republished.apply_async((2,), task_id=task_id).get() == 2
    assert runs == [1, 2]


def test_attempt_lost_max_crashes_times_is_not_run_again(app: Celery, events: HookRecorder) -> None:
    """Deliveries that never finished spend the crash budget; the next one gives up."""
    runs: list[int] = []

    @resilient(max_crashes=2)
    @app.task(shared=False)
    def poison() -> None:
        runs.append(1)

    task_id = uuid.uuid4().hex
    lost_deliveries(app, task_id, 2)
    result = poison.apply_async(task_id=task_id)
    assert result.state == "FAILURE"
    with pytest.raises(CrashBudgetExceeded, match="lost with its worker 2 times"):
        result.get()
    assert runs == []
    assert events.of("redelivery_seen")[0]["deliveries"] == 3
    assert events.of("crash_budget_spent")[0]["max_crashes"] == 2
    assert [e["outcome"].reason for e in events.of("task_gave_up")] == ["worker_lost"]


def test_one_lost_delivery_reruns_and_is_reported(app: Celery, events: HookRecorder) -> None:
    """A redelivery within the budget runs and is reported as seen."""

    @resilient(max_crashes=3)
    @app.task(shared=False)
    def survivor() -> str:
        return f"deliveries={current_attempt().deliveries}"

    task_id = uuid.uuid4().hex
    lost_deliveries(app, task_id, 1)
    assert survivor.apply_async(task_id=task_id).get() == "deliveries=2"
    assert [e["deliveries"] for e in events.of("redelivery_seen")] == [2]


def test_current_attempt_exposes_key_and_increasing_fencing_tokens(app: Celery) -> None:
    """The body reads its lock key (defaults and kwargs applied) and fencing token."""

    @resilient(lock="report:{account}:{period}")
    @app.task(shared=False)
    def report(account: int, period: str = "monthly") -> tuple[str | None, int | None]:
        attempt = current_attempt()
        return attempt.lock_key, attempt.fencing_token

    key1, token1 = report.delay(7).get()
    key2, token2 = report.delay(account=7).get()
    assert key1 == key2 == "report:7:monthly"
    assert token1 is not None
    assert token2 is not None
    assert token2 > token1
    with pytest.raises(NoCurrentAttempt):
        current_attempt()


def test_lock_callable_renders_the_key(app: Celery) -> None:
    """lock= may be a callable (args, kwargs) -> str."""

    @resilient(lock=lambda args, kwargs: f"sum:{sum(args)}")
    @app.task(shared=False)
    def add(a: int, b: int) -> str | None:
        return current_attempt().lock_key

    assert add.delay(2, 3).get() == "sum:5"


def test_users_own_retry_is_honoured_and_counted(app: Celery, events: HookRecorder) -> None:
    """self.retry() in the body retries as Celery does and is reported as requested."""

    @resilient(max_retries=3)
    @app.task(bind=True, shared=False)
    def manual(self: Task) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0.01)
        return int(self.request.retries)

    assert manual.delay().get() == 2
    assert [r["reason"] for r in events.of("retry_scheduled")] == ["requested", "requested"]


def test_lease_is_renewed_while_a_long_body_runs(app: Celery) -> None:
    """A body running several TTLs keeps its key; another owner is refused meanwhile."""
    started = threading.Event()
    contended: list[Admission] = []

    @resilient(lock="long:{x}", lock_ttl=0.3)
    @app.task(shared=False)
    def long_body(x: int) -> int | None:
        started.set()
        time.sleep(1.2)
        return current_attempt().fencing_token

    def probe() -> None:
        started.wait(5)
        for _ in range(4):
            time.sleep(0.25)
            result = hold(app, uuid.uuid4().hex, "probe", "long:1", ttl=5)
            contended.append(result.admission)

    thread = threading.Thread(target=probe)
    thread.start()
    long_body.delay(1).get()
    thread.join()
    assert contended == [Admission.LOCK_CONTENDED] * 4


def test_a_renewal_that_finds_the_lease_gone_sets_lease_lost(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """The body's leases vanish while it runs (expired and taken by another holder):
    the next renewal marks the attempt ``lease_lost`` and warns; until then it is False."""
    seen: list[bool] = []

    @resilient(lock="gone:{x}", lock_ttl=0.3)
    @app.task(shared=False)
    def body(x: int) -> None:
        attempt = current_attempt()
        assert runtime(app).backend.release(attempt.task_id, attempt.lock_key, attempt.owner)
        seen.append(attempt.lease_lost)
        deadline = time.monotonic() + 3
        while not attempt.lease_lost and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(attempt.lease_lost)

    with caplog.at_level(logging.WARNING, logger="celery_resilience.leases"):
        body.delay(1).get()
    assert seen == [False, True]
    assert "lost the run lease of" in caplog.text


def test_failing_observer_never_fails_the_task(app: Celery, events: HookRecorder) -> None:
    """A plugin hook that raises is logged; the task and other plugins carry on."""
    from celery_resilience import get_plugin_manager, hookimpl

    class Broken:
        @hookimpl
        def resilience_retry_scheduled(self) -> None:
            raise RuntimeError("exporter down")

    pm = get_plugin_manager()
    broken = Broken()
    pm.register(broken)
    try:

        @resilient(max_retries=2, retry_on=(ValueError,), backoff=FAST)
        @app.task(bind=True, shared=False)
        def flaky(self: Task) -> str:
            if not self.request.retries:
                raise ValueError("once")
            return "ok"

        assert flaky.delay().get() == "ok"
    finally:
        pm.unregister(broken)
    assert len(events.of("retry_scheduled")) == 1


def test_direct_call_runs_the_body_without_the_gate(app: Celery) -> None:
    """Calling the task like a function is a function call, as in plain Celery."""

    @resilient(lock="d:{x}")
    @app.task(shared=False)
    def direct(x: int) -> int:
        return x * 3

    hold(app, "o", "o", "d:1")
    assert direct(1) == 3


def test_default_max_retries_comes_from_settings(app: Celery, events: HookRecorder) -> None:
    """Without max_retries the app's resilience_max_retries applies, to self.retry too."""
    app.conf.resilience_max_retries = 1
    runs: list[int] = []

    @resilient(retry_on=(ValueError,), backoff=FAST)
    @app.task(shared=False)
    def fails() -> None:
        runs.append(1)
        raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        fails.delay().get()
    assert len(runs) == 2
    assert fails.max_retries == 1


def test_countdown_without_heartbeat_stays_under_half_the_visibility_timeout(
    backend_url: str, key_prefix: str, events: HookRecorder
) -> None:
    """Redis broker, heartbeat off: a retry never waits longer than visibility_timeout / 2."""
    app = Celery(f"t{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        broker_url="redis://127.0.0.1:6379/0",
        broker_transport_options={"visibility_timeout": 10},
        resilience_visibility_heartbeat=False,
        resilience_url=backend_url,
        resilience_key_prefix=key_prefix,
    )

    @resilient(max_retries=1, retry_on=(ValueError,), backoff=Backoff(base=60, jitter="none"))
    @app.task(shared=False)
    def slow_retry() -> None:
        raise ValueError("again")

    with pytest.raises(ValueError, match="again"):
        slow_retry.delay().get()
    assert [r["countdown"] for r in events.of("retry_scheduled")] == [5.0]


def test_lock_of_a_provably_dead_holder_is_freed_at_once(app: Celery, events: HookRecorder) -> None:
    """A lease left by a process that died on this machine does not block the task."""
    import subprocess
    import sys

    code = "from celery_resilience.leases import new_owner; print(new_owner('n', 't'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead = done.stdout.strip()
    hold(app, "dead-task", dead, "d:1")

    @resilient(max_retries=0, lock="d:{x}")
    @app.task(shared=False)
    def guarded(x: int) -> int | None:
        return current_attempt().fencing_token

    assert guarded.delay(1).get() is not None
    assert events.of("lock_contended") == []


def test_lock_of_a_live_holder_is_never_overtaken(app: Celery) -> None:
    """A holder whose process is alive keeps its lease: the task gives up contended."""
    owner = __import__("celery_resilience.leases", fromlist=["new_owner"]).new_owner("n", "t")
    hold(app, "live-task", owner, "l:1")

    @resilient(max_retries=0, lock="l:{x}", lock_timeout=0.05, backoff=FAST)
    @app.task(shared=False)
    def guarded(x: int) -> None: ...

    with pytest.raises(LockContended):
        guarded.delay(1).get()


def test_redelivery_is_reported_when_the_dead_holder_was_itself(
    app: Celery, events: HookRecorder
) -> None:
    """A delivery lost with its lease, freed as a dead holder, still counts as redelivered."""
    import subprocess
    import sys

    code = "from celery_resilience.leases import new_owner; print(new_owner('n', 't'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    task_id = uuid.uuid4().hex
    hold(app, task_id, done.stdout.strip(), "r:1")

    @resilient(lock="r:{x}")
    @app.task(shared=False)
    def again(x: int) -> int:
        return current_attempt().deliveries

    assert again.apply_async((1,), task_id=task_id).get() == 2
    assert [e["deliveries"] for e in events.of("redelivery_seen")] == [2]


def _overlapping(spans: list[tuple[float, float]]) -> int:
    """How many of the (start, end) spans began before an earlier one ended."""
    ordered = sorted(spans)
    return sum(1 for a, b in itertools.pairwise(ordered) if b[0] < a[1])


@pytest.mark.parametrize(("copies", "same_publish"), [(2, True), (4, True), (3, False)])
def test_one_body_per_task_id_at_a_time_without_a_lock(
    app: Celery, events: HookRecorder, copies: int, same_publish: bool
) -> None:
    """Concurrent deliveries of one task id never overlap: copies of a publish are then
    suppressed, other publishes of the id run after it. No dead letters."""
    spans: list[tuple[float, float]] = []
    app.finalize()  # bind the task before threads use it (Task.bind is not thread-safe)

    @resilient(max_retries=0, max_crashes=1)
    @app.task(shared=False)
    def body() -> str:
        started = time.monotonic()
        time.sleep(0.3)
        spans.append((started, time.monotonic()))
        return "done"

    task_id = uuid.uuid4().hex
    states: list[str] = []

    def deliver(n: int) -> None:
        publish = {headers.PUBLISH: "p" if same_publish else f"p{n}"}
        states.append(body.apply_async(task_id=task_id, headers=publish).state)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Task.apply saves and restores a process-global "join would block" flag
    # (celery.result.denied_join_result); eager calls from threads interleave and can
    # leave it set, which would fail later .get() calls of other tests.
    celery_state._set_task_join_will_block(False)
    assert _overlapping(spans) == 0
    assert len(spans) == (1 if same_publish else copies)
    assert sorted(states) == sorted(
        ["SUCCESS"] + ["IGNORED" if same_publish else "SUCCESS"] * (copies - 1)
    )
    assert events.of("task_gave_up") == []
    assert {r["reason"] for r in events.of("retry_scheduled")} == {"running"}
    assert events.of("crash_budget_spent") == []


def test_still_holds_asks_the_backend_and_marks_a_lost_lease(app: Celery) -> None:
    """current_attempt().still_holds() is True while held, False (and lease_lost) once not."""
    seen: list[tuple[bool, bool]] = []
    task_id = uuid.uuid4().hex

    @resilient(lock="h:{x}")
    @app.task(shared=False)
    def careful(x: int) -> None:
        attempt = current_attempt()
        seen.append((attempt.still_holds(), attempt.lease_lost))
        # our leases go (as after a long pause) and another owner takes the lock
        runtime(app).backend.release(task_id, "h:1", holder_of(app, task_id))
        hold(app, "thief", "thief", "h:1")
        seen.append((attempt.still_holds(), attempt.lease_lost))

    careful.apply_async((1,), task_id=task_id).get()
    assert seen == [(True, False), (False, True)]
