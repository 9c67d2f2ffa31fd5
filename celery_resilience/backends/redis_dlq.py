"""The dead-letter queue on Redis: one server (``redis://``, ``rediss://``, ``unix://``),
Sentinel or Cluster.

Entries are JSON strings under ``<base>:e:<id>``, indexed by sorted sets scored with
``last_failure_at`` in microseconds: all entries (``<base>:all``), per task name
(``<base>:t:<task>``), per reason (``<base>:r:<reason>``) and per both
(``<base>:tr:<task>:<reason>``). The hash ``<base>:meta`` maps each id to its task
name and reason (which rows to remove with it), the set ``<base>:tasks`` holds every
task name stored, and ``<base>:trimmed:<task>`` counts the entries the cap dropped.
``<base>`` is ``<prefix>:dlq``, as in earlier releases, so an upgrade reads the queues
it finds; on Cluster it is the hash tag ``{<prefix>:dlq}``, so that every DLQ key is in
one slot (``list``'s MGET included).

Every key a script touches is in its KEYS: Cluster routes a script by them, and ACL key
patterns are checked on them. Keys that depend on data are therefore read first:

- ``store`` is one run of ``lua/dlq_store.lua`` (type checks before any write, then the
  entry and its rows), which answers with the entries now past the retention or the
  cap and their meta; one run of ``lua/dlq_drop.lua`` then drops those, if any.
- ``delete`` and ``purge`` read the meta of their entries (and, for one without a valid
  meta, every task name and its JSON), then drop them with ``lua/dlq_drop.lua``.

A drop skips an entry whose meta changed since it was read (a store or delete ran in
between): ``delete`` and ``purge`` read it again, ``store`` leaves it to the next store.

Each store and each drop is atomic, so an index never points at a half-written entry;
the expiry and trim after a store are a second step, so for a moment a task name may
hold one entry more than ``max_entries``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_resilience.backends.base import (
    Page,
    StoreResult,
    decode_cursor,
    encode_cursor,
    score_of,
    to_score,
)
from celery_resilience.backends.clients import connect, is_cluster
from celery_resilience.backends.redis import call, evicting, lua
from celery_resilience.deadletter import GIVE_UP_REASONS, DeadLetter, MalformedEntry
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import REDIS_SCHEMES, mask_url

PURGE_BATCH = 1000
"""How many entries ``purge`` reads and drops per round."""

DROP_KEYS = 10_000
"""A run of ``lua/dlq_drop.lua`` gets about this many keys at most; more take more runs."""

RETRIES = 5
"""How often ``delete`` and ``purge`` read again an entry whose meta keeps changing
under them; the next time they drop it whatever its meta then, looking for it under
every task name and reason."""

_Place = tuple[int, str]  # (score, id): where an index row sorts
_Rows = list[tuple[bytes, float]]
_Decoded = list[tuple[_Place, DeadLetter | str]]
_Known = tuple[set[bytes], set[bytes]]  # task names and reasons an entry may be under


@dataclass(frozen=True)
class _Doomed:
    """An entry to drop: its id; its meta value as read (None: it had none); index keys
    to clear besides those of its meta; its trimmed counter when it counts as trimmed;
    whether to drop it whatever its meta is by then (``force``)."""

    id: bytes
    meta: bytes | None
    also: tuple[bytes, ...] = ()
    counter: bytes | None = None
    force: bool = False


def _split(meta: bytes | None) -> tuple[bytes, bytes] | None:
    """(task name, reason) of a meta value ``task \\x1f reason``; None when it is missing
    or corrupt (no separator, or one at either end)."""
    if meta is None:
        return None
    cut = meta.find(b"\x1f")
    if cut <= 0 or cut == len(meta) - 1:
        return None
    return meta[:cut], meta[cut + 1 :]


def _wrong_type(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE")


def _or_none(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None when the key is of another type: it holds none of ours."""
    try:
        return fn(*args)
    except Exception as exc:
        if _wrong_type(exc):
            return None
        raise


