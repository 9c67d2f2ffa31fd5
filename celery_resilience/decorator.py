"""``@resilient``: puts the gate around a Celery task's body."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task
from celery import _state as celery_state
from celery.app.annotations import resolve_all as resolve_all_annotations
from celery.local import PromiseProxy, Proxy

from celery_resilience.backoff import Backoff
from celery_resilience.dedup import deduplicating
from celery_resilience.errors import ConfigurationError
from celery_resilience.gate import Gate
from celery_resilience.headers import stamping
from celery_resilience.locks import LockSpec, check_template
from celery_resilience.options import ResilientOptions
from celery_resilience.worker import install

T = TypeVar("T")


@overload
def resilient(task: T) -> T: ...


@overload
def resilient(
    task: None = None,
    *,
    max_retries: int | None = None,
    lock: LockSpec | None = None,
    lock_ttl: float | None = None,
    lock_timeout: float | None = None,
    dlq: bool = True,
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = (),
    backoff: Backoff | None = None,
    max_crashes: int | None = None,
    dedup: LockSpec | None = None,
    dedup_until: str = "start",
    dedup_ttl: float | None = None,
    on_duplicate: str = "return",
) -> Callable[[T], T]: ...


def resilient(
    task: Any = None,
    *,
    max_retries: int | None = None,
    lock: LockSpec | None = None,
    lock_ttl: float | None = None,
    lock_timeout: float | None = None,
    dlq: bool = True,
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = (),
    backoff: Backoff | None = None,
    max_crashes: int | None = None,
    dedup: LockSpec | None = None,
    dedup_until: str = "start",
    dedup_ttl: float | None = None,
    on_duplicate: str = "return",
) -> Any:
    """Make a Celery task resilient. Put it directly above ``@app.task``/``@shared_task``.

    :param max_retries: retries allowed (the first run is not a retry); default
        ``resilience_max_retries`` (10).
    :param lock: a template over the task's parameters (``"upload:{repoid}"``) or a
        callable ``(args, kwargs) -> str``; the body runs only while holding a lease
        on the rendered key.
    :param lock_ttl: lease length in seconds (the lock's and the task id's run lease),
        renewed while the body runs; default ``resilience_lock_ttl`` (30).
    :param lock_timeout: seconds a task may wait for its lock, counted from its first
        contended delivery, before it gives up as ``lock_contended``; waiting spends
        no retries. Default ``resilience_lock_timeout`` (3600).
    :param dlq: whether a task that gives up is kept in the dead-letter queue.
    :param retry_on: exception classes retried with ``backoff``; others are terminal.
    :param backoff: delays between retries; default ``Backoff()``.
    :param max_crashes: lost deliveries of one attempt before it is not run again;
        default ``resilience_max_crashes`` (3).
    :param dedup: a template or callable like ``lock``: while a task of the same
        rendered key is pending, a call publishes nothing (see ``dedup_until``) and
        returns that task's ``AsyncResult``.
    :param dedup_until: ``"start"`` (the key is free once the pending task starts
        running) or ``"finish"`` (free once it is done: succeeded, gave up, discarded).
    :param dedup_ttl: seconds after which a key expires even if never released;
        default ``resilience_dedup_ttl`` (3600).
    :param on_duplicate: ``"return"`` the pending task's ``AsyncResult``, or
        ``"raise"`` ``celery_resilience.DuplicateTask``.

    Returns the task itself, so ``.delay()``, ``.apply_async()`` and ``.s()`` work
    unchanged. Raises ``TypeError`` when given a plain function and
    ``celery_resilience.errors.ConfigurationError`` for a bad option, such as a
    lock template naming a parameter the task does not have, or a task that sets
    ``acks_late=False`` itself (on ``@app.task``, a base class or ``task_annotations``).
    """
    options = ResilientOptions(
        max_retries=max_retries,
        lock=lock,
        lock_ttl=lock_ttl,
        lock_timeout=lock_timeout,
        dlq=dlq,
        retry_on=retry_on if isinstance(retry_on, tuple) else (retry_on,),
        backoff=backoff if backoff is not None else Backoff(),
        max_crashes=max_crashes,
        dedup=dedup,
        dedup_until=dedup_until,
        dedup_ttl=dedup_ttl,
        on_duplicate=on_duplicate,
    )

    def decorate(obj: Any) -> Any:
        _attach(obj, options)
        return obj

    return decorate if task is None else decorate(task)


def _attach(obj: Any, options: ResilientOptions) -> None:
    """Apply ``options`` to a task, or to the task a Celery proxy will become."""
    kind = type(obj)
    if issubclass(kind, PromiseProxy):
        # @app.task on an app not finalized yet: the task is created later.
        if obj.__evaluated__():
            make_resilient(obj._get_current_object(), options)
            return
        fun, task_options = _promise_target(obj)
        name = task_options.get("name") or fun.__qualname__
        _check_lock(options, fun, name)
        _check_task_options(task_options, name)
        obj.__then__(lambda: make_resilient(obj._get_current_object(), options))
    elif issubclass(kind, Proxy):
        _attach_shared(obj, options)
    elif isinstance(obj, Task):
        make_resilient(obj, options)
    else:
        raise TypeError(
            f"@resilient was given {obj!r}, not a Celery task: put @resilient above "
            "@app.task(...) or @shared_task(...), not below it"
        )


def _promise_target(proxy: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    # celery.local.PromiseProxy keeps the factory's arguments until evaluated
    # (stable through Celery 5.3-5.7): (fun,) and the @app.task options.
    args = object.__getattribute__(proxy, "_Proxy__args")
    kwargs = object.__getattribute__(proxy, "_Proxy__kwargs")
    return args[0], dict(kwargs)


def _attach_shared(proxy: Any, options: ResilientOptions) -> None:
    """Apply ``options`` to every app's copy of a ``@shared_task``.

    ``shared_task`` returns ``Proxy(task_by_cons)`` whose closure holds the function
    and the explicit name (Celery 5.3-5.7); each app creates its own task from them
    when it finalizes.
    """
    factory = object.__getattribute__(proxy, "_Proxy__local")
    cells = getattr(factory, "__closure__", None) or ()
    scope = dict(zip(factory.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))
    fun = scope.get("fun")
    if fun is None:
        raise TypeError(f"@resilient cannot find the task behind {proxy!r}")
    name = scope.get("name")
    _check_lock(options, fun, name or fun.__qualname__)
    _check_task_options(_shared_task_options(fun), name or fun.__qualname__)

    def apply_to(app: Any) -> None:
        task = app._tasks.get(name or app.gen_task_name(fun.__name__, fun.__module__))
        if task is not None:
            make_resilient(task, options)

    def on_finalize(app: Any) -> None:
        # Finalize callbacks run in no fixed order, so wait until every task exists.
        app.on_after_finalize.connect(lambda sender, **kw: apply_to(sender), weak=False)

    celery_state.connect_on_app_finalize(on_finalize)
    for app in celery_state._get_active_apps():
        if app.finalized:
            apply_to(app)


def _check_lock(options: ResilientOptions, fun: Callable[..., Any], task_name: str) -> None:
    if isinstance(options.lock, str):
        check_template(options.lock, fun, task_name)
    if isinstance(options.dedup, str):
        check_template(options.dedup, fun, task_name, "dedup")


def _shared_task_options(fun: Callable[..., Any]) -> dict[str, Any]:
    """The ``@shared_task(...)`` options of ``fun``, read before any app creates the task.

    ``shared_task`` (Celery 5.3-5.7) registers ``lambda app: app._task_from_fun(fun,
    **options)`` with ``connect_on_app_finalize``; its closure is the only place the
    options are kept. Empty if it cannot be found.
    """
    for callback in list(getattr(celery_state, "_on_app_finalizers", ())):
        cells = getattr(callback, "__closure__", None) or ()
        scope = dict(zip(callback.__code__.co_freevars, cells, strict=True))
        if "fun" in scope and "options" in scope and scope["fun"].cell_contents is fun:
            found = scope["options"].cell_contents
            return dict(found) if isinstance(found, dict) else {}
    return {}


def _check_task_options(task_options: dict[str, Any], task_name: str) -> None:
    """Refuse ``@app.task`` options that would silently lose the gate's guarantees."""
    if task_options.get("acks_late") is False:
        raise _early_ack(task_name, "acks_late=False is set on @app.task")


