"""Prometheus metrics: a built-in plugin on the observer hooks.

Metrics land in ``prometheus_client.REGISTRY`` of the process where the event happens,
so an application that already exports Prometheus metrics gets them there. With
``resilience_prometheus_port`` set, the worker serves them itself, right under the
prefork pool: see celery_resilience.exporters.prometheus_server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery_resilience.errors import MissingExtraError
from celery_resilience.exporters import LOCK_WAIT_BUCKETS, METRICS, DeadLetterCounts
from celery_resilience.hookspecs import hookimpl

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.metrics_core import Metric

    from celery_resilience.deadletter import DeadLetter, GiveUp

INSTALL_HINT = "pip install 'celery-resilience[prometheus]'"


def require_prometheus_client(why: str) -> None:
    """Import prometheus_client or raise ``MissingExtraError`` naming the extra."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"{why} needs prometheus-client: {INSTALL_HINT}") from None


class _Metrics:
    """The counters and the histogram of one registry, created on a process' first event."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.counters: dict[str, Counter] = {
            key: Counter(spec.prometheus, spec.help, spec.labels, registry=registry)
            for key, spec in METRICS.items()
            if spec.kind == "counter"
        }
        wait = METRICS["lock.wait"]
        self.lock_wait = Histogram(
            wait.prometheus, wait.help, wait.labels, registry=registry, buckets=LOCK_WAIT_BUCKETS
        )

    def inc(self, key: str, *labels: str, amount: float = 1) -> None:
        counter = self.counters[key]
        (counter.labels(*labels) if labels else counter).inc(amount)


class PrometheusExporter:
    """Counts the observer events in Prometheus metrics of ``registry``.

    The built-in instance uses ``prometheus_client.REGISTRY``, resolved on the first
    event; without prometheus_client installed it does nothing. Register another
    instance with a registry of your own to count into it too.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry
        self._metrics: _Metrics | None = None
        self._disabled = False
        self._lock = threading.Lock()

    def metrics(self) -> _Metrics | None:
        """The metrics, created on first call; ``None`` without prometheus_client."""
        if self._metrics is None and not self._disabled:
            with self._lock:
                if self._metrics is None and not self._disabled:
                    try:
                        from prometheus_client import REGISTRY
                    except ImportError:
                        self._disabled = True
                        return None
                    self._metrics = _Metrics(REGISTRY if self._registry is None else self._registry)
        return self._metrics

    @hookimpl
    def resilience_retry_scheduled(self, task_name: str, reason: str, countdown: float) -> None:
        if (m := self.metrics()) is not None:
            m.inc("retries", task_name, reason)
            if reason == "lock_contended":
                m.lock_wait.labels(task_name).observe(countdown)

    @hookimpl
    def resilience_lock_contended(self, task_name: str) -> None:
        if (m := self.metrics()) is not None:
            m.inc("lock.contended", task_name)

    @hookimpl
    def resilience_redelivery_seen(self, task_name: str) -> None:
        if (m := self.metrics()) is not None:
            m.inc("redeliveries", task_name)

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str) -> None:
        if (m := self.metrics()) is not None:
            m.inc("duplicates_suppressed", task_name)

    @hookimpl
    def resilience_call_deduplicated(self, task_name: str) -> None:
        if (m := self.metrics()) is not None:
            m.inc("deduplicated", task_name)

    @hookimpl
    def resilience_node_lost(self, recovered: dict[str, int]) -> None:
        if (m := self.metrics()) is not None:
            m.inc("nodes_lost")
            for queue, count in recovered.items():
                m.inc("messages_recovered", queue, amount=count)

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        if (m := self.metrics()) is not None:
            m.inc("dead_letters", outcome.task_name, outcome.reason)

    @hookimpl
    def resilience_dead_letter_stored(self, entry: DeadLetter, trimmed: int) -> None:
        if (m := self.metrics()) is not None:
            m.inc("dlq.trimmed", entry.task_name, amount=trimmed)

    @hookimpl
    def resilience_dead_letter_replayed(self, entry: DeadLetter) -> None:
        if (m := self.metrics()) is not None:
            m.inc("dlq.replays", entry.task_name)


exporter = PrometheusExporter()
"""The built-in plugin, registered by ``get_plugin_manager()``."""


class DeadLetterCollector:
    """``celery_resilience_dlq_entries{task}``: dead letters per resilient task of ``app``.

    Read from the DLQ backend at most every 5 s. The worker serving
    ``resilience_prometheus_port`` registers one; with an exporter of your own,
    ``registry.register(DeadLetterCollector(app))`` in one process (every process
    reporting it would only repeat the same numbers).
    """

    NAME = METRICS["dlq.entries"].prometheus
    HELP = METRICS["dlq.entries"].help

    def __init__(self, app: Any, counts: DeadLetterCounts | None = None) -> None:
        require_prometheus_client("celery_resilience_dlq_entries")
        self.counts = counts or DeadLetterCounts(app)

    def describe(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(self.NAME, self.HELP, labels=("task",))]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        counts = self.counts.get()
        if counts is None:
            return
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=("task",))
        for task_name, count in counts.items():
            family.add_metric((task_name,), count)
        yield family
