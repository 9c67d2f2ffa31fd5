"""The attempt being run: what a task body can read with ``current_attempt``."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

from celery_resilience.errors import NoCurrentAttempt


@dataclass
class Attempt:
    """One delivery of a resilient task whose body is running.

    ``attempt`` is Celery's ``retries`` (0 on the first run); ``deliveries`` counts the
    deliveries of this attempt, this one included (more than 1 after a lost worker).
    ``fencing_token`` is set when the task has a lock: it is strictly greater than
    every token given earlier for the same key, so a store that remembers the
    largest token it saw can refuse writes from an attempt that lost its lease.
    ``lease_lost`` turns True if a renewal found a lease gone: it lags (after a long
    pause of this process it turns True only at the first renewal after it); the
    fencing token, checked by the store it guards, is the only guard that cannot lag.
    """

    task_name: str
    task_id: str
    attempt: int
    deliveries: int
    lock_key: str | None = None
    fencing_token: int | None = None
    lease_lost: bool = False
    owner: str = ""
    """The owner string of this delivery's leases (host, process, delivery)."""
    _holds: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    def still_holds(self) -> bool:
        """Ask the coordination backend (one round trip) whether this attempt still
        holds its run lease and lock lease; False also sets ``lease_lost``.

        Raises ``celery_resilience.errors.BackendUnavailable`` when the backend
        cannot be reached.
        """
        held = self._holds() if self._holds is not None else not self.lease_lost
        if not held:
            self.lease_lost = True
        return held


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
