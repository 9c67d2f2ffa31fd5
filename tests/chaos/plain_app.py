"""A plain Celery app beside the chaos suite's: no celery-resilience anywhere in its workers.

A mixed fleet during a rollout: ``celery -A tests.chaos.plain_app worker`` consumes a
chaos cluster's queue on the same Redis broker (the same ``global_keyprefix``, kombu's
default visibility timeout) with one ``acks_late`` task, ``chaos.plain_held``. Nothing
here imports or installs ``celery_resilience`` (``celery`` itself imports its CLI
plugin when the package is installed, which installs nothing), so the worker gets none
of its boot steps, no presence and kombu's own fetch. Its bodies append the same
start/end records to the cluster's ``rec:log`` as ``tests.chaos.app``'s do, with
``steps``: the celery-resilience boot steps of the app that ran the body (none).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from tests.support.apps import ProcessRedis
from tests.support.services import REDIS_URL as TEST_REDIS_URL

# The environment of a chaos cluster's workers (tests.chaos.app's names; importing that
# module would import celery_resilience).
PREFIX, REDIS_URL, QUEUE = "CHAOS_PREFIX", "CHAOS_REDIS_URL", "CHAOS_QUEUE"
HELD_MAX_S = 120.0


def create_app(env: Mapping[str, str]) -> Celery:
    """The plain app of the cluster configured by ``env`` (a worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, "chaos:unconfigured")
    url = env.get(REDIS_URL, TEST_REDIS_URL)
    client = ProcessRedis(url, socket_timeout=HELD_MAX_S + 30)

    app = Celery("celery_resilience_chaos_plain", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options={"global_keyprefix": f"{prefix}:broker:"},
        task_default_queue=env.get(QUEUE, f"{prefix}.queue"),
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
    )

    def log(event: str, request: Any) -> None:
        r = client()
        seconds, micros = r.time()
        line = {
            "ev": event,
            "id": request.id,
            "node": str(request.hostname).split("@")[0],
            "pid": os.getpid(),
            "t": time.time(),
            "srv": seconds + micros / 1e6,
            "steps": sorted(
                str(step)
                for step in (*app.steps["worker"], *app.steps["consumer"])
                if "resilience" in str(step).lower()
            ),
        }
        r.rpush(f"{prefix}:rec:log", json.dumps(line))

    @app.task(bind=True, shared=False, acks_late=True, name="chaos.plain_held")
    def plain_held(self: Any, tag: str, seconds: float) -> None:
        """Runs until the test releases ``tag`` or ``seconds`` at most; acked at its end."""
        log("start", self.request)
        gate = f"{prefix}:rec:release:{tag}"  # BLMOVE keeps the token, as in app.py
        client().blmove(gate, gate, min(seconds, HELD_MAX_S), "LEFT", "RIGHT")
        client().hincrby(f"{prefix}:rec:completions", self.request.id, 1)
        log("end", self.request)

    return app


app = create_app(os.environ)
