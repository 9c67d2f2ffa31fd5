"""An example third-party plugin: a dead-letter queue in SQLite for ``sqlite:///path`` URLs.

Installed with pip, a package like this one declares itself in ``pyproject.toml``::

    [project.entry-points.celery_resilience]
    sqlite_dlq = "tests.plugins.sqlite_dlq"

and users select it with ``app.conf.resilience_dlq_url = "sqlite:////var/lib/app/dlq.db"``
(three slashes then the path, as in SQLAlchemy: four for an absolute path). The tests
load it through that entry point and run the shared DLQ contract suite against it
(tests/test_dlq_contract.py).

Each entry is one row: the indexed columns ``list`` filters and sorts on, and the
entry itself as ``DeadLetter.to_json()``. The database file is the namespace, so
``resilience_key_prefix`` is not used.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from celery_resilience import hookimpl
from celery_resilience.backends.base import (
    Page,
    StoreResult,
    decode_cursor,
    encode_cursor,
    score_of,
    to_score,
)
from celery_resilience.deadletter import DeadLetter, MalformedEntry
from celery_resilience.errors import BackendUnavailable
from celery_resilience.settings import Settings

logger = logging.getLogger(__name__)

SCHEME = "sqlite:///"

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id        TEXT PRIMARY KEY,
    task_name TEXT NOT NULL,
    reason    TEXT NOT NULL,
    score     INTEGER NOT NULL,  -- last_failure_at in us: the sort key (base.score_of)
    entry     TEXT NOT NULL      -- DeadLetter.to_json()
);
CREATE INDEX IF NOT EXISTS dead_letters_newest ON dead_letters (score, id);
CREATE INDEX IF NOT EXISTS dead_letters_task ON dead_letters (task_name, score, id);
"""


class SQLiteDeadLetterBackend:
    """A :class:`~celery_resilience.backends.base.DeadLetterBackend` in one SQLite file.

    One connection per backend, guarded by a lock: a prefork child builds its own
    backend, threads of one process share this one.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            # isolation_level=None: no implicit transactions, each write below
            # opens its own with BEGIN IMMEDIATE (one writer, no upgrade deadlock).
            self._db = sqlite3.connect(
                url[len(SCHEME) :], timeout=5.0, isolation_level=None, check_same_thread=False
            )
            # WAL with synchronous=NORMAL: a committed entry survives the process
            # being killed (what a DLQ must survive); only a power loss may lose the
            # last commits. Use synchronous=FULL to survive that too, at an fsync a write.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"DLQ backend {url}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _session(self, what: str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the connection; with ``write``, in one transaction committed at the end."""
        with self._lock:
            try:
                if write:
                    self._db.execute("BEGIN IMMEDIATE")  # take the write lock up front
                with self._db:  # commits a write, or rolls it back on an exception
                    yield self._db
            except sqlite3.Error as exc:
                raise BackendUnavailable(
                    f"DLQ backend {self.url} failed during {what}: {exc}"
                ) from exc

    def store(self, entry: DeadLetter, *, retention: float, max_entries: int) -> StoreResult:
        with self._session("store", write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                (entry.id, entry.task_name, entry.reason, score_of(entry), entry.to_json()),
            )
            cutoff = to_score(time.time() - retention)
            expired = db.execute("DELETE FROM dead_letters WHERE score <= ?", (cutoff,)).rowcount
            # Every entry of this task name past the newest max_entries.
            trimmed = db.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE task_name = ? ORDER BY score DESC, id DESC LIMIT -1 OFFSET ?)",
                (entry.task_name, max_entries),
            ).rowcount
        return StoreResult(trimmed=trimmed, expired=expired)

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._session("get") as db:
            row = db.execute("SELECT entry FROM dead_letters WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else DeadLetter.from_json(row[0], entry_id)

    @staticmethod
    def _where(
        task_name: str | None, reason: str | None, newer_than: float
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = ["score > ?"]
        params: list[Any] = [to_score(newer_than)]
        if task_name is not None:
            clauses.append("task_name = ?")
            params.append(task_name)
        if reason is not None:
            clauses.append("reason = ?")
            params.append(reason)
        return " AND ".join(clauses), params

    def list(
        self,
        *,
        task_name: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        newer_than: float = 0.0,
    ) -> Page:
        where, params = self._where(task_name, reason, newer_than)
        if cursor is not None:
            # Keyset paging: strictly after the last entry of the previous page, so
            # entries added or removed meanwhile never shift the rest.
            score, entry_id = decode_cursor(cursor)
            where += " AND (score < ? OR (score = ? AND id < ?))"
            params += [score, score, entry_id]
        found: list[tuple[int, DeadLetter]] = []
        with self._session("list") as db:
            rows = db.execute(
                f"SELECT id, score, entry FROM dead_letters WHERE {where}"
                " ORDER BY score DESC, id DESC",
                params,
            )
            with closing(rows):  # rows are fetched lazily: stop at one past the page
                for row_id, row_score, text in rows:
                    try:
                        found.append((row_score, DeadLetter.from_json(text, row_id)))
                    except MalformedEntry as exc:
                        logger.error("%s; skipped", exc)
                        continue
                    if len(found) > limit:
                        break
        page = found[:limit]
        more = len(found) > limit
        return Page(
            [entry for _, entry in page],
            encode_cursor(page[-1][0], page[-1][1].id) if more else None,
        )

    def count(
        self, *, task_name: str | None = None, reason: str | None = None, newer_than: float = 0.0
    ) -> int:
        where, params = self._where(task_name, reason, newer_than)
        with self._session("count") as db:
            (n,) = db.execute(f"SELECT COUNT(*) FROM dead_letters WHERE {where}", params).fetchone()
        return int(n)

    def delete(self, entry_id: str) -> bool:
        with self._session("delete", write=True) as db:
            return db.execute("DELETE FROM dead_letters WHERE id = ?", (entry_id,)).rowcount > 0

    def purge(self, *, task_name: str | None = None) -> int:
        with self._session("purge", write=True) as db:
            if task_name is None:
                return db.execute("DELETE FROM dead_letters").rowcount
            return db.execute("DELETE FROM dead_letters WHERE task_name = ?", (task_name,)).rowcount

    def eviction_policy(self) -> str | None:
        """SQLite never drops rows by itself."""
        return None

    def ping(self) -> None:
        with self._session("ping") as db:
            db.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()


@hookimpl
def resilience_dlq_backend(url: str, settings: Settings) -> SQLiteDeadLetterBackend | None:
    """Serve ``sqlite:///`` URLs; leave every other scheme to other plugins."""
    if not url.startswith(SCHEME):
        return None
    return SQLiteDeadLetterBackend(url)
