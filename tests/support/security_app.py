"""A minimal Celery app with one resilient task, started as a real worker by the tests.

The broker and coordination URLs come from the environment, so a test can point the
worker at an unreachable backend whose URL carries a password.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_resilience import resilient

app = Celery("security_app", broker=os.environ["CR_SECURITY_BROKER_URL"])
app.conf.resilience_url = os.environ["CR_SECURITY_RESILIENCE_URL"]
# A broker that refuses the connection at startup fails the worker instead of retrying forever.
app.conf.broker_connection_retry_on_startup = False


@resilient
@app.task
def noop() -> None:
    """Do nothing; being resilient makes the app install celery-resilience."""
