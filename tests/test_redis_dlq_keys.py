"""The Redis DLQ's keys: every key a script touches is in its KEYS, and with the Cluster
key names every DLQ key is in one hash slot.

Two checks of the first, each with its limits:

- Static: each ``redis.call``/``redis.pcall`` in ``lua/dlq*.lua`` names its key (the
  argument after the command) as a ``KEYS[...]`` expression, or as a local variable
  assigned nothing but ``KEYS[...]`` expressions. It reads the text: it does not follow
  a key passed to a function as a parameter (such a call fails the check), does not
  check that an index is within KEYS, and knows nothing of the commands' other
  arguments, so it allows only commands whose one key is their first argument.
- Live: MONITOR of the test Redis while a DLQ stores (with expiry and trimming),
  lists, counts, deletes and purges; every command a script of this test's run makes
  (MONITOR shows them, after the EVALSHA that ran them) touches only keys in that
  EVALSHA's KEYS, as ``COMMAND GETKEYS`` reads them. It sees only the paths the run
  takes.

There is no Redis Cluster here: the Cluster names are forced (``cluster=True``) on the
test Redis, and their slots computed as Cluster does (``redis.crc.key_slot``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from celery_resilience.backends.redis_dlq import RETRIES, RedisDeadLetterBackend
from celery_resilience.testing.dlq import _NOW, _ids, _letter

LUA = Path(__file__).resolve().parents[1] / "celery_resilience" / "backends" / "lua"

# Commands whose only key is their first argument (DEL: with one argument only).
ONE_KEY = {
    "DEL", "GET", "HDEL", "HGET", "HSET", "INCRBY", "SADD", "SET", "SMEMBERS",
    "TYPE", "ZADD", "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "ZREM", "ZSCORE",
}  # fmt: skip
_KEYS_EXPR = re.compile(r"KEYS\[[^\[\]]+\]")
_NAME = r"[A-Za-z_]\w*"
_ASSIGNMENT = re.compile(rf"(?:\blocal\s+)?\b({_NAME}(?:\s*,\s*{_NAME})*)\s*=(?!=)\s*([^\n]+)")


def _strip_comments(source: str) -> str:
    """``source`` without its ``--`` comments (quotes respected; no long comments)."""
    out, quote, i = [], "", 0
    while i < len(source):
        c = source[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(source[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
            out.append(c)
        elif source.startswith("--", i):
            i = source.find("\n", i)
            if i < 0:
                break
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _split_args(text: str, start: int) -> list[str]:
    """The arguments of the call whose ``(`` is at ``start``, split at top-level commas."""
    args: list[str] = []
    depth, quote, current = 0, "", []
    for i in range(start + 1, len(text)):
        c = text[i]
        if quote:
            if c == quote and text[i - 1] != "\\":
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append("".join(current).strip())
                return args
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            continue
        current.append(c)
    raise ValueError(f"unclosed call at {start}")


def key_problems(source: str) -> list[str]:
    """Every ``redis.call`` of ``source`` whose key is not from KEYS, described."""
    text = _strip_comments(source)
    problems = []
    # A local is from KEYS when every expression assigned to it is a KEYS[...] one.
    assigned: dict[str, list[str]] = {}
    for match in _ASSIGNMENT.finditer(text):
        names = [name.strip() for name in match.group(1).split(",")]
        values = _split_args(f"({match.group(2)})", 0) if "," in match.group(2) else []
        values = values if len(values) == len(names) else [match.group(2).strip()] * len(names)
        for name, value in zip(names, values, strict=True):
            assigned.setdefault(name, []).append(value)
    if re.search(r"redis\.p?call(?!\s*\()", text):
        problems.append("redis.call is used other than by calling it")
    for match in re.finditer(r"redis\.p?call\s*\(", text):
        args = _split_args(text, match.end() - 1)
        command = args[0].strip("'\"").upper()
        if command not in ONE_KEY or (command == "DEL" and len(args) != 2):
            problems.append(f"{match.group(0)}{', '.join(args)}): not a one-key command")
            continue
        key = args[1]
        from_keys = _KEYS_EXPR.fullmatch(key) or (
            key in assigned and all(_KEYS_EXPR.fullmatch(v) for v in assigned[key])
        )
        if not from_keys:
            problems.append(f"{match.group(0)}{', '.join(args)}): key {key!r} is not from KEYS")
    return problems


def test_the_static_check_can_fail() -> None:
    """Keys built from ARGV or data, or passed as parameters, are found; KEYS pass."""
    assert key_problems("local k = KEYS[2]\nredis.call('GET', k)\nredis.call('DEL', KEYS[i])") == []
    bad = [
        "redis.call('GET', ARGV[1] .. ':e:' .. id)",
        "local k = KEYS[1]\nk = ARGV[1]\nredis.call('GET', k)",
        "local function kind(key) return redis.call('TYPE', key) end",
        "redis.call('DEL', KEYS[1], KEYS[2])",
        "redis.call('EVAL', 'return 1', 0)",
        "local c = redis.call\nc('GET', 'x')",
    ]
    for source in bad:
        assert key_problems(source), source
    assert key_problems("-- redis.call('GET', ARGV[1])\nredis.call('GET', KEYS[1])") == []


def test_every_dlq_script_names_its_keys_from_keys() -> None:
    """Each lua/dlq*.lua (store and drop) passes the static check."""
    scripts = sorted(LUA.glob("dlq*.lua"))
    assert {path.name for path in scripts} >= {"dlq_store.lua", "dlq_drop.lua"}
    for path in scripts:
        source = path.read_text("utf-8")
        assert "redis.call(" in source
        assert key_problems(source) == [], path.name


# -- MONITOR ----------------------------------------------------------------------------

_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unquote(token: bytes) -> bytes:
    """One argument of a MONITOR line, as Redis quoted it (``sdscatrepr``)."""

    def one(match: re.Match[bytes]) -> bytes:
        c = match.group(1)
        if c.startswith(b"x"):
            return bytes([int(c[1:], 16)])
        return _ESCAPES.get(c, c)

    return re.sub(rb"\\(x[0-9a-fA-F]{2}|.)", one, token)


def _parse(line: bytes) -> tuple[str, list[bytes]]:
    """(who: ``lua`` or the client's address, the command's arguments) of a MONITOR line."""
    head, _, rest = line.partition(b"] ")
    who = head.partition(b"[")[2].split(b" ", 1)[1].decode()
    return who, [_unquote(token) for token in _TOKEN.findall(rest)]


@contextlib.contextmanager
def monitored(url: str, marker: str) -> Iterator[list[tuple[str, list[bytes]]]]:
    """Record the MONITOR lines of ``url``'s database until the block ends, parsed."""
    client = redis.Redis.from_url(url)
    db = f"[{client.connection_pool.connection_kwargs.get('db', 0)} ".encode()
    lines: list[bytes] = []
    stop = f"{marker}:stop".encode()
    try:
        monitor = client.monitor()
        monitor.__enter__()
    except redis.ResponseError as exc:
        client.close()
        pytest.skip(f"MONITOR refused by the test Redis: {exc}")

    def read() -> None:
        while True:
            raw = monitor.connection.read_response()
            if stop in raw:
                return
            if db in raw:
                lines.append(raw)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    recorded: list[tuple[str, list[bytes]]] = []
    try:
        yield recorded
    finally:
        client.echo(stop)
        reader.join(10)
        monitor.__exit__(None, None, None)
        client.close()
    assert not reader.is_alive(), "MONITOR never showed the end marker"
    recorded += [_parse(line) for line in lines]


def _keys_of(client: redis.Redis[bytes], args: list[bytes]) -> list[bytes]:
    """The keys of one command, as the server reads them (``COMMAND GETKEYS``)."""
    try:
        keys = client.command_getkeys(*args)
    except redis.ResponseError:  # a command without keys
        return []
    return [key.encode() if isinstance(key, str) else key for key in keys]


_Run = tuple[str, list[bytes], list[list[bytes]]]


def _scripts(
    client: redis.Redis[bytes], recorded: list[tuple[str, list[bytes]]], prefix: str
) -> list[_Run]:
    """Each EVALSHA naming ``prefix`` in its arguments: its script's file name, its KEYS
    and the commands it ran (the ``lua`` lines right after it). Fails on a script
    command naming ``prefix`` that follows no such EVALSHA."""
    names = {
        hashlib.sha1(path.read_bytes()).hexdigest().encode(): path.name
        for path in LUA.glob("*.lua")
    }
    runs: list[_Run] = []
    mine = False
    for who, args in recorded:
        if who != "lua":
            name = args[0].upper() if args else b""
            mine = name in (b"EVAL", b"EVALSHA") and any(prefix.encode() in a for a in args)
            if mine:
                runs.append((names.get(args[1], "?"), _keys_of(client, args), []))
        elif mine:
            runs[-1][2].append(args)
        else:
            assert not any(prefix.encode() in a for a in args), args
    return runs


def _exercise(dlq: RedisDeadLetterBackend) -> None:
    """store (expiring and trimming), get, list, count, delete and purge (one entry with
    a corrupt meta)."""
    now = time.time()
    old = [_letter("tasks.old", at=now - 7200 - i) for i in range(3)]
    for entry in old:
        dlq.store(entry, retention=86400.0, max_entries=100)
    capped = [_letter("tasks.capped", reason="error", at=now - 60 + i) for i in range(4)]
    results = [dlq.store(e, retention=3600.0, max_entries=2) for e in capped]
    assert results[0].expired == 3  # the first store with a 1-hour retention
    assert [r.trimmed for r in results] == [0, 0, 1, 1]
    assert dlq.get(capped[3].id) == capped[3]
    assert _ids(dlq.list(task_name="tasks.capped")) == [capped[3].id, capped[2].id]
    assert dlq.count(reason="error") == 2
    assert dlq.delete(capped[3].id) is True
    assert dlq.delete(capped[3].id) is False
    others = [_letter("tasks.other", at=_NOW - i) for i in range(3)]
    for entry in others:
        dlq.store(entry, retention=86400.0, max_entries=100)
    assert dlq.purge(task_name="tasks.other") == 3
    # A corrupt meta: the drop looks for the entry under every task name and reason.
    dlq._client.hset(dlq._key("meta"), capped[2].id, b"corrupt")
    assert dlq.purge() == 1
    assert dlq.count() == 0


@pytest.fixture
def cluster_cleanup(redis_url: str, key_prefix: str) -> Iterator[None]:
    """Remove this test's Cluster-named keys, which the ``key_prefix`` fixture misses."""
    yield
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{key_prefix}:dlq}}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["plain", "cluster"])
@pytest.mark.usefixtures("cluster_cleanup")
def test_every_key_a_script_touches_is_in_its_keys(
    redis_url: str, key_prefix: str, cluster: bool
) -> None:
    """MONITOR: every command each DLQ script ran touches only keys of its EVALSHA's
    KEYS; with Cluster names every key of every DLQ command is in one slot."""
    dlq = RedisDeadLetterBackend(redis_url, key_prefix, cluster=cluster)
    for path in LUA.glob("dlq*.lua"):  # so that no EVALSHA fails NOSCRIPT while recorded
        dlq._client.script_load(path.read_text("utf-8"))
    try:
        with monitored(redis_url, key_prefix) as recorded:
            _exercise(dlq)
    finally:
        dlq.close()
    client = redis.Redis.from_url(redis_url)
    try:
        runs = _scripts(client, recorded, key_prefix)
        # 10 stores; drops: of the expired, of 2 trims, of 2 deletes and of 2 purges.
        assert Counter(name for name, _, _ in runs) == {"dlq_store.lua": 10, "dlq_drop.lua": 7}
        for _, keys, commands in runs:
            assert commands, "a script run that made no command"
            for command in commands:
                touched = _keys_of(client, command)
                assert touched, command
                assert set(touched) <= set(keys), (command, keys)
        if cluster:
            mine = [args for who, args in recorded if any(key_prefix.encode() in a for a in args)]
            slots = {key_slot(key) for args in mine for key in _keys_of(client, args)}
            assert slots == {key_slot(f"{{{key_prefix}:dlq}}".encode())}
    finally:
        client.close()


