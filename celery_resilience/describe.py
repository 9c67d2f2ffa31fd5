"""How a dead letter reads as text, for ``dlq ls/show`` and the web page alike: a
value as one safe line, its exception, a raw body's size, a time and how long ago.

Nothing here escapes for a terminal or for HTML beyond control characters: the CLI
prints these strings, the page escapes them (``celery_resilience.web.layout.esc``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import unicodedata
from datetime import datetime, timezone
from typing import Any

from celery_resilience.deadletter import DeadLetter


def safe(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control/format characters escaped (``\\x1b``), newlines kept if asked."""
    return "".join(
        ch
        if (keep_newlines and ch == "\n") or not unicodedata.category(ch).startswith("C")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def one_line(value: object) -> str:
    """``value`` as one safe line: whitespace runs collapsed to one space."""
    return safe(" ".join(str(value).split()))


def age(seconds: float) -> str:
    """Humanize a duration: ``42s``, ``3m``, ``2h``, ``5d`` (whole units, rounded down)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def when(ts: Any, now: float | None = None) -> str:
    """``ts`` in UTC and how long before ``now`` (default: this machine's clock); a value
    that is no time is shown as it is, on one line."""
    try:
        stamp = datetime.fromtimestamp(float(ts), tz=timezone.utc)
        ago = age((time.time() if now is None else now) - float(ts))
        return f"{stamp:%Y-%m-%d %H:%M:%S} UTC ({ago} ago)"
    except (TypeError, ValueError, OverflowError, OSError):
        return one_line(ts)


def exception_line(entry: DeadLetter) -> str:
    """``Type: message`` (``builtins.`` left out), or the type alone."""
    kind = str(entry.exception_type).removeprefix("builtins.")
    return f"{kind}: {entry.exception_message}" if entry.exception_message else kind


def body_text(entry: DeadLetter) -> str:
    """``<N bytes of TYPE>`` for a raw body: counted, never deserialized."""
    body = entry.body
    content_type = one_line(getattr(body, "content_type", "?"))
    try:
        size = len(base64.b64decode(str(getattr(body, "data", "")), validate=True))
    except (binascii.Error, ValueError):
        return f"<undecodable body of {content_type}>"
    return f"<{size} bytes of {content_type}>"


def fields(entry: DeadLetter, data: dict[str, Any]) -> list[tuple[str, object]]:
    """What ``dlq show`` and an entry's page show, as (label, value) in order; ``data``
    is ``masking.view``'s (arguments masked). A raw body is shown by its size only."""
    raw = entry.body is not None
    return [
        ("id", entry.id),
        ("task", entry.task_name),
        ("task id", entry.task_id),
        ("reason", entry.reason),
        ("exception", entry.exception_type),
        ("message", entry.exception_message),
        ("attempts", entry.attempts),
        ("deliveries", entry.deliveries),
        ("replays", entry.replays),
        ("first failure", when(entry.first_failure_at)),
        ("last failure", when(entry.last_failure_at)),
        ("queue", entry.queue),
        ("exchange", entry.exchange),
        ("routing key", entry.routing_key),
        ("priority", entry.priority),
        ("lock key", entry.lock_key),
        ("hostname", entry.hostname),
        ("argnames", ", ".join(entry.argnames or [])),
        ("args", None if raw else json.dumps(data["args"])),
        ("kwargs", None if raw else json.dumps(data["kwargs"])),
        ("body", body_text(entry) if raw else None),
        ("args repr", data["args_repr"]),
        ("kwargs repr", data["kwargs_repr"]),
    ]
