"""The dead-letter queue backend contract, run against every DLQ backend.

memory:// and redis:// are built in; sqlite:/// is the example third-party plugin in
tests/plugins/sqlite_dlq.py, loaded through a real ``celery_resilience`` entry point.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from celery_resilience.backends.base import DeadLetterBackend, Page, score_of
from celery_resilience.deadletter import DeadLetter, MalformedEntry, RawBody
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.runtime import build_dlq_backend
from celery_resilience.settings import load_settings

KEEP = 7 * 86400.0  # the default retention, in seconds
CAP = 10_000  # the default cap per task name
NOW = float(int(time.time()))  # whole seconds: exact as floats and as millisecond scores
STORES_DOCUMENTS = ["redis", "sqlite"]  # backends whose stored entries can be undecodable


@contextmanager
def entry_point(tmp_path: Path, name: str, module: str) -> Iterator[None]:
    """Install ``module`` as plugin ``name`` of the celery_resilience group, as pip would."""
    dist = tmp_path / f"celery_resilience_{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: celery-resilience-{name}\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[celery_resilience]\n{name} = {module}\n")
    sys.path.insert(0, str(tmp_path))
    get_plugin_manager.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        get_plugin_manager.cache_clear()


@pytest.fixture(params=["memory", "redis", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which DLQ backend the test runs against."""
    return str(request.param)


@pytest.fixture
def dlq(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> Iterator[DeadLetterBackend]:
    """A DLQ backend built the way the library builds it: through the plugin hook."""
    with ExitStack() as stack:
        if kind == "memory":
            url = f"memory://dlq-{uuid.uuid4().hex[:8]}"
        elif kind == "redis":
            url = str(request.getfixturevalue("redis_url"))
        else:
            url = f"sqlite:///{tmp_path / 'dlq.db'}"
            stack.enter_context(entry_point(tmp_path, "sqlite_dlq", "tests.plugins.sqlite_dlq"))
        settings = load_settings(
            {"resilience_url": url, "resilience_key_prefix": key_prefix}, environ={}
        )
        backend = build_dlq_backend(get_plugin_manager(), settings)
        stack.callback(backend.close)
        yield backend


def letter(
    task_name: str = "tasks.upload", reason: str = "max_retries", at: float = NOW, **fields: Any
) -> DeadLetter:
    """A dead letter of ``task_name`` that last failed at ``at`` (Unix seconds)."""
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "task_id": str(uuid.uuid4()),
        "task_name": task_name,
        "reason": reason,
        "exception_type": "builtins.ConnectionError",
        "exception_message": "upstream refused",
        "traceback": "Traceback (most recent call last):\nConnectionError: upstream refused\n",
        "attempts": 3,
        "deliveries": 1,
        "first_failure_at": at - 10,
        "last_failure_at": at,
        "args": [1],
        "kwargs": {},
    }
    values.update(fields)
    return DeadLetter(**values)


def store(dlq: DeadLetterBackend, *entries: DeadLetter) -> None:
    for entry in entries:
        dlq.store(entry, retention=KEEP, max_entries=CAP)


def ids(page: Page) -> list[str]:
    return [e.id for e in page.entries]


def every_id(
    dlq: DeadLetterBackend, limit: int, cursor: str | None = None, **filters: Any
) -> list[str]:
    """Page through ``dlq`` from ``cursor``, ``limit`` a page; every id in the order seen."""
    seen: list[str] = []
    while True:
        page = dlq.list(limit=limit, cursor=cursor, **filters)
        assert len(page.entries) <= limit
        seen += ids(page)
        if page.cursor is None:
            return seen
        cursor = page.cursor


def newest_first(*entries: DeadLetter) -> list[str]:
    return [e.id for e in sorted(entries, key=lambda e: (e.last_failure_at, e.id), reverse=True)]


