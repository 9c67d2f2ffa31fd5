"""The Celery app of the visibility-heartbeat integration tests.

A worker runs ``celery -A tests.integration.heartbeat_app worker`` and gets
``app = create_app(os.environ)``; the test process builds the same app from the same
mapping to publish. Everything lives under one Redis prefix (``HB_PREFIX``): the
broker's queue, ``unacked`` hash and ``unacked_index`` (as ``global_keyprefix``), the
coordination keys and the records the task bodies write.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from celery_resilience import resilient
from tests.support.apps import ProcessRedis, worker_settings
from tests.support.services import REDIS_URL as _DEFAULT_REDIS
from tests.support.workers import redis_broker_options

# Environment variables the workers are configured with.
PREFIX = "HB_PREFIX"
REDIS_URL = "HB_REDIS_URL"
QUEUE = "HB_QUEUE"
VISIBILITY_TIMEOUT = "HB_VISIBILITY_TIMEOUT"
HEARTBEAT = "HB_HEARTBEAT"  # "on" or "off"
FAST_SWEEP = "HB_FAST_SWEEP"  # "1": kombu's own restore sweep every second (kombu >= 5.7)
NODE_TTL = "HB_NODE_TTL"  # resilience_node_ttl, seconds
REMOTE_CONTROL = "HB_REMOTE_CONTROL"  # "1": Celery's default, a remote-control channel too

_UNCONFIGURED = "hbtest:unconfigured"


def record_key(prefix: str, tag: str, what: str) -> str:
    """The Redis list where test ``tag``'s bodies record ``what`` (starts, completions)."""
    return f"{prefix}:rec:{tag}:{what}"


class Records:
    """Names the Redis keys of one cluster's records (``WorkerCluster`` builds one)."""

    def __init__(self, prefix: str, url: str) -> None:
        self.prefix = prefix
        self.client = ProcessRedis(url, socket_timeout=60)

    def key(self, tag: str, what: str) -> str:
        return record_key(self.prefix, tag, what)


def broker_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The broker transport options of the workers of ``env`` (and of the test's sweeper)."""
    return redis_broker_options(
        env.get(PREFIX, _UNCONFIGURED),
        float(env.get(VISIBILITY_TIMEOUT, 3600)),
        fast_sweep=env.get(FAST_SWEEP) == "1",
    )


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the app of one test cluster from ``env`` (a worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, _UNCONFIGURED)
    url = env.get(REDIS_URL, _DEFAULT_REDIS)
    queue = env.get(QUEUE, f"{prefix}.queue")
    client = ProcessRedis(url, socket_timeout=60)

    app = Celery("celery_resilience_heartbeat", set_as_current=False)
    app.conf.update(
        worker_settings(prefix, queue),
        broker_url=url,
        broker_transport_options=broker_options(env),
        task_ignore_result=True,
        resilience_url=url,
        resilience_visibility_heartbeat=env.get(HEARTBEAT, "on") != "off",
    )
    if NODE_TTL in env:
        app.conf.resilience_node_ttl = float(env[NODE_TTL])
    if env.get(REMOTE_CONTROL) == "1":
        app.conf.worker_enable_remote_control = True

    def debug_heartbeat(**_: Any) -> None:
        logging.getLogger("celery_resilience.heartbeat").setLevel(logging.DEBUG)

    signals.after_setup_logger.connect(debug_heartbeat, weak=False)

    def hold(request: Any, tag: str, seconds: float) -> str:
        """Record a start (on the server's clock), run ``seconds`` or until released."""
        r = client()
        node = str(request.hostname).split("@")[0]
        seconds_, micros = r.time()
        r.rpush(record_key(prefix, tag, "starts"), f"{node} {os.getpid()} {seconds_}.{micros:06d}")
        if seconds > 0:
            r.blpop([record_key(prefix, tag, "release")], timeout=seconds)
        r.rpush(record_key(prefix, tag, "completions"), f"{node} {socket.gethostname()}")
        return "done"

    @resilient(max_retries=0)
    @app.task(bind=True, shared=False, name="hb.held")
    def held(self: Any, tag: str, seconds: float) -> str:
        """Records its start, then runs ``seconds`` or until the test releases it."""
        return hold(self.request, tag, seconds)

    # A lease that outlives a dead holder by 40 s or more: recovery faster than that
    # freed it because its holder's presence expired, not by its TTL.
    @resilient(max_retries=0, lock="{key}", lock_ttl=60)
    @app.task(bind=True, shared=False, name="hb.locked")
    def locked(self: Any, tag: str, key: str, seconds: float) -> str:
        """``held`` under the lock ``key``."""
        return hold(self.request, tag, seconds)

    return app


app = create_app(os.environ)
