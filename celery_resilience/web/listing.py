"""What the list page reads from the DLQ: one page of entries and the counts.

Each count is ``DeadLetterQueue.count`` (one ``ZCOUNT`` on an index of the Redis
backend), so the page costs the same at 100 entries and at 100,000: one page read,
then a count per reason, per task name with entries, and per (task, reason) pair of
those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery_resilience.backends.base import Page
from celery_resilience.deadletter import GIVE_UP_REASONS
from celery_resilience.dlq import DeadLetterQueue

PAGE_SIZE = 50


@dataclass
class Counts:
    """Entries per task name and reason (only task names with entries)."""

    total: int
    by_reason: dict[str, int]
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)

    def of_task(self, task_name: str) -> int:
        return sum(self.by_task.get(task_name, {}).values())


@dataclass
class Listing:
    """One page of the list, as filtered, with the counts."""

    task_name: str | None
    reason: str | None
    cursor: str | None
    page: Page
    matching: int
    counts: Counts
    task_names: list[str]


def task_names(app: Any) -> list[str]:
    """The task names the app registers, Celery's own left out."""
    return sorted(name for name in app.tasks if not name.startswith("celery."))


def counts(queue: DeadLetterQueue, names: list[str]) -> Counts:
    """How many entries each reason, each of ``names`` and each pair of those has."""
    by_task: dict[str, dict[str, int]] = {}
    for name in names:
        if queue.count(task_name=name):
            row = {reason: queue.count(task_name=name, reason=reason) for reason in GIVE_UP_REASONS}
            by_task[name] = {reason: n for reason, n in row.items() if n}
    by_reason = {reason: queue.count(reason=reason) for reason in GIVE_UP_REASONS}
    return Counts(total=queue.count(), by_reason=by_reason, by_task=by_task)


def read(
    queue: DeadLetterQueue,
    names: list[str],
    *,
    task_name: str | None,
    reason: str | None,
    cursor: str | None,
    limit: int = PAGE_SIZE,
) -> Listing:
    """The page of entries after ``cursor`` matching the filters, and the counts over
    ``names`` and the task names on that page."""
    page = queue.list(task_name=task_name, reason=reason, limit=limit, cursor=cursor)
    seen = sorted({*names, *(e.task_name for e in page.entries), *filter(None, [task_name])})
    return Listing(
        task_name=task_name,
        reason=reason,
        cursor=cursor,
        page=page,
        matching=queue.count(task_name=task_name, reason=reason),
        counts=counts(queue, seen),
        task_names=seen,
    )
