"""``redis://`` and ``rediss://`` dead-letter queue.

Entries are JSON strings under ``{prefix}:dlq:e:{id}``, indexed by sorted sets scored
with ``last_failure_at`` in microseconds: all entries, per task name, per reason, and
per (task name, reason). Writes and deletes are single Lua scripts, so an index
never points at a half-written entry.
"""

from __future__ import annotations

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
from celery_resilience.backends.redis import EVICTING, REDIS_SCHEMES, call, connect
from celery_resilience.deadletter import DeadLetter, MalformedEntry
from celery_resilience.hookspecs import hookimpl
from celery_resilience.outcome import GIVE_UP_REASONS
from celery_resilience.settings import Settings
from celery_resilience.urls import mask_url

# Shared by the scripts: remove entry `id` from the store and from every index.
# `{prefix}:dlq:meta` maps id -> "task name \31 reason"; when that value is missing
# or corrupt, the entry is looked for under the task name and reason its JSON
# names, every task name in `{prefix}:dlq:tasks` and every give-up reason.
# Redis keeps the writes of a script that fails halfway, so nothing here can fail
# on what it reads: reads check the key's type first (a key of another type holds
# none of ours), and a write goes only to a key of the type it needs.
_DROP = (
    "local REASONS = {"
    + ", ".join(f"'{r}'" for r in GIVE_UP_REASONS)
    + "}"
    + """
local function kind(key) return redis.call('TYPE', key)['ok'] end
local function zrem(key, id)
  if kind(key) == 'zset' then return redis.call('ZREM', key, id) end
  return 0
end
local function split(meta)
  if type(meta) ~= 'string' then return nil end
  local cut = string.find(meta, '\\31', 1, true)
  if not cut or cut == 1 or cut == #meta then return nil end
  return string.sub(meta, 1, cut - 1), string.sub(meta, cut + 1)
end
local function places(prefix, id, meta)
  local task, reason = split(meta)
  if task then return {[task] = true}, {[reason] = true} end
  local tasks, reasons = {}, {}
  for _, r in ipairs(REASONS) do reasons[r] = true end
  if kind(prefix .. ':dlq:tasks') == 'set' then
    for _, t in ipairs(redis.call('SMEMBERS', prefix .. ':dlq:tasks')) do tasks[t] = true end
  end
  local key = prefix .. ':dlq:e:' .. id
  if kind(key) == 'string' then
    local ok, doc = pcall(cjson.decode, redis.call('GET', key))
    if ok and type(doc) == 'table' then
      if type(doc.task_name) == 'string' then tasks[doc.task_name] = true end
      if type(doc.reason) == 'string' then reasons[doc.reason] = true end
    end
  end
  return tasks, reasons
end
-- Returns true if anything of `id` was there.
local function drop(prefix, id)
  local metakey = prefix .. ':dlq:meta'
  local meta = false
  if kind(metakey) == 'hash' then meta = redis.call('HGET', metakey, id) end
  local tasks, reasons = places(prefix, id, meta)
  local found = meta ~= false
  if found then redis.call('HDEL', metakey, id) end
  if redis.call('DEL', prefix .. ':dlq:e:' .. id) == 1 then found = true end
  if zrem(prefix .. ':dlq:all', id) == 1 then found = true end
  for task in pairs(tasks) do
    zrem(prefix .. ':dlq:t:' .. task, id)
    for reason in pairs(reasons) do zrem(prefix .. ':dlq:tr:' .. task .. ':' .. reason, id) end
  end
  for reason in pairs(reasons) do zrem(prefix .. ':dlq:r:' .. reason, id) end
  return found
end
"""
)

# KEYS: none (all keys derive from ARGV[1]; a Cluster port must hash-tag the prefix)
# ARGV: 1 prefix, 2 id, 3 entry JSON, 4 score (us), 5 task name, 6 reason,
#       7 retention cutoff (us), 8 max entries per task name
# Returns {trimmed, expired}, or an error (before any write) when a key it writes
# holds another type.
STORE = (
    _DROP
    + """
local p, id, score, task, reason = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
local all, bytask = p .. ':dlq:all', p .. ':dlq:t:' .. task
local need = {
  {p .. ':dlq:meta', 'hash'}, {all, 'zset'}, {bytask, 'zset'}, {p .. ':dlq:r:' .. reason, 'zset'},
  {p .. ':dlq:tr:' .. task .. ':' .. reason, 'zset'}, {p .. ':dlq:tasks', 'set'},
}
for _, want in ipairs(need) do
  local have = kind(want[1])
  if have ~= 'none' and have ~= want[2] then
    return redis.error_reply('key ' .. want[1] .. ' holds a ' .. have .. ', not a ' ..
      want[2] .. '; nothing was written')
  end
end
-- A counter that is not an integer is set afresh rather than failing INCRBY.
local counter, counted = p .. ':dlq:trimmed:' .. task, false
if kind(counter) == 'string' then
  local n = tonumber(redis.call('GET', counter))
  counted = n ~= nil and n == math.floor(n) and math.abs(n) < 2^53
end
redis.call('SET', p .. ':dlq:e:' .. id, ARGV[3])
redis.call('HSET', p .. ':dlq:meta', id, task .. '\\31' .. reason)
redis.call('ZADD', all, score, id)
redis.call('ZADD', bytask, score, id)
redis.call('ZADD', p .. ':dlq:r:' .. reason, score, id)
redis.call('ZADD', p .. ':dlq:tr:' .. task .. ':' .. reason, score, id)
redis.call('SADD', p .. ':dlq:tasks', task)
local expired = 0
for _, old in ipairs(redis.call('ZRANGEBYSCORE', all, '-inf', ARGV[7], 'LIMIT', 0, 200)) do
  drop(p, old)
  expired = expired + 1
end
local trimmed = 0
local excess = redis.call('ZCARD', bytask) - tonumber(ARGV[8])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', bytask, 0, excess - 1)) do
    drop(p, old)
    redis.call('ZREM', bytask, old)
    trimmed = trimmed + 1
  end
  if counted then
    redis.call('INCRBY', counter, trimmed)
  else
    redis.call('SET', counter, trimmed)
  end
end
return {trimmed, expired}
"""
)

# ARGV: 1 prefix, 2 id. Returns 1 if anything of the entry was there (and is gone).
DELETE = (
    _DROP
    + """
if drop(ARGV[1], ARGV[2]) then return 1 end
return 0
"""
)

# ARGV: 1 prefix, 2 index key, 3 batch size. Removes up to a batch of the index's
# entries; returns how many it removed (call again until 0).
PURGE = (
    _DROP
    + """
if kind(ARGV[2]) ~= 'zset' then return 0 end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', ARGV[2], 0, tonumber(ARGV[3]) - 1)) do
  drop(ARGV[1], id)
  redis.call('ZREM', ARGV[2], id)
  n = n + 1
end
return n
"""
)

_Place = tuple[int, str]  # (score, id): where an index row sorts
_Rows = list[tuple[bytes, float]]
_Decoded = list[tuple[_Place, DeadLetter | str]]


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
        return policy if policy in EVICTING else None

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
