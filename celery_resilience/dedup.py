"""Deduplication at publish time: a call whose dedup key a pending task holds publishes nothing.

The key lives in the coordination backend and names the task id that holds it.
``Dedup.apply_async`` takes it (one atomic step) before publishing; the gate frees
it when the task starts (``dedup_until="start"``) or is done (``"finish"``), and a
worker that discards the task as revoked or expired frees it too. A key whose holder
already has a ready result, or (on a Redis broker) whose message is neither queued nor
unacked (purged, lost with the broker's data), does not block: the call takes it
over. ``dedup_ttl`` is the backstop for a holder that cannot be looked for (an AMQP
broker, more than ``pending.MOST_SCANNED`` messages to read).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import states
from celery.backends.base import DisabledBackend

from celery_resilience import headers
from celery_resilience.errors import BackendUnavailable, DuplicateTask
from celery_resilience.locks import LockKey, LockSpec
from celery_resilience.plugins import notify
from celery_resilience.runtime import Runtime, runtime
from celery_resilience.settings import Settings

logger = logging.getLogger(__name__)

# Task.apply_async's positional parameters after ``self`` (Celery 5.3-5.7).
_POSITIONAL = ("args", "kwargs", "task_id", "producer", "link", "link_error", "shadow")

# Options Celery's canvas passes when a call is a step of a chain, a member of a
# group or chord, or has callbacks: its task id is fixed and awaited, so a collapsed
# call is published as a follower of the pending task (headers.FOLLOWS), which
# returns that task's result under its own id. A chain's later steps are published
# by the worker with only parent_id and root_id (celery/app/trace.py, 5.3-5.7); a
# plain call from a task body gets its parent id from send_task, not as an option.
_CANVAS = ("chain", "chord", "group_id", "link", "link_error", "parent_id", "root_id")


RECHECK = 5.0
"""Seconds between two looks, from one process, for the message of one key's holder
in the broker (``Dedup._lost``); one look reads at most ``pending.MOST_SCANNED``
messages on the broker's Redis."""