def _early_ack(task_name: str, where: str) -> ConfigurationError:
    return ConfigurationError(
        f"@resilient on task {task_name!r}: {where}; a task acked before it runs is lost "
        "with its worker, so @resilient needs acks_late=True. Remove acks_late=False "
        "(celery-resilience sets acks_late and reject_on_worker_lost on this task only)"
    )


def _explicit_early_ack(task: Any) -> str | None:
    """Where an explicit ``acks_late=False`` on an already created task comes from, if any."""
    cls = type(task)
    for annotation in resolve_all_annotations(task.app.annotations, cls):
        if annotation.get("acks_late") is False:
            return "task_annotations sets acks_late=False for it"
    if cls.acks_late is not False:
        return None
    # Task.bind (Celery 5.3-5.7) sets ``__bound__`` first, then copies task_acks_late
    # onto the class only when the attribute was None: a key placed after
    # ``__bound__`` came from the global setting, anything else from the user
    # (an @app.task option, which type() put before it, or a base class).
    keys = list(cls.__dict__)
    set_by_bind = "acks_late" in keys and "__bound__" in keys
    if set_by_bind and keys.index("acks_late") > keys.index("__bound__"):
        return None
    return "acks_late=False is set on the task (or its base class)"


def make_resilient(task: Any, options: ResilientOptions) -> None:
    """Put the gate around ``task``'s body and set its per-task delivery options. Idempotent.

    Sets ``acks_late`` and ``reject_on_worker_lost`` on this task only: the crash
    budget makes redelivery after a lost worker safe. Its ``apply_async`` stamps each
    publish with a publish id (see ``celery_resilience.headers``).
    """
    cls = type(task)
    if isinstance(cls.__dict__.get("run"), staticmethod) and isinstance(
        cls.__dict__["run"].__func__, Gate
    ):
        return
    if "run" in vars(task):
        # Celery's autoretry_for (celery/app/autoretry.py, 5.3-5.7) sets an instance
        # ``run`` that calls ``_orig_run``: it would hide the gate set on the class.
        raise ConfigurationError(
            f"@resilient on task {task.name!r}: autoretry_for="
            f"{getattr(task, 'autoretry_for', ())!r} is set on @app.task; Celery's "
            "autoretry wrapper would run the body without the gate. Remove autoretry_for "
            "and the retry_* options and use @resilient(retry_on=..., backoff=Backoff(...))"
        )
    early_ack = _explicit_early_ack(task)
    if early_ack is not None:
        raise _early_ack(task.name, early_ack)
    body = task.run
    _check_lock(options, body, task.name)
    if options.max_retries is None and cls.__dict__.get("max_retries") is not None:
        # @app.task(max_retries=N) below @resilient() without its own max_retries.
        options = dataclasses.replace(options, max_retries=cls.__dict__["max_retries"])
    cls.acks_late = True
    cls.reject_on_worker_lost = True
    if options.max_retries is not None:
        cls.max_retries = options.max_retries
    gate = Gate(task, options, body)
    cls.run = staticmethod(gate)
    if not getattr(cls.apply_async, "__resilience_stamping__", False):
        cls.apply_async = stamping(cls.apply_async)
    if gate.dedup is not None:
        cls.apply_async = deduplicating(cls.apply_async, gate.dedup)
    cls.after_return = _after_return(gate, cls.after_return)
    cls.__resilience__ = options
    install(task.app, validate=False)


def _after_return(gate: Gate, inner: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the task class's ``after_return``; Celery calls it after storing the result."""

    def after_return(
        self: Any, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> Any:
        gate.after_return(status, task_id)
        return inner(self, status, retval, task_id, args, kwargs, einfo)

    return after_return
