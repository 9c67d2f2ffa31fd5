"""The demo's observer plugin: every celery-resilience hook call becomes a demo event.

An ordinary pluggy plugin on the hooks of :mod:`celery_resilience.hookspecs`, the same
way the Prometheus and OpenTelemetry exporters are built; the report prints each
event as it comes and counts them into the metrics table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_resilience.demo.store import Store
from celery_resilience.hookspecs import hookimpl

if TYPE_CHECKING:
    from celery_resilience.deadletter import DeadLetter
    from celery_resilience.outcome import GiveUp

PLUGIN_NAME = "celery-resilience-demo"


class EventForwarder:
    """Writes each observer event to ``store`` as a ``hook`` event (JSON fields only)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, task_id: str, attempt: int, reason: str, countdown: float
    ) -> None:
        self.store.emit(
            "hook",
            hook="retry_scheduled",
            task=task_name,
            task_id=task_id,
            attempt=attempt,
            reason=reason,
            countdown=countdown,
        )

    @hookimpl
    def resilience_lock_contended(
        self, task_name: str, task_id: str, lock_key: str, lease_remaining: float
    ) -> None:
        self.store.emit(
            "hook",
            hook="lock_contended",
            task=task_name,
            task_id=task_id,
            lock_key=lock_key,
            lease_remaining=lease_remaining,
        )

    @hookimpl
    def resilience_redelivery_seen(
        self, task_name: str, task_id: str, attempt: int, deliveries: int
    ) -> None:
        self.store.emit(
            "hook",
            hook="redelivery_seen",
            task=task_name,
            task_id=task_id,
            attempt=attempt,
            deliveries=deliveries,
        )

    @hookimpl
    def resilience_crash_budget_spent(
        self, task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
    ) -> None:
        self.store.emit(
            "hook",
            hook="crash_budget_spent",
            task=task_name,
            task_id=task_id,
            deliveries=deliveries,
            max_crashes=max_crashes,
        )

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str, task_id: str) -> None:
        self.store.emit("hook", hook="duplicate_suppressed", task=task_name, task_id=task_id)

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self.store.emit(
            "hook",
            hook="task_gave_up",
            task=outcome.task_name,
            task_id=outcome.task_id,
            reason=outcome.reason,
            error=f"{type(outcome.exception).__name__}: {outcome.exception}",
            attempts=outcome.attempts,
        )

    @hookimpl
    def resilience_dead_letter_stored(self, entry: DeadLetter, trimmed: int) -> None:
        self.store.emit(
            "hook",
            hook="dead_letter_stored",
            task=entry.task_name,
            task_id=entry.task_id,
            entry_id=entry.id,
            reason=entry.reason,
        )

    @hookimpl
    def resilience_dead_letter_replayed(self, entry: DeadLetter, task_id: str) -> None:
        self.store.emit(
            "hook",
            hook="dead_letter_replayed",
            task=entry.task_name,
            task_id=task_id,
            entry_id=entry.id,
            replays=entry.replays + 1,
        )
