"""What a resilient task leaves behind when it gives up."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

MAX_TRACEBACK_FRAMES = 30

GIVE_UP_REASONS = ("max_retries", "error", "worker_lost", "lock_contended")


@dataclass(frozen=True)
class GiveUp:
    """A terminal outcome: the task will not run again unless replayed.

    ``reason`` is one of ``GIVE_UP_REASONS``. ``attempts`` counts the attempts
    made (Celery's ``retries`` + 1); ``deliveries`` counts the deliveries of the
    last attempt (more than 1 after lost workers). ``traceback`` keeps at most the
    innermost 30 frames. ``failed_at`` is a Unix timestamp in seconds.
    """

    task_name: str
    task_id: str
    reason: str
    exception: BaseException
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attempts: int
    deliveries: int
    lock_key: str | None = None
    hostname: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    failed_at: float = field(default_factory=time.time)

    @property
    def exception_type(self) -> str:
        """The exception's qualified class name, e.g. ``"builtins.ValueError"``."""
        cls = type(self.exception)
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def traceback(self) -> str:
        """The formatted traceback, cut to the innermost 30 frames."""
        return "".join(
            traceback.format_exception(
                type(self.exception),
                self.exception,
                self.exception.__traceback__,
                limit=-MAX_TRACEBACK_FRAMES,
            )
        )
