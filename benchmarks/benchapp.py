"""The Celery app of the recovery, duplicates and memory benchmarks, in several setups.

Workers import it as ``celery -A benchapp worker`` and read their setup from the
environment (``BENCH_SETUP``, ``BENCH_PREFIX``, ``BENCH_VT``); the driver builds the
same app with :func:`make_app` to publish. Setups:

``plain``            ``@app.task``, Celery's defaults (acks early, visibility 3600 s)
``plain_acks_late``  ``acks_late=True`` + ``task_reject_on_worker_lost=True``
``resilient``        ``@resilient(lock=...)`` (acks late, heartbeat on: the defaults)
``resilient_nolock`` ``@resilient()``
``resilient_metrics`` ``@resilient(lock=...)`` with ``resilience_prometheus_port`` set
``once``             celery-once's ``QueueOnce`` (lock taken at publish, default timeout)
``singleton``        celery-singleton's ``Singleton`` (lock at publish, default expiry)

``BENCH_PREFIX`` (which contains the run id) prefixes every Redis key of the setup:
the broker's (``global_keyprefix``: its own ``unacked`` index, so a setup's restore
sweeps never touch another's messages), the coordination backend's, the locks' and the
benchmark's own records. Task names are ``<prefix>.sleepy`` and ``<prefix>.noop``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_prerun, worker_ready
from common import REDIS_URL

_clients: dict[int, redis.Redis] = {}


def rclient() -> redis.Redis:
    """One Redis client per process (prefork children are forked)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(REDIS_URL)
    return _clients[pid]


def record(prefix: str, what: str, tag: str) -> None:
    """Append ``{t, pid, host}`` to ``<prefix>:<what>:<tag>`` (t: Unix time, seconds)."""
    doc = {"t": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    rclient().rpush(f"{prefix}:{what}:{tag}", json.dumps(doc))


def make_app(setup: str, prefix: str, vt: float | None) -> tuple[Celery, dict[str, Any]]:
    """Return the app of ``setup`` and its tasks (``sleepy``, ``noop``)."""
    app = Celery(prefix, broker=REDIS_URL, backend=None, set_as_current=False)
    transport: dict[str, Any] = {"global_keyprefix": f"{prefix}:"}
    if vt is not None:
        transport["visibility_timeout"] = vt
    app.conf.update(
        broker_transport_options=transport,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_default_queue=f"{prefix}.q",
    )
    if setup == "plain_acks_late":
        app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)
    if setup.startswith("resilient"):
        app.conf.update(resilience_url=REDIS_URL, resilience_key_prefix=f"{prefix}:res")
    if setup == "resilient_metrics":
        app.conf.update(resilience_prometheus_port=int(os.environ.get("BENCH_METRICS_PORT", "0")))
    if setup == "once":
        app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": REDIS_URL}}
    if setup == "singleton":
        app.conf.update(singleton_backend_url=REDIS_URL, singleton_key_prefix=f"{prefix}:sl:")

    def sleepy_body(tag: str, seconds: float) -> None:
        record(prefix, "starts", tag)
        time.sleep(seconds)
        record(prefix, "ends", tag)

    def noop_body(key: str) -> None:
        rclient().incr(key)

    opts: dict[str, Any] = {}
    if setup == "once":
        from celery_once import QueueOnce

        opts = {"base": QueueOnce, "once": {"graceful": True}}
    elif setup == "singleton":
        from celery_singleton import Singleton

        opts = {"base": Singleton}

    def sleepy(tag: str, seconds: float) -> None:
        sleepy_body(tag, seconds)

    def noop(key: str, i: int) -> None:
        noop_body(key)

    t_sleepy = app.task(name=f"{prefix}.sleepy", **opts)(sleepy)
    t_noop = app.task(name=f"{prefix}.noop")(noop)
    if setup.startswith("resilient"):
        from celery_resilience import resilient

        lock = None if setup == "resilient_nolock" else "bench:{tag}"
        t_sleepy = resilient(lock=lock)(t_sleepy)
        t_noop = resilient(lock=None if lock is None else "noop:{i}")(t_noop)
    return app, {"sleepy": t_sleepy, "noop": t_noop}


app: Celery | None = None
if os.environ.get("BENCH_SETUP"):
    _vt = os.environ.get("BENCH_VT")
    _prefix = os.environ["BENCH_PREFIX"]
    app, _tasks = make_app(os.environ["BENCH_SETUP"], _prefix, float(_vt) if _vt else None)

    @task_prerun.connect
    def _prerun(sender: Any = None, kwargs: Any = None, **rest: Any) -> None:
        if kwargs and "tag" in kwargs:  # a delivery reached the worker's task code
            record(_prefix, "deliveries", kwargs["tag"])

    @worker_ready.connect
    def _ready(sender: Any = None, **kwargs: Any) -> None:
        record(_prefix, "ready", "node")  # one list per setup: ready workers
