"""The worker boot step: checks settings and backends when a worker starts."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from celery_resilience.doctor import storage_findings
from celery_resilience.errors import ResilienceError
from celery_resilience.runtime import runtime
from celery_resilience.settings import require_shared_backend
from celery_resilience.urls import mask_url

logger = logging.getLogger(__name__)


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
