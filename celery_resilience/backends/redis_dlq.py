"""``redis://`` and ``rediss://`` dead-letter queue.

Entries are JSON strings under ``{prefix}:dlq:e:{id}``, indexed by sorted sets scored
with ``last_failure_at`` in microseconds: all entries, per task name, per reason, and
per (task name, reason). Writes and deletes are single Lua scripts, so an index
never points at a half-written entry.
"""

from __future__ import annotations

import logging
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
from celery_resilience.backends.redis import call, connect
from celery_resilience.deadletter import DeadLetter, MalformedEntry
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import mask_url

logger = logging.getLogger(__name__)

# Shared by the scripts: remove entry `id` from the store and from every index.
# `{prefix}:dlq:meta` maps id -> "task name \31 reason", so even an entry whose
# JSON cannot be decoded leaves no index member behind.
_DROP = """
local function drop(prefix, id)
  local meta = redis.call('HGET', prefix .. ':dlq:meta', id)
  redis.call('ZREM', prefix .. ':dlq:all', id)
  local existed = redis.call('DEL', prefix .. ':dlq:e:' .. id)
  if not meta then
    if existed == 1 then return '' end
    return nil
  end
  redis.call('HDEL', prefix .. ':dlq:meta', id)
  local cut = string.find(meta, '\\31', 1, true)
  local task, reason = string.sub(meta, 1, cut - 1), string.sub(meta, cut + 1)
  redis.call('ZREM', prefix .. ':dlq:t:' .. task, id)
  redis.call('ZREM', prefix .. ':dlq:r:' .. reason, id)
  redis.call('ZREM', prefix .. ':dlq:tr:' .. task .. ':' .. reason, id)
  return task
end
"""

# KEYS: none (all keys derive from ARGV[1]; a Cluster port must hash-tag the prefix)
# ARGV: 1 prefix, 2 id, 3 entry JSON, 4 score (us), 5 task name, 6 reason,
#       7 retention cutoff (us), 8 max entries per task name
# Returns {trimmed, expired}.
STORE = (
    _DROP
    + """
local p, id, score, task, reason = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
redis.call('SET', p .. ':dlq:e:' .. id, ARGV[3])
redis.call('HSET', p .. ':dlq:meta', id, task .. '\\31' .. reason)
redis.call('ZADD', p .. ':dlq:all', score, id)
redis.call('ZADD', p .. ':dlq:t:' .. task, score, id)
redis.call('ZADD', p .. ':dlq:r:' .. reason, score, id)
redis.call('ZADD', p .. ':dlq:tr:' .. task .. ':' .. reason, score, id)
redis.call('SADD', p .. ':dlq:tasks', task)
local expired = 0
local stale = redis.call('ZRANGEBYSCORE', p .. ':dlq:all', '-inf', ARGV[7], 'LIMIT', 0, 200)
for _, old in ipairs(stale) do
  drop(p, old)
  expired = expired + 1
end
local trimmed = 0
local excess = redis.call('ZCARD', p .. ':dlq:t:' .. task) - tonumber(ARGV[8])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', p .. ':dlq:t:' .. task, 0, excess - 1)) do
    drop(p, old)
    redis.call('ZREM', p .. ':dlq:t:' .. task, old)
    trimmed = trimmed + 1
  end
  redis.call('INCRBY', p .. ':dlq:trimmed:' .. task, trimmed)
end
return {trimmed, expired}
"""
)

# ARGV: 1 prefix, 2 id. Returns 1 if an entry was removed.
DELETE = (
    _DROP
    + """
if drop(ARGV[1], ARGV[2]) == nil then return 0 end
return 1
"""
)

# ARGV: 1 prefix, 2 index key, 3 batch size. Removes up to a batch of the index's
# entries; returns how many it removed (call again until 0).
PURGE = (
    _DROP
    + """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', ARGV[2], 0, tonumber(ARGV[3]) - 1)) do
  drop(ARGV[1], id)
  redis.call('ZREM', ARGV[2], id)
  n = n + 1
end
return n
"""
)

_EVICTING = {
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
}


class RedisDeadLetterBackend:
    """``celery_resilience.backends.base.DeadLetterBackend`` on Redis."""

    def __init__(self, url: str, key_prefix: str = "celery_resilience") -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._client = connect(url, "DLQ")
        self._store = self._client.register_script(STORE)
        self._delete = self._client.register_script(DELETE)
        self._purge = self._client.register_script(PURGE)

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
        ]
        trimmed, expired = self._call("store", self._store, keys=[], args=args)
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
        entries: list[DeadLetter] = []
        offset = 0
        batch = limit + 1
        while len(entries) <= limit:
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
            ids = [
                (member.decode(), int(score))
                for member, score in rows
                if after is None or (int(score), member.decode()) < after
            ]
            keys = [f"{self._prefix}:dlq:e:{i}" for i, _ in ids]
            raws = self._call("list", self._client.mget, keys) if keys else []
            for (entry_id, _), raw in zip(ids, raws, strict=True):
                if raw is None:
                    continue  # deleted or trimmed since the index was read
                try:
                    entries.append(DeadLetter.from_json(raw, entry_id))
                except MalformedEntry as exc:
                    logger.error("celery-resilience: %s; skipped", exc)
            if len(rows) < batch:
                break
        page = entries[:limit]
        more = len(entries) > limit
        return Page(page, encode_cursor(score_of(page[-1]), page[-1].id) if more else None)

    def count(
        self, *, task_name: str | None = None, reason: str | None = None, newer_than: float = 0.0
    ) -> int:
        index = self._index(task_name, reason)
        floor = f"({to_score(newer_than)}"
        return int(self._call("count", self._client.zcount, index, floor, "+inf"))

    def delete(self, entry_id: str) -> bool:
        return bool(self._call("delete", self._delete, keys=[], args=[self._prefix, entry_id]))

    def purge(self, *, task_name: str | None = None) -> int:
        index = self._index(task_name, None)
        total = 0
        while True:
            n = int(self._call("purge", self._purge, keys=[], args=[self._prefix, index, 1000]))
            total += n
            if n == 0:
                return total

    def eviction_policy(self) -> str | None:
        config = self._call("CONFIG GET", self._client.config_get, "maxmemory-policy")
        policy = config.get("maxmemory-policy")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        return policy if policy in _EVICTING else None

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<RedisDeadLetterBackend {self.url}>"


@hookimpl(trylast=True)
def resilience_dlq_backend(url: str, settings: Settings) -> RedisDeadLetterBackend | None:
    """Serve ``redis://``, ``rediss://`` and ``unix://`` URLs."""
    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        return None
    return RedisDeadLetterBackend(url, key_prefix=settings.key_prefix)
