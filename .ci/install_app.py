"""The app of the clean-install check (``.ci/install_check.py``): ``celery -A install_app``.

Imports only Celery and celery-resilience, as a user's project does after
``pip install 'celery-resilience[redis]'``. Configured from the environment the check
sets: one Redis for broker, results, coordination and DLQ, with every key under
``INSTALL_CHECK_PREFIX`` (shared Redis: other runs never meet this one's keys).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_resilience import Backoff, resilient

URL = os.environ["INSTALL_CHECK_REDIS_URL"]
PREFIX = os.environ["INSTALL_CHECK_PREFIX"]

app = Celery("install_app", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=f"{PREFIX}:queue",
    # global_keyprefix: kombu >= 5.3 (broker) and Celery >= 5.3 (results).
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:"},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    resilience_url=URL,
    resilience_key_prefix=f"{PREFIX}:res",
)
if os.environ.get("INSTALL_CHECK_PROMETHEUS_PORT"):
    app.conf.resilience_prometheus_port = int(os.environ["INSTALL_CHECK_PROMETHEUS_PORT"])


@resilient(
    max_retries=3,
    retry_on=(ConnectionError,),
    backoff=Backoff(base=0.2, cap=0.2, jitter="none"),
)
@app.task(bind=True)
def add(self: Any, x: int, y: int) -> int:
    """Fail the first run with a retryable error, then return ``x + y``."""
    if self.request.retries == 0:
        raise ConnectionError("install check: the first run fails on purpose")
    return x + y


@resilient(max_retries=0, retry_on=(ValueError,), dlq=True)
@app.task
def give_up() -> None:
    """Always fail: the task ends in the dead-letter queue."""
    raise ValueError("install check: kept in the dead-letter queue")
