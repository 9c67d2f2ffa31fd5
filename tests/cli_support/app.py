"""The Celery app ``tests/test_cli.py`` runs ``celery -A tests.cli_support.app resilience`` on.

Configured from the environment so each test points it at its own keys:
``CR_CLI_BROKER_URL``, ``CR_CLI_RESILIENCE_URL``, ``CR_CLI_KEY_PREFIX`` (also the
prefix of the broker's keys, so a test's queue is ``{prefix}:broker:{queue}``) and
``CR_CLI_MASK_ARGS`` (comma-separated argument names to mask).
"""

from __future__ import annotations

import os

from celery import Celery

from tests.support.services import REDIS_URL as TEST_REDIS_URL

BROKER_URL = "CR_CLI_BROKER_URL"
RESILIENCE_URL = "CR_CLI_RESILIENCE_URL"
KEY_PREFIX = "CR_CLI_KEY_PREFIX"
MASK_ARGS = "CR_CLI_MASK_ARGS"

_prefix = os.environ.get(KEY_PREFIX, "crtest:cli-unconfigured")

app = Celery("cli_support", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get(BROKER_URL, TEST_REDIS_URL),
    broker_transport_options={"global_keyprefix": f"{_prefix}:broker:"},
    broker_connection_retry_on_startup=False,
    resilience_url=os.environ.get(RESILIENCE_URL, TEST_REDIS_URL),
    resilience_key_prefix=_prefix,
    resilience_dlq_mask_args=os.environ.get(MASK_ARGS, ""),
)


@app.task(name="cli.upload", shared=False)
def upload(repoid: int, token: str, *, commitid: str = "") -> None:
    """A task the dead letters name; never run (no worker runs in these tests)."""
