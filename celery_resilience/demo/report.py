"""The demo's report: one line per event as it happens, then a summary and the metrics.

Every line goes to one text stream, flushed at once, so a person watching sees the
story unfold and a test can match lines.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from celery_resilience.demo import tasks
from celery_resilience.demo.store import Event

SCENARIO_OF_TASK = {
    tasks.FLAKY: "retry",
    tasks.EXCLUSIVE: "lock",
    tasks.CHARGE: "dlq",
    tasks.POISON: "crash",
    tasks.LONG: "sigkill",
}


@dataclass(frozen=True)
class Outcome:
    """How one scenario ended: ``ok`` when everything happened as promised."""

    title: str
    ok: bool
    detail: str


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], wrap: int = 0) -> list[str]:
    """Left-aligned columns two spaces apart, a rule under the headers.

    With ``wrap``, the last column is wrapped at that many characters, continuation
    lines under it.
    """
    lines: list[Sequence[str]] = []
    for row in rows:
        last = textwrap.wrap(row[-1], wrap) if wrap else [row[-1]]
        lines.append([*row[:-1], last[0] if last else ""])
        lines += [["" for _ in row[:-1]] + [more] for more in last[1:]]
    widths = [max(len(r[i]) for r in [headers, *lines]) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in lines)]


def _hook_text(event: Event) -> str:
    hook, e = event["hook"], event
    if hook == "retry_scheduled":
        return (
            f"retry_scheduled: attempt {e['attempt']} retries in {e['countdown']:.2f} s "
            f"({e['reason']})"
        )
    if hook == "lock_contended":
        return (
            f"lock_contended: {e['lock_key']!r} is held ({e['lease_remaining']:.1f} s of lease "
            "left): not run, retried after a backoff"
        )
    if hook == "redelivery_seen":
        return (
            f"redelivery_seen: delivery {e['deliveries']} of attempt {e['attempt']}, "
            "the earlier ones never finished"
        )
    if hook == "crash_budget_spent":
        return (
            f"crash_budget_spent: {e['deliveries'] - 1} deliveries lost "
            f"(max_crashes={e['max_crashes']}); not running it again"
        )
    if hook == "task_gave_up":
        return f"task_gave_up: reason {e['reason']} after {e['attempts']} attempt(s) ({e['error']})"
    if hook == "dead_letter_stored":
        return f"dead_letter_stored: entry {e['entry_id']} (reason {e['reason']})"
    if hook == "dead_letter_replayed":
        return (
            f"dead_letter_replayed: entry {e['entry_id']} published again (replay {e['replays']})"
        )
    return str(hook)


class Report:
    """Prints events and results to ``out`` and keeps what the checks need.

    ``events`` holds every event seen, in order; ``hook_counts`` counts observer
    events per (hook, task name): the demo's own metrics.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.time()
        self.events: list[Event] = []
        self.hook_counts: Counter[tuple[str, str]] = Counter()
        self.outcomes: list[Outcome] = []

    def line(self, text: str = "") -> None:
        """Print ``text`` as it is."""
        self.out.write(text + "\n")
        self.out.flush()

    def say(self, scenario: str, text: str, **fields: Any) -> None:
        """An event of the demo itself (it published, killed, replayed...)."""
        self.event({"kind": "demo", "t": time.time(), "scenario": scenario, "text": text, **fields})

    def event(self, event: Event) -> None:
        """Print one event line and keep the event."""
        self.events.append(event)
        task = event.get("task", "")
        if event["kind"] == "hook":
            self.hook_counts[(event["hook"], task)] += 1
            if event["hook"] == "retry_scheduled" and event["reason"] == "lock_contended":
                return  # its lock_contended line said it all
            text = _hook_text(event)
        else:
            text = event["text"]
        scenario = event.get("scenario") or SCENARIO_OF_TASK.get(task, "")
        who = f"{task}[{event['task_id'][:8]}]" if event.get("task_id") else "demo"
        elapsed = max(0.0, event["t"] - self.t0)
        self.line(f"{elapsed:6.2f}s  {scenario:<7}  {who:<30}  {text}")

    def of(self, hook: str, task_id: str | None = None) -> list[Event]:
        """The observer events ``hook`` seen so far (of ``task_id`` only, when given)."""
        return [
            e
            for e in self.events
            if e["kind"] == "hook"
            and e["hook"] == hook
            and (task_id is None or e.get("task_id") == task_id)
        ]

    def result(self, outcome: Outcome) -> None:
        """Record and announce how a scenario ended."""
        self.outcomes.append(outcome)
        self.line(f"{'PASS' if outcome.ok else 'FAIL'}  {outcome.title}: {outcome.detail}")
        self.line()

    def summary(self) -> None:
        """The table of every scenario's outcome."""
        self.line("Summary")
        rows = [(o.title, "PASS" if o.ok else "FAIL", o.detail) for o in self.outcomes]
        for text in table(("scenario", "result", "what happened"), rows, wrap=72):
            self.line("  " + text)
        self.line()

    def metrics(self, prometheus: list[str] | None, note: str) -> None:
        """The observer-event counts, then the Prometheus samples (or why there are none)."""
        self.line("Metrics: observer hook calls counted by the demo's pluggy plugin")
        rows = [
            (f"resilience_{hook}", task, str(count))
            for (hook, task), count in sorted(self.hook_counts.items())
        ]
        for text in table(("hook", "task", "calls"), rows):
            self.line("  " + text)
        self.line()
        if prometheus is None:
            self.line(f"Prometheus: {note}")
        else:
            self.line(f"Prometheus exposition ({note}):")
            for sample in prometheus:
                self.line("  " + sample)
        self.line()

    def exit_code(self, err: TextIO) -> int:
        """0 when every scenario passed; else one line per failure on ``err`` and 2."""
        for outcome in self.failed:
            err.write(f"demo failed: {outcome.title}: {outcome.detail}\n")
        err.flush()
        return 2 if self.failed else 0

    @property
    def failed(self) -> list[Outcome]:
        """The scenarios that did not end as expected."""
        return [o for o in self.outcomes if not o.ok]
