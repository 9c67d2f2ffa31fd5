"""dedup=: identical calls collapse at publish time, on an app with no worker running.

The app publishes to its own ``memory://`` broker, so what a call published is what
the queue holds; eager mode runs each call to its end. Real workers, Redis and kills
are in tests/integration/test_dedup.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, group

from celery_resilience import ConfigurationError, DuplicateTask, headers, resilient
from celery_resilience.runtime import runtime
from celery_resilience.testing import eager_app


def publishing_app(**conf: object) -> contextlib.AbstractContextManager[Celery]:
    """An app that publishes to a queue of its own on the in-memory broker (kombu's
    memory transport is one per process), where no worker runs."""
    queue = f"dedup-{uuid.uuid4().hex[:8]}"
    return eager_app(task_always_eager=False, task_default_queue=queue, **conf)


@pytest.fixture
def app() -> Iterator[Celery]:
    """A publishing app with a result backend."""
    with publishing_app(result_backend="cache+memory://") as app:
        yield app


def queued(app: Celery) -> int:
    """Messages waiting in the app's queue."""
    with app.connection_for_read() as conn:
        queue = app.conf.task_default_queue
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def key_is_free(app: Celery, task: Any, key: str) -> bool:
    """Whether no task holds dedup key ``key`` of ``task`` (a probe takes it if free)."""
    return runtime(app).backend.dedup_claim(f"{task.name}:{key}", "probe", ttl=1) is None


def messages(app: Celery) -> list[dict[str, Any]]:
    """The headers of each message waiting in the app's queue, in order (they stay)."""
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(app.conf.task_default_queue)
        found = []
        for _ in range(queue.qsize()):
            message = queue.get(timeout=1)
            found.append(dict(message.headers))
            message.requeue()
        queue.close()
    return found


def test_identical_calls_while_one_is_queued_publish_once(app: Celery) -> None:
    """50 identical calls: 1 message, and every call returns the same task id."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int, full: bool = False) -> None: ...

    ids = {sync.delay(7).id for _ in range(25)} | {sync.s(repoid=7).apply_async().id}
    ids |= {sync.apply_async((7,)).id for _ in range(24)}
    assert len(ids) == 1
    assert queued(app) == 1
    assert sync.delay(8).id not in ids
    assert queued(app) == 2


def test_on_duplicate_raise_names_the_pending_task(app: Celery) -> None:
    """on_duplicate="raise": DuplicateTask carries the pending task's id and the key."""

    @resilient(dedup="sync:{repoid}", on_duplicate="raise")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    first = sync.delay(1)
    with pytest.raises(DuplicateTask) as raised:
        sync.delay(1)
    assert (raised.value.task_id, raised.value.dedup_key) == (first.id, "sync:1")
    assert queued(app) == 1


def test_dedup_false_always_publishes(app: Celery) -> None:
    """apply_async(dedup=False) publishes beside the pending one."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    first = sync.delay(1)
    forced = sync.apply_async((1,), dedup=False)
    assert forced.id != first.id
    assert queued(app) == 2
    assert sync.delay(1).id == first.id


def test_replay_from_the_dlq_takes_a_free_key_and_is_never_dropped(app: Celery) -> None:
    """A replay (it carries the replay count) publishes even when another task holds the
    key; when the key is free it takes it, so later calls collapse into the replay."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    replay = {headers.REPLAYS: 1}
    pending = sync.delay(1)
    beside = sync.apply_async((1,), headers=replay)
    assert beside.id != pending.id
    assert sync.delay(1).id == pending.id
    replayed = sync.apply_async((2,), headers=replay)
    assert sync.delay(2).id == replayed.id
    assert queued(app) == 3


def test_callable_key_and_bound_task(app: Celery) -> None:
    """A callable key sees the call's arguments; a bound task's self is not one of them."""

    @resilient(dedup=lambda args, kwargs: f"commit:{kwargs['sha'][:7]}")
    @app.task(bind=True, shared=False)
    def upload(self: object, *, sha: str) -> None: ...

    first = upload.delay(sha="abcdef0123")
    assert upload.delay(sha="abcdef0999").id == first.id
    assert queued(app) == 1


def test_a_holder_whose_result_is_ready_does_not_block(app: Celery) -> None:
    """A key left behind by a task that already finished is taken over by the next call."""

    @resilient(dedup="sync:{repoid}", dedup_until="finish")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    first = sync.delay(3)
    app.backend.mark_as_done(first.id, None)  # done, but its key was never released
    second = sync.delay(3)
    assert second.id != first.id
    assert sync.delay(3).id == second.id
    assert queued(app) == 2


