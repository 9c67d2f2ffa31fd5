"""A workaround for a Celery bug that hangs clients of the Redis result backend.

Celery < 5.7 (celery/celery#10477): the garbage collector can run
``AsyncResult.__del__`` while this process holds the result backend's ``PubSub`` lock
(a SUBSCRIBE in ``apply_async``, an UNSUBSCRIBE when a polled result is ready);
``__del__`` then UNSUBSCRIBEs through the same lock and the process hangs for good.
Seen in the demo's client on Celery 5.3 in 2 of 6 runs. Celery 5.7 defers that
unsubscribe; this skips it instead (the stale subscription costs a client that polls
nothing). Used by the demo's Redis mode and by the project's own test suite; it
changes the calling process only, never a worker (workers do not subscribe).
"""

from __future__ import annotations

from typing import Any


def work_around_celery_10477() -> None:
    """Make ``ResultConsumer.cancel_for`` skip an unsubscribe that would wait on the
    ``PubSub`` lock. Idempotent; does nothing on Celery 5.7, which has its own fix, and
    changes nothing where redis-py's lock is reentrant."""
    from celery.backends.redis import ResultConsumer

    if hasattr(ResultConsumer, "_flush_pending_unsubscribe"):  # Celery 5.7's fix
        return
    original = ResultConsumer.cancel_for
    if getattr(original, "__celery_10477__", False):
        return

    def cancel_for(self: Any, task_id: str) -> None:
        # redis-py < 6 guards PubSub with a Lock, which deadlocks here; newer ones use
        # an RLock (no locked() on Python 3.11), which lets the same thread in.
        locked = getattr(getattr(self._pubsub, "_lock", None), "locked", None)
        if callable(locked) and locked():
            self.subscribed_to.discard(self._get_key_for_task(task_id))
            return
        original(self, task_id)

    cancel_for.__celery_10477__ = True  # type: ignore[attr-defined]
    ResultConsumer.cancel_for = cancel_for
