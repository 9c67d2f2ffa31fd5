"""``HookRecorder``: the observer hook calls of the code under test, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from celery_resilience.deadletter import DeadLetter
from celery_resilience.hookspecs import hookimpl
from celery_resilience.plugins import get_plugin_manager

if TYPE_CHECKING:
    from celery_resilience.deadletter import GiveUp


class HookCall(NamedTuple):
    """One observer hook call: the hook's name without ``resilience_``, and its arguments."""

    name: str
    arguments: dict[str, Any]


class HookRecorder:
    """A plugin that records every observer hook call, in order, in ``calls``.

    Register it with ``celery_resilience.get_plugin_manager`` (or use
    ``record_hooks``). ``listener``, when given, is also called with each
    ``HookCall`` as it is recorded (to forward events elsewhere). The provider
    hooks, which choose a backend, are not recorded.
    """

    def __init__(self, listener: Callable[[HookCall], None] | None = None) -> None:
        self.calls: list[HookCall] = []
        self._listener = listener

    def of(self, hook: str) -> list[dict[str, Any]]:
        """The arguments of each call of ``hook`` (with or without ``resilience_``)."""
        name = hook.removeprefix("resilience_")
        return [call.arguments for call in self.calls if call.name == name]

    def names(self) -> list[str]:
        """The hooks called so far, in order (without the ``resilience_`` prefix)."""
        return [call.name for call in self.calls]

    def _record(self, hook: str, arguments: dict[str, Any]) -> None:
        call = HookCall(hook, {k: v for k, v in arguments.items() if k != "self"})
        self.calls.append(call)
        if self._listener is not None:
            self._listener(call)

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, task_id: str, attempt: int, reason: str, countdown: float
    ) -> None:
        self._record("retry_scheduled", locals())

    @hookimpl
    def resilience_lock_contended(
        self, task_name: str, task_id: str, lock_key: str, lease_remaining: float
    ) -> None:
        self._record("lock_contended", locals())

    @hookimpl
    def resilience_redelivery_seen(
        self, task_name: str, task_id: str, attempt: int, deliveries: int
    ) -> None:
        self._record("redelivery_seen", locals())

    @hookimpl
    def resilience_crash_budget_spent(
        self, task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
    ) -> None:
        self._record("crash_budget_spent", locals())

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str, task_id: str) -> None:
        self._record("duplicate_suppressed", locals())

    @hookimpl
    def resilience_call_deduplicated(self, task_name: str, task_id: str, dedup_key: str) -> None:
        self._record("call_deduplicated", locals())

    @hookimpl
    def resilience_node_lost(self, node: str, nodename: str, recovered: dict[str, int]) -> None:
        self._record("node_lost", locals())

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self._record("task_gave_up", locals())

    @hookimpl
    def resilience_dead_letter_stored(self, entry: DeadLetter, trimmed: int) -> None:
        self._record("dead_letter_stored", locals())

    @hookimpl
    def resilience_dead_letter_replayed(self, entry: DeadLetter, task_id: str) -> None:
        self._record("dead_letter_replayed", locals())

    @hookimpl
    def resilience_dead_letter_deleted(self, entry_id: str) -> None:
        self._record("dead_letter_deleted", locals())

    @hookimpl
    def resilience_dead_letters_purged(self, task_name: str | None, count: int) -> None:
        self._record("dead_letters_purged", locals())


@contextmanager
def record_hooks() -> Iterator[HookRecorder]:
    """A ``HookRecorder`` registered with the plugin manager for the block."""
    recorder = HookRecorder()
    manager = get_plugin_manager()
    manager.register(recorder)
    try:
        yield recorder
    finally:
        manager.unregister(recorder)
