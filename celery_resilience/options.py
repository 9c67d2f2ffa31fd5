"""The options of one ``@resilient`` task, validated when the task is decorated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery_resilience.backoff import Backoff
from celery_resilience.errors import ConfigurationError
from celery_resilience.locks import LockSpec


def options_of(task: Any) -> ResilientOptions | None:
    """The ``@resilient`` options of ``task`` (a Celery task), ``None`` if it is not one."""
    options = getattr(type(task), "__resilience__", None)
    return options if isinstance(options, ResilientOptions) else None


@dataclass(frozen=True)
class ResilientOptions:
    """What ``@resilient(...)`` was given. ``None`` means "use the app's setting"."""

    max_retries: int | None = None
    lock: LockSpec | None = None
    lock_ttl: float | None = None
    lock_timeout: float | None = None
    dlq: bool = True
    retry_on: tuple[type[BaseException], ...] = ()
    backoff: Backoff = field(default_factory=Backoff)
    max_crashes: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_retries", self.max_retries, 0)
        _check_int("max_crashes", self.max_crashes, 1)
        if self.lock is not None and not (isinstance(self.lock, str) or callable(self.lock)):
            raise ConfigurationError(
                f"@resilient lock={self.lock!r}: expected a template string such as "
                "'upload:{repoid}' or a callable (args, kwargs) -> str"
            )
        _check_seconds("lock_ttl", self.lock_ttl)
        _check_seconds("lock_timeout", self.lock_timeout)
        if not isinstance(self.dlq, bool):
            raise ConfigurationError(f"@resilient dlq={self.dlq!r}: expected True or False")
        if not all(isinstance(e, type) and issubclass(e, BaseException) for e in self.retry_on):
            raise ConfigurationError(
                f"@resilient retry_on={self.retry_on!r}: expected exception classes"
            )
        if not isinstance(self.backoff, Backoff):
            raise ConfigurationError(
                f"@resilient backoff={self.backoff!r}: expected a celery_resilience.Backoff"
            )


def _check_int(name: str, value: object, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"@resilient {name}={value!r}: expected an integer >= {minimum}")


def _check_seconds(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"@resilient {name}={value!r}: expected seconds > 0")
