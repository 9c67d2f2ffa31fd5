"""Metrics exporters: built-in plugins on the observer hooks, and what they share.

``celery_resilience.exporters.prometheus`` and ``celery_resilience.exporters.otel``
are ordinary plugins registered by ``celery_resilience.get_plugin_manager``; a
StatsD or Datadog exporter is one more module implementing the same hooks. Their
optional dependencies are imported on first use, never when this package is imported.

The hooks run where the event happens (a prefork child, an eager caller, the CLI).
What only the worker's main process can do, ``celery_resilience.worker.MetricsBootstep``
does: serve Prometheus' ``/metrics`` on ``resilience_prometheus_port`` and report the
number of dead letters. The exporters import neither the worker nor the per-app
runtime. See docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from celery_resilience.options import options_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """One metric, as each exporter names it."""

    prometheus: str
    otel: str
    kind: str  # counter, histogram or gauge
    labels: tuple[str, ...]
    unit: str  # UCUM, as OpenTelemetry wants it
    help: str


METRICS: dict[str, MetricSpec] = {
    spec.otel.removeprefix("celery_resilience."): spec
    for spec in (
        MetricSpec(
            "celery_resilience_retries_total", "celery_resilience.retries", "counter",
            ("task", "reason"), "{retry}", "Retries scheduled by the gate.",
        ),
        MetricSpec(
            "celery_resilience_dead_letters_total", "celery_resilience.dead_letters", "counter",
            ("task", "reason"), "{task}",
            "Resilient tasks that gave up (stored in the DLQ when dlq=True).",
        ),
        MetricSpec(
            "celery_resilience_redeliveries_total", "celery_resilience.redeliveries", "counter",
            ("task",), "{delivery}",
            "Deliveries of an attempt after an earlier one was lost with its worker.",
        ),
        MetricSpec(
            "celery_resilience_lock_contended_total", "celery_resilience.lock.contended",
            "counter", ("task",), "{attempt}",
            "Attempts that did not run their body because another held the lock.",
        ),
        MetricSpec(
            "celery_resilience_lock_wait_seconds", "celery_resilience.lock.wait", "histogram",
            ("task",), "s", "Countdown of each retry scheduled because the lock was held.",
        ),
        MetricSpec(
            "celery_resilience_duplicates_suppressed_total",
            "celery_resilience.duplicates_suppressed", "counter", ("task",), "{delivery}",
            "Deliveries of an already succeeded task id acked without running.",
        ),
        MetricSpec(
            "celery_resilience_deduplicated_total",
            "celery_resilience.deduplicated", "counter", ("task",), "{call}",
            "Calls collapsed into the pending task of their dedup key.",
        ),
        MetricSpec(
            "celery_resilience_dlq_replays_total", "celery_resilience.dlq.replays", "counter",
            ("task",), "{entry}", "Dead letters published again.",
        ),
        MetricSpec(
            "celery_resilience_dlq_trimmed_total", "celery_resilience.dlq.trimmed", "counter",
            ("task",), "{entry}",
            "Dead letters dropped to keep within resilience_dlq_max_entries.",
        ),
        MetricSpec(
            "celery_resilience_nodes_lost_total", "celery_resilience.nodes_lost", "counter",
            (), "{node}", "Worker nodes whose presence expired and whose messages came back.",
        ),
        MetricSpec(
            "celery_resilience_messages_recovered_total", "celery_resilience.messages_recovered",
            "counter", ("queue",), "{message}",
            "Messages a lost node held, put back on their queue by a live node.",
        ),
        MetricSpec(
            "celery_resilience_dlq_entries", "celery_resilience.dlq.entries", "gauge",
            ("task",), "{entry}",
            "Dead letters within retention, per task name (read every 5 s at most).",
        ),
    )
}  # fmt: skip
"""Every metric, by key: the OpenTelemetry name without its ``celery_resilience.``."""

DLQ_REFRESH_S = 5.0
"""The number of dead letters is read from the DLQ backend at most this often."""

LOCK_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds, in seconds, of the lock wait histogram's buckets (leases last 30 s by
default, and a contended attempt waits at most the lease's remainder)."""


def resilient_task_names(app: Any) -> list[str]:
    """The names of ``app``'s tasks decorated with ``@resilient``, sorted."""
    return sorted(name for name, task in list(app.tasks.items()) if options_of(task) is not None)


class DeadLetterCounts:
    """Dead letters per resilient task name of one app, read at most every ``refresh`` s.

    A scrape or a metric collection asks ``get``; the DLQ backend sees one
    ``count(task_name=...)`` per task name per ``refresh`` period however often it is
    asked. An unreachable backend is logged and gives ``None`` (no samples rather than
    stale ones).
    """

    def __init__(self, app: Any, refresh: float = DLQ_REFRESH_S) -> None:
        self._app = weakref.ref(app)
        self.refresh = refresh
        self.closed = False
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._counts: dict[str, int] | None = None

    def get(self) -> dict[str, int] | None:
        """Entries within retention per task name, or ``None`` when they cannot be read."""
        app = self._app()
        if app is None or self.closed:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.refresh:
                self._read_at = now
                self._counts = self._read(app)
            return self._counts

    def _read(self, app: Any) -> dict[str, int] | None:
        from celery_resilience.dlq import DeadLetterQueue

        try:
            dlq = DeadLetterQueue(app)
            return {name: dlq.count(task_name=name) for name in resilient_task_names(app)}
        except Exception as exc:  # a scrape must still answer, with the other metrics
            logger.warning("celery-resilience: could not count dead letters: %r", exc)
            return None
