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
    """Run the body: the run lease (and the lock lease, if any) is held by the owner."""
    DUPLICATE = "duplicate"
    """This publish of the task id already completed successfully: do not run it again."""
    CRASH_BUDGET_SPENT = "crash_budget_spent"
    """Too many earlier deliveries were provably lost: do not run it again."""
    LOCK_CONTENDED = "lock_contended"
    """Another owner holds the lock lease: do not run the body now."""
    RUNNING = "running"
    """Another owner holds the run lease of this task id (its body is running): do not
    run a second body now."""


@dataclass(frozen=True)
class AdmitResult:
    """The answer of ``CoordinationBackend.admit``.

    ``crashes`` counts the deliveries of this task id provably lost (their run lease
    expired, or was freed because its holder died) since a body of it last ran to an
    end, the one found by this call included (0 for ``DUPLICATE`` and ``RUNNING``,
    which decide before reading it). ``fencing_token`` is set when a lock
    lease was taken. For ``LOCK_CONTENDED`` and ``RUNNING``, ``lease_remaining`` is
    the seconds until the blocking lease expires and ``holder`` its owner string.
    ``lost_predecessor`` is True when this call found the delivery before it lost
    (and counted it in ``crashes``).
    """

    admission: Admission
    crashes: int = 0
    fencing_token: int | None = None
    lease_remaining: float = 0.0
    holder: str | None = None
    lost_predecessor: bool = False

    @property
    def deliveries(self) -> int:
        """Deliveries of this task id that reached admission: this one and the lost ones."""
        return self.crashes + 1


