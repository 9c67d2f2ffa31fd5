"""A test plugin that records every observer hook call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery_resilience import DeadLetter, get_plugin_manager, hookimpl
from celery_resilience.outcome import GiveUp


class Recorder:
    """Implements every observer hook; ``events`` holds (hook name, arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.events if name == hook]

    def names(self) -> list[str]:
        """The hooks called so far, in order (without the ``resilience_`` prefix)."""
        return [name for name, _ in self.events]

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
    def resilience_node_lost(self, node: str, nodename: str, recovered: dict[str, int]) -> None:
        self.events.append(("node_lost", _args(locals())))

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self.events.append(("task_gave_up", {"outcome": outcome}))

    @hookimpl
    def resilience_dead_letter_stored(self, entry: DeadLetter, trimmed: int) -> None:
        self.events.append(("dead_letter_stored", _args(locals())))

    @hookimpl
    def resilience_dead_letter_replayed(self, entry: DeadLetter, task_id: str) -> None:
        self.events.append(("dead_letter_replayed", _args(locals())))

    @hookimpl
    def resilience_dead_letter_deleted(self, entry_id: str) -> None:
        self.events.append(("dead_letter_deleted", _args(locals())))

    @hookimpl
    def resilience_dead_letters_purged(self, task_name: str | None, count: int) -> None:
        self.events.append(("dead_letters_purged", _args(locals())))


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