def _replies(pipe: Any) -> list[Any]:
    """Run ``pipe``; a reply from a key of another type is None, other errors raise."""
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception) and not _wrong_type(reply):
            raise reply
    return [None if isinstance(reply, Exception) else reply for reply in replies]


def _named(raw: bytes | None) -> _Known:
    """The task name and reason an entry's JSON names (sets of at most one each)."""
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return set(), set()
    found = [doc.get("task_name"), doc.get("reason")]
    tasks, reasons = (
        {v.encode("utf-8", "surrogatepass")} if isinstance(v, str) else set() for v in found
    )
    return tasks, reasons


def _pairs(flat: list[Any]) -> list[tuple[bytes, bytes | None]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


class RedisDeadLetterBackend:
    """``celery_resilience.backends.base.DeadLetterBackend`` on Redis.

    ``options`` are the transport options (Sentinel's master name, ...); ``cluster``
    forces the Cluster key names (one hash tag) on or off, by default on for a Cluster
    URL.
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = "celery_resilience",
        *,
        options: Mapping[str, Any] | None = None,
        cluster: bool | None = None,
    ) -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._cluster = is_cluster(url) if cluster is None else cluster
        self._client = connect(url, "DLQ", options)
        self._store_script = self._client.register_script(lua("dlq_store"))
        self._drop_script = self._client.register_script(lua("dlq_drop"))

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call("DLQ", self.url, what, fn, *args, **kwargs)

    def _base(self) -> str:
        """The start of every DLQ key name: ``<prefix>:dlq``; on Cluster ``{<prefix>:dlq}``,
        a hash tag, so that every DLQ key is in one slot."""
        base = f"{self._prefix}:dlq"
        return f"{{{base}}}" if self._cluster else base

    def _key(self, *parts: str | bytes) -> bytes:
        """The key ``<base>:<part>:<part>...``."""
        encoded = [part.encode() if isinstance(part, str) else part for part in parts]
        return b":".join([self._base().encode(), *encoded])

    def _index(self, task_name: str | None, reason: str | None) -> bytes:
        if task_name is not None and reason is not None:
            return self._key("tr", task_name, reason)
        if task_name is not None:
            return self._key("t", task_name)
        if reason is not None:
            return self._key("r", reason)
        return self._key("all")

    def store(self, entry: DeadLetter, *, retention: float, max_entries: int) -> StoreResult:
        task, reason = entry.task_name, entry.reason
        keys = [self._key("e", entry.id), self._key("meta"), self._key("all")]
        keys += [self._key("t", task), self._key("r", reason), self._key("tr", task, reason)]
        keys.append(self._key("tasks"))
        cutoff = to_score(entry.last_failure_at - retention)
        args = [entry.id, entry.to_json(), score_of(entry), task, reason, cutoff, max_entries]
        expired, trimmed = self._call("store", self._store_script, keys=keys, args=args)
        if not expired and not trimmed:
            return StoreResult()
        doomed = [_Doomed(old, meta) for old, meta in _pairs(expired)]
        counter = self._key("trimmed", task)
        doomed += [_Doomed(old, meta, (keys[3],), counter) for old, meta in _pairs(trimmed)]
        # One that changed since (-1) is not retried: it may no longer be due, and the
        # next store names it again if it still is.
        results = self._drop("store", doomed)
        n = len(expired) // 2
        return StoreResult(trimmed=results[n:].count(1), expired=results[:n].count(1))

    def _drop(self, what: str, doomed: list[_Doomed]) -> list[int]:
        """Drop ``doomed`` with ``lua/dlq_drop.lua``; per entry 1 (something of it was
        removed), 0 (nothing of it was there) or -1 (skipped: its meta changed since it
        was read). One round trip, two when one has no valid meta or is forced."""
        wide = [d.id for d in doomed if d.force or _split(d.meta) is None]
        known = self._known(what, wide) if wide else {}
        results: list[int] = []
        keys: list[bytes] = [self._key("meta")]
        args: list[bytes | int | str] = []
        for d in doomed:
            block = [self._key("e", d.id), *self._places(d.meta, known.get(d.id)), *d.also]
            block = list(dict.fromkeys(block))
            if d.counter is not None:
                block.append(d.counter)
            if args and len(keys) + len(block) > DROP_KEYS:
                results += self._call(what, self._drop_script, keys=keys, args=args)
                keys, args = [keys[0]], []
            read = "*" if d.force else "0" if d.meta is None else "1"
            keys += block
            args += [d.id, read, d.meta or b"", len(block), int(d.counter is not None)]
        results += self._call(what, self._drop_script, keys=keys, args=args)
        return [int(result) for result in results]

    def _places(self, meta: bytes | None, known: _Known | None) -> list[bytes]:
        """The index keys an entry may be in: those its meta names, and every pairing of
        the task names and reasons in ``known``."""
        tasks, reasons = known or (set(), set())
        named = _split(meta)
        if named is not None:
            tasks, reasons = tasks | {named[0]}, reasons | {named[1]}
        keys = [self._key("all")]
        keys += [self._key("t", task) for task in sorted(tasks)]
        keys += [self._key("r", reason) for reason in sorted(reasons)]
        keys += [self._key("tr", t, r) for t in sorted(tasks) for r in sorted(reasons)]
        return keys

    def _known(self, what: str, ids: list[bytes]) -> dict[bytes, _Known]:
        """Where each of ``ids`` (without a valid meta) may be indexed: under every task
        name in ``<base>:tasks`` and every give-up reason, and those its JSON names. One
        round trip; a key of another type holds none of ours."""
        pipe = self._client.pipeline(transaction=False)
        pipe.smembers(self._key("tasks"))
        for entry_id in ids:
            pipe.get(self._key("e", entry_id))
        members, *raws = self._call(what, _replies, pipe)
        tasks = set(members or ())
        reasons = {reason.encode() for reason in GIVE_UP_REASONS}
        known = {}
        for entry_id, raw in zip(ids, raws, strict=True):
            its_tasks, its_reasons = _named(raw)
            known[entry_id] = (tasks | its_tasks, reasons | its_reasons)
        return known

    def get(self, entry_id: str) -> DeadLetter | None:
        raw = self._call("get", self._client.get, self._key("e", entry_id))
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
                places.append((place, self._key("e", member)))
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
        member, meta_key = entry_id.encode(), self._key("meta")
        attempts = 0
        while True:
            meta = self._call("delete", _or_none, self._client.hget, meta_key, member)
            doomed = _Doomed(member, meta, force=attempts >= RETRIES)
            (result,) = self._drop("delete", [doomed])
            if result != -1:
                return result == 1
            attempts += 1

    def purge(self, *, task_name: str | None = None) -> int:
        index, meta_key = self._index(task_name, None), self._key("meta")
        total = 0
        skipped: Counter[bytes] = Counter()
        while True:
            ids = self._call("purge", _or_none, self._client.zrange, index, 0, PURGE_BATCH - 1)
            if not ids:
                return total
            metas = self._call("purge", _or_none, self._client.hmget, meta_key, ids)
            doomed = [
                _Doomed(member, meta, (index,), force=skipped[member] >= RETRIES)
                for member, meta in zip(ids, metas or [None] * len(ids), strict=True)
            ]
            results = self._drop("purge", doomed)
            total += results.count(1)
            skipped.update(
                member for member, result in zip(ids, results, strict=True) if result == -1
            )

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
    """Serve the Redis URLs (``REDIS_SCHEMES``): one server, Sentinel and Cluster."""
    if not url.lower().startswith(REDIS_SCHEMES):
        return None
    return RedisDeadLetterBackend(
        url, key_prefix=settings.key_prefix, options=settings.transport_options
    )
