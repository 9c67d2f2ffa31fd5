"""The gate on every delivery, run through Celery's own tracer (eager mode).

Each test runs against every built-in coordination backend (memory and real Redis).
Worker-process behaviour (kills, redelivery, overlap across nodes) is in
tests/integration.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, Task

from celery_resilience import (
    Backoff,
    CrashBudgetExceeded,
    LockContended,
    NoCurrentAttempt,
    current_attempt,
    resilient,
)
from celery_resilience.backends.base import Admission
from celery_resilience.runtime import runtime
from tests.recorder import Recorder, recording

FAST = Backoff(base=0.01, factor=2, cap=0.05, jitter="none")


@pytest.fixture
def app(backend_url: str, key_prefix: str) -> Iterator[Celery]:
    """An eager Celery app whose resilience backend is the parametrized one."""
    app = Celery(f"t{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_store_eager_result=False,
        resilience_url=backend_url,
        resilience_key_prefix=key_prefix,
    )
    yield app
    runtime(app).backend.close()


@pytest.fixture
def events() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


def test_flaky_task_is_retried_with_backoff_until_it_succeeds(
    app: Celery, events: Recorder
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


def test_exhausted_retries_fail_with_the_original_exception(app: Celery, events: Recorder) -> None:
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


def test_error_outside_retry_on_is_terminal(app: Celery, events: Recorder) -> None:
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


def test_contended_lock_never_runs_the_body_and_counts_against_retries(
    app: Celery, events: Recorder
) -> None:
    """Held by another owner: each attempt retries, then gives up with LockContended."""
    ran: list[int] = []

    @resilient(max_retries=2, lock="upload:{repoid}", backoff=FAST)
    @app.task(shared=False)
    def upload(repoid: int) -> None:
        ran.append(repoid)

    backend = runtime(app).backend
    other = backend.admit(
        "other", 0, owner="other", lock_key="upload:1", lease_ttl=30, max_crashes=3, record_ttl=60
    )
    assert other.admission is Admission.ADMITTED
    with pytest.raises(LockContended, match="upload:1"):
        upload.delay(1).get()
    assert ran == []
    assert len(events.of("lock_contended")) == 3
    assert [r["reason"] for r in events.of("retry_scheduled")] == ["lock_contended"] * 2
    assert [e["outcome"].reason for e in events.of("task_gave_up")] == ["lock_contended"]
    upload.delay(2).get()
    assert ran == [2]


def test_contended_retry_waits_the_shorter_of_lease_and_backoff(
    app: Celery, events: Recorder
) -> None:
    """The countdown after contention is min(remaining lease, backoff)."""

    @resilient(max_retries=1, lock="k:{x}", backoff=Backoff(base=100, jitter="none"))
    @app.task(shared=False)
    def locked(x: int) -> None:
        pass

    runtime(app).backend.admit(
        "other", 0, owner="o", lock_key="k:1", lease_ttl=0.5, max_crashes=3, record_ttl=60
    )
    with pytest.raises(LockContended):
        locked.delay(1).get()
    (first, *_) = events.of("retry_scheduled")
    assert 0 < first["countdown"] <= 0.5


def test_lock_is_checked_on_every_delivery_not_only_the_first(app: Celery) -> None:
    """The origin bug: a retry must re-check the lock, and wait for it when it is held."""
    from celery_resilience import get_plugin_manager, hookimpl

    backend = runtime(app).backend
    ran: list[int] = []

    class Intruder:
        """Takes the key between the first attempt and its retry."""

        @hookimpl
        def resilience_retry_scheduled(self, reason: str) -> None:
            if reason == "exception":
                backend.admit(
                    "intruder",
                    0,
                    owner="i",
                    lock_key="k:1",
                    lease_ttl=30,
                    max_crashes=3,
                    record_ttl=60,
                )

    @resilient(max_retries=3, lock="k:{x}", retry_on=(ConnectionError,), backoff=FAST)
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


def test_redelivered_succeeded_task_is_suppressed_not_rerun(app: Celery, events: Recorder) -> None:
    """A second delivery of a task id that succeeded is acked without running."""
    runs: list[int] = []

    @resilient()
    @app.task(shared=False)
    def once(x: int) -> int:
        runs.append(x)
        return x

    task_id = uuid.uuid4().hex
    assert once.apply_async((1,), task_id=task_id).get() == 1
    again = once.apply_async((1,), task_id=task_id)
    assert again.state == "IGNORED"
    assert runs == [1]
    assert [e["task_id"] for e in events.of("duplicate_suppressed")] == [task_id]


def test_attempt_lost_max_crashes_times_is_not_run_again(app: Celery, events: Recorder) -> None:
    """Deliveries that never finished spend the crash budget; the next one gives up."""
    runs: list[int] = []

    @resilient(max_crashes=2)
    @app.task(shared=False)
    def poison() -> None:
        runs.append(1)

    task_id = uuid.uuid4().hex
    backend = runtime(app).backend
    for _ in range(2):  # two deliveries that were lost with their worker
        backend.admit(
            task_id, 0, owner="dead", lock_key=None, lease_ttl=30, max_crashes=2, record_ttl=60
        )
    result = poison.apply_async(task_id=task_id)
    assert result.state == "FAILURE"
    with pytest.raises(CrashBudgetExceeded, match="lost with its worker 2 times"):
        result.get()
    assert runs == []
    assert events.of("redelivery_seen")[0]["deliveries"] == 3
    assert events.of("crash_budget_spent")[0]["max_crashes"] == 2
    assert [e["outcome"].reason for e in events.of("task_gave_up")] == ["worker_lost"]


def test_one_lost_delivery_reruns_and_is_reported(app: Celery, events: Recorder) -> None:
    """A redelivery within the budget runs and is reported as seen."""

    @resilient(max_crashes=3)
    @app.task(shared=False)
    def survivor() -> str:
        return f"deliveries={current_attempt().deliveries}"

    task_id = uuid.uuid4().hex
    runtime(app).backend.admit(
        task_id, 0, owner="dead", lock_key=None, lease_ttl=30, max_crashes=3, record_ttl=60
    )
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


def test_users_own_retry_is_honoured_and_counted(app: Celery, events: Recorder) -> None:
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
    backend = runtime(app).backend
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
            result = backend.admit(
                uuid.uuid4().hex,
                0,
                owner="probe",
                lock_key="long:1",
                lease_ttl=5,
                max_crashes=3,
                record_ttl=60,
            )
            contended.append(result.admission)

    thread = threading.Thread(target=probe)
    thread.start()
    long_body.delay(1).get()
    thread.join()
    assert contended == [Admission.LOCK_CONTENDED] * 4


def test_failing_observer_never_fails_the_task(app: Celery, events: Recorder) -> None:
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

    runtime(app).backend.admit(
        "o", 0, owner="o", lock_key="d:1", lease_ttl=30, max_crashes=3, record_ttl=60
    )
    assert direct(1) == 3


def test_default_max_retries_comes_from_settings(app: Celery, events: Recorder) -> None:
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
    backend_url: str, key_prefix: str, events: Recorder
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


def test_lock_of_a_provably_dead_holder_is_freed_at_once(app: Celery, events: Recorder) -> None:
    """A lease left by a process that died on this machine does not block the task."""
    import subprocess
    import sys

    code = "from celery_resilience.owners import new_owner; print(new_owner('n', 't'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead = done.stdout.strip()
    runtime(app).backend.admit(
        "dead-task", 0, owner=dead, lock_key="d:1", lease_ttl=30, max_crashes=3, record_ttl=60
    )

    @resilient(max_retries=0, lock="d:{x}")
    @app.task(shared=False)
    def guarded(x: int) -> int | None:
        return current_attempt().fencing_token

    assert guarded.delay(1).get() is not None
    assert events.of("lock_contended") == []


def test_lock_of_a_live_holder_is_never_overtaken(app: Celery) -> None:
    """A holder whose process is alive keeps its lease: the task gives up contended."""
    owner = __import__("celery_resilience.owners", fromlist=["new_owner"]).new_owner("n", "t")
    runtime(app).backend.admit(
        "live-task", 0, owner=owner, lock_key="l:1", lease_ttl=30, max_crashes=3, record_ttl=60
    )

    @resilient(max_retries=0, lock="l:{x}")
    @app.task(shared=False)
    def guarded(x: int) -> None: ...

    with pytest.raises(LockContended):
        guarded.delay(1).get()


def test_redelivery_is_reported_when_the_dead_holder_was_itself(
    app: Celery, events: Recorder
) -> None:
    """A delivery lost with its lease, freed as a dead holder, still counts as redelivered."""
    import subprocess
    import sys

    code = "from celery_resilience.owners import new_owner; print(new_owner('n', 't'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    task_id = uuid.uuid4().hex
    runtime(app).backend.admit(
        task_id, 0, owner=done.stdout.strip(), lock_key="r:1", lease_ttl=30, max_crashes=3,
        record_ttl=60,
    )  # fmt: skip

    @resilient(lock="r:{x}")
    @app.task(shared=False)
    def again(x: int) -> int:
        return current_attempt().deliveries

    assert again.apply_async((1,), task_id=task_id).get() == 2
    assert [e["deliveries"] for e in events.of("redelivery_seen")] == [2]
