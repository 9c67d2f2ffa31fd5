"""The attempt being run: what a task body can read with ``current_attempt``."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from celery_resilience.errors import NoCurrentAttempt


@dataclass
class Attempt:
    """One delivery of a resilient task whose body is running.

    ``attempt`` is Celery's ``retries`` (0 on the first run); ``deliveries`` counts the
    deliveries of this attempt, this one included (more than 1 after a lost worker).
    ``fencing_token`` is set when the task has a lock: it is strictly greater than
    every token given earlier for the same key, so a store that remembers the
    largest token it saw can refuse writes from an attempt that lost its lease.
    ``lease_lost`` turns True if a renewal found the lease gone.
    """

    task_name: str
    task_id: str
    attempt: int
    deliveries: int
    lock_key: str | None = None
    fencing_token: int | None = None
    lease_lost: bool = False


_current: contextvars.ContextVar[Attempt] = contextvars.ContextVar("celery_resilience_attempt")


def current_attempt() -> Attempt:
    """Return the attempt whose body is running in this context.

    Raises ``celery_resilience.errors.NoCurrentAttempt`` outside a resilient
    task body.
    """
    try:
        return _current.get()
    except LookupError:
        raise NoCurrentAttempt(
            "current_attempt() is only available inside a resilient task body"
        ) from None
