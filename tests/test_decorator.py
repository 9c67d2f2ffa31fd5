"""@resilient on every way a Celery task is declared, and its errors at decoration."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import ClassVar

import pytest
from celery import Celery, Task, chain, group, shared_task

from celery_resilience import ConfigurationError, current_attempt, resilient
from celery_resilience.runtime import runtime
from celery_resilience.testing import eager_app


@pytest.fixture
def app() -> Iterator[Celery]:
    """An eager app on an in-memory backend, current while the test runs."""
    with eager_app() as app, app.connection_for_write():  # current: for shared tasks
        app.set_current()
        yield app


class AuditedTask(Task):  # type: ignore[misc]
    """A custom base class, as users bring their own."""

    audited: ClassVar[list[str]] = []

    def __call__(self, *args: object, **kwargs: object) -> object:
        AuditedTask.audited.append(self.name)
        return super().__call__(*args, **kwargs)


def test_unbound_app_task_runs_through_the_gate(app: Celery) -> None:
    """@resilient above @app.task: delay() works and the body sees its attempt."""

    @resilient(lock="a:{x}")
    @app.task(shared=False)
    def plain(x: int) -> str | None:
        return current_attempt().lock_key

    assert plain.delay(1).get() == "a:1"
    assert plain.apply_async((2,)).get() == "a:2"


def test_bound_task_with_custom_base_keeps_both(app: Celery) -> None:
    """bind=True and base= keep working: self is the task, the base's __call__ runs."""

    @resilient(lock="b:{x}")
    @app.task(bind=True, base=AuditedTask, shared=False)
    def bound(self: Task, x: int) -> tuple[str, str | None]:
        return self.name, current_attempt().lock_key

    name, key = bound.delay(3).get()
    assert key == "b:3"
    assert name in AuditedTask.audited


def test_shared_task_is_made_resilient_in_the_app_that_uses_it(app: Celery) -> None:
    """@resilient above @shared_task applies to the app's copy of the task."""

    @resilient(lock="s:{y}")
    @shared_task(name=f"shared-{uuid.uuid4().hex[:6]}")
    def shared(y: int) -> str | None:
        return current_attempt().lock_key

    assert shared.delay(5).get() == "s:5"
    assert app.tasks[shared.name].acks_late is True


def test_task_on_finalized_app_is_made_resilient(app: Celery) -> None:
    """An app already finalized gives a real task, not a proxy; that works too."""
    app.finalize()

    @resilient(lock="f:{z}")
    @app.task(shared=False)
    def late(z: int) -> str | None:
        return current_attempt().lock_key

    assert late.delay(9).get() == "f:9"


