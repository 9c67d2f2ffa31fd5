"""Other deliveries' admissions, made through the coordination backend contract.

Unit tests use them to put a task's run lease, a lock or a crash count where a test
needs it, as another worker would have.
"""

from __future__ import annotations

from typing import Any

from celery_resilience.backends.base import AdmitResult
from celery_resilience.runtime import runtime


def hold(
    app: Any, task_id: str, owner: str, lock_key: str | None = None, ttl: float = 30.0
) -> AdmitResult:
    """``owner`` is admitted for ``task_id``: it holds the run lease (and the lock lease
    on ``lock_key``) for ``ttl`` seconds, as if its body were running."""
    return runtime(app).backend.admit(
        task_id, owner=owner, publish="", lock_key=lock_key, lease_ttl=ttl, max_crashes=99,
        record_ttl=60,
    )  # fmt: skip


def lost_deliveries(app: Any, task_id: str, n: int) -> None:
    """``n`` deliveries of ``task_id`` that started and were lost with their worker: each
    one's run lease is gone before it finished (freed at once instead of expiring)."""
    for i in range(n):
        owner = f"dead-host:1:1:{i}"
        hold(app, task_id, owner)
        runtime(app).backend.release(task_id, None, owner)


def holder_of(app: Any, task_id: str) -> str:
    """The owner holding ``task_id``'s run lease right now."""
    found = hold(app, task_id, "probe")
    assert found.holder is not None, f"{task_id} is not running: {found}"
    return found.holder
