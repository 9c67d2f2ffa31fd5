"""Record every observer event of a worker's tasks, with the public ``HookRecorder``.

The test apps of the integration and chaos suites register it in their workers; what
it records with (a Redis list, a counter hash) is each app's own ``record`` function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from celery_resilience import get_plugin_manager
from celery_resilience.testing import HookCall, HookRecorder

Record = Callable[[str, str], None]
"""``record(task_id, event)``: keep that ``event`` was seen for ``task_id``."""

_PER_TASK = {"lock_contended", "redelivery_seen", "crash_budget_spent", "duplicate_suppressed"}


def forward(record: Record, call: HookCall) -> None:
    """Pass a task's observer event to ``record`` as ``(task_id, "<event>[:<reason>]")``."""
    arguments = call.arguments
    if call.name == "retry_scheduled":
        record(arguments["task_id"], f"retry_scheduled:{arguments['reason']}")
    elif call.name == "task_gave_up":
        outcome = arguments["outcome"]
        record(outcome.task_id, f"gave_up:{outcome.reason}")
    elif call.name in _PER_TASK:
        record(arguments["task_id"], call.name)


def record_events_in_workers(app: Celery, name: str, record: Record) -> None:
    """Register a ``HookRecorder`` forwarding to ``record`` as plugin ``name`` in every
    worker of ``app``.

    Done at ``worker_init``, in the worker's main process before the pool forks its
    children, so every child inherits it.
    """

    def register(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            manager = get_plugin_manager()
            if not manager.has_plugin(name):
                manager.register(HookRecorder(functools.partial(forward, record)), name=name)

    signals.worker_init.connect(register, weak=False)
