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


DEDUP_UNTIL = ("start", "finish")
"""When a dedup key is released: when its task starts running, or when it is done."""
ON_DUPLICATE = ("return", "raise")
"""What a deduplicated call does: return the pending task's result, or raise ``DuplicateTask``."""


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
    dedup: LockSpec | None = None
    dedup_until: str = "start"
    dedup_ttl: float | None = None
    on_duplicate: str = "return"

    def __post_init__(self) -> None:
        _check_int("max_retries", self.max_retries, 0)
        _check_int("max_crashes", self.max_crashes, 1)
        _check_key("lock", self.lock, "'upload:{repoid}'")
        _check_key("dedup", self.dedup, "'sync:{repoid}'")
        _check_choice("dedup_until", self.dedup_until, DEDUP_UNTIL)
        _check_seconds("dedup_ttl", self.dedup_ttl)
        _check_choice("on_duplicate", self.on_duplicate, ON_DUPLICATE)
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


def _check_key(name: str, value: object, example: str) -> None:
    if value is not None and not (isinstance(value, str) or callable(value)):
        raise ConfigurationError(
            f"@resilient {name}={value!r}: expected a template string such as "
            f"{example} or a callable (args, kwargs) -> str"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise ConfigurationError(f"@resilient {name}={value!r}: expected {expected}")
