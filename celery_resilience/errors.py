"""Exceptions raised by celery-resilience.

Every error the library raises on purpose derives from ``ResilienceError``, so
``except celery_resilience.ResilienceError`` catches all of them.
"""

from __future__ import annotations


class ResilienceError(Exception):
    """Base class of every celery-resilience error."""


class ConfigurationError(ResilienceError, ValueError):
    """A setting, decorator option or URL has a value the library cannot use.

    The message names the setting, the value it had and what was expected.
    """


class MissingExtraError(ResilienceError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install``."""


class BackendUnavailable(ResilienceError):
    """A backend could not be reached or answered with an error.

    The message names the backend role and its URL with the password masked.
    """


class LockContended(ResilienceError):
    """The task's lock was held by another attempt, so its body did not run."""


class CrashBudgetExceeded(ResilienceError):
    """The message was lost with its worker too often and is not run again."""


class NoCurrentAttempt(ResilienceError, LookupError):
    """``celery_resilience.current_attempt()`` was called outside a resilient task body."""


class DuplicateTask(ResilienceError):
    """A call was not published: a task with the same dedup key is pending.

    ``task_id`` is the id of that task (``AsyncResult(task_id)`` follows its run) and
    ``dedup_key`` the rendered key. Raised only with ``on_duplicate="raise"``.
    """

    def __init__(self, message: str, task_id: str, dedup_key: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.dedup_key = dedup_key
