"""The demo's observer plugin: every celery-resilience hook call becomes a demo event.

The public ``celery_resilience.testing.HookRecorder``, a pluggy plugin on the
hooks of ``celery_resilience.hookspecs`` like the Prometheus and OpenTelemetry
exporters, forwards each call to the store; the report prints each event as it comes
and counts them into the metrics table.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from celery_resilience.demo.store import Store
from celery_resilience.testing import HookCall, HookRecorder

if TYPE_CHECKING:
    from celery_resilience import DeadLetter, GiveUp

PLUGIN_NAME = "celery-resilience-demo"

_TASK_HOOKS = {
    "retry_scheduled",
    "lock_contended",
    "redelivery_seen",
    "crash_budget_spent",
    "duplicate_suppressed",
}
"""Hooks whose arguments are JSON already: passed on with ``task_name`` as ``task``."""


class EventForwarder(HookRecorder):
    """Writes each observer event of a task to ``store`` as a ``hook`` event."""

    def __init__(self, store: Store) -> None:
        super().__init__(functools.partial(_forward, store))


def _forward(store: Store, call: HookCall) -> None:
    fields = _fields(call)
    if fields is not None:
        store.emit("hook", hook=call.name, **fields)


def _fields(call: HookCall) -> dict[str, Any] | None:
    """The event fields of ``call`` (JSON only), or None for a hook the demo does not show."""
    arguments = dict(call.arguments)
    if call.name in _TASK_HOOKS:
        return {"task": arguments.pop("task_name"), **arguments}
    if call.name == "task_gave_up":
        outcome: GiveUp = arguments["outcome"]
        return {
            "task": outcome.task_name,
            "task_id": outcome.task_id,
            "reason": outcome.reason,
            "error": f"{type(outcome.exception).__name__}: {outcome.exception}",
            "attempts": outcome.attempts,
        }
    if call.name == "dead_letter_stored":
        stored: DeadLetter = arguments["entry"]
        return {
            "task": stored.task_name,
            "task_id": stored.task_id,
            "entry_id": stored.id,
            "reason": stored.reason,
        }
    if call.name == "dead_letter_replayed":
        replayed: DeadLetter = arguments["entry"]
        return {
            "task": replayed.task_name,
            "task_id": arguments["task_id"],
            "entry_id": replayed.id,
            "replays": replayed.replays + 1,
        }
    return None