def test_sqlite_backend_is_loaded_through_its_entry_point(tmp_path: Path) -> None:
    """The example plugin serves sqlite:/// only once its entry point is installed."""
    from tests.plugins import sqlite_dlq

    settings = load_settings({"resilience_url": f"sqlite:///{tmp_path / 'x.db'}"}, environ={})
    hook = get_plugin_manager().hook.resilience_dlq_backend
    assert hook(url=settings.dlq_url, settings=settings) is None
    with entry_point(tmp_path, "sqlite_dlq", "tests.plugins.sqlite_dlq"):
        pm = get_plugin_manager()
        assert pm.get_plugin("sqlite_dlq") is sqlite_dlq
        backend = build_dlq_backend(pm, settings)
        assert isinstance(backend, sqlite_dlq.SQLiteDeadLetterBackend)
        backend.close()


def test_backend_satisfies_the_protocol(dlq: DeadLetterBackend) -> None:
    """Each backend is a DeadLetterBackend, answers ping and reports no eviction here."""
    assert isinstance(dlq, DeadLetterBackend)
    dlq.ping()
    assert dlq.eviction_policy() is None  # the test Redis runs with noeviction


def test_every_field_survives_a_round_trip(dlq: DeadLetterBackend) -> None:
    """get and list return exactly what was stored, JSON arguments and raw bodies alike."""
    shown = letter(
        args=[1, "two", [3.5, None], {"nested": True}],
        kwargs={"ünïcode": "ñ", "empty": []},
        args_repr="(1, 'two', [3.5, None], {'nested': True})",
        kwargs_repr="{'ünïcode': 'ñ', 'empty': []}",
        argnames=["a", "b", "c", "d"],
        queue="uploads",
        exchange="uploads",
        routing_key="uploads.high",
        priority=7,
        lock_key="upload:1:abc",
        hostname="worker1@pod-7",
        replays=2,
        deliveries=4,
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: ✗\n',
    )
    raw = letter(
        at=NOW - 1,
        args=None,
        kwargs=None,
        body=RawBody(
            "gASVCwAAAAAAAABdlChdlH2UfZRlLg==", "application/x-python-serialize", "binary"
        ),
        args_repr="(datetime.datetime(2024, 1, 2, 0, 0),)",
        reason="error",
    )
    store(dlq, shown, raw)
    assert dlq.get(shown.id) == shown
    assert dlq.get(raw.id) == raw
    assert dlq.list().entries == [shown, raw]


def test_get_of_an_unknown_id_is_none(dlq: DeadLetterBackend) -> None:
    """An id never stored (or already removed) gives None, not an error."""
    assert dlq.get(uuid.uuid4().hex) is None


def test_list_is_newest_first(dlq: DeadLetterBackend) -> None:
    """Entries come back by last failure time, newest first, whatever the storing order."""
    entries = [letter(at=NOW - age) for age in (30, 5, 120, 0, 60)]
    store(dlq, *entries)
    assert ids(dlq.list()) == newest_first(*entries)
    assert dlq.list().cursor is None


def test_list_and_count_filter_by_task_name_and_reason(dlq: DeadLetterBackend) -> None:
    """task_name, reason and both together select the same entries in list and count."""
    a_retries = letter("tasks.a", "max_retries", at=NOW - 1)
    a_error = letter("tasks.a", "error", at=NOW - 2)
    b_retries = letter("tasks.b", "max_retries", at=NOW - 3)
    b_lost = letter("tasks.b", "worker_lost", at=NOW - 4)
    store(dlq, a_retries, a_error, b_retries, b_lost)
    cases: list[tuple[dict[str, Any], list[DeadLetter]]] = [
        ({}, [a_retries, a_error, b_retries, b_lost]),
        ({"task_name": "tasks.a"}, [a_retries, a_error]),
        ({"reason": "max_retries"}, [a_retries, b_retries]),
        ({"task_name": "tasks.b", "reason": "worker_lost"}, [b_lost]),
        ({"task_name": "tasks.a", "reason": "worker_lost"}, []),
        ({"task_name": "tasks.nope"}, []),
    ]
    for filters, expected in cases:
        assert ids(dlq.list(**filters)) == [e.id for e in expected], filters
        assert dlq.count(**filters) == len(expected), filters


