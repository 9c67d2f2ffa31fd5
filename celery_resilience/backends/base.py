"""The coordination backend contract every backend implements."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from celery_resilience.deadletter import DeadLetter


class Admission(enum.Enum):
    """What ``CoordinationBackend.admit`` decided about one delivery."""

    ADMITTED = "admitted"
    """Run the body: the delivery was counted and the lease (if any) is held."""
    DUPLICATE = "duplicate"
    """The task id already completed successfully: do not run it again."""
    CRASH_BUDGET_SPENT = "crash_budget_spent"
    """Too many earlier deliveries of this attempt were lost: do not run it again."""
    LOCK_CONTENDED = "lock_contended"
    """Another owner holds the lease: do not run the body now."""


@dataclass(frozen=True)
class AdmitResult:
    """The answer of ``CoordinationBackend.admit``.

    ``deliveries`` counts deliveries of this task id and attempt including this one
    (0 for a duplicate; more than 1 means earlier ones were lost). ``lost`` counts
    deliveries lost in earlier attempts whose redelivery ended contended, carried
    over so that the crash budget spans them. ``fencing_token`` is set when a lease
    was taken. ``lease_remaining`` is, for a contended lease, the seconds until it
    expires.
    """

    admission: Admission
    deliveries: int = 0
    fencing_token: int | None = None
    lease_remaining: float = 0.0
    lost: int = 0
    holder: str | None = None
    """For a contended lease, the owner string of its holder."""

    @property
    def crashes(self) -> int:
        """Deliveries of this task lost with their worker before this one."""
        return self.deliveries - 1 + self.lost


@runtime_checkable
class CoordinationBackend(Protocol):
    """Leases, fencing tokens, delivery counters and completion records.

    Keys are namespaced by the backend (``resilience_key_prefix``); callers pass the
    bare task id and lock key. Every method is atomic on its own: no other caller can
    observe a half-applied result. Durations are seconds (floats). Methods raise
    ``celery_resilience.errors.BackendUnavailable`` when the store cannot be
    reached; they never run a task unguarded on an error.
    """

    url: str
    """The backend's URL with any password masked."""

    def admit(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
    ) -> AdmitResult:
        """Decide, in one atomic step, whether this delivery may run its body.

        In order: if ``task_id`` has a completion record, return ``DUPLICATE``
        (nothing else changes). Otherwise count the delivery of (``task_id``,
        ``attempt``), keeping the counter for ``record_ttl``; if the lost deliveries
        (``AdmitResult.crashes``) number ``max_crashes`` or more, return
        ``CRASH_BUDGET_SPENT``. Then, with a ``lock_key``, take the lease for
        ``owner`` for ``lease_ttl`` seconds unless another owner holds it: held
        means ``LOCK_CONTENDED`` with the remaining lease time; the delivery counter
        of this attempt is removed (this delivery ends in a retry, not a crash) and
        the deliveries lost before it are added to the task's carried ``lost``
        count, so a poison task that also holds a lock still spends its crash
        budget. A taken lease gets a fencing token strictly greater than every
        earlier token of ``lock_key``: ``max(previous + 1, server time in µs)``, the
        previous token being kept ``record_ttl`` seconds after the last acquisition
        (past that, the clock alone keeps tokens increasing).
        """
        ...

    def finish(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        """Close a delivery that ran its body, atomically.

        Removes the delivery counter of (``task_id``, ``attempt``) and the carried
        ``lost`` count (the body ran to an end, so the task does not kill workers), releases
        ``lock_key`` only if ``owner`` still holds it, and when ``succeeded`` writes
        the completion record of ``task_id`` for ``record_ttl`` seconds. Returns True
        when the lease was released by this call, False when there was no lease or
        another owner held it by then.
        """
        ...

    def release(self, lock_key: str, owner: str) -> bool:
        """Delete the lease on ``lock_key`` only if ``owner`` holds it (compare-and-delete).

        Used to free a lease whose holder is provably dead. Returns True if released.
        """
        ...

    def renew(self, lock_key: str, owner: str, lease_ttl: float) -> bool:
        """Extend the lease on ``lock_key`` to ``lease_ttl`` seconds if ``owner`` holds it.

        Returns False when the lease was lost (expired or taken by another owner).
        """
        ...

    def ping(self) -> None:
        """Check that the store answers; raise ``BackendUnavailable`` if not."""
        ...

    def close(self) -> None:
        """Release connections. The backend may not be used afterwards."""
        ...


@dataclass(frozen=True)
class Page:
    """One page of dead letters, newest first.

    ``cursor`` is passed back to ``list`` for the next page; ``None`` means this was
    the last page. ``skipped`` names the entries of this page's span that could not
    be decoded, as ``(entry id, the error naming it)`` pairs, newest first; a backend that keeps
    decoded objects leaves it empty.
    """

    entries: list[DeadLetter]
    cursor: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class StoreResult:
    """What storing a dead letter removed to keep within limits.

    ``trimmed`` counts entries of the same task name dropped, oldest first, to stay
    within ``max_entries``; ``expired`` counts entries older than the retention
    removed by the same write.
    """

    trimmed: int = 0
    expired: int = 0


@runtime_checkable
class DeadLetterBackend(Protocol):
    """Keeps dead letters until they are replayed, deleted, trimmed or too old.

    Retention and the per-task cap are enforced when an entry is stored (no
    background job is needed); readers skip entries older than the retention they
    are given. Each method is atomic on its own. Methods raise
    ``celery_resilience.errors.BackendUnavailable`` when the store cannot be
    reached, and ``celery_resilience.deadletter.MalformedEntry`` for an entry
    that cannot be decoded (``list`` skips those and names them in
    ``Page.skipped``; a backend written before that field only logs them).
    """

    url: str
    """The backend's URL with any password masked."""

    def store(self, entry: DeadLetter, *, retention: float, max_entries: int) -> StoreResult:
        """Add ``entry``; drop entries older than ``retention`` seconds and, oldest
        first, entries of ``entry.task_name`` beyond ``max_entries``. Returns what was
        dropped. When this returns, the entry is durable as far as the store is."""
        ...

    def get(self, entry_id: str) -> DeadLetter | None:
        """Return the entry with ``entry_id``, or None if there is none."""
        ...

    def list(
        self,
        *,
        task_name: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        newer_than: float = 0.0,
    ) -> Page:
        """Return up to ``limit`` entries, newest ``last_failure_at`` first, filtered by
        task name and reason, skipping entries whose ``last_failure_at`` (Unix seconds)
        is not after ``newer_than``. Paging with ``cursor`` neither repeats nor skips
        entries that stay in the queue meanwhile."""
        ...

    def count(
        self, *, task_name: str | None = None, reason: str | None = None, newer_than: float = 0.0
    ) -> int:
        """Return how many entries match, as ``list`` would return them all."""
        ...

    def delete(self, entry_id: str) -> bool:
        """Remove one entry; False when there was none."""
        ...

    def purge(self, *, task_name: str | None = None) -> int:
        """Remove every entry (of ``task_name`` only, when given); return how many."""
        ...

    def eviction_policy(self) -> str | None:
        """The store's eviction policy when it may drop entries by itself, else None."""
        ...

    def ping(self) -> None:
        """Check that the store answers; raise ``BackendUnavailable`` if not."""
        ...

    def close(self) -> None:
        """Release connections. The backend may not be used afterwards."""
        ...


def to_score(seconds: float) -> int:
    """A Unix time in seconds as a sort score: whole microseconds.

    Microseconds keep two give-ups of one millisecond in the order they happened
    (the cap trims the older); they still fit a Redis score (a double) exactly.
    """
    return int(seconds * 1_000_000)


def score_of(entry: DeadLetter) -> int:
    """The sort key of an entry: ``last_failure_at`` as ``to_score``."""
    return to_score(entry.last_failure_at)


def encode_cursor(score: int, entry_id: str) -> str:
    """A cursor pointing just past the entry with ``score`` and ``entry_id``."""
    return f"{score}:{entry_id}"


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Split a cursor from ``encode_cursor``; raise ``ConfigurationError`` if it is not one."""
    from celery_resilience.errors import ConfigurationError

    score, sep, entry_id = cursor.partition(":")
    if not sep or not score.isdigit() or not entry_id:
        raise ConfigurationError(f"cursor {cursor!r} is not one returned by list()")
    return int(score), entry_id
