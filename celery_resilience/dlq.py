"""``DeadLetterQueue``: inspect, replay and remove what gave up."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery.result import AsyncResult

from celery_resilience import headers
from celery_resilience.backends.base import DeadLetterBackend, Page
from celery_resilience.deadletter import DeadLetter
from celery_resilience.errors import ResilienceError
from celery_resilience.plugins import notify
from celery_resilience.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

MAX_REPLAYS = 3
"""An entry replayed this many times is refused unless ``force=True``."""


class UnknownEntry(ResilienceError, KeyError):
    """No dead letter has this id (it was replayed, deleted, trimmed or never existed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown dead letter"


class ReplayRefused(ResilienceError):
    """A replay was refused: unknown task name, or replayed too often without ``force``."""


class ReplayFailed(ResilienceError):
    """The replay could not be published; the entry is still in the queue."""


class ReplayNotRemoved(ResilienceError):
    """The task WAS published again, but its entry could not be removed afterwards.

    The entry stays in the queue (a second replay would run the task twice);
    ``entry_id`` and ``task_id`` say which, and ``result`` is the published task's.
    """

    def __init__(self, message: str, *, entry_id: str, result: AsyncResult) -> None:
        super().__init__(message)
        self.entry_id = entry_id
        self.task_id: str = result.id
        self.result = result


@dataclass
class ReplayReport:
    """What ``replay_all`` did: ids replayed, and ids refused or failed with why.

    ``not_removed`` holds the ids (also in ``replayed``) whose task was published but
    whose entry could not be removed, with why; ``refused`` also names the entries
    that could not be decoded.
    """

    replayed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    not_removed: dict[str, str] = field(default_factory=dict)


class DeadLetterQueue:
    """The dead-letter queue of ``app``, on the backend ``resilience_dlq_url`` names.

    Entries older than ``resilience_dlq_retention`` are never returned.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._rt: Runtime = runtime(app)

    @property
    def backend(self) -> DeadLetterBackend:
        return self._rt.dlq

    def _newer_than(self) -> float:
        return time.time() - self._rt.settings.dlq_retention

    def list(
        self,
        task_name: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Return a page of entries, newest first; pass ``page.cursor`` for the next one.

        Entries that cannot be decoded are skipped and named in ``page.skipped``.
        """
        return self.backend.list(
            task_name=task_name,
            reason=reason,
            limit=limit,
            cursor=cursor,
            newer_than=self._newer_than(),
        )

    def iter(self, task_name: str | None = None, reason: str | None = None) -> Iterator[DeadLetter]:
        """Every matching entry, newest first, page by page; entries that cannot be
        decoded are skipped, each logged at warning."""
        for page in self.pages(task_name=task_name, reason=reason):
            for entry_id, why in page.skipped:
                logger.warning("celery-resilience: skipped dead letter %s: %s", entry_id, why)
            yield from page.entries

    def pages(self, task_name: str | None = None, reason: str | None = None) -> Iterator[Page]:
        """Every matching page of 500 entries, newest first (``skipped`` included)."""
        cursor: str | None = None
        while True:
            page = self.list(task_name=task_name, reason=reason, limit=500, cursor=cursor)
            yield page
            if page.cursor is None:
                return
            cursor = page.cursor

    def get(self, entry_id: str) -> DeadLetter:
        """Return one entry; raise ``UnknownEntry`` if there is none (or it is
        older than the retention)."""
        entry = self.backend.get(entry_id)
        if entry is None or entry.last_failure_at <= self._newer_than():
            raise UnknownEntry(f"no dead letter with id {entry_id!r}")
        return entry

    def count(self, task_name: str | None = None, reason: str | None = None) -> int:
        """How many entries match."""
        return self.backend.count(task_name=task_name, reason=reason, newer_than=self._newer_than())

    def replay(self, entry_id: str, *, force: bool = False) -> AsyncResult:
        """Publish the entry's task again, then remove the entry; return its result.

        Same task id, queue, exchange and routing key, a fresh retry budget and
        ``replays + 1``. Raises ``UnknownEntry``, ``MalformedEntry`` (it cannot be
        decoded), ``ReplayRefused`` (a task name this app does not know, or more than
        3 replays without ``force``), ``ReplayFailed`` (the publish failed; the entry
        stays) or ``ReplayNotRemoved`` (published, but the entry stays).
        """
        entry = self.get(entry_id)
        task = self.app.tasks.get(entry.task_name)
        if task is None:
            raise ReplayRefused(
                f"dead letter {entry_id}: task {entry.task_name!r} is not registered in "
                f"app {self.app.main!r}; import the module that defines it"
            )
        if entry.replays >= MAX_REPLAYS and not force:
            raise ReplayRefused(
                f"dead letter {entry_id} was replayed {entry.replays} times already; "
                "replay it with force to try again"
            )
        try:
            _publish(self.app, task, entry)
        except Exception as exc:
            raise ReplayFailed(
                f"dead letter {entry_id} could not be published, it stays in the queue: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        result = AsyncResult(entry.task_id, app=self.app)
        try:
            self.backend.delete(entry_id)
        except Exception as exc:
            raise ReplayNotRemoved(
                f"dead letter {entry_id} WAS replayed (published as task {entry.task_id}) "
                f"but could not be removed, so it is still listed: {type(exc).__name__}: "
                f"{exc}; delete it (dlq rm {entry_id}) so it is not replayed twice",
                entry_id=entry_id,
                result=result,
            ) from exc
        finally:
            # Published either way: observers count the replay.
            notify(
                self._rt.plugins,
                "resilience_dead_letter_replayed",
                entry=entry,
                task_id=entry.task_id,
            )
        return result

    def replay_all(
        self,
        task_name: str | None = None,
        reason: str | None = None,
        rate: float | None = None,
        *,
        force: bool = False,
    ) -> ReplayReport:
        """Replay every matching entry at most ``rate`` per second (default
        ``resilience_dlq_replay_rate``, 50). Entries refused, failing or that cannot
        be decoded are reported, not raised, and stay in the queue."""
        interval = 1.0 / (rate or self._rt.settings.dlq_replay_rate)
        report = ReplayReport()
        entries: list[DeadLetter] = []
        for page in self.pages(task_name=task_name, reason=reason):
            entries += page.entries
            report.refused.update(page.skipped)
        next_at = time.monotonic()
        for entry in entries:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at, time.monotonic()) + interval
            try:
                self.replay(entry.id, force=force)
            except ReplayNotRemoved as exc:
                report.replayed.append(entry.id)
                report.not_removed[entry.id] = str(exc)
            except ResilienceError as exc:
                report.refused[entry.id] = str(exc)
            else:
                report.replayed.append(entry.id)
        return report

    def delete(self, entry_id: str) -> None:
        """Remove one entry; raise ``UnknownEntry`` if there is none."""
        if not self.backend.delete(entry_id):
            raise UnknownEntry(f"no dead letter with id {entry_id!r}")
        notify(self._rt.plugins, "resilience_dead_letter_deleted", entry_id=entry_id)

    def purge(self, task_name: str | None = None) -> int:
        """Remove every entry (of ``task_name`` only, when given); return how many."""
        count = self.backend.purge(task_name=task_name)
        notify(self._rt.plugins, "resilience_dead_letters_purged", task_name=task_name, count=count)
        return count


def _routing(entry: DeadLetter) -> dict[str, Any]:
    """Where the original went, as ``apply_async`` options (as Celery's own retry does)."""
    options: dict[str, Any] = {}
    if entry.priority is not None:
        options["priority"] = entry.priority
    if entry.exchange in ("", None) and entry.routing_key:
        options["queue"] = entry.routing_key  # sent to the default (anonymous) exchange
    else:
        if entry.exchange:
            options["exchange"] = entry.exchange
        if entry.routing_key:
            options["routing_key"] = entry.routing_key
        if entry.queue and not entry.routing_key:
            options["queue"] = entry.queue
    return options


def _publish(app: Any, task: Any, entry: DeadLetter) -> None:
    history = {headers.REPLAYS: entry.replays + 1, headers.FIRST_FAILURE: entry.first_failure_at}
    routing = _routing(entry)
    if entry.body is None:
        task.apply_async(
            entry.args or [], entry.kwargs or {}, task_id=entry.task_id, headers=history, **routing
        )
        return
    # Arguments JSON could not show: republish the stored body byte for byte,
    # never deserializing it here.
    message = app.amqp.as_task_v2(
        entry.task_id,
        entry.task_name,
        (),
        {},
        argsrepr=entry.args_repr,
        kwargsrepr=entry.kwargs_repr,
    )
    queue = routing.get("queue")
    if queue is None and "exchange" not in routing and "routing_key" not in routing:
        # Nothing recorded (the task ran through apply()): the default queue, as
        # apply_async would route it.
        queue = app.conf.task_default_queue
    declared = app.amqp.queues.get(queue) if queue else None
    if declared is not None:
        exchange, routing_key = declared.exchange.name, declared.routing_key
    else:
        exchange = routing.get("exchange", "")
        routing_key = routing.get("routing_key", queue)
    declare = [declared] if declared is not None else []
    with app.producer_or_acquire() as producer:
        producer.publish(
            entry.body.payload(),
            exchange=exchange,
            routing_key=routing_key,
            headers={**message.headers, **history},
            content_type=entry.body.content_type,
            content_encoding=entry.body.content_encoding,
            declare=declare,
            retry=True,
            retry_policy=app.conf.task_publish_retry_policy,
            priority=entry.priority,
            **message.properties,
        )
