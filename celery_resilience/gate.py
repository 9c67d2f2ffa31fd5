"""The gate: what runs around a resilient task's body on every delivery.

Order, the same on the first run, each retry and each redelivery: completion record,
crash budget, lock, body, give-up. The first three are one atomic backend call
(``admit``) before the body; closing the delivery is one call (``finish``) after it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NoReturn

from celery import states
from celery.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry

from celery_resilience.attempt import Attempt, _current
from celery_resilience.backends.base import Admission, AdmitResult
from celery_resilience.deadletter import FIRST_FAILURE_HEADER, REPLAYS_HEADER, make_dead_letter
from celery_resilience.errors import BackendUnavailable, CrashBudgetExceeded, LockContended
from celery_resilience.leases import keeper
from celery_resilience.locks import LockKey
from celery_resilience.options import ResilientOptions
from celery_resilience.outcome import GiveUp
from celery_resilience.owners import holder_is_dead, new_owner
from celery_resilience.plugins import notify
from celery_resilience.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

# After retries are spent while the coordination backend is down, the message is
# requeued; this pause keeps a worker from spinning on it.
_REQUEUE_PAUSE = 5.0


class Delivery:
    """One delivery of a resilient task, from admission to its outcome."""

    def __init__(self, gate: Gate, rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any]):
        task = gate.task
        request = task.request
        self.gate, self.rt, self.task = gate, rt, task
        self.args, self.kwargs = args, kwargs
        self.task_id: str = request.id
        self.attempt: int = request.retries or 0
        self.options = gate.options
        settings = rt.settings
        self.max_retries: int = (
            settings.max_retries if self.options.max_retries is None else self.options.max_retries
        )
        if task.max_retries != self.max_retries:
            # So that the body's own self.retry() honours the same budget.
            task.max_retries = self.max_retries
        self.max_crashes = self.options.max_crashes or settings.max_crashes
        self.lease_ttl = self.options.lock_ttl or settings.lock_ttl
        self.owner = new_owner(request.hostname or "", self.task_id)
        self.lock_key: str | None = None
        self.deliveries = 0
        self.replays = int(_header(request, REPLAYS_HEADER) or 0)
        first = _header(request, FIRST_FAILURE_HEADER)
        self.first_failure: float | None = float(first) if first is not None else None

    # -- the steps -------------------------------------------------------

    def run(self) -> Any:
        if self.gate.lock is not None:
            try:
                self.lock_key = self.gate.lock.render(self.args, self.kwargs)
            except Exception as exc:
                self.give_up("error", exc)
        try:
            admitted = first = self.admit()
            if admitted.holder is not None and self.free_dead_holder(admitted.holder):
                admitted = self.admit()
        except BackendUnavailable as exc:
            self.backend_down(exc)
        # After freeing a dead holder the second admit counts from 1 again (the
        # lost deliveries are carried); the first one saw the true count.
        self.deliveries = max(first.deliveries, admitted.deliveries)
        if self.deliveries > 1:
            self.emit(
                "resilience_redelivery_seen", attempt=self.attempt, deliveries=self.deliveries
            )
        if admitted.admission is Admission.ADMITTED:
            return self.run_body(admitted)
        if admitted.admission is Admission.DUPLICATE:
            self.emit("resilience_duplicate_suppressed")
            raise Ignore()
        if admitted.admission is Admission.CRASH_BUDGET_SPENT:
            self.emit(
                "resilience_crash_budget_spent",
                attempt=self.attempt,
                deliveries=self.deliveries,
                max_crashes=self.max_crashes,
            )
            self.give_up(
                "worker_lost",
                CrashBudgetExceeded(
                    f"task {self.task.name}[{self.task_id}] was lost with its worker "
                    f"{admitted.crashes} times (max_crashes={self.max_crashes}); "
                    "not running it again"
                ),
            )
        return self.contended(admitted)

    def admit(self) -> AdmitResult:
        return self.rt.backend.admit(
            self.task_id,
            self.attempt,
            owner=self.owner,
            lock_key=self.lock_key,
            lease_ttl=self.lease_ttl,
            max_crashes=self.max_crashes,
            record_ttl=self.rt.settings.completion_ttl,
        )

    def free_dead_holder(self, holder: str) -> bool:
        """Release a lease whose holder is provably dead (see ``owners``); True if freed.

        A child killed on this machine leaves its lease behind; its task's
        redelivery would otherwise wait out the whole TTL.
        """
        assert self.lock_key is not None
        if not holder_is_dead(holder) or not self.rt.backend.release(self.lock_key, holder):
            return False
        logger.warning(
            "celery-resilience: released lock %r of dead holder %s for task %s[%s]",
            self.lock_key,
            holder,
            self.task.name,
            self.task_id,
        )
        return True

    def contended(self, admitted: AdmitResult) -> NoReturn:
        assert self.lock_key is not None
        self.emit(
            "resilience_lock_contended",
            lock_key=self.lock_key,
            lease_remaining=admitted.lease_remaining,
        )
        exc = LockContended(
            f"lock {self.lock_key!r} of task {self.task.name}[{self.task_id}] is held by "
            f"another attempt for {admitted.lease_remaining:.1f} s more"
        )
        if self.attempt >= self.max_retries:
            self.give_up("lock_contended", exc)
        delay = min(admitted.lease_remaining, self.options.backoff.delay(self.attempt))
        self.retry("lock_contended", delay, exc)

    def run_body(self, admitted: AdmitResult) -> Any:
        attempt = Attempt(
            task_name=self.task.name,
            task_id=self.task_id,
            attempt=self.attempt,
            deliveries=self.deliveries,
            lock_key=self.lock_key,
            fencing_token=admitted.fencing_token,
        )
        token = _current.set(attempt)
        renewing = (
            keeper.hold(self.rt.backend, self.lock_key, self.owner, self.lease_ttl, attempt)
            if self.lock_key is not None
            else nullcontext()
        )
        try:
            with renewing:
                value = self.gate.body(*self.args, **self.kwargs)
        except Retry as retry:
            # The body called self.retry(): Celery already published the retry.
            self.finish(succeeded=False)
            self.emit_retry("requested", _countdown(retry))
            raise
        except (Ignore, Reject):
            self.finish(succeeded=False)
            raise
        except Exception as exc:
            self.finish(succeeded=False)
            retryable = isinstance(exc, self.options.retry_on)
            if retryable and self.attempt < self.max_retries:
                self.retry("exception", self.options.backoff.delay(self.attempt), exc)
            spent = retryable or isinstance(exc, MaxRetriesExceededError)
            self.give_up("max_retries" if spent else "error", exc)
        except BaseException:
            # SystemExit / KeyboardInterrupt: the worker is going away; free the lock.
            self.finish(succeeded=False)
            raise
        finally:
            _current.reset(token)
        # Closed by Gate.after_return once Celery has stored the result: a
        # completion record written earlier would make a worker lost in between
        # suppress the redelivery and leave the task PENDING for good.
        self.gate.opened(self)
        return value

    def finish(self, *, succeeded: bool) -> None:
        """Close the delivery; a backend error is logged, never raised (the body ran)."""
        try:
            self.rt.backend.finish(
                self.task_id,
                self.attempt,
                owner=self.owner,
                lock_key=self.lock_key,
                succeeded=succeeded,
                record_ttl=self.rt.settings.completion_ttl,
            )
        except BackendUnavailable as exc:
            logger.error(
                "celery-resilience: task %s[%s] ran but its delivery could not be closed "
                "(its lease expires by itself): %s",
                self.task.name,
                self.task_id,
                exc,
            )

    # -- outcomes --------------------------------------------------------

    def retry(self, reason: str, countdown: float, exc: BaseException) -> NoReturn:
        """Publish the next attempt after ``countdown`` seconds and end this one."""
        countdown = self.rt.cap_countdown(countdown)
        history = {
            REPLAYS_HEADER: self.replays,
            FIRST_FAILURE_HEADER: self.first_failure or time.time(),
        }
        try:
            self.task.retry(
                exc=exc, countdown=countdown, max_retries=self.max_retries, headers=history
            )
        except Retry:
            self.emit_retry(reason, countdown)
            raise
        except Exception as error:
            if error is exc or self.task.request.is_eager:
                raise
            # The retry could not be published (broker down): requeue, lose nothing.
            logger.error(
                "celery-resilience: task %s[%s] could not publish its retry (%r); requeueing",
                self.task.name,
                self.task_id,
                error,
            )
            raise Reject(error, requeue=True) from error
        raise AssertionError("Task.retry() returned instead of raising")  # pragma: no cover

    def give_up(self, reason: str, exc: BaseException) -> NoReturn:
        """End the task for good: keep it in the DLQ, tell the plugins, fail with ``exc``.

        The dead letter is stored before the message is acked; if it cannot be, the
        message is requeued instead (nothing is lost between "gave up" and "stored").
        """
        request = self.task.request
        outcome = GiveUp(
            task_name=self.task.name,
            task_id=self.task_id,
            reason=reason,
            exception=exc,
            args=tuple(self.args),
            kwargs=dict(self.kwargs),
            attempts=self.attempt + 1,
            deliveries=self.deliveries,
            lock_key=self.lock_key,
            hostname=request.hostname,
            delivery_info=dict(request.delivery_info or {}),
        )
        if self.options.dlq:
            self.store_dead_letter(outcome)
        notify(self.rt.plugins, "resilience_task_gave_up", outcome=outcome)
        raise exc

    def store_dead_letter(self, outcome: GiveUp) -> None:
        settings = self.rt.settings
        try:
            entry = make_dead_letter(
                outcome, self.task, replays=self.replays, first_failure_at=self.first_failure
            )
            stored = self.rt.dlq.store(
                entry, retention=settings.dlq_retention, max_entries=settings.dlq_max_entries
            )
        except Exception as error:
            if self.task.request.is_eager:
                raise
            logger.error(
                "celery-resilience: task %s[%s] gave up (%s) but its dead letter could not "
                "be stored, so the message is requeued: %s",
                self.task.name,
                self.task_id,
                outcome.reason,
                error,
            )
            time.sleep(_REQUEUE_PAUSE)
            raise Reject(error, requeue=True) from error
        notify(
            self.rt.plugins, "resilience_dead_letter_stored", entry=entry, trimmed=stored.trimmed
        )

    def backend_down(self, exc: BackendUnavailable) -> NoReturn:
        """Never run unguarded: retry later, or requeue once retries are spent."""
        logger.error(
            "celery-resilience: task %s[%s] not run: %s", self.task.name, self.task_id, exc
        )
        if self.attempt < self.max_retries:
            self.retry("backend_unavailable", self.options.backoff.delay(self.attempt), exc)
        time.sleep(_REQUEUE_PAUSE)
        raise Reject(exc, requeue=True)

    def emit_retry(self, reason: str, countdown: float) -> None:
        self.emit(
            "resilience_retry_scheduled", attempt=self.attempt, reason=reason, countdown=countdown
        )

    def emit(self, hook: str, **kwargs: Any) -> None:
        notify(self.rt.plugins, hook, task_name=self.task.name, task_id=self.task_id, **kwargs)


def _header(request: Any, name: str) -> Any:
    """A custom message header: Celery merges them into the request in a worker and
    keeps them under ``request.headers`` in eager mode."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _countdown(retry: Retry) -> float:
    """Seconds until a user-requested retry runs, from ``Retry.when`` (number or datetime)."""
    when: Any = retry.when
    if isinstance(when, (int, float)):
        return float(when)
    if when is None:
        return 0.0
    try:
        from datetime import datetime, timezone

        return max(0.0, float((when - datetime.now(timezone.utc)).total_seconds()))
    except TypeError:
        return 0.0


