"""``memory://`` dead-letter queue: one process only, for tests, eager mode and the demo."""

from __future__ import annotations

import threading
import time

from celery_resilience.backends.base import (
    Page,
    StoreResult,
    decode_cursor,
    encode_cursor,
    score_of,
)
from celery_resilience.deadletter import DeadLetter
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings

_QUEUES: dict[str, dict[str, DeadLetter]] = {}
_LOCK = threading.Lock()


class MemoryDeadLetterBackend:
    """In-process ``celery_resilience.backends.base.DeadLetterBackend``.

    Backends built from the same URL in one process share their entries.
    """

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        with _LOCK:
            self._entries = _QUEUES.setdefault(url, {})

    def store(self, entry: DeadLetter, *, retention: float, max_entries: int) -> StoreResult:
        with _LOCK:
            entries = self._entries
            entries[entry.id] = entry
            cutoff = time.time() - retention
            expired = [e.id for e in entries.values() if e.last_failure_at <= cutoff]
            for entry_id in expired:
                del entries[entry_id]
            same = sorted(
                (e for e in entries.values() if e.task_name == entry.task_name),
                key=lambda e: (score_of(e), e.id),
            )
            trimmed = same[: max(0, len(same) - max_entries)]
            for old in trimmed:
                del entries[old.id]
            return StoreResult(trimmed=len(trimmed), expired=len(expired))

    def get(self, entry_id: str) -> DeadLetter | None:
        with _LOCK:
            return self._entries.get(entry_id)

    def _matching(
        self, task_name: str | None, reason: str | None, newer_than: float
    ) -> list[DeadLetter]:
        with _LOCK:
            return [
                e
                for e in self._entries.values()
                if (task_name is None or e.task_name == task_name)
                and (reason is None or e.reason == reason)
                and e.last_failure_at > newer_than
            ]

    def list(
        self,
        *,
        task_name: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        newer_than: float = 0.0,
    ) -> Page:
        found = sorted(
            self._matching(task_name, reason, newer_than),
            key=lambda e: (score_of(e), e.id),
            reverse=True,
        )
        if cursor is not None:
            after = decode_cursor(cursor)
            found = [e for e in found if (score_of(e), e.id) < after]
        page = found[:limit]
        more = len(found) > limit
        return Page(page, encode_cursor(score_of(page[-1]), page[-1].id) if more else None)

    def count(
        self, *, task_name: str | None = None, reason: str | None = None, newer_than: float = 0.0
    ) -> int:
        return len(self._matching(task_name, reason, newer_than))

    def delete(self, entry_id: str) -> bool:
        with _LOCK:
            return self._entries.pop(entry_id, None) is not None

    def purge(self, *, task_name: str | None = None) -> int:
        with _LOCK:
            doomed = [e.id for e in self._entries.values() if task_name in (None, e.task_name)]
            for entry_id in doomed:
                del self._entries[entry_id]
            return len(doomed)

    def eviction_policy(self) -> str | None:
        return None

    def ping(self) -> None:
        """The in-process store always answers."""

    def close(self) -> None:
        """Nothing to release; entries stay for other backends of this URL."""

    def __repr__(self) -> str:
        return f"<MemoryDeadLetterBackend {self.url}>"


@hookimpl(trylast=True)
def resilience_dlq_backend(url: str, settings: Settings) -> MemoryDeadLetterBackend | None:
    """Serve ``memory://`` URLs."""
    if not url.lower().startswith("memory://"):
        return None
    return MemoryDeadLetterBackend(url)
