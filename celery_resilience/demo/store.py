"""Where the demo's task bodies, observer hooks and the demo itself meet.

Task bodies record what they did (runs, intervals), hooks record events, the demo
sets flags the bodies read ("the gateway is back") and reads it all back to print
the report and check each scenario. In-process everything is a dict; with worker
processes it is Redis keys under one prefix, removed when the demo ends.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis

Event = dict[str, Any]
"""One event: ``kind``, ``t`` (Unix time) and fields of that kind (JSON types only)."""


class Store(Protocol):
    """Shared records of one demo run. Every method is safe from any thread or process."""

    def emit(self, kind: str, **fields: Any) -> None:
        """Append an event of ``kind``, stamped with the current time."""

    def drain(self) -> list[Event]:
        """Events appended since the last ``drain`` (of this object), oldest first."""

    def incr(self, name: str) -> int:
        """Add one to counter ``name`` and return the new value (1 the first time)."""

    def push(self, name: str, value: str) -> None:
        """Append ``value`` to list ``name``."""

    def items(self, name: str) -> list[str]:
        """Every value of list ``name``, in the order appended."""

    def set_flag(self, name: str) -> None:
        """Raise flag ``name`` (it stays raised)."""

    def flag(self, name: str) -> bool:
        """Whether flag ``name`` is raised."""

    def wait_flag(self, name: str, timeout: float) -> bool:
        """Block until flag ``name`` is raised or ``timeout`` s passed; return whether raised."""


def _event(kind: str, fields: dict[str, Any]) -> Event:
    return {"kind": kind, "t": time.time(), **fields}


class MemoryStore:
    """A :class:`Store` in this process' memory (the no-services demo)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._read = 0
        self._counters: dict[str, int] = {}
        self._lists: dict[str, list[str]] = {}
        self._flags: set[str] = set()

    def emit(self, kind: str, **fields: Any) -> None:
        with self._cond:
            self._events.append(_event(kind, fields))

    def drain(self) -> list[Event]:
        with self._cond:
            new, self._read = self._events[self._read :], len(self._events)
            return new

    def incr(self, name: str) -> int:
        with self._cond:
            self._counters[name] = self._counters.get(name, 0) + 1
            return self._counters[name]

    def push(self, name: str, value: str) -> None:
        with self._cond:
            self._lists.setdefault(name, []).append(value)

    def items(self, name: str) -> list[str]:
        with self._cond:
            return list(self._lists.get(name, ()))

    def set_flag(self, name: str) -> None:
        with self._cond:
            self._flags.add(name)
            self._cond.notify_all()

    def flag(self, name: str) -> bool:
        with self._cond:
            return name in self._flags

    def wait_flag(self, name: str, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: name in self._flags, timeout)


class RedisStore:
    """A :class:`Store` in Redis keys ``{prefix}:rec:*`` (the ``--redis`` demo).

    Each process (a forked pool child too) opens its own connection on first use.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._client: redis.Redis | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._read = 0

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "rec", *parts))

    def client(self) -> redis.Redis:
        """This process' client (short timeouts: the demo must never hang on Redis)."""
        import redis

        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = redis.Redis.from_url(
                    self.url, decode_responses=True, socket_connect_timeout=3, socket_timeout=10
                )
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        """Close this process' connection, if any."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def emit(self, kind: str, **fields: Any) -> None:
        self.client().rpush(self._key("events"), json.dumps(_event(kind, fields)))

    def drain(self) -> list[Event]:
        raw: list[Any] = self.client().lrange(self._key("events"), self._read, -1)
        self._read += len(raw)
        return [json.loads(item) for item in raw]

    def incr(self, name: str) -> int:
        return int(self.client().incr(self._key("n", name)))

    def push(self, name: str, value: str) -> None:
        self.client().rpush(self._key("l", name), value)

    def items(self, name: str) -> list[str]:
        return [str(item) for item in self.client().lrange(self._key("l", name), 0, -1)]

    def set_flag(self, name: str) -> None:
        self.client().set(self._key("f", name), "1")

    def flag(self, name: str) -> bool:
        return bool(self.client().exists(self._key("f", name)))

    def wait_flag(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.flag(name):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
