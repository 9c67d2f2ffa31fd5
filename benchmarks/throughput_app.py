"""The Celery app of ``throughput.py``: what its workers run and its driver publishes with.

A worker imports it as ``celery -A throughput_app worker`` (with this directory on
PYTHONPATH) and reads its role and URLs from the ``BENCH_*`` environment variables the
driver sets: ``BENCH_ROLE`` (``plain``: the plain variants, on a worker that never
imports celery-resilience; ``resilient``; ``metrics``; ``all``), ``BENCH_BROKER_URL``,
``BENCH_RESILIENCE_URL``, ``BENCH_KEY_PREFIX`` and ``BENCH_METRICS_PORT``. Each task's
body is the same: one ``INCR`` of a per-phase counter, stamping the first and the last.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

ROLE = os.environ.get("BENCH_ROLE", "driver")  # driver | plain | resilient | metrics | all

VARIANTS = ("plain", "plain_acks_late", "nolock", "lock", "lock_metrics")
TASK_NAMES = {v: f"bench.{v}" for v in VARIANTS}
# CLOCK_MONOTONIC is one clock for every process of a Linux machine, so stamps taken
# in the worker children and in the driver can be subtracted.
now = time.monotonic


def make_app(role: str, broker_url: str, resilience_url: str | None, key_prefix: str) -> Celery:
    app = Celery("bench", broker=broker_url, backend=None, set_as_current=True)
    app.conf.update(
        broker_transport_options={"visibility_timeout": 3600},
        worker_prefetch_multiplier=4,
        # No result backend and no results: we measure the task path, not result storage.
        task_ignore_result=True,
        result_backend=None,
        broker_connection_retry_on_startup=True,
        # task_acks_late is left at Celery's default (False); resilient tasks set it per task.
    )
    if resilience_url is not None:
        app.conf.update(resilience_url=resilience_url, resilience_key_prefix=key_prefix)
    if role == "metrics":
        # The Prometheus exporter on (it serves /metrics from the worker's main process).
        app.conf.update(resilience_prometheus_port=int(os.environ["BENCH_METRICS_PORT"]))
    return app


_counter_client: redis.Redis | None = None
_counter_pid = 0


def _counter() -> redis.Redis:
    """One Redis client per worker child (the prefork children are forked)."""
    global _counter_client, _counter_pid
    if _counter_client is None or _counter_pid != os.getpid():
        _counter_client = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])
        _counter_pid = os.getpid()
    return _counter_client


def _done(key: str, n: int) -> None:
    """The whole body of every variant: count this task, stamp the first and the last."""
    t = now()
    r = _counter()
    c = r.incr(key)
    if c == 1:
        r.set(f"{key}:first", repr(t))
    if c == n:
        r.set(f"{key}:last", repr(t))


def register_tasks(app: Celery, role: str) -> None:
    if role in ("plain", "all"):

        @app.task(name=TASK_NAMES["plain"])
        def plain(i: int, key: str, n: int) -> None:
            _done(key, n)

        @app.task(name=TASK_NAMES["plain_acks_late"], acks_late=True)
        def plain_acks_late(i: int, key: str, n: int) -> None:
            _done(key, n)

    if role in ("resilient", "all"):
        # Imported only here: the "plain" worker runs Celery without celery-resilience.
        from celery_resilience import resilient

        @resilient()
        @app.task(name=TASK_NAMES["nolock"])
        def nolock(i: int, key: str, n: int) -> None:
            _done(key, n)

        @resilient(lock="k:{i}")
        @app.task(name=TASK_NAMES["lock"])
        def lock(i: int, key: str, n: int) -> None:
            _done(key, n)

    if role in ("metrics", "all"):
        from celery_resilience import resilient

        @resilient(lock="k:{i}")
        @app.task(name=TASK_NAMES["lock_metrics"])
        def lock_metrics(i: int, key: str, n: int) -> None:
            _done(key, n)


app: Celery | None = None
if ROLE != "driver":
    app = make_app(
        ROLE,
        os.environ["BENCH_BROKER_URL"],
        os.environ.get("BENCH_RESILIENCE_URL") if ROLE in ("resilient", "metrics", "all") else None,
        os.environ.get("BENCH_KEY_PREFIX", "celery_resilience"),
    )
    register_tasks(app, ROLE)
