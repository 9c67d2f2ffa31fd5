"""The changes the page's forms make, each reported as one line for the list page.

They are what ``dlq replay``/``dlq replay --all``/``dlq rm`` do, with the same
library calls: a replay publishes the task again (same id and routing) and then
removes the entry; a bulk replay runs at ``resilience_dlq_replay_rate`` per second.
Errors about one entry (refused, failed, unknown) become the line, never a crash.
"""

from __future__ import annotations

from celery_resilience.deadletter import MalformedEntry
from celery_resilience.dlq import (
    DeadLetterQueue,
    ReplayFailed,
    ReplayNotRemoved,
    ReplayRefused,
    UnknownEntry,
)
from celery_resilience.web.layout import line

_PER_ENTRY = (UnknownEntry, ReplayRefused, ReplayFailed, ReplayNotRemoved, MalformedEntry)


def filtered(task_name: str | None, reason: str | None) -> str:
    """`` of task T and reason R`` (what a filter selects), or nothing."""
    parts = [f"task {task_name}" if task_name else "", f"reason {reason}" if reason else ""]
    shown = " and ".join(p for p in parts if p)
    return f" of {shown}" if shown else ""


def replay(queue: DeadLetterQueue, entry_id: str) -> str:
    """Replay one entry; the line says as which task, or why not."""
    queue.app.loader.import_default_modules()  # register the tasks, as a worker does
    try:
        task_id = queue.replay(entry_id).id
    except _PER_ENTRY as exc:
        return f"error: {line(exc, 500)}"
    return f"replayed {entry_id} as task {task_id}"


def delete(queue: DeadLetterQueue, entry_id: str) -> str:
    """Delete one entry; the line says so, or why not."""
    try:
        queue.delete(entry_id)
    except UnknownEntry as exc:
        return f"error: {line(exc, 500)}"
    return f"deleted {entry_id}"


def replay_all(queue: DeadLetterQueue, task_name: str | None, reason: str | None) -> str:
    """Replay every matching entry at the configured rate; the line counts what was
    replayed and refused, and names the first refusal."""
    queue.app.loader.import_default_modules()
    report = queue.replay_all(task_name=task_name, reason=reason)
    text = (
        f"replayed {len(report.replayed)} dead letters{filtered(task_name, reason)}, "
        f"refused {len(report.refused)}"
    )
    problems = [*report.refused.values(), *report.not_removed.values()]
    if report.not_removed:
        text += f", {len(report.not_removed)} replayed but not removed"
    if problems:
        text += f"; first: {line(problems[0], 300)}"
    return text


def delete_all(queue: DeadLetterQueue, task_name: str | None, reason: str | None) -> str:
    """Delete every matching entry (those that cannot be decoded too); count them."""
    ids = [
        entry_id
        for page in queue.pages(task_name=task_name, reason=reason)
        for entry_id in [*(e.id for e in page.entries), *(i for i, _ in page.skipped)]
    ]
    deleted = 0
    for entry_id in ids:
        try:
            queue.delete(entry_id)
        except UnknownEntry:
            continue  # replayed or deleted by someone else meanwhile
        deleted += 1
    return f"deleted {deleted} dead letters{filtered(task_name, reason)}"