def test_canvas_members_are_published_as_followers(app: Celery) -> None:
    """In a group or chain each member's own id is awaited: a collapsed member is
    published under its id as a follower of the pending task."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    pending = sync.delay(5)
    members = group(sync.s(5), sync.s(5)).apply_async()
    steps = chain(sync.s(5), sync.si(6)).apply_async()
    own = [r.id for r in members.results] + [steps.parent.id]
    assert pending.id not in own
    # A chain's later step, as the worker publishes it when the step before ends.
    later = sync.apply_async((5,), parent_id=steps.parent.id, root_id=steps.parent.id)
    own.append(later.id)
    follows = {h["id"]: h.get(headers.FOLLOWS) for h in messages(app)}
    assert [follows[tid][0] for tid in own] == [pending.id] * 4
    assert follows[pending.id] is None
    assert len(follows) == 5


@pytest.mark.parametrize(
    ("leader_state", "value", "runs"),
    [("SUCCESS", 42, []), ("FAILURE", 5, [5]), ("PENDING", 5, [5])],
    ids=["leader-succeeded", "leader-failed", "leader-never-ends"],
)
def test_follower_returns_the_leaders_value_or_runs_itself(
    leader_state: str, value: int, runs: list[int]
) -> None:
    """A follower returns its leader's value once it succeeded; after a failure, or
    once dedup_ttl has passed with the leader pending, it runs its own body."""
    with eager_app(result_backend="cache+memory://", task_store_eager_result=True) as app:
        ran: list[int] = []

        @resilient(dedup="sync:{repoid}", dedup_ttl=0.3)
        @app.task(shared=False)
        def sync(repoid: int) -> int:
            ran.append(repoid)
            return repoid

        leader = "leader-" + uuid.uuid4().hex
        if leader_state == "SUCCESS":
            app.backend.mark_as_done(leader, 42)
        elif leader_state == "FAILURE":
            app.backend.mark_as_failure(leader, KeyError("x"))
        follower = sync.apply((5,), headers={headers.FOLLOWS: [leader, time.time()]})
        assert follower.get() == value
        assert ran == runs


def test_unreachable_backend_publishes_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The coordination backend down at publish time: the call publishes, with a warning."""
    with eager_app(task_always_eager=False, resilience_url="redis://127.0.0.1:1/0") as app:

        @resilient(dedup="sync:{repoid}")
        @app.task(shared=False)
        def sync(repoid: int) -> None: ...

        with caplog.at_level(logging.WARNING, logger="celery_resilience.dedup"):
            first, second = sync.delay(1), sync.delay(1)
        assert first.id != second.id
        assert queued(app) == 2
        assert "could not deduplicate" in caplog.text


def test_failed_publish_frees_the_key(app: Celery) -> None:
    """A call whose publish raises leaves no key behind: the next call publishes."""

    @resilient(dedup="sync:{repoid}")
    @app.task(shared=False)
    def sync(repoid: int) -> None: ...

    with pytest.raises(TypeError):
        sync.apply_async((1,), countdown="soon")
    assert sync.delay(1) is not None
    assert queued(app) == 1


@pytest.mark.parametrize("until", ["start", "finish"])
def test_eager_calls_run_one_after_another(until: str) -> None:
    """In eager mode each call ends before the next, so every call runs, in both modes."""
    with eager_app() as app:
        runs: list[int] = []

        @resilient(dedup="sync:{repoid}", dedup_until=until)
        @app.task(shared=False)
        def sync(repoid: int) -> int:
            runs.append(repoid)
            return repoid

        assert [sync.delay(2).get() for _ in range(3)] == [2, 2, 2]
        assert runs == [2, 2, 2]
        assert key_is_free(app, sync, "sync:2")


@pytest.mark.parametrize(("until", "expected"), [("start", 1), ("finish", 2)])
def test_a_run_makes_one_backend_call_per_step(
    until: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per run, beside the publish's claim: "start" releases once, as the body starts;
    "finish" sets the TTL afresh at the start and releases at the end."""
    with eager_app() as app:

        @resilient(dedup="sync:{repoid}", dedup_until=until)
        @app.task(shared=False)
        def sync(repoid: int) -> int:
            return repoid

        backend = runtime(app).backend
        calls: list[str] = []
        for name in ("dedup_claim", "dedup_release"):
            real = getattr(backend, name)
            monkeypatch.setattr(
                backend, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1]
            )
        assert sync.delay(3).get() == 3
        assert len(calls) == 1 + expected, calls
        assert key_is_free(app, sync, "sync:3")


def test_eager_give_up_frees_the_key() -> None:
    """A task that gives up frees its "finish" key (eager: the exception propagates)."""
    with eager_app() as app:

        @resilient(dedup="sync:{repoid}", dedup_until="finish")
        @app.task(shared=False)
        def sync(repoid: int) -> None:
            raise KeyError(repoid)

        with pytest.raises(KeyError):
            sync.delay(4).get()
        assert key_is_free(app, sync, "sync:4")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dedup": "sync:{nope}"}, "dedup template 'sync:{nope}' of task"),
        ({"dedup": 42}, "@resilient dedup=42: expected a template string"),
        ({"dedup": "k", "dedup_until": "end"}, "dedup_until='end': expected 'start' or 'finish'"),
        ({"dedup": "k", "on_duplicate": "drop"}, "on_duplicate='drop': expected 'return'"),
        ({"dedup": "k", "dedup_ttl": 0}, "@resilient dedup_ttl=0: expected seconds > 0"),
    ],
)
def test_bad_dedup_options_fail_at_decoration(
    app: Celery, options: dict[str, object], message: str
) -> None:
    """Each bad option is one ConfigurationError naming it, its value and what was expected."""
    with pytest.raises(ConfigurationError, match=None) as raised:

        @resilient(**options)  # type: ignore[arg-type]
        @app.task(shared=False)
        def sync(repoid: int) -> None: ...

    assert message in str(raised.value)