class Gate:
    """Replaces a task's ``run``: every call from a worker or ``apply`` goes through it.

    A direct call (``task(...)`` outside a worker) runs the body with no gate, as
    Celery runs a plain function call.
    """

    def __init__(self, task: Any, options: ResilientOptions, body: Callable[..., Any]) -> None:
        self.task = task
        self.options = options
        self.body = body
        self.lock: LockKey | None = None
        if options.lock is not None:
            self.lock = LockKey(options.lock, inspect.signature(body))
        self.__wrapped__ = body
        self._open: dict[str, Delivery] = {}

    def opened(self, delivery: Delivery) -> None:
        """Keep ``delivery`` until Celery reports its outcome to ``after_return``."""
        self._open[delivery.task_id] = delivery

    def after_return(self, status: str, task_id: str) -> None:
        """Close the delivery whose body returned, now that its result is stored.

        ``status`` SUCCESS writes the completion record; any other status (the
        result could not be stored) only releases the lease and the counters.
        """
        delivery = self._open.pop(task_id, None)
        if delivery is not None:
            delivery.finish(succeeded=status == states.SUCCESS)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task = self.task
        if not task.request.called_directly:
            return Delivery(self, runtime(task.app), args, kwargs).run()
        traced = _traced_request(task)
        if traced is None:
            return self.body(*args, **kwargs)
        # Celery < 5.5 in eager mode: a base class whose __call__ calls super()
        # pushes a fresh, empty request over the traced one (5.5 copies it).
        # Put the traced request back on top so the gate, Task.retry() and the
        # body all see the delivery.
        task.push_request(**traced.__dict__)
        try:
            return Delivery(self, runtime(task.app), args, kwargs).run()
        finally:
            task.pop_request()


def _traced_request(task: Any) -> Any:
    """Return the request of the delivery beneath a direct-call frame, or None."""
    for request in reversed(task.request_stack.stack[:-1]):
        if not request.called_directly:
            return request
    return None
