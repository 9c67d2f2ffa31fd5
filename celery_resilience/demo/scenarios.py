"""The demo's scenarios: each publishes tasks, waits for them, and checks the promise.

A scenario function returns one line saying what happened, or raises
:class:`ScenarioFailed` saying what did not; :func:`run` turns either into an
:class:`~celery_resilience.demo.report.Outcome`. The same functions run in-process
and against real workers: only the :class:`Context` differs.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery, states
from celery.result import AsyncResult

from celery_resilience.deadletter import DeadLetter
from celery_resilience.demo import tasks
from celery_resilience.demo.report import Outcome, Report
from celery_resilience.demo.store import Store
from celery_resilience.dlq import DeadLetterQueue, UnknownEntry
from celery_resilience.errors import CrashBudgetExceeded

T = TypeVar("T")

_POLL_S = 0.05


class ScenarioFailed(Exception):
    """A scenario did not end as promised; the message says what was seen instead."""


def check(condition: object, message: str) -> None:
    """Fail the scenario with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ScenarioFailed(message)


@dataclass
class Context:
    """What a scenario works with: the app to publish on, the shared store, the report."""

    app: Celery
    store: Store
    report: Report
    dlq: DeadLetterQueue
    timeout: float = 20.0

    def pump(self) -> None:
        """Print the events recorded since the last call."""
        for event in self.store.drain():
            self.report.event(event)

    def say(self, scenario: str, text: str, **fields: Any) -> None:
        self.pump()
        self.report.say(scenario, text, **fields)

    def wait(self, what: str, predicate: Callable[[], T | None], timeout: float | None = None) -> T:
        """Poll ``predicate`` until it gives a truthy value, printing events meanwhile."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            self.pump()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"timed out after {limit:.0f} s waiting for {what}")
            time.sleep(_POLL_S)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, printing events meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump()
            time.sleep(_POLL_S)

    def publish(
        self, scenario: str, name: str, *args: Any, task_id: str | None = None
    ) -> AsyncResult:
        result: AsyncResult = self.app.tasks[name].apply_async(args, task_id=task_id)
        shown = ", ".join(map(repr, args))
        self.say(scenario, f"published {name}({shown})", task=name, task_id=result.id)
        return result

    def final_state(self, result: AsyncResult, what: str, timeout: float | None = None) -> str:
        """Wait until ``result`` is ready; return its state."""

        def ready() -> str | None:
            state = str(result.state)
            return state if state in states.READY_STATES else None

        return self.wait(what, ready, timeout)

    def dead_letter(self, task_name: str, task_id: str) -> DeadLetter:
        """Wait for the DLQ entry of ``task_id``."""
        return self.wait(
            f"the dead letter of {task_name}[{task_id}]",
            lambda: next(
                (e for e in self.dlq.iter(task_name=task_name) if e.task_id == task_id), None
            ),
        )


def run(report: Report, title: str, scenario: Callable[[], str]) -> Outcome:
    """Run one scenario under a heading and report how it ended."""
    report.line(f"== {title} ==")
    try:
        outcome = Outcome(title, True, scenario())
    except ScenarioFailed as exc:
        outcome = Outcome(title, False, str(exc))
    except Exception as exc:  # a demo reports every scenario, whatever one of them did
        outcome = Outcome(title, False, f"unexpected {type(exc).__name__}: {exc}")
    report.result(outcome)
    return outcome


def retry_with_backoff(ctx: Context) -> str:
    """A task failing twice with a ``retry_on`` error is retried with backoff and succeeds."""
    result = ctx.publish("retry", tasks.FLAKY, "prices.csv")
    state = ctx.final_state(result, "the flaky task to finish")
    check(state == states.SUCCESS, f"ended {state} ({result.result!r}), expected SUCCESS")
    retries = ctx.report.of("retry_scheduled", result.id)
    delays = [round(e["countdown"], 2) for e in retries]
    expected = [round(tasks.FLAKY_BACKOFF.ceiling(n), 2) for n in range(tasks.FLAKY_FAILURES)]
    check(delays == expected, f"retried after {delays} s, expected {expected} s")
    runs = tasks.FLAKY_FAILURES + 1
    shown = " and ".join(f"{d:.2f} s" for d in delays)
    return f"failed {tasks.FLAKY_FAILURES} times, retried after {shown}, run {runs} succeeded"


def lock_exclusion(ctx: Context, keys: int = 3, per_key: int = 3) -> str:
    """Tasks on one lock key never overlap, while tasks on other keys run alongside."""
    names = [chr(ord("A") + i) for i in range(keys)]
    results = [
        ctx.publish("lock", tasks.EXCLUSIVE, names[n % keys], n) for n in range(keys * per_key)
    ]
    finals = [ctx.final_state(r, f"{len(results)} account updates") for r in results]
    check(finals == [states.SUCCESS] * len(results), f"final states {finals}")
    runs = [json.loads(item) for item in ctx.store.items("intervals")]
    check(len(runs) == len(results), f"{len(runs)} bodies ran for {len(results)} tasks")
    for name in names:
        on_key = sorted((r for r in runs if r["key"] == name), key=lambda r: r["start"])
        overlaps = [
            (a["n"], b["n"]) for a, b in itertools.pairwise(on_key) if b["start"] < a["end"]
        ]
        check(not overlaps, f"bodies overlapped on account {name}: {overlaps}")
        tokens = [r["token"] for r in on_key]
        check(tokens == sorted(set(tokens)), f"fencing tokens of {name} not increasing: {tokens}")
    together = max(
        len({r["key"] for r in runs if r["start"] <= moment < r["end"]})
        for moment in (r["start"] for r in runs)
    )
    check(together > 1, "no two accounts were ever updated at the same time")
    contended = sum(len(ctx.report.of("lock_contended", r.id)) for r in results)
    return (
        f"{len(runs)} updates on {keys} accounts: never two at once on one account, up to "
        f"{together} accounts at once; {contended} contended attempts waited and retried"
    )


def dead_letter_and_replay(ctx: Context) -> str:
    """Retries run out, the task is kept in the DLQ, and a replay completes it."""
    result = ctx.publish("dlq", tasks.CHARGE, "order-1042")
    state = ctx.final_state(result, "the charge to give up")
    check(state == states.FAILURE, f"ended {state}, expected FAILURE")
    check(
        isinstance(result.result, ConnectionError),
        f"failed with {result.result!r}, expected the body's ConnectionError",
    )
    entry = ctx.dead_letter(tasks.CHARGE, result.id)
    attempts = tasks.CHARGE_MAX_RETRIES + 1
    check(entry.reason == "max_retries", f"DLQ reason {entry.reason!r}, expected 'max_retries'")
    check(entry.attempts == attempts, f"{entry.attempts} attempts recorded, expected {attempts}")
    ctx.say(
        "dlq",
        f"DeadLetterQueue(app).get({entry.id!r}): reason {entry.reason}, {entry.attempts} "
        f"attempts, args {entry.args}, {entry.exception_type}: {entry.exception_message}",
    )
    ctx.store.set_flag(tasks.GATEWAY_FLAG)
    ctx.say("dlq", f"the gateway is back: DeadLetterQueue(app).replay({entry.id!r})")
    replayed = ctx.dlq.replay(entry.id)
    check(replayed.id == result.id, "the replay got a new task id")
    # A fresh AsyncResult each time: one that saw FAILURE (the replay not run yet)
    # keeps it for good.
    ctx.wait(
        "the replayed charge to succeed",
        lambda: ctx.app.AsyncResult(replayed.id).state == states.SUCCESS,
    )
    replayed = ctx.app.AsyncResult(replayed.id)
    try:
        ctx.dlq.get(entry.id)
    except UnknownEntry:
        pass
    else:
        raise ScenarioFailed(f"entry {entry.id} is still in the DLQ after its replay")
    return (
        f"gave up after {attempts} attempts (max_retries), kept in the DLQ with its "
        f"arguments; the replay (same task id) ended SUCCESS: {replayed.result!r}"
    )


def crash_budget(ctx: Context, *, simulate: bool) -> str:
    """A message that takes its worker down is run ``max_crashes`` times, then quarantined.

    With real workers the broker redelivers the message after each crash. With
    ``simulate`` (in-process, where nothing can be SIGKILLed) the body's delivery
    never finishes, and this publishes the same message again (same task id, same
    attempt), as the broker would after losing a worker.
    """
    task_id = str(uuid.uuid4())
    args = ("invoice-17.pdf",)
    result = ctx.publish("crash", tasks.POISON, *args, task_id=task_id)
    pids_key = f"poison-pids:{task_id}"

    def started(count: int) -> Callable[[], bool]:
        return lambda: len(ctx.store.items(pids_key)) >= count

    for lost in range(1, tasks.MAX_CRASHES + 1) if simulate else ():
        ctx.wait(f"delivery {lost} to start", started(lost))
        ctx.say(
            "crash",
            f"simulated: delivery {lost} is lost, so the message is published again "
            "(same task id, retries 0) as the broker redelivers it",
            task=tasks.POISON,
            task_id=task_id,
        )
        ctx.app.tasks[tasks.POISON].apply_async(args, task_id=task_id)
    state = ctx.final_state(result, "the poison task to be quarantined", timeout=40)
    check(state == states.FAILURE, f"ended {state}, expected FAILURE")
    check(
        isinstance(result.result, CrashBudgetExceeded),
        f"failed with {result.result!r}, expected CrashBudgetExceeded",
    )
    runs = len(ctx.store.items(pids_key))
    check(runs == tasks.MAX_CRASHES, f"the body ran {runs} times, expected {tasks.MAX_CRASHES}")
    entry = ctx.dead_letter(tasks.POISON, task_id)
    check(entry.reason == "worker_lost", f"DLQ reason {entry.reason!r}, expected 'worker_lost'")
    check(ctx.report.of("crash_budget_spent", task_id), "no crash_budget_spent event")
    ctx.sleep(0.5)  # nothing may run it again: the message is acked
    runs = len(ctx.store.items(pids_key))
    check(runs == tasks.MAX_CRASHES, f"the body ran again after the give-up ({runs} runs)")
    how = "lost deliveries simulated" if simulate else "each run SIGKILLed its own child"
    return (
        f"ran {runs} times ({how}); delivery {runs + 1} was not run: "
        f"CrashBudgetExceeded, in the DLQ as {entry.reason}"
    )


def worker_killed(ctx: Context, kill: Callable[[str], str], visibility_timeout: float) -> str:
    """A whole worker node SIGKILLed mid-task: another node runs the task again, once."""
    result = ctx.publish("sigkill", tasks.LONG, "batch-7")
    starts_key = f"long-starts:{result.id}"
    first = ctx.wait("the import to start", lambda: ctx.store.items(starts_key))
    ctx.sleep(0.5)
    victim = json.loads(first[0])["node"]
    killed = kill(victim)
    killed_at = time.time()
    ctx.say("sigkill", f"SIGKILL {killed} mid-task", task=tasks.LONG, task_id=result.id)
    state = ctx.final_state(result, "the import to complete", timeout=visibility_timeout * 4 + 20)
    check(state == states.SUCCESS, f"ended {state} ({result.result!r}), expected SUCCESS")
    starts = [json.loads(s) for s in ctx.store.items(starts_key)]
    check(len(starts) == 2, f"the body started {len(starts)} times, expected 2")
    check(starts[1]["node"] != victim, f"run 2 was on the killed node {victim}")
    completions = [
        e
        for e in ctx.report.events
        if e.get("task_id") == result.id and str(e.get("text", "")).endswith("completes")
    ]
    check(len(completions) == 1, f"the body completed {len(completions)} times, expected once")
    recovery = starts[1]["t"] - killed_at
    return (
        f"{victim} SIGKILLed mid-task; {starts[1]['node']} ran it again {recovery:.1f} s later "
        f"(visibility timeout {visibility_timeout:g} s) and it completed once"
    )


def metrics_agree(ctx: Context, prometheus: list[str] | None) -> str:
    """The observer events counted match what the scenarios did (and Prometheus agrees)."""
    counts = ctx.report.hook_counts
    expected = {
        ("retry_scheduled", tasks.FLAKY): tasks.FLAKY_FAILURES,
        ("retry_scheduled", tasks.CHARGE): tasks.CHARGE_MAX_RETRIES,
        ("dead_letter_stored", tasks.CHARGE): 1,
        ("dead_letter_replayed", tasks.CHARGE): 1,
        ("crash_budget_spent", tasks.POISON): 1,
        ("dead_letter_stored", tasks.POISON): 1,
        ("redelivery_seen", tasks.POISON): tasks.MAX_CRASHES,
    }
    wrong = {
        f"{h} {t}": (counts[(h, t)], n) for (h, t), n in expected.items() if counts[(h, t)] != n
    }
    check(not wrong, f"counted (got, expected): {wrong}")
    if prometheus is None:
        return f"{sum(counts.values())} observer events, as expected"
    sample = f'celery_resilience_dead_letters_total{{reason="worker_lost",task="{tasks.POISON}"}}'
    check(
        any(line.startswith(sample) and line.endswith(" 1.0") for line in prometheus),
        f"Prometheus has no {sample} 1.0",
    )
    return f"{sum(counts.values())} observer events, as expected; Prometheus agrees"
