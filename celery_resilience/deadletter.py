"""Dead letters: a task's terminal outcome (``GiveUp``) and what is kept of it, as JSON-safe data.

A dead letter never holds an unpickled object: arguments JSON cannot show are kept
as the task serializer's bytes (base64) with their content type and encoding,
shown as such, and republished byte for byte on replay.
"""

from __future__ import annotations

import base64
import inspect
import json
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from celery_resilience.errors import ResilienceError

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


class MalformedEntry(ResilienceError):
    """A stored dead letter could not be decoded; the message names the entry."""


MAX_DEPTH = 100
"""How deeply a stored entry may nest (the entry object itself is level 1).

Deeper arguments are kept as a raw body, so every decoded entry can be copied,
shown and encoded again without reaching Python's recursion limit.
"""

# The latest Unix time Python's datetime can show (9999-12-31 23:59:59 UTC).
_LATEST = 253402300799.0

_TEXT = ("id", "task_id", "task_name", "reason", "exception_type", "exception_message")
_FIELD_TYPES: tuple[tuple[tuple[str, ...], type | tuple[type, ...]], ...] = (
    ((*_TEXT, "traceback", "args_repr", "kwargs_repr"), str),
    (("attempts", "deliveries", "replays"), int),
    (("first_failure_at", "last_failure_at"), (int, float)),
    (("args", "argnames"), (list, type(None))),
    (("kwargs",), (dict, type(None))),
    (("queue", "exchange", "routing_key", "lock_key", "hostname"), (str, type(None))),
    (("priority",), (int, type(None))),
)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid value")


def _depth(value: Any) -> int:
    """How many lists/objects deep ``value`` nests (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:  # deeper is rejected anyway; stop counting there
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, level + 1) for child in children)
    return deepest


def _invalid_field(entry: DeadLetter) -> tuple[str, Any] | None:
    """The first field of ``entry`` with a value of the wrong type or range, if any."""
    for names, kinds in _FIELD_TYPES:
        for name in names:
            value = getattr(entry, name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                return name, value
    for name in ("first_failure_at", "last_failure_at"):
        if not 0 <= getattr(entry, name) <= _LATEST:
            return name, getattr(entry, name)
    if entry.argnames is not None and not all(isinstance(n, str) for n in entry.argnames):
        return "argnames", entry.argnames
    body = entry.body
    if body is not None:
        for name in ("data", "content_type", "content_encoding"):
            if not isinstance(getattr(body, name), str):
                return f"body.{name}", getattr(body, name)
    return None


@dataclass(frozen=True)
class RawBody:
    """A message body kept as bytes because JSON cannot show its arguments."""

    data: str
    """The serialized ``[args, kwargs, embed]`` body, base64-encoded."""
    content_type: str
    content_encoding: str

    def payload(self) -> bytes:
        return base64.b64decode(self.data)


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter queue. Times are Unix timestamps in seconds.

    Exactly one of (``args``, ``kwargs``) and ``body`` holds the arguments: the
    first when JSON can show them, else ``body``; ``args_repr``/``kwargs_repr`` are
    always there for people to read.
    """

    id: str
    task_id: str
    task_name: str
    reason: str
    exception_type: str
    exception_message: str
    traceback: str
    attempts: int
    deliveries: int
    first_failure_at: float
    last_failure_at: float
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    body: RawBody | None = None
    args_repr: str = ""
    kwargs_repr: str = ""
    argnames: list[str] = field(default_factory=list)
    queue: str | None = None
    exchange: str | None = None
    routing_key: str | None = None
    priority: int | None = None
    lock_key: str | None = None
    hostname: str | None = None
    replays: int = 0

    def to_json(self) -> str:
        """Return the entry as a JSON document (what backends store)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, entry_id: str | None = None) -> DeadLetter:
        """Decode a stored entry; raise ``MalformedEntry`` naming it if it is not one.

        However the text is malformed (not UTF-8, not JSON, nested deeper than
        ``MAX_DEPTH``, ``NaN``, not an object, a field of the wrong type, a time
        out of range, or an ``id`` other than ``entry_id``), the error is
        ``MalformedEntry``; a decoded entry is safe to show, page and replay.
        """
        name = entry_id or "?"
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except RecursionError:
            raise MalformedEntry(
                f"dead letter {name} cannot be decoded: nested too deeply"
            ) from None
        except (ValueError, TypeError) as exc:
            raise MalformedEntry(f"dead letter {name} cannot be decoded: {exc}") from None
        if not isinstance(data, dict):
            raise MalformedEntry(
                f"dead letter {name} cannot be decoded: a JSON {type(data).__name__}, not an object"
            )
        if _depth(data) > MAX_DEPTH:
            raise MalformedEntry(
                f"dead letter {name} cannot be decoded: nested deeper than {MAX_DEPTH} levels"
            )
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            if values.get("body") is not None:
                values["body"] = RawBody(**values["body"])
            entry = cls(**values)
        except TypeError as exc:
            raise MalformedEntry(f"dead letter {name} cannot be decoded: {exc}") from None
        problem = _invalid_field(entry)
        if problem is not None:
            field_name, value = problem
            raise MalformedEntry(
                f"dead letter {name} has an invalid {field_name}: {_repr(value, 80)}"
            )
        if entry_id is not None and entry.id != entry_id:
            raise MalformedEntry(
                f"dead letter {name} has an invalid id: {_repr(entry.id, 80)} "
                "is not the id it is stored under"
            )
        return entry

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq ls`` shows."""
        return {
            "id": self.id,
            "task_name": self.task_name,
            "reason": self.reason,
            "last_failure_at": self.last_failure_at,
            "attempts": self.attempts,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
        }


