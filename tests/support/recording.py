"""A celery-resilience plugin that records every observer event of a worker's tasks.

The test apps of the integration and chaos suites register it in their workers; what
it records with (a Redis list, a counter hash) is each app's own ``record`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from celery_resilience import get_plugin_manager, hookimpl
from celery_resilience.outcome import GiveUp

Record = Callable[[str, str], None]
"""``record(task_id, event)``: keep that ``event`` was seen for ``task_id``."""


class EventRecorder:
    """Passes every observer event to ``record`` as ``(task_id, "<event>[:<reason>]")``."""

    def __init__(self, record: Record) -> None:
        self.record = record

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, task_id: str, attempt: int, reason: str, countdown: float
    ) -> None:
        self.record(task_id, f"retry_scheduled:{reason}")

    @hookimpl
    def resilience_lock_contended(
        self, task_name: str, task_id: str, lock_key: str, lease_remaining: float
    ) -> None:
        self.record(task_id, "lock_contended")

    @hookimpl
    def resilience_redelivery_seen(
        self, task_name: str, task_id: str, attempt: int, deliveries: int
    ) -> None:
        self.record(task_id, "redelivery_seen")

    @hookimpl
    def resilience_crash_budget_spent(
        self, task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
    ) -> None:
        self.record(task_id, "crash_budget_spent")

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str, task_id: str) -> None:
        self.record(task_id, "duplicate_suppressed")

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self.record(outcome.task_id, f"gave_up:{outcome.reason}")


def record_events_in_workers(app: Celery, name: str, record: Record) -> None:
    """Register ``EventRecorder(record)`` as plugin ``name`` in every worker of ``app``.

    Done at ``worker_init``, in the worker's main process before the pool forks its
    children, so every child inherits it.
    """

    def register(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            manager = get_plugin_manager()
            if not manager.has_plugin(name):
                manager.register(EventRecorder(record), name=name)

    signals.worker_init.connect(register, weak=False)
