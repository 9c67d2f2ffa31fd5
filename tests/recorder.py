"""A test plugin that records every observer hook call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery_resilience import get_plugin_manager, hookimpl
from celery_resilience.outcome import GiveUp


class Recorder:
    """Implements every observer hook; ``events`` holds (hook name, arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.events if name == hook]

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, task_id: str, attempt: int, reason: str, countdown: float
    ) -> None:
        self.events.append(("retry_scheduled", _args(locals())))

    @hookimpl
    def resilience_lock_contended(
        self, task_name: str, task_id: str, lock_key: str, lease_remaining: float
    ) -> None:
        self.events.append(("lock_contended", _args(locals())))

    @hookimpl
    def resilience_redelivery_seen(
        self, task_name: str, task_id: str, attempt: int, deliveries: int
    ) -> None:
        self.events.append(("redelivery_seen", _args(locals())))

    @hookimpl
    def resilience_crash_budget_spent(
        self, task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
    ) -> None:
        self.events.append(("crash_budget_spent", _args(locals())))

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str, task_id: str) -> None:
        self.events.append(("duplicate_suppressed", _args(locals())))

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self.events.append(("task_gave_up", {"outcome": outcome}))


@contextmanager
def recording() -> Iterator[Recorder]:
    """Register a Recorder for the duration of the block."""
    recorder = Recorder()
    pm = get_plugin_manager()
    pm.register(recorder)
    try:
        yield recorder
    finally:
        pm.unregister(recorder)


def _args(scope: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scope.items() if k != "self"}
