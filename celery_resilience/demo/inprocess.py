"""The demo with no services: everything runs in this process.

Celery's ``memory://`` broker, a worker on the threads pool in a thread (Celery's
``start_worker``), results in ``cache+memory://``, and ``memory://`` coordination and
DLQ backends. Nothing connects anywhere: the environment variables that could point
the app elsewhere are ignored.

A thread cannot be SIGKILLed, so the crash budget is shown by simulation: each
delivery of the poison task drops its run lease and parks its thread for good (it
never finishes and never acks, which is what a SIGKILLed child, freed as a dead
holder, looks like to the backend) and the demo
publishes the same message again, as the broker redelivers it after a lost worker.
The gate counts those deliveries exactly as it counts real ones.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore

from celery_resilience.attempt import current_attempt
from celery_resilience.demo import scenarios, tasks
from celery_resilience.demo.app import isolated, memory_app
from celery_resilience.demo.observer import PLUGIN_NAME, EventForwarder
from celery_resilience.demo.report import Report
from celery_resilience.demo.scenarios import Context
from celery_resilience.demo.store import MemoryStore
from celery_resilience.dlq import DeadLetterQueue
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.runtime import runtime

CONCURRENCY = 8
RELEASE_FLAG = "release-parked"
PARK_MAX_S = 120.0  # a bound: parked threads are released when the scenarios end
# Once start_worker asks it to stop, the worker thread takes about 4 s to end: Celery's
# synloop (5.3-5.7) drains the memory:// broker with a fixed 2 s timeout and runs one
# more drain after it sees the stop flag, then waits for its timer thread's sleep. By
# then everything is reported and the worker holds only this process' memory:// state,
# so the demo waits this long, then leaves the (daemon) thread to end with the process.
STOP_WAIT_S = 0.2
_STILL_STOPPING = "Worker thread failed to exit"  # start_worker's RuntimeError after the wait


def run(out: TextIO, *, verbose: bool = False) -> int:
    """Run every scenario in-process, print the report to ``out``; return the exit code.

    0 when every scenario ended as promised, else 2 (see :meth:`Report.exit_code`).
    The environment variables that would point the app elsewhere are ignored.
    """
    with isolated(os.environ) as ignored:
        return _run(out, ignored, verbose=verbose)


def _run(out: TextIO, ignored: list[str], *, verbose: bool) -> int:
    store = MemoryStore()
    report = Report(out)

    def park(task_id: str) -> None:
        store.emit(
            "body",
            task=tasks.POISON,
            task_id=task_id,
            text="simulated crash: this delivery never finishes or acks, as a SIGKILLed child",
        )
        # A SIGKILLed child's leases are freed as a dead holder's: drop this one's.
        runtime(app).backend.release(task_id, None, current_attempt().owner)
        store.wait_flag(RELEASE_FLAG, PARK_MAX_S)
        raise Ignore()  # acked without touching the stored result

    app = memory_app(store, park)
    report.line("celery-resilience demo: in-process, no services")
    report.line(
        f"  broker: memory:// (kombu in-memory), worker in this process: "
        f"threads pool x {CONCURRENCY}"
    )
    report.line("  results: cache+memory://; leases, crash budgets and DLQ: memory://")
    if ignored:
        report.line(f"  ignored from the environment: {', '.join(ignored)}")
    report.line("  (run with --redis redis://HOST:PORT/N for real worker processes and SIGKILLs)")
    report.line()
    plugins = get_plugin_manager()
    plugins.register(EventForwarder(store), name=PLUGIN_NAME)
    ctx = Context(app, store, report, DeadLetterQueue(app))
    reported = False
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=CONCURRENCY,
            perform_ping_check=False,
            loglevel="INFO" if verbose else "CRITICAL",
            shutdown_timeout=STOP_WAIT_S,
        ):
            try:
                _story(ctx)
            finally:
                store.set_flag(RELEASE_FLAG)
            # Everything is in: report now, not after the worker stopped (see STOP_WAIT_S).
            ctx.pump()
            prometheus = prometheus_samples()
            scenarios.run(report, "metrics", lambda: scenarios.metrics_agree(ctx, prometheus))
            report.metrics(
                prometheus,
                "prometheus_client's default registry, filled by the built-in exporter plugin"
                if prometheus is not None
                else "prometheus_client is not installed "
                "(pip install 'celery-resilience[prometheus]')",
            )
            report.summary()
            reported = True
    except RuntimeError as exc:
        if not (reported and _STILL_STOPPING in str(exc)):
            raise
    finally:
        plugins.unregister(name=PLUGIN_NAME)
    return report.exit_code(sys.stderr)


def _story(ctx: Context) -> None:
    report = ctx.report
    scenarios.run(report, "retry with backoff", lambda: scenarios.retry_with_backoff(ctx))
    scenarios.run(report, "lock exclusion", lambda: scenarios.lock_exclusion(ctx))
    scenarios.run(report, "DLQ and replay", lambda: scenarios.dead_letter_and_replay(ctx))
    scenarios.run(
        report, "crash budget (simulated)", lambda: scenarios.crash_budget(ctx, simulate=True)
    )


def prometheus_samples() -> list[str] | None:
    """This process' ``celery_resilience_*`` samples, or ``None`` without prometheus_client.

    Counters and the histogram's count and sum; ``_created`` and bucket lines left out.
    """
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError:
        return None
    lines = generate_latest(REGISTRY).decode().splitlines()
    return [
        line
        for line in lines
        if line.startswith("celery_resilience_")
        and not line.split("{", 1)[0].endswith(("_created", "_bucket"))
    ]
