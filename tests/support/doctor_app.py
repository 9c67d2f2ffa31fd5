"""A Celery app configured from the environment, for ``resilience doctor`` and worker
start tests that must leave settings unset.

``CR_DOCTOR_BROKER_URL`` (required); ``CR_DOCTOR_RESILIENCE_URL`` and
``CR_DOCTOR_VISIBILITY_TIMEOUT`` are set on the app only when present.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_resilience import resilient

app = Celery("doctor_app", broker=os.environ["CR_DOCTOR_BROKER_URL"], set_as_current=False)
# A broker that refuses the connection at startup fails the worker instead of retrying forever.
app.conf.broker_connection_retry_on_startup = False
if "CR_DOCTOR_RESILIENCE_URL" in os.environ:
    app.conf.resilience_url = os.environ["CR_DOCTOR_RESILIENCE_URL"]
if "CR_DOCTOR_VISIBILITY_TIMEOUT" in os.environ:
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["CR_DOCTOR_VISIBILITY_TIMEOUT"])
    }


@resilient(lock="doc:{x}")
@app.task(name="doctor_app.job")
def job(x: int) -> None:
    """Never run; being resilient makes the app install celery-resilience."""
