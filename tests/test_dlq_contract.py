"""The dead-letter queue backend contract (``celery_resilience.testing``), run against
every DLQ backend, each built the way the library builds it: through the plugin hook.

memory:// and redis:// are built in; sqlite:/// is the example third-party plugin in
tests/plugins/sqlite_dlq.py, loaded through a real ``celery_resilience`` entry point.
"""

from __future__ import annotations

import functools
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_resilience.backends.base import DeadLetterBackend, score_of
from celery_resilience.deadletter import DeadLetter, MalformedEntry
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.runtime import build_dlq_backend
from celery_resilience.settings import load_settings

# The suite's own (private) helpers serve the tests below that only some backends run.
from celery_resilience.testing import DeadLetterBackendContract, dlq_backend_for
from celery_resilience.testing.dlq import _KEEP, _NOW, _every_id, _ids, _letter, _store
from tests.support.entry_points import entry_point

Factory = Callable[..., DeadLetterBackend]


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


class TestMemoryDeadLetterBackend(DeadLetterBackendContract):
    @pytest.fixture
    def backend_factory(self) -> Factory:
        """memory:// on a store of this test alone."""
        return functools.partial(dlq_backend_for, f"memory://dlq-{uuid.uuid4().hex[:8]}")


class StoresDocuments:
    """Tests of a backend that stores documents, which can be undecodable (memory://
    keeps DeadLetter objects): ``write_undecodable(entry, garbage)`` writes garbage as
    the stored document of ``entry``, indexed as the backend indexes it."""

    @pytest.mark.parametrize("garbage", ["{not json", '["a", "list"]', '{"id": "x"}'])
    def test_an_undecodable_entry_fails_get_and_is_skipped_by_list(
        self,
        dlq: DeadLetterBackend,
        write_undecodable: Callable[[DeadLetter, str], None],
        garbage: str,
    ) -> None:
        """get raises MalformedEntry naming the entry; list and paging skip it, losing nothing."""
        newer, older = _letter(at=_NOW - 1), _letter(at=_NOW - 3)
        bad = _letter(at=_NOW - 2)
        _store(dlq, newer, older)
        write_undecodable(bad, garbage)
        with pytest.raises(MalformedEntry, match=bad.id):
            dlq.get(bad.id)
        assert _ids(dlq.list()) == [newer.id, older.id]
        assert _ids(dlq.list(task_name="tasks.upload", reason="max_retries")) == [
            newer.id,
            older.id,
        ]
        assert _every_id(dlq, 1) == [newer.id, older.id]

    def test_an_undecodable_entry_can_be_deleted_from_every_view(
        self, dlq: DeadLetterBackend, write_undecodable: Callable[[DeadLetter, str], None]
    ) -> None:
        """Deleting an entry that cannot be decoded removes it from counts by task and reason."""
        good, bad = _letter(at=_NOW - 1), _letter(at=_NOW - 2)
        _store(dlq, good)
        write_undecodable(bad, "{not json")
        assert dlq.delete(bad.id) is True
        assert dlq.get(bad.id) is None
        assert dlq.count() == 1
        assert dlq.count(task_name="tasks.upload") == 1
        assert dlq.count(reason="max_retries") == 1
        assert dlq.count(task_name="tasks.upload", reason="max_retries") == 1


class TestRedisDeadLetterBackend(StoresDocuments, DeadLetterBackendContract):
    @pytest.fixture
    def backend_factory(self, redis_url: str, key_prefix: str) -> Factory:
        """The test Redis, under this test's key prefix (its keys are removed afterwards)."""
        return functools.partial(dlq_backend_for, redis_url, key_prefix)

    @pytest.fixture
    def write_undecodable(
        self, redis_url: str, key_prefix: str
    ) -> Callable[[DeadLetter, str], None]:
        def write(entry: DeadLetter, garbage: str) -> None:
            import redis

            client = redis.Redis.from_url(redis_url)
            p, t, r = key_prefix, entry.task_name, entry.reason
            client.set(f"{p}:dlq:e:{entry.id}", garbage)
            indexes = ("all", f"t:{t}", f"r:{r}", f"tr:{t}:{r}")
            for index in indexes:
                client.zadd(f"{p}:dlq:{index}", {entry.id: score_of(entry)})
            client.sadd(f"{p}:dlq:tasks", t)
            client.hset(f"{p}:dlq:meta", entry.id, f"{t}\x1f{r}")
            client.close()

        return write

    @pytest.mark.parametrize("meta", [b"no separator", b"", b"\xff\xfe", b"\x1f"])
    @pytest.mark.parametrize("removal", ["delete", "purge", "purge one task", "trim"])
    def test_an_entry_with_a_corrupt_meta_leaves_no_index_member(
        self, dlq: DeadLetterBackend, redis_url: str, key_prefix: str, meta: bytes, removal: str
    ) -> None:
        """delete, purge and the cap's trim remove an entry with a corrupt meta from every index."""
        import redis

        doomed, other = _letter(at=_NOW - 2), _letter(at=_NOW - 1)
        _store(dlq, doomed, other)
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
            dlq.store(_letter(at=_NOW), retention=_KEEP, max_entries=2)  # trims the oldest

        assert _members(redis_url, key_prefix, doomed) == []
        assert dlq.count() == dlq.count(task_name="tasks.upload") == len(_ids(dlq.list()))
        assert dlq.count(reason="max_retries") == dlq.count(
            task_name="tasks.upload", reason="max_retries"
        )
        assert dlq.count(reason="max_retries") == dlq.count()

    def test_a_store_over_a_key_of_another_type_writes_nothing(
        self, dlq: DeadLetterBackend, redis_url: str, key_prefix: str
    ) -> None:
        """A per-reason index that is not a sorted set: _store fails before its first write."""
        import redis

        from celery_resilience.errors import BackendUnavailable

        client = redis.Redis.from_url(redis_url)
        client.set(f"{key_prefix}:dlq:r:max_retries", "not an index")
        client.close()
        entry = _letter()

        with pytest.raises(
            BackendUnavailable, match="holds a string, not a zset; nothing was written"
        ):
            _store(dlq, entry)

        assert _members(redis_url, key_prefix, entry) == []
        assert dlq.count() == 0


class TestSQLiteDeadLetterBackend(StoresDocuments, DeadLetterBackendContract):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Iterator[Factory]:
        """sqlite:/// in this test's directory, its plugin installed by entry point."""
        with entry_point(tmp_path, "sqlite_dlq", "tests.plugins.sqlite_dlq"):
            yield functools.partial(dlq_backend_for, f"sqlite:///{tmp_path / 'dlq.db'}")

    @pytest.fixture
    def write_undecodable(self, tmp_path: Path) -> Callable[[DeadLetter, str], None]:
        def write(entry: DeadLetter, garbage: str) -> None:
            with sqlite3.connect(tmp_path / "dlq.db") as db:
                row = (entry.id, entry.task_name, entry.reason, score_of(entry), garbage)
                db.execute("INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?)", row)
            db.close()

        return write
