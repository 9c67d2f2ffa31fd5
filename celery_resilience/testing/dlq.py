"""``DeadLetterBackendContract``: the suite every dead-letter queue backend passes."""

from __future__ import annotations

import random
import time
import uuid
from typing import TYPE_CHECKING, Any

from celery_resilience.backends.base import (
    DeadLetterBackend,
    Page,
)
from celery_resilience.deadletter import DeadLetter, RawBody

if TYPE_CHECKING:
    pass

from celery_resilience.testing.contract import _Contract

_KEEP = 7 * 86400.0  # the default retention, in seconds
_CAP = 10_000  # the default cap per task name
_NOW = float(int(time.time()))  # whole seconds: exact as floats and as millisecond scores


def _letter(
    task_name: str = "tasks.upload", reason: str = "max_retries", at: float = _NOW, **fields: Any
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


def _store(dlq: DeadLetterBackend, *entries: DeadLetter) -> None:
    for entry in entries:
        dlq.store(entry, retention=_KEEP, max_entries=_CAP)


def _ids(page: Page) -> list[str]:
    return [e.id for e in page.entries]


def _every_id(
    dlq: DeadLetterBackend, limit: int, cursor: str | None = None, **filters: Any
) -> list[str]:
    """Page through ``dlq`` from ``cursor``, ``limit`` a page; every id in the order seen."""
    seen: list[str] = []
    while True:
        page = dlq.list(limit=limit, cursor=cursor, **filters)
        assert len(page.entries) <= limit
        seen += _ids(page)
        if page.cursor is None:
            return seen
        cursor = page.cursor


def _newest_first(*entries: DeadLetter) -> list[str]:
    return [e.id for e in sorted(entries, key=lambda e: (e.last_failure_at, e.id), reverse=True)]


class DeadLetterBackendContract(_Contract):
    """The dead-letter queue backend contract: every built-in DLQ backend passes it.

    Subclass it in a test module as ``Test<YourBackend>`` and give it one fixture,
    ``backend_factory``: a callable that returns a new backend on a store that is
    empty at the start of each test (``functools.partial(dlq_backend_for, url)``
    with a fresh ``url`` builds it through its plugin, as an app does). The suite's
    ``dlq`` fixture calls it once per test and closes the backend afterwards. One
    test stores, pages and purges 10,000 entries.
    """

    _fixture_name = "dlq"

    def test_backend_satisfies_the_protocol(self, dlq: DeadLetterBackend) -> None:
        """The backend is a DeadLetterBackend, answers ping and reports no eviction."""
        assert isinstance(dlq, DeadLetterBackend)
        dlq.ping()
        assert (
            dlq.eviction_policy() is None
        )  # a store under test must not evict (Redis: noeviction)

    def test_every_field_survives_a_round_trip(self, dlq: DeadLetterBackend) -> None:
        """get and list return exactly what was stored, JSON arguments and raw bodies alike."""
        shown = _letter(
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
        raw = _letter(
            at=_NOW - 1,
            args=None,
            kwargs=None,
            body=RawBody(
                "gASVCwAAAAAAAABdlChdlH2UfZRlLg==", "application/x-python-serialize", "binary"
            ),
            args_repr="(datetime.datetime(2024, 1, 2, 0, 0),)",
            reason="error",
        )
        _store(dlq, shown, raw)
        assert dlq.get(shown.id) == shown
        assert dlq.get(raw.id) == raw
        assert dlq.list().entries == [shown, raw]

    def test_get_of_an_unknown_id_is_none(self, dlq: DeadLetterBackend) -> None:
        """An id never stored (or already removed) gives None, not an error."""
        assert dlq.get(uuid.uuid4().hex) is None

    def test_list_is_newest_first(self, dlq: DeadLetterBackend) -> None:
        """Entries come back by last failure time, newest first, whatever the storing order."""
        entries = [_letter(at=_NOW - age) for age in (30, 5, 120, 0, 60)]
        _store(dlq, *entries)
        assert _ids(dlq.list()) == _newest_first(*entries)
        assert dlq.list().cursor is None

    def test_list_and_count_filter_by_task_name_and_reason(self, dlq: DeadLetterBackend) -> None:
        """task_name, reason and both together select the same entries in list and count."""
        a_retries = _letter("tasks.a", "max_retries", at=_NOW - 1)
        a_error = _letter("tasks.a", "error", at=_NOW - 2)
        b_retries = _letter("tasks.b", "max_retries", at=_NOW - 3)
        b_lost = _letter("tasks.b", "worker_lost", at=_NOW - 4)
        _store(dlq, a_retries, a_error, b_retries, b_lost)
        cases: list[tuple[dict[str, Any], list[DeadLetter]]] = [
            ({}, [a_retries, a_error, b_retries, b_lost]),
            ({"task_name": "tasks.a"}, [a_retries, a_error]),
            ({"reason": "max_retries"}, [a_retries, b_retries]),
            ({"task_name": "tasks.b", "reason": "worker_lost"}, [b_lost]),
            ({"task_name": "tasks.a", "reason": "worker_lost"}, []),
            ({"task_name": "tasks.nope"}, []),
        ]
        for filters, expected in cases:
            assert _ids(dlq.list(**filters)) == [e.id for e in expected], filters
            assert dlq.count(**filters) == len(expected), filters

    def test_paging_never_repeats_or_skips_even_with_identical_times(
        self, dlq: DeadLetterBackend
    ) -> None:
        """25 entries, 12 failing in one millisecond, read 10 a page: each seen once, in order."""
        ties = [_letter(at=_NOW - 5.5) for _ in range(12)]  # both page breaks fall among these
        entries = ties + [_letter(at=_NOW - i) for i in range(13)]
        random.shuffle(entries)
        _store(dlq, *entries)
        pages: list[list[str]] = []
        cursor = None
        while True:
            page = dlq.list(limit=10, cursor=cursor)
            pages.append(_ids(page))
            if page.cursor is None:
                break
            cursor = page.cursor
        assert [len(p) for p in pages] == [10, 10, 5]
        assert [entry_id for page in pages for entry_id in page] == _newest_first(*entries)

    def test_paging_with_a_filter_uses_the_filter_on_every_page(
        self, dlq: DeadLetterBackend
    ) -> None:
        """A cursor from a filtered list continues the same filtered listing."""
        wanted = [_letter("tasks.a", at=_NOW - (i // 3)) for i in range(9)]
        others = [_letter("tasks.b", at=_NOW - (i // 3)) for i in range(9)]
        _store(dlq, *wanted, *others)
        assert _every_id(dlq, 4, task_name="tasks.a") == _newest_first(*wanted)
        assert _every_id(dlq, 2, task_name="tasks.b", reason="max_retries") == _newest_first(
            *others
        )

    def test_paging_stays_exact_while_entries_are_added_and_removed(
        self, dlq: DeadLetterBackend
    ) -> None:
        """New entries and deleted ones between pages do not shift the entries still to come."""
        entries = [_letter(at=_NOW - 100 - (i // 2)) for i in range(20)]
        _store(dlq, *entries)
        first = dlq.list(limit=8)
        _store(dlq, _letter(at=_NOW), _letter(at=_NOW - 50))  # newer: before the cursor
        for entry_id in _ids(first)[:3]:
            assert dlq.delete(entry_id)  # already read
        assert first.cursor is not None
        rest = _every_id(dlq, 8, cursor=first.cursor)
        assert _ids(first) + rest == _newest_first(*entries)

    def test_newer_than_hides_older_entries(self, dlq: DeadLetterBackend) -> None:
        """Entries whose last failure is not after newer_than are neither listed nor counted."""
        old = _letter(at=_NOW - 3600)
        edge = _letter(at=_NOW - 60)
        new = _letter(at=_NOW - 1)
        _store(dlq, old, edge, new)
        assert _ids(dlq.list(newer_than=_NOW - 60)) == [new.id]
        assert dlq.count(newer_than=_NOW - 60) == 1
        assert _ids(dlq.list(newer_than=_NOW - 61)) == [new.id, edge.id]
        assert dlq.count(newer_than=_NOW - 61, task_name="tasks.upload") == 2
        assert dlq.count() == 3

    def test_a_write_removes_entries_older_than_the_retention(self, dlq: DeadLetterBackend) -> None:
        """Storing with retention R drops every entry (any task) last failed over R ago."""
        now = time.time()
        stale = [_letter("tasks.a", at=now - 7200), _letter("tasks.b", at=now - 3601)]
        kept = _letter("tasks.a", at=now - 60)
        _store(dlq, *stale, kept)
        fresh = _letter("tasks.c", at=now)
        result = dlq.store(fresh, retention=3600.0, max_entries=_CAP)
        assert (result.expired, result.trimmed) == (2, 0)
        assert _ids(dlq.list()) == [fresh.id, kept.id]
        assert all(dlq.get(e.id) is None for e in stale)

    def test_the_cap_per_task_name_trims_the_oldest_first(self, dlq: DeadLetterBackend) -> None:
        """Past max_entries, a write drops its task's oldest entries, counts them, spares others."""
        others = [_letter("tasks.other", at=_NOW - 1000 - i) for i in range(3)]
        _store(dlq, *others)
        mine = [_letter("tasks.capped", at=_NOW - 100 + i) for i in range(6)]
        results = [dlq.store(e, retention=_KEEP, max_entries=3) for e in mine]
        assert [(r.trimmed, r.expired) for r in results] == [(0, 0)] * 3 + [(1, 0)] * 3
        assert _ids(dlq.list(task_name="tasks.capped")) == _newest_first(*mine[3:])
        assert _ids(dlq.list(task_name="tasks.other")) == _newest_first(*others)
        shrink = dlq.store(_letter("tasks.capped", at=_NOW), retention=_KEEP, max_entries=1)
        assert shrink.trimmed == 3
        assert dlq.count(task_name="tasks.capped") == 1

    def test_delete_removes_one_entry_and_says_whether_it_was_there(
        self, dlq: DeadLetterBackend
    ) -> None:
        """delete is True once, then False; the entry is gone from get, list and count."""
        doomed, kept = _letter("tasks.a", "error"), _letter("tasks.a", "error", at=_NOW - 1)
        _store(dlq, doomed, kept)
        assert dlq.delete(doomed.id) is True
        assert dlq.delete(doomed.id) is False
        assert dlq.delete(uuid.uuid4().hex) is False
        assert dlq.get(doomed.id) is None
        assert _ids(dlq.list()) == [kept.id]
        assert dlq.count(task_name="tasks.a", reason="error") == 1

    def test_purge_removes_all_or_one_task_names_entries(self, dlq: DeadLetterBackend) -> None:
        """purge(task_name) removes that task's entries only; purge() the rest; both count."""
        a = [_letter("tasks.a", at=_NOW - i) for i in range(4)]
        b = [_letter("tasks.b", reason="error", at=_NOW - i) for i in range(3)]
        _store(dlq, *a, *b)
        assert dlq.purge(task_name="tasks.a") == 4
        assert _ids(dlq.list()) == _newest_first(*b)
        assert dlq.count(task_name="tasks.a") == 0
        assert dlq.purge(task_name="tasks.a") == 0
        assert dlq.purge() == 3
        assert dlq.count() == 0
        assert dlq.list() == Page([], None)

    def test_ten_thousand_entries_are_stored_counted_paged_and_purged(
        self, dlq: DeadLetterBackend
    ) -> None:
        """10,000 entries over 10 task names: count, every id paged exactly once, purge to 0."""
        now = time.time()
        entries = [
            _letter(f"tasks.t{i % 10}", ("error", "max_retries")[i % 2], at=now - (i // 2) / 1000)
            for i in range(10_000)
        ]
        started = time.perf_counter()
        _store(dlq, *entries)
        stored = time.perf_counter()
        assert dlq.count() == 10_000
        assert dlq.count(task_name="tasks.t3") == 1000
        paging = time.perf_counter()
        seen = _every_id(dlq, 500)
        paged = time.perf_counter()
        assert len(seen) == 10_000
        assert set(seen) == {e.id for e in entries}
        assert dlq.purge() == 10_000
        purged = time.perf_counter()
        assert dlq.count() == 0
        print(
            f"\n{type(dlq).__name__}: store 10,000 {stored - started:.2f} s, page them 500 a page "
            f"{paged - paging:.2f} s, purge {purged - paged:.2f} s"
        )
