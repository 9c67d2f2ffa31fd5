"""celery-resilience: make any Celery task survive what production does to it.

Importing this package does no work: nothing connects, loads plugins or reads
configuration until a resilient task is decorated, installed or run.
"""

from __future__ import annotations

from typing import Any

from celery_resilience.attempt import Attempt, current_attempt
from celery_resilience.backoff import Backoff
from celery_resilience.deadletter import DeadLetter, GiveUp, MalformedEntry
from celery_resilience.decorator import resilient
from celery_resilience.dlq import (
    DeadLetterQueue,
    ReplayFailed,
    ReplayNotRemoved,
    ReplayRefused,
    ReplayReport,
    UnknownEntry,
)
from celery_resilience.errors import (
    BackendUnavailable,
    ConfigurationError,
    CrashBudgetExceeded,
    DuplicateTask,
    LockContended,
    MissingExtraError,
    NoCurrentAttempt,
    ResilienceError,
)
from celery_resilience.hookspecs import hookimpl
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.worker import install

__all__ = [
    "Attempt",
    "BackendUnavailable",
    "Backoff",
    "ConfigurationError",
    "CrashBudgetExceeded",
    "DeadLetter",
    "DeadLetterQueue",
    "DuplicateTask",
    "GiveUp",
    "LockContended",
    "MalformedEntry",
    "MissingExtraError",
    "NoCurrentAttempt",
    "ReplayFailed",
    "ReplayNotRemoved",
    "ReplayRefused",
    "ReplayReport",
    "ResilienceError",
    "UnknownEntry",
    "__version__",
    "current_attempt",
    "get_plugin_manager",
    "hookimpl",
    "install",
    "resilient",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("celery-resilience")
    raise AttributeError(f"module 'celery_resilience' has no attribute {name!r}")
