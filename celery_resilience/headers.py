"""Message headers that carry a resilient task's history across messages.

Celery merges custom headers into the worker's request (and keeps them under
``request.headers`` in eager mode); ``read`` finds them either way. Every message of
one publish (its retries and postponements) carries the same publish id, so the
completion record tells a redelivered copy of a message (suppressed) from a new
publish that reuses the task id (run, after any running body of that id ends).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

REPLAYS = "resilience_replays"
"""How often the task was replayed from the dead-letter queue."""
FIRST_FAILURE = "resilience_first_failure"
"""When the task first failed (Unix time), kept across retries and replays."""
PUBLISH = "resilience_publish"
"""The publish id: one per ``apply_async`` call, kept by retries and postponements."""
WAITS = "resilience_waits"
"""How often this attempt was postponed (lock held, body running elsewhere, outage)."""
LOCK_SINCE = "resilience_lock_since"
"""When this attempt first found its lock held (Unix time): ``lock_timeout`` counts from it."""
FOLLOWS = "resilience_follows"
"""``[task id, since]``: a canvas member published while that task held its dedup key;
it returns that task's result once ready instead of running its body."""
ADOPTABLE = "resilience_adoptable"
"""Owner strings of deliveries that gave up waiting for the coordination backend; a
lease their late admission took is this message's own."""


def read(request: Any, name: str) -> Any:
    """The value of custom header ``name`` of the delivery ``request``, or None."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def stamping(apply_async: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task class's ``apply_async`` so that every publish gets a publish id.

    A call that already carries one (a retry or postponement of the gate, which
    passes its own) keeps it. Signatures, chains, groups and chords publish through
    the task's ``apply_async``, so they are stamped too.
    """

    @functools.wraps(apply_async)
    def stamped(self: Any, *args: Any, **options: Any) -> Any:
        headers = options.get("headers") or {}
        if PUBLISH not in headers:
            options["headers"] = {**headers, PUBLISH: uuid.uuid4().hex}
        return apply_async(self, *args, **options)

    stamped.__resilience_stamping__ = True  # type: ignore[attr-defined]
    return stamped