def make_dead_letter(
    outcome: GiveUp, task: Any, *, replays: int, first_failure_at: float | None
) -> DeadLetter:
    """Build the entry for ``outcome`` of ``task`` (a Celery task instance)."""
    info = outcome.delivery_info
    args, kwargs, body = _arguments(outcome, task)
    return DeadLetter(
        id=uuid.uuid4().hex,
        task_id=outcome.task_id,
        task_name=outcome.task_name,
        reason=outcome.reason,
        exception_type=outcome.exception_type,
        exception_message=_text(outcome.exception),
        traceback=outcome.traceback,
        attempts=outcome.attempts,
        deliveries=outcome.deliveries,
        first_failure_at=first_failure_at or outcome.failed_at,
        last_failure_at=outcome.failed_at,
        args=args,
        kwargs=kwargs,
        body=body,
        args_repr=_repr(outcome.args),
        kwargs_repr=_repr(outcome.kwargs),
        argnames=_argnames(task),
        queue=info.get("queue") or info.get("routing_key"),
        exchange=info.get("exchange"),
        routing_key=info.get("routing_key"),
        priority=info.get("priority"),
        lock_key=outcome.lock_key,
        hostname=outcome.hostname,
        replays=replays,
    )


def _arguments(
    outcome: GiveUp, task: Any
) -> tuple[list[Any] | None, dict[str, Any] | None, RawBody | None]:
    args, kwargs = list(outcome.args), dict(outcome.kwargs)
    try:
        # Strict JSON: what loads back as the same values. Anything else is kept
        # in the task serializer's own form.
        if (
            json.loads(json.dumps([args, kwargs], allow_nan=False)) == [args, kwargs]
            and _depth([args, kwargs]) <= MAX_DEPTH
        ):
            return args, kwargs, None
    except (TypeError, ValueError, RecursionError):
        pass
    from kombu.serialization import dumps

    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    content_type, encoding, data = dumps(  # type: ignore[no-untyped-call]  # kombu is untyped
        [args, kwargs, embed], serializer=task.serializer or "json"
    )
    raw = data if isinstance(data, bytes) else data.encode(encoding)
    return None, None, RawBody(base64.b64encode(raw).decode("ascii"), content_type, encoding)


def _argnames(task: Any) -> list[str]:
    try:
        params = inspect.signature(task.run).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unrepresentable: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}>"
