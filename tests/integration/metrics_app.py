"""The Celery app of the metrics integration tests.

A worker runs ``celery -A tests.integration.metrics_app worker`` and gets
``app = create_app(os.environ)``; the test process builds the same app from the same
mapping to publish. Everything lives under one Redis prefix (``MT_PREFIX``): the
broker's keys, the coordination keys, the DLQ and the records the bodies write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from celery_resilience import Backoff, resilient
from celery_resilience.worker import MetricsBootstep
from tests.support.apps import ProcessRedis, worker_settings
from tests.support.services import REDIS_URL as _DEFAULT_REDIS

# Environment variables the workers are configured with.
PREFIX = "MT_PREFIX"
REDIS_URL = "MT_REDIS_URL"
QUEUE = "MT_QUEUE"
PORT = "MT_PROMETHEUS_PORT"
MAX_TASKS_PER_CHILD = "MT_MAX_TASKS_PER_CHILD"  # optional

_UNCONFIGURED = "mttest:unconfigured"

# Long enough that a second task goes to the other child while one runs.
BODY_S = 0.1


def record_key(prefix: str, tag: str, what: str) -> str:
    """The Redis list where test ``tag``'s bodies record ``what`` (runs, done)."""
    return f"{prefix}:rec:{tag}:{what}"


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the app of one test worker from ``env`` (a worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, _UNCONFIGURED)
    url = env.get(REDIS_URL, _DEFAULT_REDIS)
    client = ProcessRedis(url, socket_timeout=30)

    app = Celery("celery_resilience_metrics", set_as_current=False)
    app.conf.update(
        worker_settings(prefix, env.get(QUEUE, f"{prefix}.queue")),
        broker_url=url,
        broker_transport_options={"global_keyprefix": f"{prefix}:broker:"},
        task_ignore_result=True,
        resilience_url=url,
    )
    if PORT in env:
        app.conf.resilience_prometheus_port = int(env[PORT])
    if env.get(MAX_TASKS_PER_CHILD):
        app.conf.worker_max_tasks_per_child = int(env[MAX_TASKS_PER_CHILD])
    # install() adds this step too once it registers it; adding a step twice is a no-op.
    app.steps["worker"].add(MetricsBootstep)

    @resilient(
        max_retries=10,
        retry_on=ValueError,
        backoff=Backoff(base=0.05, factor=1.0, jitter="none"),
    )
    @app.task(bind=True, shared=False, name="mt.flaky")
    def flaky(self: Any, tag: str, fails: int) -> None:
        """Fails with ValueError on its first ``fails`` attempts, recording each run's pid."""
        r = client()
        r.rpush(record_key(prefix, tag, "runs"), str(os.getpid()))
        time.sleep(BODY_S)
        if self.request.retries < fails:
            raise ValueError(f"attempt {self.request.retries} fails on purpose")
        r.rpush(record_key(prefix, tag, "done"), self.request.id)

    @resilient(max_retries=0)
    @app.task(bind=True, shared=False, name="mt.broken")
    def broken(self: Any, tag: str) -> None:
        """Gives up at once: a terminal error, kept in the DLQ."""
        raise RuntimeError(f"{tag}: broken on purpose")

    return app


app = create_app(os.environ)
