"""The worker's wiring: ``install()`` and the boot steps it adds to an app.

``ResilienceBootstep`` checks settings and backends when a worker starts,
``VisibilityHeartbeat`` (celery_resilience.heartbeat) keeps the broker from
redelivering what the worker holds, and ``MetricsBootstep`` does in the worker's main
process what the metrics exporters cannot do from their hooks. Per-app state stays in
celery_resilience.runtime, and the exporters stay plugins that import neither.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from celery_resilience import dedup
from celery_resilience.doctor import storage_findings
from celery_resilience.errors import ResilienceError
from celery_resilience.heartbeat import VisibilityHeartbeat
from celery_resilience.runtime import runtime
from celery_resilience.settings import require_shared_backend
from celery_resilience.urls import mask_url

if TYPE_CHECKING:
    from celery_resilience.exporters.otel import DeadLetterGauge
    from celery_resilience.exporters.prometheus_server import MetricsServer

logger = logging.getLogger(__name__)


def install(app: Any, *, validate: bool = True) -> None:
    """Install celery-resilience into ``app``. Idempotent.

    Adds the worker boot step that checks settings and backends at worker start.
    With ``validate`` (the default) the settings are read and checked now, raising
    ``ConfigurationError`` on a bad one; ``@resilient`` installs with
    ``validate=False`` so that decorating a task does not load the app's
    configuration early.
    """
    if not getattr(app, "_celery_resilience_installed", False):
        app.steps["worker"].add(ResilienceBootstep)
        app.steps["worker"].add(MetricsBootstep)
        app.steps["consumer"].add(VisibilityHeartbeat)
        app._celery_resilience_installed = True
        # A worker that discards a revoked or expired task frees its dedup key.
        signals.task_revoked.connect(dedup.revoked, weak=False, dispatch_uid=dedup.__name__)
    if validate:
        runtime(app)


class ResilienceBootstep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Fails worker start on a bad setting or an unreachable backend, with one clear line.

    Also refuses to start when no ``resilience_url`` was set and the broker is not
    Redis (leases and crash budgets would live in each process only), and warns when
    the coordination or DLQ Redis loses its data on restart.
    """

    label = "celery-resilience"

    def start(self, worker: Any) -> None:
        try:
            rt = runtime(worker.app)
            require_shared_backend(rt.settings, worker.app.conf)
            rt.backend.ping()
            rt.dlq.ping()
        except ResilienceError as exc:
            logger.critical("celery-resilience: %s", exc)
            # WorkController.start() turns SystemExit into a plain exit with this
            # code; any other exception would add "Unrecoverable error" and a traceback.
            raise SystemExit(1) from exc
        settings = rt.settings
        if settings.url.lower().startswith("memory://"):
            logger.warning(
                "celery-resilience: coordination backend is memory://: leases, crash "
                "budgets and completion records are per process and do not hold across "
                "worker processes or nodes; set %s to a redis:// URL",
                settings.name_of("url"),
            )
        logger.info(
            "celery-resilience: coordination backend %s, DLQ %s",
            mask_url(settings.url),
            mask_url(settings.dlq_url),
        )
        for finding in storage_findings(settings, rt.dlq):
            logger.warning("celery-resilience: %s", str(finding).removeprefix("warning: "))


class MetricsBootstep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs in the worker's main process what the metrics exporters need there.

    With ``resilience_prometheus_port`` set: prepares prometheus_client's multiprocess
    directory while the worker is being built (before the pool forks a child, so every
    child counts into it), then serves ``/metrics`` once the pool runs. With
    opentelemetry-api installed: reports the number of dead letters as an observable
    gauge to the application's MeterProvider. See docs/metrics.md.
    """

    label = "celery-resilience metrics"
    # Started after the pool and stopped before it; create() runs before any start.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.prometheus: MetricsServer | None = None
        self.otel_gauge: DeadLetterGauge | None = None

    def create(self, worker: Any) -> None:
        try:
            settings = runtime(worker.app).settings
        except ResilienceError:
            return None  # ResilienceBootstep fails the start with the reason
        if settings.prometheus_port is None:
            return None
        from celery_resilience.exporters.prometheus_server import MetricsServer

        try:
            self.prometheus = MetricsServer(
                worker.app, settings.prometheus_port, settings.prometheus_addr
            )
            self.prometheus.prepare()
        except ResilienceError as exc:
            logger.critical("celery-resilience: %s", exc)
            raise SystemExit(1) from exc
        return None

    def start(self, worker: Any) -> None:
        if self.prometheus is not None:
            try:
                self.prometheus.start()
            except ResilienceError as exc:
                logger.critical("celery-resilience: %s", exc)
                raise SystemExit(1) from exc
        from celery_resilience.exporters.otel import observe_dead_letters

        try:
            self.otel_gauge = observe_dead_letters(worker.app)
        except Exception:  # an observer never stops the worker
            logger.exception("celery-resilience: could not report dead letters to OpenTelemetry")

    def stop(self, worker: Any) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.otel_gauge is not None:
            self.otel_gauge.close()
            self.otel_gauge = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