# -- Cluster key names ------------------------------------------------------------------


def _written(redis_url: str, pattern: str) -> set[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return set(client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


@pytest.mark.usefixtures("cluster_cleanup")
def test_cluster_names_put_every_key_in_one_slot(redis_url: str, key_prefix: str) -> None:
    """cluster=True: every key written is under {<prefix>:dlq}, all in one slot, and
    store, list, count, delete and purge behave."""
    dlq = RedisDeadLetterBackend(redis_url, key_prefix, cluster=True)
    entries = [_letter("tasks.a", at=_NOW - i) for i in range(3)]
    entries += [_letter("tasks.b", reason="error", at=_NOW - 10 - i) for i in range(2)]
    try:
        for entry in entries:
            dlq.store(entry, retention=3600.0, max_entries=2)
        base = f"{{{key_prefix}:dlq}}"
        keys = _written(redis_url, f"{base}:*")
        assert _written(redis_url, f"{key_prefix}:*") == set()
        assert {key_slot(key) for key in keys} == {key_slot(base.encode())}
        a, b = entries[:2], entries[3:]
        expected = {f"{base}:{name}".encode() for name in ("meta", "all", "tasks")}
        expected |= {f"{base}:e:{e.id}".encode() for e in a + b}
        for task, reason in (("tasks.a", "max_retries"), ("tasks.b", "error")):
            expected |= {f"{base}:{name}".encode() for name in (f"t:{task}", f"r:{reason}")}
            expected.add(f"{base}:tr:{task}:{reason}".encode())
        expected.add(f"{base}:trimmed:tasks.a".encode())
        assert keys == expected
        assert _ids(dlq.list()) == [e.id for e in a + b]
        assert dlq.count(task_name="tasks.a") == 2
        assert dlq.count(reason="error") == 2
        assert dlq.get(b[0].id) == b[0]
        assert dlq.delete(a[0].id) is True
        assert dlq.purge(task_name="tasks.b") == 2
        assert _ids(dlq.list()) == [a[1].id]
        assert dlq.purge() == 1
    finally:
        dlq.close()


def test_plain_names_are_those_of_earlier_releases(redis_url: str, key_prefix: str) -> None:
    """Without Cluster the names are <prefix>:dlq:..., as before, so an upgrade reads them."""
    dlq = RedisDeadLetterBackend(redis_url, key_prefix)
    entries = [_letter(at=_NOW - i) for i in range(2)]
    try:
        for entry in entries:
            dlq.store(entry, retention=3600.0, max_entries=1)
        p, index = f"{key_prefix}:dlq", "tasks.upload:max_retries"
        expected = {f"{p}:{n}" for n in ("meta", "all", "tasks", "t:tasks.upload")}
        expected |= {f"{p}:r:max_retries", f"{p}:tr:{index}", f"{p}:trimmed:tasks.upload"}
        expected.add(f"{p}:e:{entries[0].id}")
        assert _written(redis_url, f"{key_prefix}:*") == {key.encode() for key in expected}
    finally:
        dlq.close()


# -- The two steps: drops that find an entry changed ------------------------------------


class _Meddling:
    """Wraps the backend's drop script: before each of the first ``times`` runs, sets the
    meta field of ``entry_id`` to a new value, as a concurrent write would (a corrupt
    one, so that the entry is then looked for everywhere)."""

    def __init__(self, dlq: RedisDeadLetterBackend, entry_id: str, times: int) -> None:
        self.dlq, self.entry_id, self.left, self.runs = dlq, entry_id, times, 0
        self.script = dlq._drop_script

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        if self.left > 0:
            self.left -= 1
            value = f"corrupt {self.left}"
            self.dlq._client.hset(self.dlq._key("meta"), self.entry_id, value)
        return self.script(*args, **kwargs)


@pytest.fixture
def dlq(redis_url: str, key_prefix: str) -> Iterator[RedisDeadLetterBackend]:
    backend = RedisDeadLetterBackend(redis_url, key_prefix)
    yield backend
    backend.close()


def test_a_delete_reads_again_an_entry_that_changed(dlq: RedisDeadLetterBackend) -> None:
    """A meta changed between delete's read and its drop: read again, then removed."""
    entry = _letter()
    dlq.store(entry, retention=3600.0, max_entries=100)
    dlq._drop_script = meddling = _Meddling(dlq, entry.id, times=2)
    assert dlq.delete(entry.id) is True
    assert meddling.runs == 3
    assert dlq.get(entry.id) is None
    assert dlq.count() == dlq.count(task_name="tasks.upload", reason="max_retries") == 0


@pytest.mark.parametrize("removal", ["delete", "purge"])
def test_an_entry_that_keeps_changing_is_removed_after_the_retries(
    dlq: RedisDeadLetterBackend, removal: str
) -> None:
    """delete and purge end even when an entry changes before every drop: the last
    attempt drops it whatever its meta, from every index."""
    kept, entry = _letter(at=_NOW - 1), _letter()
    dlq.store(kept, retention=3600.0, max_entries=100)
    dlq.store(entry, retention=3600.0, max_entries=100)
    dlq._drop_script = meddling = _Meddling(dlq, entry.id, times=1000)
    if removal == "delete":
        assert dlq.delete(entry.id) is True
        assert dlq.count() == 1
    else:
        assert dlq.purge() == 2
        assert dlq.count() == 0
    assert meddling.runs == RETRIES + 1
    assert dlq.get(entry.id) is None
    assert dlq.count(task_name="tasks.upload", reason="max_retries") == dlq.count()
    assert not dlq._client.hexists(dlq._key("meta"), entry.id)


def test_a_store_leaves_an_old_entry_that_changed_to_the_next_store(
    dlq: RedisDeadLetterBackend,
) -> None:
    """Trim candidates whose meta changed before the drop are neither dropped nor counted."""
    first, second = _letter(at=_NOW - 2), _letter(at=_NOW - 1)
    dlq.store(first, retention=3600.0, max_entries=100)
    dlq._drop_script = _Meddling(dlq, first.id, times=1)
    assert dlq.store(second, retention=3600.0, max_entries=1).trimmed == 0
    assert dlq.count() == 2  # one more than max_entries, until the next store
    assert dlq.store(_letter(at=_NOW), retention=3600.0, max_entries=1).trimmed == 2
    assert dlq.count() == 1


@pytest.mark.parametrize("counter", [None, b"7", b"not a number", b"007", b"1.5"])
def test_the_trimmed_counter_counts_or_starts_afresh(
    dlq: RedisDeadLetterBackend, counter: bytes | None
) -> None:
    """Each trimmed entry adds 1 to <base>:trimmed:<task>; a value INCRBY refuses is reset."""
    key = dlq._key("trimmed", "tasks.upload")
    if counter is not None:
        dlq._client.set(key, counter)
    for i in range(3):
        dlq.store(_letter(at=_NOW - 3 + i), retention=3600.0, max_entries=1)
    expected = 7 + 2 if counter == b"7" else 2
    assert dlq._client.get(key) == str(expected).encode()


def test_an_expired_entry_with_a_corrupt_meta_leaves_no_index_row(
    dlq: RedisDeadLetterBackend,
) -> None:
    """Expiry finds an entry with a corrupt meta under its JSON's task name and reason."""
    old = _letter("tasks.elsewhere", "worker_lost", at=time.time() - 7200)
    dlq.store(old, retention=86400.0, max_entries=100)
    dlq._client.hset(dlq._key("meta"), old.id, b"corrupt")
    dlq._client.srem(dlq._key("tasks"), "tasks.elsewhere")  # only the JSON names it
    assert dlq.store(_letter(), retention=3600.0, max_entries=100).expired == 1
    assert dlq.count(task_name="tasks.elsewhere") == 0
    assert dlq.count(task_name="tasks.elsewhere", reason="worker_lost") == 0
    assert dlq.count(reason="worker_lost") == 0
    assert dlq.count() == 1


def test_keys_of_another_type_do_not_stop_a_delete_or_purge(dlq: RedisDeadLetterBackend) -> None:
    """A task-name set and an index that are strings hold none of ours: the rest goes."""
    entry, other = _letter(), _letter("tasks.other", at=_NOW - 1)
    dlq.store(entry, retention=3600.0, max_entries=100)
    dlq.store(other, retention=3600.0, max_entries=100)
    dlq._client.hset(dlq._key("meta"), entry.id, b"\x1f")
    dlq._client.set(dlq._key("tasks"), "not a set")
    dlq._client.set(dlq._key("r", "error"), "not an index")
    assert dlq.delete(entry.id) is True
    assert dlq.get(entry.id) is None
    assert dlq.count(task_name="tasks.upload") == 0
    dlq._client.set(dlq._key("meta"), "not a hash")
    assert dlq.purge() == 1
    assert dlq.count() == dlq.count(task_name="tasks.other") == 0
    dlq._client.set(dlq._key("t", "tasks.broken"), "not an index")
    assert dlq.purge(task_name="tasks.broken") == 0
