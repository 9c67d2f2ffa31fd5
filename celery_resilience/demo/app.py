"""The demo's Celery apps: one on ``memory://`` for this process, one on Redis for workers.

Both carry the same tasks (:mod:`~celery_resilience.demo.tasks`); only where messages,
results, leases and dead letters live differs.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, MutableMapping

from celery import Celery

from celery_resilience.demo.store import Store
from celery_resilience.demo.tasks import define_tasks
from celery_resilience.settings import SETTING_NAMES

APP_NAME = "celery_resilience_demo"

REDIS_URL_ENV = "CRDEMO_REDIS_URL"
PREFIX_ENV = "CRDEMO_PREFIX"
"""What the ``--redis`` demo tells its worker processes (see ``worker_app``)."""

VISIBILITY_TIMEOUT_S = 4.0
"""The ``--redis`` broker's visibility timeout: a dead node's tasks return this fast.
The visibility heartbeat (on by default with Redis) keeps it safe for the long task."""

# Environment variables Celery or celery-resilience read over app.conf: left in
# place, they could point the demo at a broker or backend it must not touch.
_OVERRIDES = (
    "BROKER_URL",
    "RESULT_BACKEND",
    "CELERY_BROKER_URL",
    "CELERY_BROKER_READ_URL",
    "CELERY_BROKER_WRITE_URL",
    "CELERY_RESULT_BACKEND",
    # Celery reads the loader class from here (celery/app/base.py): a stray one makes
    # the demo app import a project that is not there.
    "CELERY_LOADER",
)
# The environment overrides of celery-resilience's own settings, and nothing else
# under that prefix (CI sets CELERY_RESILIENCE_TEST_* for the test suite).
_SETTING_OVERRIDES = tuple(f"CELERY_{name.upper()}" for name in SETTING_NAMES)


@contextlib.contextmanager
def isolated(environ: MutableMapping[str, str]) -> Iterator[list[str]]:
    """Remove from ``environ`` what would override the demo app's configuration.

    Yields the names removed (sorted), so the demo can say it ignored them, and puts
    them back on exit.
    """
    removed = {
        name: environ[name]
        for name in sorted(environ)
        if name in _OVERRIDES or name in _SETTING_OVERRIDES
    }
    for name in removed:
        del environ[name]
    try:
        yield list(removed)
    finally:
        environ.update(removed)


def memory_app(store: Store, crash: Callable[[str], None]) -> Celery:
    """An app whose broker, results, leases and DLQ all live in this process' memory."""
    run = f"celery-resilience-demo-{uuid.uuid4().hex[:8]}"
    app = Celery(APP_NAME, broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        # kombu's in-memory transport polls; its default of 1 s would dominate the demo.
        broker_transport_options={"polling_interval": 0.01},
        task_default_queue=run,
        resilience_url=f"memory://{run}",
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    define_tasks(app, store, crash)
    return app


def redis_app(url: str, prefix: str, store: Store, crash: Callable[[str], None]) -> Celery:
    """An app on the Redis at ``url``, every key of it under ``prefix``.

    The broker's queue, unacked hash and index, the results, leases, counters and
    dead letters all go under ``prefix:``, so one pattern removes the whole run.
    """
    app = Celery(APP_NAME, set_as_current=False)
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options={
            "global_keyprefix": f"{prefix}:broker:",
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
        },
        result_backend_transport_options={"global_keyprefix": f"{prefix}:result:"},
        task_default_queue=f"{prefix}:queue",
        resilience_url=url,
        resilience_key_prefix=f"{prefix}:res",
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
    )
    define_tasks(app, store, crash)
    return app
