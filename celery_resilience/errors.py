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
