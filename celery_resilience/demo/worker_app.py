"""The app of the ``--redis`` demo's worker processes.

``celery -A celery_resilience.demo.worker_app worker`` imports this module, which
builds the app from what the demo put in the environment (``CRDEMO_REDIS_URL``,
``CRDEMO_PREFIX``). Only those worker processes import it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import signals

from celery_resilience.demo.app import PREFIX_ENV, REDIS_URL_ENV, redis_app
from celery_resilience.demo.observer import PLUGIN_NAME, EventForwarder
from celery_resilience.demo.store import RedisStore
from celery_resilience.demo.tasks import POISON
from celery_resilience.plugins import get_plugin_manager

store = RedisStore(os.environ[REDIS_URL_ENV], os.environ[PREFIX_ENV])


def sigkill_self(task_id: str) -> None:
    """What the poison task does: SIGKILL the pool child running it, for real."""
    store.emit(
        "body",
        task=POISON,
        task_id=task_id,
        text=f"os.kill({os.getpid()}, SIGKILL): the pool child dies mid-task",
    )
    os.kill(os.getpid(), signal.SIGKILL)


app = redis_app(store.url, store.prefix, store, sigkill_self)


def register_forwarder(sender: Any = None, **_: Any) -> None:
    """Forward observer events to the demo; in the main process, before the pool forks."""
    plugins = get_plugin_manager()
    if not plugins.has_plugin(PLUGIN_NAME):
        plugins.register(EventForwarder(store), name=PLUGIN_NAME)


signals.worker_init.connect(register_forwarder, weak=False)