@runtime_checkable
class CoordinationBackend(Protocol):
    """Run leases, lock leases, fencing tokens, crash counts and completion records.

    Keys are namespaced by the backend (``resilience_key_prefix``); callers pass the
    bare task id and lock key. Every method is atomic on its own: no other caller can
    observe a half-applied result. Every method is idempotent for the same ``owner``:
    a call the client gave up on (a timeout) that the store runs later, followed by
    the same call again, leaves the state of one call. Durations are seconds
    (floats). Methods raise ``celery_resilience.errors.BackendUnavailable`` when the
    store cannot be reached; they never run a task unguarded on an error.
    """

    url: str
    """The backend's URL with any password masked."""

    def admit(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
        adoptable: tuple[str, ...] = (),
    ) -> AdmitResult:
        """Decide, in one atomic step, whether this delivery may run its body.

        A lease or start mark held by ``owner`` itself, or by one of the ``adoptable``
        owners (deliveries that gave up waiting for this store, whose admission may
        have run late), counts as this delivery's own. In order:

        1. ``task_id`` has a completion record of this ``publish`` (or the record or
           ``publish`` is empty, for messages without a publish id): ``DUPLICATE``,
           nothing changes. A record of another publish does not stop a new publish
           that reuses the task id.
        2. Another owner holds the run lease of ``task_id``: ``RUNNING``, nothing
           changes.
        3. The task's start mark is another owner's and no run lease is held: that
           delivery started and its lease expired (or was freed) before it finished,
           so it was lost: the crash count goes up by one, kept ``record_ttl``
           seconds, and the mark is removed. Then, crashes >= ``max_crashes``:
           ``CRASH_BUDGET_SPENT``.
        4. With a ``lock_key`` held by another owner: ``LOCK_CONTENDED`` (a run lease
           or start mark of this delivery's own is removed).
        5. Otherwise ``ADMITTED``: ``owner`` takes the run lease (and the lock lease)
           for ``lease_ttl`` seconds and the start mark for ``record_ttl``; a lock
           lease gets a fencing token strictly greater than every earlier token of
           ``lock_key``: ``max(previous + 1, server time in µs)``, the previous token
           kept ``record_ttl`` seconds after the last acquisition.
        """
        ...

    def finish(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        """Close a delivery that ran its body, atomically.

        Removes the crash count (the body ran to an end, so the task does not kill
        workers), the start mark, run lease and lock lease each only if ``owner``
        still holds it, and when ``succeeded`` writes the completion record of
        ``task_id`` for this ``publish`` for ``record_ttl`` seconds. Returns True when
        the lock lease was released by this call, False when there was none or
        another owner held it by then.
        """
        ...

    def release(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        """Delete the run lease of ``task_id`` and the lock lease on ``lock_key`` where
        ``owner`` holds them (compare-and-delete); the start mark stays, so the next
        admission counts the delivery as lost.

        Used to free the leases of a holder that is provably dead. Returns True if
        any lease was released.
        """
        ...

    def renew(self, task_id: str, lock_key: str | None, owner: str, lease_ttl: float) -> bool:
        """Extend ``owner``'s run lease of ``task_id`` (and lock lease on ``lock_key``)
        to ``lease_ttl`` seconds where ``owner`` holds them.

        Returns False when a lease was lost (expired or taken by another owner).
        """
        ...

    def holds(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        """Whether ``owner`` holds the run lease of ``task_id`` (and the lock lease on
        ``lock_key``) right now."""
        ...

    def dedup_claim(
        self, key: str, task_id: str, *, ttl: float, stale: str | None = None
    ) -> str | None:
        """Take the dedup key ``key`` for ``task_id`` for ``ttl`` seconds, atomically,
        unless another task holds it.

        The key is taken when it is free, already ``task_id``'s (its TTL is then set
        afresh), or held by ``stale`` (a holder the caller found done). Returns None
        when ``task_id`` holds the key after the call; otherwise the holding task's
        id, and nothing changes. Dedup keys are a namespace of their own: ``key``
        never meets a lock key of the same text.
        """
        ...

    def dedup_release(self, key: str, task_id: str) -> bool:
        """Free the dedup key ``key`` if ``task_id`` holds it (compare-and-delete).

        Returns True if this call freed it, False if it was free or another task's.
        """
        ...

    def ping(self) -> None:
        """Check that the store answers; raise ``BackendUnavailable`` if not."""
        ...

    def close(self) -> None:
        """Release connections. The backend may not be used afterwards."""
        ...


@dataclass(frozen=True)
class HeldLock:
    """A lock lease held now, as ``LockListing.held_locks`` read it.

    ``key`` is the lock key as the task rendered it (no prefix, no hash tag), ``holder``
    the owner string of the delivery holding it, ``expires_in`` the seconds until the
    lease expires unless its holder renews it. ``fencing_token`` is the lock key's
    current token, the one its holder got (None if the counter is gone). ``held_for``
    is the seconds since that token was issued, read from it: a token is the store's
    clock in microseconds at the acquisition, unless that clock was behind the previous
    token; it is None then (the token is ahead of the store's clock now), and after a
    renewal it still counts from the acquisition.
    """

    key: str
    holder: str
    expires_in: float
    fencing_token: int | None
    held_for: float | None


def held_for(token: int | None, now_us: int) -> float | None:
    """Seconds from fencing token ``token`` to the store's clock ``now_us`` (µs), or None
    when there is no token or it is ahead of the clock (it was not the clock's time)."""
    if token is None or token > now_us:
        return None
    return (now_us - token) / 1_000_000


@runtime_checkable
class LockListing(Protocol):
    """A coordination backend that can list the lock leases held in its namespace.

    Optional: the web page's "Locks held" section needs it, nothing else does, and a
    backend written before it keeps working without it. Every built-in backend has it.
    """

    def held_locks(self, *, limit: int = 1000) -> list[HeldLock]:
        """Up to ``limit`` lock leases held now in this backend's key namespace, sorted
        by key; when more are held, which of them are returned is not specified.

        Read, never written, and not one atomic snapshot: a lease taken, renewed or
        freed meanwhile may be missed or seen at either moment. On Redis this is a
        ``SCAN`` of the keyspace (of every primary on a Cluster), so it costs in
        proportion to all the keys the server holds, not to the locks alone.
        """
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
