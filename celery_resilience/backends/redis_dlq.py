"""``redis://``, ``rediss://`` and ``unix://`` dead-letter queue.

Entries are JSON strings under ``{prefix}:dlq:e:{id}``, indexed by sorted sets scored
with ``last_failure_at`` in microseconds: all entries, per task name, per reason, and
per (task name, reason). Writes and deletes are single runs of one Lua script,
``lua/dlq.lua``, so an index never points at a half-written entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery_resilience.backends.base import (
    Page,
    StoreResult,
    decode_cursor,
    encode_cursor,
    score_of,
    to_score,
)
from celery_resilience.backends.redis import call, connect, evicting, lua
from celery_resilience.deadletter import GIVE_UP_REASONS, DeadLetter, MalformedEntry
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import REDIS_SCHEMES, mask_url


@functools.cache
def _source() -> str:
    """The text of ``lua/dlq.lua`` (store, delete and purge), read once per process.

    Its list of give-up reasons is written out in Lua; a reason added to
    ``GIVE_UP_REASONS`` but not there would leave index rows behind.
    """
    source = lua("dlq")
    reasons = ", ".join(f"'{reason}'" for reason in GIVE_UP_REASONS)
    if f"local REASONS = {{{reasons}}}" not in source:
        raise RuntimeError("lua/dlq.lua: REASONS do not match GIVE_UP_REASONS")
    return source


_Place = tuple[int, str]  # (score, id): where an index row sorts
_Rows = list[tuple[bytes, float]]
_Decoded = list[tuple[_Place, DeadLetter | str]]


class RedisDeadLetterBackend:
    """``celery_resilience.backends.base.DeadLetterBackend`` on Redis."""

    def __init__(self, url: str, key_prefix: str = "celery_resilience") -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._client = connect(url, "DLQ")
        self._script = self._client.register_script(_source())

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call("DLQ", self.url, what, fn, *args, **kwargs)

    def _index(self, task_name: str | None, reason: str | None) -> str:
        p = self._prefix
        if task_name is not None and reason is not None:
            return f"{p}:dlq:tr:{task_name}:{reason}"
        if task_name is not None:
            return f"{p}:dlq:t:{task_name}"
        if reason is not None:
            return f"{p}:dlq:r:{reason}"
        return f"{p}:dlq:all"

    def store(self, entry: DeadLetter, *, retention: float, max_entries: int) -> StoreResult:
        cutoff = to_score(entry.last_failure_at - retention)
        args = [
            self._prefix,
            entry.id,
            entry.to_json(),
            score_of(entry),
            entry.task_name,
            entry.reason,
            cutoff,
            max_entries,
            "store",
        ]
        trimmed, expired = self._call("store", self._script, keys=[], args=args)
        return StoreResult(trimmed=int(trimmed), expired=int(expired))

    def get(self, entry_id: str) -> DeadLetter | None:
        raw = self._call("get", self._client.get, f"{self._prefix}:dlq:e:{entry_id}")
        return None if raw is None else DeadLetter.from_json(raw, entry_id)

    def list(
        self,
        *,
        task_name: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        newer_than: float = 0.0,
    ) -> Page:
        index = self._index(task_name, reason)
        floor = f"({to_score(newer_than)}"
        top: str = "+inf"
        after: tuple[int, str] | None = None
        if cursor is not None:
            after = decode_cursor(cursor)
            top = str(after[0])
        found: list[tuple[_Place, DeadLetter]] = []
        skipped: list[tuple[_Place, str]] = []
        offset = 0
        batch = limit + 1
        while len(found) <= limit:
            rows = self._call(
                "list",
                self._client.zrevrangebyscore,
                index,
                top,
                floor,
                start=offset,
                num=batch,
                withscores=True,
            )
            if not rows:
                break
            offset += len(rows)
            for place, entry_or_why in self._decode(rows, after):
                if isinstance(entry_or_why, DeadLetter):
                    found.append((place, entry_or_why))
                else:
                    skipped.append((place, entry_or_why))
            if len(rows) < batch:
                break
        page = found[:limit]
        cursor_at = page[-1][0] if len(found) > limit else None
        return Page(
            [entry for _, entry in page],
            None if cursor_at is None else encode_cursor(*cursor_at),
            # Those past the cursor are the next page's to name.
            [(place[1], why) for place, why in skipped if cursor_at is None or place > cursor_at],
        )

    def _decode(self, rows: _Rows, after: _Place | None) -> _Decoded:
        """Each index row after ``after`` as ((score, id), entry or why it is skipped)."""
        places: list[tuple[_Place, bytes]] = []
        decoded: _Decoded = []
        for member, score in rows:
            try:
                place = (int(score), member.decode())
            except UnicodeDecodeError:
                shown = member.decode(errors="backslashreplace")
                why = f"dead letter {shown} cannot be decoded: its id is not UTF-8 text"
                decoded.append(((int(score), shown), why))
                continue
            if after is None or place < after:
                places.append((place, self._prefix.encode() + b":dlq:e:" + member))
        raws = self._call("list", self._client.mget, [key for _, key in places]) if places else []
        for (place, _), raw in zip(places, raws, strict=True):
            if raw is None:
                continue  # deleted or trimmed since the index was read
            try:
                decoded.append((place, DeadLetter.from_json(raw, place[1])))
            except MalformedEntry as exc:
                decoded.append((place, str(exc)))
        decoded.sort(key=lambda item: item[0], reverse=True)
        return decoded

    def count(
        self, *, task_name: str | None = None, reason: str | None = None, newer_than: float = 0.0
    ) -> int:
        index = self._index(task_name, reason)
        floor = f"({to_score(newer_than)}"
        return int(self._call("count", self._client.zcount, index, floor, "+inf"))

    def delete(self, entry_id: str) -> bool:
        args = [self._prefix, entry_id, "delete"]
        return bool(self._call("delete", self._script, keys=[], args=args))

    def purge(self, *, task_name: str | None = None) -> int:
        index = self._index(task_name, None)
        total = 0
        while True:
            args = [self._prefix, index, 1000, "purge"]
            n = int(self._call("purge", self._script, keys=[], args=args))
            total += n
            if n == 0:
                return total

    def eviction_policy(self) -> str | None:
        config = self._call("CONFIG GET", self._client.config_get, "maxmemory-policy")
        return evicting(config.get("maxmemory-policy"))

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<RedisDeadLetterBackend {self.url}>"


@hookimpl(trylast=True)
def resilience_dlq_backend(url: str, settings: Settings) -> RedisDeadLetterBackend | None:
    """Serve ``redis://``, ``rediss://`` and ``unix://`` URLs."""
    if not url.lower().startswith(REDIS_SCHEMES):
        return None
    return RedisDeadLetterBackend(url, key_prefix=settings.key_prefix)
