"""Dead letters: what is kept of a task that gave up, as JSON-safe data.

A dead letter never holds an unpickled object: arguments JSON cannot show are kept
as the task serializer's bytes (base64) with their content type and encoding,
shown as such, and republished byte for byte on replay.
"""

from __future__ import annotations

import base64
import inspect
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from celery_resilience.errors import ResilienceError
from celery_resilience.outcome import GiveUp

# Message headers the gate reads and writes to carry a task's history across
# retries and replays (Celery merges custom headers into the request).
REPLAYS_HEADER = "resilience_replays"
FIRST_FAILURE_HEADER = "resilience_first_failure"


class MalformedEntry(ResilienceError):
    """A stored dead letter could not be decoded; the message names the entry."""


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
    def from_json(cls, text: str | bytes, entry_id: str = "?") -> DeadLetter:
        """Decode a stored entry; raise ``MalformedEntry`` naming it if it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in data.items() if k in known}
            if values.get("body") is not None:
                values["body"] = RawBody(**values["body"])
            entry = cls(**values)
        except (ValueError, TypeError) as exc:
            raise MalformedEntry(f"dead letter {entry_id} cannot be decoded: {exc}") from None
        for names, kinds in _FIELD_TYPES:
            for name in names:
                value = getattr(entry, name)
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise MalformedEntry(f"dead letter {entry_id} has an invalid {name}: {value!r}")
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
        if json.loads(json.dumps([args, kwargs])) == [args, kwargs]:
            return args, kwargs, None
    except (TypeError, ValueError):
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