class Dedup:
    """The ``dedup=`` of one task: renders its key and decides each publish."""

    def __init__(
        self,
        task_name: str,
        spec: LockSpec,
        signature: inspect.Signature,
        *,
        until: str,
        ttl: float | None,
        on_duplicate: str,
    ) -> None:
        self.task_name = task_name
        self.key = LockKey(spec, signature, "dedup")
        self.until = until
        self.ttl = ttl
        self.on_duplicate = on_duplicate
        self._seen: dict[tuple[str, str], float] = {}  # (key, holder) -> seen, or found, at

    def key_of(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> str:
        """The rendered key of a call; ``ConfigurationError`` if the arguments do not fit."""
        return self.key.render(args or (), kwargs or {})

    def apply_async(
        self, task: Any, publish: Callable[..., Any], dedup: bool, options: dict[str, Any]
    ) -> Any:
        """Publish a call of ``task`` through ``publish`` unless a pending task holds its key.

        Returns what ``publish`` returns, or the pending task's ``AsyncResult``;
        raises ``DuplicateTask`` instead with ``on_duplicate="raise"``. A member of a
        chain, group or chord is published as a follower instead (see
        ``headers.FOLLOWS``; without a result backend, as itself). Publishes without
        deduplicating when ``dedup`` is false, for the task's own retries and
        postponements (they carry a publish id), and when the coordination backend
        cannot be reached (logged).
        """
        sent = options.get("headers") or {}
        if not dedup or headers.PUBLISH in sent:
            return publish(task, **options)
        canvas = any(options.get(o) for o in _CANVAS)
        if canvas and not results_kept(task.app):
            return publish(task, **options)  # no result to follow
        key = self.key_of(options.get("args"), options.get("kwargs"))
        task_id = options.get("task_id") or str(uuid.uuid4())
        options["task_id"] = task_id
        rt = runtime(task.app)
        try:
            holder = self._claim(rt, key, task_id, lambda: _queues(task, options))
        except BackendUnavailable as exc:
            logger.warning(
                "celery-resilience: could not deduplicate %s (key %r), publishing it: %s",
                task.name,
                key,
                exc,
            )
            return publish(task, **options)
        # A replay from the dead-letter queue is published even when the key is taken.
        if holder is not None and headers.REPLAYS not in sent:
            notify(
                rt.plugins,
                "resilience_call_deduplicated",
                task_name=task.name,
                task_id=holder,
                dedup_key=key,
            )
            if canvas:
                # The canvas waits for this call's own id: publish it as a follower.
                follows = {headers.FOLLOWS: [holder, time.time()]}
                return publish(task, **{**options, "headers": {**sent, **follows}})
            if self.on_duplicate == "raise":
                raise DuplicateTask(
                    f"task {task.name} with dedup key {key!r} is pending as {holder}; "
                    "this call was not published",
                    holder,
                    key,
                )
            return task.AsyncResult(holder)
        try:
            return publish(task, **options)
        except BaseException:
            if holder is None:
                self.release(rt, key, task_id)
            raise

    def _stored(self, key: str) -> str:
        """The backend's key: one task's keys never meet another task's."""
        return f"{self.task_name}:{key}"

    def ttl_of(self, settings: Settings) -> float:
        """Seconds a key of this task lives unreleased: ``dedup_ttl=``, else the setting."""
        return self.ttl or settings.dedup_ttl

    def _claim(
        self, rt: Runtime, key: str, task_id: str, queues: Callable[[], list[str]]
    ) -> str | None:
        """Take ``key`` for ``task_id``: None when taken, else the pending holder. A
        holder whose result is ready, or whose message is gone from the broker, is taken
        over."""
        ttl, stored = self.ttl_of(rt.settings), self._stored(key)
        holder = rt.backend.dedup_claim(stored, task_id, ttl=ttl)
        if holder is not None and (_done(rt.app, holder) or self._lost(rt, stored, holder, queues)):
            holder = rt.backend.dedup_claim(stored, task_id, ttl=ttl, stale=holder)
        return holder

    def _lost(self, rt: Runtime, stored: str, holder: str, queues: Callable[[], list[str]]) -> bool:
        """Whether ``holder``'s message is in neither its queues nor unacked (purged,
        lost with the broker's data). Looked for at most every ``RECHECK`` seconds per
        key from this process, and first ``RECHECK`` seconds after this process first
        saw the holder (its producer takes the key before it publishes: a holder's
        message may not be in the broker yet). An unknown answer keeps the key."""
        now = time.monotonic()
        if len(self._seen) >= 10_000:  # a bound on memory; forgetting only delays a look
            self._seen.clear()
        seen = self._seen.setdefault((stored, holder), now)
        if now - seen < RECHECK:
            return False
        found = rt.pending.holds(holder, queues())
        if found is not False:
            self._seen[(stored, holder)] = now
            return False
        self._seen.pop((stored, holder), None)
        logger.info(
            "celery-resilience: task %s holding dedup key %r is no longer in the broker "
            "(purged?): the call takes the key",
            holder,
            stored,
        )
        return True

    def started(self, rt: Runtime, key: str, task_id: str) -> bool:
        """The task holding ``key`` starts its body: ``"start"`` frees the key, ``"finish"``
        keeps it ``dedup_ttl`` from now (the TTL counted from the publish would cut
        short a task that waited long in its queue). Errors are logged.

        Returns True when the task is done with the key (``"start"``, the backend
        answered): nothing needs freeing at its end.
        """
        if self.until == "start":
            return self.release(rt, key, task_id)
        try:
            rt.backend.dedup_claim(self._stored(key), task_id, ttl=self.ttl_of(rt.settings))
        except BackendUnavailable as exc:
            logger.error(
                "celery-resilience: could not extend dedup key %r of task %s: %s", key, task_id, exc
            )
        return False

    def release(self, rt: Runtime, key: str, task_id: str) -> bool:
        """Free ``key`` if ``task_id`` holds it. Returns whether the backend answered; an
        error is logged (the TTL frees the key)."""
        try:
            rt.backend.dedup_release(self._stored(key), task_id)
        except BackendUnavailable as exc:
            logger.error(
                "celery-resilience: could not free dedup key %r of task %s (it expires "
                "by itself): %s",
                key,
                task_id,
                exc,
            )
            return False
        return True


def _queues(task: Any, options: Mapping[str, Any]) -> list[str]:
    """The queues a pending task of this call may wait in: where this call is routed
    (another call with other routing options may have gone elsewhere) and every queue
    the app declares."""
    names = list(task.app.amqp.queues)
    try:
        routed = task.app.amqp.router.route(
            dict(options), task.name, options.get("args"), options.get("kwargs")
        )
        names.insert(0, routed["queue"].name)
    except Exception:  # a router that cannot route this: the declared queues only
        names.insert(0, options.get("queue") or task.app.conf.task_default_queue)
    return names


def results_kept(app: Any) -> bool:
    """Whether ``app`` stores task results where this process can read them."""
    if isinstance(app.backend, DisabledBackend):
        return False
    return not app.conf.task_always_eager or bool(app.conf.task_store_eager_result)


def _done(app: Any, task_id: str) -> bool:
    """Whether the result backend already holds a final state for ``task_id``."""
    if not results_kept(app):
        return False
    try:
        return app.AsyncResult(task_id).state in states.READY_STATES
    except Exception as exc:  # the result backend is down: keep the key
        logger.warning("celery-resilience: could not read the state of task %s: %s", task_id, exc)
        return False


def deduplicating(apply_async: Callable[..., Any], decider: Dedup) -> Callable[..., Any]:
    """Wrap a task class's ``apply_async`` so that each call goes through ``decider``.

    ``apply_async(..., dedup=False)`` publishes regardless.
    """

    @functools.wraps(apply_async)
    def apply(self: Any, *args: Any, **options: Any) -> Any:
        options.update(zip(_POSITIONAL, args, strict=False))
        dedup = options.pop("dedup", True)
        return decider.apply_async(self, apply_async, dedup, options)

    return apply


def revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_revoked`` receiver: a worker discarded a task (revoked, expired) whose
    dedup key it holds, so the key is freed."""
    dedup = getattr(getattr(sender, "run", None), "dedup", None)
    if not isinstance(dedup, Dedup) or request is None:
        return
    try:
        key = dedup.key_of(request.args, request.kwargs)
    except Exception:
        return  # arguments that do not fit were never published under a key
    dedup.release(runtime(sender.app), key, request.id)