def test_signatures_chains_and_groups_keep_working(app: Celery) -> None:
    """.s(), chains and groups of resilient tasks behave as plain Celery."""

    @resilient(lock="add:{x}")
    @app.task(shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    assert add.s(1, 2).delay().get() == 3
    assert chain(add.s(1, 2), add.s(10)).delay().get() == 13
    assert group(add.s(i, i) for i in range(3)).delay().get() == [0, 2, 4]


def test_delivery_options_are_set_per_task_not_globally(app: Celery) -> None:
    """acks_late and reject_on_worker_lost go on the resilient task only."""

    @resilient()
    @app.task(shared=False)
    def safe() -> None: ...

    @app.task(shared=False)
    def ordinary() -> None: ...

    assert (safe.acks_late, safe.reject_on_worker_lost) == (True, True)
    assert not ordinary.acks_late
    assert not app.conf.task_acks_late


def test_explicit_max_retries_wins_over_task_option_and_setting(app: Celery) -> None:
    """max_retries: @resilient's, else @app.task's, else resilience_max_retries."""

    @resilient(max_retries=4)
    @app.task(max_retries=1, shared=False)
    def explicit() -> None: ...

    @resilient()
    @app.task(max_retries=2, shared=False)
    def from_task() -> None: ...

    assert explicit.max_retries == 4
    assert from_task.max_retries == 2


def test_plain_function_is_a_type_error_saying_where_to_put_it() -> None:
    """Given a plain function, @resilient says to go above the task decorator."""
    with pytest.raises(TypeError, match=r"put @resilient above @app.task"):

        @resilient(max_retries=1)
        def not_a_task() -> None: ...


def test_autoretry_for_below_resilient_is_refused_naming_the_replacement(app: Celery) -> None:
    """Celery's autoretry wrapper would run the body without the gate: one clear error."""
    app.finalize()
    with pytest.raises(ConfigurationError, match=r"autoretry_for=.*retry_on=\.\.\."):

        @resilient(max_retries=2)
        @app.task(shared=False, autoretry_for=(ValueError,))
        def both() -> None: ...


@pytest.mark.parametrize("declare", ["app.task", "shared_task", "finalized"])
def test_lock_template_with_unknown_parameter_fails_at_decoration(
    app: Celery, declare: str
) -> None:
    """A lock template naming a missing parameter names it and the task."""
    if declare == "finalized":
        app.finalize()
    # shared tasks join every app created later: unique names keep tests apart.
    declarator = shared_task if declare == "shared_task" else app.task
    decorator = declarator(name=f"upload-{uuid.uuid4().hex[:6]}")
    with pytest.raises(ConfigurationError, match=r"names 'commitid'.*parameters: repoid"):

        @resilient(lock="upload:{repoid}:{commitid}")
        @decorator
        def upload(repoid: int) -> None: ...


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_retries": -1}, "max_retries=-1"),
        ({"max_crashes": 0}, "max_crashes=0"),
        ({"lock_ttl": 0}, "lock_ttl=0"),
        ({"retry_on": ("ValueError",)}, "retry_on="),
        ({"lock": 42}, "lock=42"),
        ({"lock": "k:{0}"}, "positional field"),
    ],
)
def test_bad_option_fails_at_decoration(
    app: Celery, options: dict[str, object], named: str
) -> None:
    """Each bad @resilient option is one ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=named):

        @resilient(**options)  # type: ignore[arg-type]
        @app.task(shared=False)
        def task(x: int) -> None: ...


def test_decorating_does_not_load_configuration(app: Celery) -> None:
    """@resilient installs without reading settings: a bad one surfaces on install or run."""
    app.conf.resilience_lock_ttl = "soon"

    @resilient()
    @app.task(shared=False)
    def later() -> None: ...

    from celery_resilience import install

    with pytest.raises(ConfigurationError, match="resilience_lock_ttl='soon'"):
        install(app)
    with pytest.raises(ConfigurationError, match="resilience_lock_ttl='soon'"):
        later.delay().get()


def test_install_is_idempotent(app: Celery) -> None:
    """install(app) twice adds one worker boot step and one runtime."""
    from celery_resilience import install
    from celery_resilience.worker import ResilienceBootstep

    install(app)
    first = runtime(app)
    install(app)
    assert runtime(app) is first
    assert list(app.steps["worker"]).count(ResilienceBootstep) == 1


@pytest.mark.parametrize("declare", ["app.task", "shared_task", "finalized"])
def test_acks_late_false_on_the_task_is_refused_at_decoration(app: Celery, declare: str) -> None:
    """acks_late=False would lose the task with its worker: refused, naming task and option."""
    if declare == "finalized":
        app.finalize()
    declarator = shared_task if declare == "shared_task" else app.task
    name = f"early-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigurationError, match=rf"task '{name}': acks_late=False is set"):

        @resilient(max_retries=1)
        @declarator(name=name, acks_late=False)
        def early() -> None: ...


def test_acks_late_false_from_a_base_class_is_refused(app: Celery) -> None:
    """A base class with acks_late = False is the user's choice too: refused."""

    class EarlyAck(Task):  # type: ignore[misc]
        acks_late = False

    app.finalize()
    with pytest.raises(ConfigurationError, match=r"acks_late=False is set on the task"):

        @resilient(max_retries=1)
        @app.task(shared=False, base=EarlyAck)
        def early() -> None: ...


def test_acks_late_false_from_task_annotations_is_refused(app: Celery) -> None:
    """task_annotations setting acks_late=False for the task is named in the error."""
    name = f"annotated-{uuid.uuid4().hex[:6]}"
    app.conf.task_annotations = {name: {"acks_late": False}}
    app.finalize()
    with pytest.raises(ConfigurationError, match=r"task_annotations sets acks_late=False"):

        @resilient(max_retries=1)
        @app.task(shared=False, name=name)
        def annotated() -> None: ...


@pytest.mark.parametrize("global_acks_late", [False, True])
def test_global_task_acks_late_setting_is_not_mistaken_for_the_tasks_own(
    app: Celery, global_acks_late: bool
) -> None:
    """The task_acks_late default (False) is not the task's choice: the task is made resilient."""
    app.conf.task_acks_late = global_acks_late
    app.finalize()

    @resilient(max_retries=1)
    @app.task(shared=False)
    def plain() -> str:
        return "ran"

    assert plain.acks_late is True
    assert plain.delay().get() == "ran"
