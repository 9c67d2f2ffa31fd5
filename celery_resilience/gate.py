"""The gate: what runs around a resilient task's body on every delivery.

Order, the same on the first run, each retry and each redelivery: completion record,
run lease, crash budget, lock, body, give-up. The first four are one atomic backend
call (``admit``) before the body; closing the delivery is one call (``finish``) after
it. A delivery that may not run now (its task id running elsewhere, its lock held,
the coordination backend unreachable) is *postponed*: the same message is published
again with a countdown (same task id, same ``retries``) and this one is acked, so
waiting spends neither retries nor the crash budget.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from celery import states
from celery.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry

from celery_resilience import headers
from celery_resilience.attempt import Attempt, _current
from celery_resilience.backends.base import Admission, AdmitResult
from celery_resilience.backoff import Backoff
from celery_resilience.deadletter import GiveUp, make_dead_letter
from celery_resilience.dedup import Dedup, results_kept
from celery_resilience.errors import BackendUnavailable, CrashBudgetExceeded, LockContended
from celery_resilience.leases import holder_is_dead, keeper, new_owner, presence_of
from celery_resilience.locks import LockKey
from celery_resilience.options import ResilientOptions
from celery_resilience.plugins import notify
from celery_resilience.runtime import Runtime, runtime

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

# When a dead letter cannot be stored (or a postponement cannot be published) the
# message is requeued; this pause keeps a worker from spinning on it.
_REQUEUE_PAUSE = 5.0
# Postponements while the coordination backend is unreachable, after a delivery
# retried its admission in-process for one lease TTL.
_OUTAGE_BACKOFF = Backoff(base=1.0, factor=2.0, cap=30.0, jitter="equal")
# Postponements of a copy whose task id is running elsewhere.
_RUNNING_BACKOFF = Backoff(base=0.5, factor=2.0, cap=30.0, jitter="equal")
# Owners of deliveries that gave up on the backend, carried to the next message.
_MAX_ADOPTABLE = 4


class _Postponed(Exception):
    """Eager mode only: wait ``countdown`` seconds, then run the delivery again."""

    def __init__(self, countdown: float) -> None:
        self.countdown = countdown


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
        self.lock_timeout = self.options.lock_timeout or settings.lock_timeout
        self.owner = new_owner(request.hostname or "", self.task_id)
        self.lock_key: str | None = None
        self.dedup_key: str | None = None
        self.deliveries = 0
        self.replays = int(headers.read(request, headers.REPLAYS) or 0)
        first = headers.read(request, headers.FIRST_FAILURE)
        self.first_failure: float | None = float(first) if first is not None else None
        self.publish = str(headers.read(request, headers.PUBLISH) or "")
        self.waits = int(headers.read(request, headers.WAITS) or 0)
        since = headers.read(request, headers.LOCK_SINCE)
        self.lock_since: float | None = float(since) if since is not None else None
        follows = headers.read(request, headers.FOLLOWS)
        self.follows: list[Any] | None = follows if isinstance(follows, list) else None
        adoptable = headers.read(request, headers.ADOPTABLE)
        self.adoptable: tuple[str, ...] = (
            tuple(a for a in adoptable if isinstance(a, str))
            if isinstance(adoptable, (list, tuple))
            else ()
        )

    # -- the steps -------------------------------------------------------

    def run(self) -> Any:
        presence = None if self.task.request.is_eager else self.rt.presence
        if presence is None:
            return self.run_deliveries()
        tag = (getattr(self.task.request, "properties", None) or {}).get("delivery_tag")
        if tag is not None and not presence.starts(str(tag)):
            logger.info(
                "celery-resilience: task %s[%s] was handed back to its queue when its worker "
                "began a warm shutdown; the copy there runs it, not this one",
                self.task.name,
                self.task_id,
            )
            raise Ignore()
        with presence.hold() as presence_id:
            self.owner = new_owner(self.task.request.hostname or "", self.task_id, presence_id)
            return self.run_deliveries()

    def run_deliveries(self) -> Any:
        if self.gate.dedup is not None:
            with contextlib.suppress(Exception):  # it would not have been published under one
                self.dedup_key = self.gate.dedup.key_of(self.args, self.kwargs)
        if self.gate.lock is not None:
            try:
                self.lock_key = self.gate.lock.render(self.args, self.kwargs)
            except Exception as exc:
                self.give_up("error", exc)
        while True:
            try:
                return self.run_once()
            except _Postponed as later:
                time.sleep(later.countdown)

    def run_once(self) -> Any:
        if self.follows is not None:
            done, value = self.follow(self.follows)
            if done:
                return value
            self.follows = None
        try:
            admitted = self.admit()
            held = admitted.admission in (Admission.RUNNING, Admission.LOCK_CONTENDED)
            if held and admitted.holder is not None and self.free_dead_holder(admitted.holder):
                admitted = self.admit()
        except BackendUnavailable as exc:
            self.backend_down(exc)
        self.deliveries = admitted.deliveries
        if admitted.lost_predecessor:
            self.emit(
                "resilience_redelivery_seen", attempt=self.attempt, deliveries=self.deliveries
            )
        if admitted.admission is Admission.ADMITTED:
            dedup, key = self.gate.dedup, self.dedup_key
            if dedup is not None and key is not None and dedup.started(self.rt, key, self.task_id):
                self.dedup_key = None  # freed: no release at the end
            return self.run_body(admitted)
        if admitted.admission is Admission.DUPLICATE:
            self.free_dedup_key()
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
        if admitted.admission is Admission.RUNNING:
            self.running_elsewhere(admitted)
        return self.contended(admitted)

    def follow(self, follows: list[Any]) -> tuple[bool, Any]:
        """A canvas member collapsed into the task ``follows`` names: ``(True, its
        value)`` once that task succeeded; postponed while it is pending.

        ``(False, None)`` when this member must run its own body instead: the task
        it follows failed or was revoked, or did not end within ``dedup_ttl``.
        """
        if not results_kept(self.task.app):
            return False, None
        try:
            leader, since = str(follows[0]), float(follows[1])
            result = self.task.AsyncResult(leader)
            state = result.state
        except Exception as exc:  # a malformed header, or the result backend down
            logger.warning(
                "celery-resilience: task %s[%s] cannot follow %r, running itself: %s",
                self.task.name,
                self.task_id,
                follows,
                exc,
            )
            return False, None
        if state == states.SUCCESS:
            return True, result.result
        dedup = self.gate.dedup
        ttl = dedup.ttl_of(self.rt.settings) if dedup is not None else self.rt.settings.dedup_ttl
        if state in states.READY_STATES or time.time() - since > ttl:
            return False, None
        self.postpone("following", _RUNNING_BACKOFF.delay(self.waits))

    def admit(self) -> AdmitResult:
        """Admit this delivery, retrying in-process while the backend does not answer.

        The retries reuse this delivery's owner, so an earlier call that timed out but
        ran late on the server is recognised as this delivery's own. After one lease
        TTL of failures (by then any such late lease has expired) the error is raised.
        """
        return self.retrying(
            "waits for its coordination backend",
            lambda: self.rt.backend.admit(
                self.task_id,
                owner=self.owner,
                publish=self.publish,
                lock_key=self.lock_key,
                lease_ttl=self.lease_ttl,
                max_crashes=self.max_crashes,
                record_ttl=self.rt.settings.completion_ttl,
                adoptable=self.adoptable,
            ),
        )

    def retrying(self, waits: str, call: Callable[[], _T]) -> _T:
        """``call()``, again after 0.1 s, 0.2 s, ... (at most 2 s apart) while it raises
        ``BackendUnavailable``, for one lease TTL (a Sentinel failover takes a few
        seconds); then, or at once when eager, the error is raised."""
        deadline = time.monotonic() + self.lease_ttl
        pause = 0.1
        while True:
            try:
                return call()
            except BackendUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self.task.request.is_eager:
                    raise
                logger.warning(
                    "celery-resilience: task %s[%s] %s: %s",
                    self.task.name,
                    self.task_id,
                    waits,
                    exc,
                )
                time.sleep(min(pause, left))
                pause = min(pause * 2, 2.0)

    def free_dead_holder(self, holder: str) -> bool:
        """Release the leases of a holder that is provably dead: its process is gone
        from this machine (``owners``), or its presence expired (on any machine).

        A killed holder leaves its run and lock leases behind; its task's redelivery
        would otherwise wait out the whole TTL. Returns True if freed.
        """
        if not holder_is_dead(holder):
            presence, holder_presence = self.rt.presence, presence_of(holder)
            if presence is None or holder_presence is None:
                return False
            if not presence.gone(holder_presence):
                return False
        if not self.rt.backend.release(self.task_id, self.lock_key, holder):
            return False
        logger.warning(
            "celery-resilience: released the leases of dead holder %s for task %s[%s]",
            holder,
            self.task.name,
            self.task_id,
        )
        return True

    def running_elsewhere(self, admitted: AdmitResult) -> NoReturn:
        """Another delivery of this task id runs its body: wait for it to end."""
        logger.info(
            "celery-resilience: task %s[%s] is running elsewhere (%s); postponed",
            self.task.name,
            self.task_id,
            admitted.holder,
        )
        delay = min(admitted.lease_remaining, _RUNNING_BACKOFF.delay(self.waits))
        self.postpone("running", max(delay, 0.1))

    def contended(self, admitted: AdmitResult) -> NoReturn:
        assert self.lock_key is not None
        self.emit(
            "resilience_lock_contended",
            lock_key=self.lock_key,
            lease_remaining=admitted.lease_remaining,
        )
        now = time.time()
        since = self.lock_since if self.lock_since is not None else now
        if now - since >= self.lock_timeout:
            self.give_up(
                "lock_contended",
                LockContended(
                    f"lock {self.lock_key!r} of task {self.task.name}[{self.task_id}] was "
                    f"held by others for {now - since:.1f} s (lock_timeout="
                    f"{self.lock_timeout:g} s); it is held for {admitted.lease_remaining:.1f} "
                    "s more"
                ),
            )
        self.lock_since = since
        delay = min(admitted.lease_remaining, self.options.backoff.delay(self.waits))
        self.postpone("lock_contended", delay)

    def run_body(self, admitted: AdmitResult) -> Any:
        backend, owner = self.rt.backend, self.owner

        def holds() -> bool:
            return backend.holds(self.task_id, self.lock_key, owner)

        attempt = Attempt(
            task_name=self.task.name,
            task_id=self.task_id,
            attempt=self.attempt,
            deliveries=self.deliveries,
            lock_key=self.lock_key,
            fencing_token=admitted.fencing_token,
            owner=owner,
            _holds=holds,
        )
        token = _current.set(attempt)
        try:
            with keeper.hold(backend, self.task_id, self.lock_key, owner, self.lease_ttl, attempt):
                value = self.gate.body(*self.args, **self.kwargs)
        except Retry as retry:
            # The body called self.retry(): Celery already published the retry.
            self.finish(succeeded=False)
            self.emit_retry("requested", _countdown(retry))
            raise
        except (Ignore, Reject) as ended:
            self.finish(succeeded=False)
            if not getattr(ended, "requeue", False):
                self.free_dedup_key()
            raise
        except Exception as exc:
            self.finish(succeeded=False)
            retryable = isinstance(exc, self.options.retry_on)
            if retryable and self.attempt < self.max_retries:
                self.retry("exception", self.options.backoff.delay(self.attempt), exc)
            spent = retryable or isinstance(exc, MaxRetriesExceededError)
            self.give_up("max_retries" if spent else "error", exc)
        except BaseException:
            # SystemExit / KeyboardInterrupt: the worker is going away; free the leases.
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
        """Close the delivery, retrying as ``admit`` does (without the completion record a
        redelivery would run the body again); a backend error is then logged, never
        raised (the body ran)."""
        try:
            self.retrying(
                "waits for its coordination backend to record its end",
                lambda: self.rt.backend.finish(
                    self.task_id,
                    owner=self.owner,
                    publish=self.publish,
                    lock_key=self.lock_key,
                    succeeded=succeeded,
                    record_ttl=self.rt.settings.completion_ttl,
                ),
            )
        except BackendUnavailable as exc:
            logger.error(
                "celery-resilience: task %s[%s] ran but its delivery could not be closed "
                "(its leases expire by themselves): %s",
                self.task.name,
                self.task_id,
                exc,
            )

    def free_dedup_key(self) -> None:
        """The task is done (succeeded, gave up, ended): free its dedup key, in either
        mode (a ``"start"`` key whose release at the start failed, too)."""
        if self.gate.dedup is not None and self.dedup_key is not None:
            self.gate.dedup.release(self.rt, self.dedup_key, self.task_id)

    # -- outcomes --------------------------------------------------------

    def history(self) -> dict[str, Any]:
        """The headers every message of this task carries on (retries, postponements)."""
        carried: dict[str, Any] = {
            headers.REPLAYS: self.replays,
            headers.FIRST_FAILURE: self.first_failure or time.time(),
        }
        if self.publish:
            carried[headers.PUBLISH] = self.publish
        if self.follows is not None:
            carried[headers.FOLLOWS] = self.follows
        return carried

    def retry(self, reason: str, countdown: float, exc: BaseException) -> NoReturn:
        """Publish the next attempt after ``countdown`` seconds and end this one."""
        countdown = self.rt.cap_countdown(countdown)
        try:
            self.task.retry(
                exc=exc, countdown=countdown, max_retries=self.max_retries, headers=self.history()
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

    def postpone(self, reason: str, countdown: float) -> NoReturn:
        """Deliver this same attempt again after ``countdown`` seconds; ack this message.

        The new message has the same task id, ``retries``, routing, links and
        history, so no budget is spent. Eager mode waits and runs again in-process.
        If it cannot be published, this message is requeued instead.
        """
        countdown = self.rt.cap_countdown(countdown)
        self.waits += 1
        self.emit_retry(reason, countdown)
        request = self.task.request
        if request.is_eager:
            raise _Postponed(countdown)
        carried = {**self.history(), headers.WAITS: self.waits}
        if self.lock_since is not None:
            carried[headers.LOCK_SINCE] = self.lock_since
        if self.adoptable:
            carried[headers.ADOPTABLE] = list(self.adoptable)
        again = self.task.signature_from_request(
            request,
            list(self.args),
            dict(self.kwargs),
            countdown=countdown,
            retries=self.attempt,
            headers={**(request.headers or {}), **carried},
        )
        try:
            again.apply_async()
        except Exception as error:
            logger.error(
                "celery-resilience: task %s[%s] could not be postponed (%r); requeueing",
                self.task.name,
                self.task_id,
                error,
            )
            time.sleep(_REQUEUE_PAUSE)
            raise Reject(error, requeue=True) from error
        raise Ignore()

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
        self.free_dedup_key()
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
        """Never run unguarded, never spend a budget on an outage: postpone.

        The next message may adopt whatever this delivery's late admission took.
        """
        logger.error(
            "celery-resilience: task %s[%s] not run: %s", self.task.name, self.task_id, exc
        )
        if self.task.request.is_eager:
            raise exc
        self.adoptable = (*self.adoptable, self.owner)[-_MAX_ADOPTABLE:]
        self.postpone("backend_unavailable", _OUTAGE_BACKOFF.delay(min(self.waits, 10)))

    def emit_retry(self, reason: str, countdown: float) -> None:
        self.emit(
            "resilience_retry_scheduled", attempt=self.attempt, reason=reason, countdown=countdown
        )

    def emit(self, hook: str, **kwargs: Any) -> None:
        notify(self.rt.plugins, hook, task_name=self.task.name, task_id=self.task_id, **kwargs)


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
        self.dedup: Dedup | None = None
        if options.dedup is not None:
            self.dedup = Dedup(
                task.name,
                options.dedup,
                inspect.signature(body),
                until=options.dedup_until,
                ttl=options.dedup_ttl,
                on_duplicate=options.on_duplicate,
            )
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
            if status == states.SUCCESS:
                delivery.free_dedup_key()

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
