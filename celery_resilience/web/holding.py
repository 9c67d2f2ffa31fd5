"""What the nodes-and-leases page reads: the worker nodes (``resilience nodes``' view)
and the lock leases held now, each with the app's tasks whose ``lock=`` renders its key.

Both are read, never written. Either part may be unavailable on its own (liveness off,
a store not answering); the page then says why in that part and shows the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery_resilience.backends.base import HeldLock, LockListing
from celery_resilience.errors import ResilienceError
from celery_resilience.leases import Owner, parse_owner
from celery_resilience.locks import template_pattern
from celery_resilience.nodes import Nodes, read_nodes
from celery_resilience.options import options_of
from celery_resilience.runtime import runtime
from celery_resilience.urls import mask_url

LOCKS_READ = 10_000
"""Locks read from the store per page, at most (then filtered by task)."""
LOCKS_SHOWN = 500
"""Locks the page lists, at most."""


@dataclass(frozen=True)
class LockRow:
    """A lock held, the app's task names whose lock template renders its key, and its
    holder's parts (None for an owner string of another format)."""

    lock: HeldLock
    tasks: list[str]
    owner: Owner | None


@dataclass(frozen=True)
class Holding:
    """The page's data. ``nodes`` is None when ``nodes_error`` says why; ``locks`` is
    empty when ``locks_error`` says why. ``more_locks`` is True when more locks match
    than are listed. ``locked_tasks`` maps each of the app's tasks with ``lock=`` to its
    template (a callable's repr), for the filter; ``task_name`` is the filter chosen."""

    nodes: Nodes | None
    nodes_error: str | None
    locks: list[LockRow]
    more_locks: bool
    locks_error: str | None
    locked_tasks: dict[str, str]
    task_name: str | None


def locked_tasks(app: Any) -> dict[str, Any]:
    """The app's resilient tasks that take a lock, by name, with their ``lock=``."""
    found = {}
    for name, task in sorted(app.tasks.items()):
        options = options_of(task)
        if options is not None and options.lock is not None:
            found[name] = options.lock
    return found


def read(app: Any, *, task_name: str | None = None) -> Holding:
    """Read the nodes and the locks held for the page, locks of ``task_name`` only if given."""
    nodes, nodes_error = None, None
    try:
        nodes = read_nodes(app)
    except ResilienceError as exc:
        nodes_error = str(exc)
    specs = locked_tasks(app)
    patterns = {
        name: template_pattern(spec) for name, spec in specs.items() if isinstance(spec, str)
    }
    shown = {name: spec if isinstance(spec, str) else repr(spec) for name, spec in specs.items()}
    held, locks_error = _held(app, task_name, specs)
    rows = []
    for lock in held:
        tasks = [name for name, pattern in patterns.items() if pattern.fullmatch(lock.key)]
        if task_name is None or task_name in tasks:
            rows.append(LockRow(lock, tasks, parse_owner(lock.holder)))
    more = len(rows) > LOCKS_SHOWN or len(held) >= LOCKS_READ
    return Holding(nodes, nodes_error, rows[:LOCKS_SHOWN], more, locks_error, shown, task_name)


def _held(
    app: Any, task_name: str | None, specs: dict[str, Any]
) -> tuple[list[HeldLock], str | None]:
    """Up to ``LOCKS_READ`` locks held, or none and why they cannot be listed (as asked)."""
    url = runtime(app).settings.url
    if url.lower().startswith("memory://"):
        return [], (
            f"the coordination backend {mask_url(url)} is this process's own: "
            "the workers' locks are not visible from here"
        )
    if task_name is not None and task_name not in specs:
        return [], f"task {task_name!r} takes no lock"
    if task_name is not None and not isinstance(specs[task_name], str):
        why = "renders its lock with a callable: its keys cannot be told apart"
        return [], f"task {task_name!r} {why}"
    try:
        backend = runtime(app).backend
        if not isinstance(backend, LockListing):
            return [], f"the coordination backend {backend.url} cannot list its locks"
        return backend.held_locks(limit=LOCKS_READ), None
    except ResilienceError as exc:
        return [], str(exc)
