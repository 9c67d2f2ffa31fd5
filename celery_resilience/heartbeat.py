"""The visibility heartbeat: keeps the messages a worker holds from being redelivered.

(Placeholder consumer boot step; the implementation lands with the worker-death
recovery work.)
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps


class VisibilityHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer boot step; does nothing yet."""

    label = "celery-resilience visibility heartbeat"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
