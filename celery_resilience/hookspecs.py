"""Hook specifications: what a celery-resilience plugin can implement.

Plugins register through the ``celery_resilience`` entry-point group and implement
any of these with ``celery_resilience.hookimpl``. Provider hooks return a value
(the first non-``None`` result wins); observer hooks return nothing, are called after
the event happened, and a raising observer is logged and never fails the task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from celery_resilience.backends.base import CoordinationBackend, DeadLetterBackend
    from celery_resilience.deadletter import DeadLetter, GiveUp
    from celery_resilience.settings import Settings

PROJECT = "celery_resilience"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def resilience_coordination_backend(url: str, settings: Settings) -> CoordinationBackend | None:
    """Build the coordination backend for ``url`` (leases, counters, completion records).

    Called once per process when a resilient task first runs (and at worker start to
    check the backend answers). Return ``None`` when ``url``'s scheme is not yours;
    the first non-``None`` result is used. Built in: ``memory://``, ``redis://``,
    ``rediss://``, ``unix://``.

    :param url: the ``resilience_url`` setting, password included.
    :param settings: all validated settings (``key_prefix`` namespaces your keys).
    """


@hookspec(firstresult=True)
def resilience_dlq_backend(url: str, settings: Settings) -> DeadLetterBackend | None:
    """Build the dead-letter queue backend for ``url``.

    Called once per process on the first dead letter, at worker start, and by
    ``DeadLetterQueue`` and the CLI. Return ``None`` when ``url``'s scheme is not
    yours; the first non-``None`` result is used. Built in: ``memory://``,
    ``redis://``, ``rediss://``, ``unix://``.

    :param url: the ``resilience_dlq_url`` setting (``resilience_url`` when unset).
    :param settings: all validated settings.
    """


@hookspec
def resilience_retry_scheduled(
    task_name: str, task_id: str, attempt: int, reason: str, countdown: float
) -> None:
    """A retry or a postponement of a resilient task was published; it runs after
    ``countdown`` seconds.

    A retry is the next attempt (``retries + 1``, spends ``max_retries``); a
    postponement delivers the same attempt again and spends nothing.

    :param attempt: the attempt that is retrying or postponed (0 for the first run).
    :param reason: retries: ``exception`` (a ``retry_on`` error), ``requested`` (the
        body called ``self.retry``); postponements: ``lock_contended`` (its lock is
        held), ``running`` (its task id is running elsewhere), ``backend_unavailable``
        (the coordination backend did not answer for one lease TTL), ``following``
        (a canvas member waits for the pending task of its dedup key).
    :param countdown: seconds until it may run (``None``-free; 0 when immediate).
    """


@hookspec
def resilience_lock_contended(
    task_name: str, task_id: str, lock_key: str, lease_remaining: float
) -> None:
    """A delivery did not run its body because another owner held ``lock_key``.

    It is postponed, or gives up with ``lock_contended`` once it waited ``lock_timeout``.

    :param lease_remaining: seconds until the holder's lease expires unless renewed.
    """


@hookspec
def resilience_redelivery_seen(task_name: str, task_id: str, attempt: int, deliveries: int) -> None:
    """A task arrived again after its previous delivery was provably lost (its run
    lease expired, or its holder died, before it finished).

    :param deliveries: deliveries of the task since a body last ran to an end, this
        one and the lost ones included (>= 2).
    """


@hookspec
def resilience_crash_budget_spent(
    task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
) -> None:
    """The task was lost with its worker ``max_crashes`` times and is not run again.

    The task then gives up with reason ``worker_lost``
    (``resilience_task_gave_up`` follows).
    """


@hookspec
def resilience_node_lost(node: str, nodename: str, recovered: dict[str, int]) -> None:
    """A worker node's presence expired and this node put back what it held.

    Called in the main process of the worker that recovered it (once per lost node:
    the one whose recovery finished it), after the messages are back on their queues.

    :param node: the lost node's presence id (``node/host/pid/random``).
    :param nodename: its Celery node name (``celery@host``), or ``""`` if unknown.
    :param recovered: messages put back, per queue (empty when it held none).
    """


@hookspec
def resilience_duplicate_suppressed(task_name: str, task_id: str) -> None:
    """A copy of a publish that already succeeded was acked without running."""


@hookspec
def resilience_call_deduplicated(task_name: str, task_id: str, dedup_key: str) -> None:
    """A call of a task with ``dedup=`` was collapsed into the pending task of its key.

    It published nothing (or, in a chain, group or chord, a follower that runs no
    body). Called in the process that made the call (a web process, say), once per
    such call. ``task_id`` is the pending task the call was collapsed into, ``dedup_key``
    the rendered key.
    """


@hookspec
def resilience_task_gave_up(outcome: GiveUp) -> None:
    """A resilient task gave up and will not run again; its state becomes FAILURE.

    Called before the message is acked. ``outcome.reason`` is ``max_retries``,
    ``error``, ``worker_lost`` or ``lock_contended``; ``outcome`` carries what a
    replay needs (arguments, routing) and what a person needs (exception, traceback).
    """


@hookspec
def resilience_dead_letter_stored(entry: DeadLetter, trimmed: int) -> None:
    """A dead letter was stored; the message will be acked next.

    :param trimmed: entries of the same task name dropped (oldest first) by this
        write to keep within ``resilience_dlq_max_entries``.
    """


@hookspec
def resilience_dead_letter_replayed(entry: DeadLetter, task_id: str) -> None:
    """A dead letter was published again and removed from the queue.

    :param entry: the entry as it was stored (``entry.replays`` is the count before
        this replay).
    """


@hookspec
def resilience_dead_letter_deleted(entry_id: str) -> None:
    """A dead letter was deleted by ``DeadLetterQueue.delete`` (not by replay or purge)."""


@hookspec
def resilience_dead_letters_purged(task_name: str | None, count: int) -> None:
    """``count`` dead letters were purged (of ``task_name``, or all when None)."""
