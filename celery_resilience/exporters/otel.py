"""OpenTelemetry metrics and span events: a built-in plugin on the observer hooks.

The instruments come from ``get_meter("celery_resilience")`` of the MeterProvider the
application configured (through the API's global provider, which is a no-op until one
is set, so nothing is recorded or exported without one). Span events go on the current
span, the task's span under opentelemetry-instrumentation-celery. Names follow
OpenTelemetry's conventions and become the Prometheus names through OpenTelemetry's
Prometheus exporter (``celery_resilience.lock.wait`` in seconds is
``celery_resilience_lock_wait_seconds``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celery_resilience.errors import MissingExtraError
from celery_resilience.exporters import LOCK_WAIT_BUCKETS, METRICS, DeadLetterCounts
from celery_resilience.hookspecs import hookimpl

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Meter, MeterProvider, Observation

    from celery_resilience.deadletter import DeadLetter, GiveUp

INSTALL_HINT = "pip install 'celery-resilience[otel]'"
METER_NAME = "celery_resilience"

# Span events, each with attributes named celery_resilience.<what>.
EVENT_LOCK_CONTENDED = "celery_resilience.lock_contended"
EVENT_RETRY_SCHEDULED = "celery_resilience.retry_scheduled"
EVENT_REDELIVERY_SEEN = "celery_resilience.redelivery_seen"
EVENT_DEAD_LETTERED = "celery_resilience.dead_lettered"


def require_opentelemetry(why: str) -> None:
    """Import opentelemetry-api or raise ``MissingExtraError`` naming the extra."""
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"{why} needs opentelemetry-api: {INSTALL_HINT}") from None


def _meter(provider: MeterProvider | None) -> Meter:
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry import metrics

    try:
        ours = version("celery-resilience")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ours = ""
    if provider is None:
        return metrics.get_meter(METER_NAME, ours)
    return provider.get_meter(METER_NAME, ours)


class _Instruments:
    """The instruments of one meter, created on a process' first event."""

    def __init__(self, meter: Meter) -> None:
        self.counters: dict[str, Counter] = {
            key: meter.create_counter(spec.otel, spec.unit, spec.help)
            for key, spec in METRICS.items()
            if spec.kind == "counter"
        }
        wait = METRICS["lock.wait"]
        self.lock_wait = meter.create_histogram(
            wait.otel, wait.unit, wait.help, explicit_bucket_boundaries_advisory=LOCK_WAIT_BUCKETS
        )

    def add(self, key: str, task_name: str | None, amount: int = 1, **attributes: str) -> None:
        task = {} if task_name is None else {"task": task_name}
        self.counters[key].add(amount, {**task, **attributes})


class OtelExporter:
    """Records the observer events as OpenTelemetry metrics and span events.

    The built-in instance uses the global MeterProvider and adds span events; without
    opentelemetry-api installed it does nothing. Another instance given
    ``meter_provider`` records into that provider too; it adds span events only with
    ``span_events=True`` (the built-in one already adds them to the current span).
    """

    def __init__(
        self, meter_provider: MeterProvider | None = None, *, span_events: bool | None = None
    ) -> None:
        if meter_provider is not None:
            require_opentelemetry("OtelExporter")
        self._provider = meter_provider
        self._span_events = meter_provider is None if span_events is None else span_events
        self._instruments: _Instruments | None = None
        self._disabled = False
        self._lock = threading.Lock()

    def instruments(self) -> _Instruments | None:
        """The instruments, created on first call; ``None`` without opentelemetry-api."""
        if self._instruments is None and not self._disabled:
            with self._lock:
                if self._instruments is None and not self._disabled:
                    try:
                        meter = _meter(self._provider)
                    except ImportError:
                        self._disabled = True
                        return None
                    self._instruments = _Instruments(meter)
        return self._instruments

    def _add_event(self, name: str, attributes: dict[str, Any]) -> None:
        """Add event ``name`` to the current span (the task's), if one is recording."""
        if not self._span_events:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, {f"celery_resilience.{k}": v for k, v in attributes.items()})

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, attempt: int, reason: str, countdown: float
    ) -> None:
        if (i := self.instruments()) is None:
            return
        i.add("retries", task_name, reason=reason)
        if reason == "lock_contended":
            i.lock_wait.record(countdown, {"task": task_name})
        self._add_event(
            EVENT_RETRY_SCHEDULED, {"reason": reason, "countdown": countdown, "attempt": attempt}
        )

    @hookimpl
    def resilience_lock_contended(
        self, task_name: str, lock_key: str, lease_remaining: float
    ) -> None:
        if (i := self.instruments()) is None:
            return
        i.add("lock.contended", task_name)
        self._add_event(
            EVENT_LOCK_CONTENDED, {"lock_key": lock_key, "lease_remaining": lease_remaining}
        )

    @hookimpl
    def resilience_redelivery_seen(self, task_name: str, attempt: int, deliveries: int) -> None:
        if (i := self.instruments()) is None:
            return
        i.add("redeliveries", task_name)
        self._add_event(EVENT_REDELIVERY_SEEN, {"attempt": attempt, "deliveries": deliveries})

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str) -> None:
        if (i := self.instruments()) is not None:
            i.add("duplicates_suppressed", task_name)

    @hookimpl
    def resilience_call_deduplicated(self, task_name: str) -> None:
        if (i := self.instruments()) is not None:
            i.add("deduplicated", task_name)

    @hookimpl
    def resilience_node_lost(self, recovered: dict[str, int]) -> None:
        if (i := self.instruments()) is None:
            return
        i.add("nodes_lost", None)
        for queue, count in recovered.items():
            i.add("messages_recovered", None, count, queue=queue)

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        if (i := self.instruments()) is None:
            return
        i.add("dead_letters", outcome.task_name, reason=outcome.reason)
        self._add_event(
            EVENT_DEAD_LETTERED,
            {
                "reason": outcome.reason,
                "attempts": outcome.attempts,
                "deliveries": outcome.deliveries,
                "exception_type": outcome.exception_type,
            },
        )

    @hookimpl
    def resilience_dead_letter_stored(self, entry: DeadLetter, trimmed: int) -> None:
        if (i := self.instruments()) is not None:
            i.add("dlq.trimmed", entry.task_name, trimmed)

    @hookimpl
    def resilience_dead_letter_replayed(self, entry: DeadLetter) -> None:
        if (i := self.instruments()) is not None:
            i.add("dlq.replays", entry.task_name)


exporter = OtelExporter()
"""The built-in plugin, registered by ``get_plugin_manager()``."""


class DeadLetterGauge:
    """``celery_resilience.dlq.entries{task}``: dead letters per resilient task of an app.

    An observable gauge read from the DLQ backend at most every 5 s, whenever the
    MeterProvider collects. ``close`` stops it reporting (OpenTelemetry cannot
    remove an instrument).
    """

    def __init__(self, app: Any, meter_provider: MeterProvider | None = None) -> None:
        self.counts = DeadLetterCounts(app)
        spec = METRICS["dlq.entries"]
        _meter(meter_provider).create_observable_gauge(
            spec.otel, [self._observe], spec.unit, spec.help
        )

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        counts = self.counts.get()
        for task_name, count in (counts or {}).items():
            yield Observation(count, {"task": task_name})

    def close(self) -> None:
        self.counts.closed = True


def observe_dead_letters(app: Any) -> DeadLetterGauge | None:
    """Report ``app``'s dead letters to the global MeterProvider; ``None`` without the API."""
    try:
        return DeadLetterGauge(app)
    except ImportError:
        return None