def test_paging_never_repeats_or_skips_even_with_identical_times(dlq: DeadLetterBackend) -> None:
    """25 entries, 12 failing in the same millisecond, read 10 a page: each seen once, in order."""
    ties = [letter(at=NOW - 5.5) for _ in range(12)]  # both page breaks fall among these
    entries = ties + [letter(at=NOW - i) for i in range(13)]
    random.shuffle(entries)
    store(dlq, *entries)
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = dlq.list(limit=10, cursor=cursor)
        pages.append(ids(page))
        if page.cursor is None:
            break
        cursor = page.cursor
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [entry_id for page in pages for entry_id in page] == newest_first(*entries)


def test_paging_with_a_filter_uses_the_filter_on_every_page(dlq: DeadLetterBackend) -> None:
    """A cursor from a filtered list continues the same filtered listing."""
    wanted = [letter("tasks.a", at=NOW - (i // 3)) for i in range(9)]
    others = [letter("tasks.b", at=NOW - (i // 3)) for i in range(9)]
    store(dlq, *wanted, *others)
    assert every_id(dlq, 4, task_name="tasks.a") == newest_first(*wanted)
    assert every_id(dlq, 2, task_name="tasks.b", reason="max_retries") == newest_first(*others)


def test_paging_stays_exact_while_entries_are_added_and_removed(dlq: DeadLetterBackend) -> None:
    """New entries and deleted ones between pages do not shift the entries still to come."""
    entries = [letter(at=NOW - 100 - (i // 2)) for i in range(20)]
    store(dlq, *entries)
    first = dlq.list(limit=8)
    store(dlq, letter(at=NOW), letter(at=NOW - 50))  # newer: before the cursor
    for entry_id in ids(first)[:3]:
        assert dlq.delete(entry_id)  # already read
    assert first.cursor is not None
    rest = every_id(dlq, 8, cursor=first.cursor)
    assert ids(first) + rest == newest_first(*entries)


def test_newer_than_hides_older_entries(dlq: DeadLetterBackend) -> None:
    """Entries whose last failure is not after newer_than are neither listed nor counted."""
    old = letter(at=NOW - 3600)
    edge = letter(at=NOW - 60)
    new = letter(at=NOW - 1)
    store(dlq, old, edge, new)
    assert ids(dlq.list(newer_than=NOW - 60)) == [new.id]
    assert dlq.count(newer_than=NOW - 60) == 1
    assert ids(dlq.list(newer_than=NOW - 61)) == [new.id, edge.id]
    assert dlq.count(newer_than=NOW - 61, task_name="tasks.upload") == 2
    assert dlq.count() == 3


def test_a_write_removes_entries_older_than_the_retention(dlq: DeadLetterBackend) -> None:
    """Storing with retention R drops every entry (any task) last failed over R ago."""
    now = time.time()
    stale = [letter("tasks.a", at=now - 7200), letter("tasks.b", at=now - 3601)]
    kept = letter("tasks.a", at=now - 60)
    store(dlq, *stale, kept)
    fresh = letter("tasks.c", at=now)
    result = dlq.store(fresh, retention=3600.0, max_entries=CAP)
    assert (result.expired, result.trimmed) == (2, 0)
    assert ids(dlq.list()) == [fresh.id, kept.id]
    assert all(dlq.get(e.id) is None for e in stale)


def test_the_cap_per_task_name_trims_the_oldest_first(dlq: DeadLetterBackend) -> None:
    """Past max_entries, a write drops its task's oldest entries, counts them, spares others."""
    others = [letter("tasks.other", at=NOW - 1000 - i) for i in range(3)]
    store(dlq, *others)
    mine = [letter("tasks.capped", at=NOW - 100 + i) for i in range(6)]
    results = [dlq.store(e, retention=KEEP, max_entries=3) for e in mine]
    assert [(r.trimmed, r.expired) for r in results] == [(0, 0)] * 3 + [(1, 0)] * 3
    assert ids(dlq.list(task_name="tasks.capped")) == newest_first(*mine[3:])
    assert ids(dlq.list(task_name="tasks.other")) == newest_first(*others)
    shrink = dlq.store(letter("tasks.capped", at=NOW), retention=KEEP, max_entries=1)
    assert shrink.trimmed == 3
    assert dlq.count(task_name="tasks.capped") == 1


def test_delete_removes_one_entry_and_says_whether_it_was_there(dlq: DeadLetterBackend) -> None:
    """delete is True once, then False; the entry is gone from get, list and count."""
    doomed, kept = letter("tasks.a", "error"), letter("tasks.a", "error", at=NOW - 1)
    store(dlq, doomed, kept)
    assert dlq.delete(doomed.id) is True
    assert dlq.delete(doomed.id) is False
    assert dlq.delete(uuid.uuid4().hex) is False
    assert dlq.get(doomed.id) is None
    assert ids(dlq.list()) == [kept.id]
    assert dlq.count(task_name="tasks.a", reason="error") == 1


def test_purge_removes_all_or_one_task_names_entries(dlq: DeadLetterBackend) -> None:
    """purge(task_name) removes that task's entries only; purge() the rest; both count."""
    a = [letter("tasks.a", at=NOW - i) for i in range(4)]
    b = [letter("tasks.b", reason="error", at=NOW - i) for i in range(3)]
    store(dlq, *a, *b)
    assert dlq.purge(task_name="tasks.a") == 4
    assert ids(dlq.list()) == newest_first(*b)
    assert dlq.count(task_name="tasks.a") == 0
    assert dlq.purge(task_name="tasks.a") == 0
    assert dlq.purge() == 3
    assert dlq.count() == 0
    assert dlq.list() == Page([], None)


@pytest.fixture
def write_undecodable(
    kind: str, request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> Callable[[DeadLetter, str], None]:
    """Write garbage as the stored document of ``entry``, indexed as the backend indexes it.

    Only for stores that keep documents: memory:// keeps DeadLetter objects.
    """
    assert kind in STORES_DOCUMENTS

    def write(entry: DeadLetter, garbage: str) -> None:
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
            p, t, r = key_prefix, entry.task_name, entry.reason
            client.set(f"{p}:dlq:e:{entry.id}", garbage)
            indexes = ("all", f"t:{t}", f"r:{r}", f"tr:{t}:{r}")
            for index in indexes:
                client.zadd(f"{p}:dlq:{index}", {entry.id: score_of(entry)})
            client.sadd(f"{p}:dlq:tasks", t)
            client.hset(f"{p}:dlq:meta", entry.id, f"{t}\x1f{r}")
            client.close()
        else:
            with sqlite3.connect(tmp_path / "dlq.db") as db:
                row = (entry.id, entry.task_name, entry.reason, score_of(entry), garbage)
                db.execute("INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?)", row)
            db.close()

    return write


@pytest.mark.parametrize("kind", STORES_DOCUMENTS)
@pytest.mark.parametrize("garbage", ["{not json", '["a", "list"]', '{"id": "x"}'])
def test_an_undecodable_entry_fails_get_and_is_skipped_by_list(
    dlq: DeadLetterBackend, write_undecodable: Callable[[DeadLetter, str], None], garbage: str
) -> None:
    """get raises MalformedEntry naming the entry; list and paging skip it, losing nothing."""
    newer, older = letter(at=NOW - 1), letter(at=NOW - 3)
    bad = letter(at=NOW - 2)
    store(dlq, newer, older)
    write_undecodable(bad, garbage)
    with pytest.raises(MalformedEntry, match=bad.id):
        dlq.get(bad.id)
    assert ids(dlq.list()) == [newer.id, older.id]
    assert ids(dlq.list(task_name="tasks.upload", reason="max_retries")) == [newer.id, older.id]
    assert every_id(dlq, 1) == [newer.id, older.id]


@pytest.mark.parametrize("kind", STORES_DOCUMENTS)
def test_an_undecodable_entry_can_be_deleted_from_every_view(
    dlq: DeadLetterBackend, write_undecodable: Callable[[DeadLetter, str], None]
) -> None:
    """Deleting an entry that cannot be decoded removes it from counts by task and reason too."""
    good, bad = letter(at=NOW - 1), letter(at=NOW - 2)
    store(dlq, good)
    write_undecodable(bad, "{not json")
    assert dlq.delete(bad.id) is True
    assert dlq.get(bad.id) is None
    assert dlq.count() == 1
    assert dlq.count(task_name="tasks.upload") == 1
    assert dlq.count(reason="max_retries") == 1
    assert dlq.count(task_name="tasks.upload", reason="max_retries") == 1


def test_ten_thousand_entries_are_stored_counted_paged_and_purged(
    dlq: DeadLetterBackend, kind: str
) -> None:
    """10,000 entries over 10 task names: count, every id paged exactly once, purge to 0."""
    now = time.time()
    entries = [
        letter(f"tasks.t{i % 10}", ("error", "max_retries")[i % 2], at=now - (i // 2) / 1000)
        for i in range(10_000)
    ]
    started = time.perf_counter()
    store(dlq, *entries)
    stored = time.perf_counter()
    assert dlq.count() == 10_000
    assert dlq.count(task_name="tasks.t3") == 1000
    paging = time.perf_counter()
    seen = every_id(dlq, 500)
    paged = time.perf_counter()
    assert len(seen) == 10_000
    assert set(seen) == {e.id for e in entries}
    assert dlq.purge() == 10_000
    purged = time.perf_counter()
    assert dlq.count() == 0
    print(
        f"\n{kind}: store 10,000 {stored - started:.2f} s, page them 500 a page "
        f"{paged - paging:.2f} s, purge {purged - paged:.2f} s"
    )


def _members(url: str, prefix: str, entry: DeadLetter) -> list[str]:
    """The DLQ keys that still name ``entry`` (its document, meta field, index members)."""
    import redis

    client = redis.Redis.from_url(url)
    p, t, r = prefix, entry.task_name, entry.reason
    left = [
        index
        for index in ("all", f"t:{t}", f"r:{r}", f"tr:{t}:{r}")
        if client.type(f"{p}:dlq:{index}") == b"zset"
        and client.zscore(f"{p}:dlq:{index}", entry.id) is not None
    ]
    left += ["meta"] if client.hexists(f"{p}:dlq:meta", entry.id) else []
    left += ["entry"] if client.exists(f"{p}:dlq:e:{entry.id}") else []
    client.close()
    return left


@pytest.mark.parametrize("kind", ["redis"])
@pytest.mark.parametrize("meta", [b"no separator", b"", b"\xff\xfe", b"\x1f"])
@pytest.mark.parametrize("removal", ["delete", "purge", "purge one task", "trim"])
def test_an_entry_with_a_corrupt_meta_leaves_no_index_member(
    dlq: DeadLetterBackend, redis_url: str, key_prefix: str, meta: bytes, removal: str
) -> None:
    """delete, purge and the cap's trim remove an entry whose meta is corrupt from every index."""
    import redis

    doomed, other = letter(at=NOW - 2), letter(at=NOW - 1)
    store(dlq, doomed, other)
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{key_prefix}:dlq:meta", doomed.id, meta)
    client.close()

    if removal == "delete":
        assert dlq.delete(doomed.id) is True
    elif removal == "purge":
        assert dlq.purge() == 2
    elif removal == "purge one task":
        assert dlq.purge(task_name="tasks.upload") == 2
    else:
        dlq.store(letter(at=NOW), retention=KEEP, max_entries=2)  # trims the oldest

    assert _members(redis_url, key_prefix, doomed) == []
    assert dlq.count() == dlq.count(task_name="tasks.upload") == len(ids(dlq.list()))
    assert dlq.count(reason="max_retries") == dlq.count(
        task_name="tasks.upload", reason="max_retries"
    )
    assert dlq.count(reason="max_retries") == dlq.count()


@pytest.mark.parametrize("kind", ["redis"])
def test_a_store_over_a_key_of_another_type_writes_nothing(
    dlq: DeadLetterBackend, redis_url: str, key_prefix: str
) -> None:
    """A per-reason index that is not a sorted set: store fails before its first write."""
    import redis

    from celery_resilience.errors import BackendUnavailable

    client = redis.Redis.from_url(redis_url)
    client.set(f"{key_prefix}:dlq:r:max_retries", "not an index")
    client.close()
    entry = letter()

    with pytest.raises(BackendUnavailable, match="holds a string, not a zset; nothing was written"):
        store(dlq, entry)

    assert _members(redis_url, key_prefix, entry) == []
    assert dlq.count() == 0
