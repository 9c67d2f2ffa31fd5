#!/usr/bin/env python
"""Acquire + release latency of a lock against Redis on loopback, per library.

Run from the repository root (needs celery-once and celery-singleton, which only the
benchmark environment has; ``run.py`` makes it)::

    benchmarks/.venv/bin/python benchmarks/locks.py [--quick] [--json-out FILE]

One operation = take a free lock and give it back, as each library does it:

``celery-resilience``  the coordination backend's ``admit`` with a lock key (one
                       script: completion record, delivery counter, ``SET NX PX``,
                       fencing token) and ``finish`` (one script: compare-and-delete
                       and counters): what a delivery with ``lock=`` costs
``redis-py Lock``      ``redis.lock.Lock(...).acquire()`` / ``.release()``
``celery-once``        ``QueueOnce.once_backend.raise_or_lock`` / ``clear_lock``
                       (key from ``get_key``, as ``apply_async`` and ``after_return`` do)
``celery-singleton``   ``Singleton.generate_lock`` + ``aquire_lock`` / ``unlock``

Rounds interleave the libraries (order rotated each round); each round times
``--n`` operations per library with ``perf_counter_ns``. Reported: p50 and p99 per
round, median and min-max over rounds, in microseconds.
"""

from __future__ import annotations

import os
import secrets
import sys
import uuid
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from celery import Celery
from common import (
    REDIS_URL,
    client,
    delete_keys,
    log,
    rounds_options,
    spread,
    timed_rounds,
    versions,
    write_json,
)

Op = Callable[[int], None]


def make_ops(prefix: str) -> dict[str, Op]:
    """One acquire+release callable per library; the argument makes the key unique."""
    from celery_once import QueueOnce
    from celery_singleton import Singleton

    from celery_resilience.backends.redis import RedisCoordinationBackend

    backend = RedisCoordinationBackend(REDIS_URL, key_prefix=f"{prefix}:res")
    r = redis.Redis.from_url(REDIS_URL)

    def resilience(i: int) -> None:
        tid = uuid.uuid4().hex
        got = backend.admit(tid, owner=tid, publish=tid, lock_key=f"k{i}", lease_ttl=30.0,
                            max_crashes=3, record_ttl=60.0)  # fmt: skip
        assert got.fencing_token is not None
        backend.finish(tid, owner=tid, publish=tid, lock_key=f"k{i}", succeeded=True,
                       record_ttl=60.0)  # fmt: skip

    def redis_lock(i: int) -> None:
        lock = redis.lock.Lock(r, f"{prefix}:rl:{i}", timeout=30.0)
        assert lock.acquire(blocking=False)
        lock.release()

    app = Celery(prefix, broker="memory://", set_as_current=False)
    app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": REDIS_URL}}
    app.conf.update(singleton_backend_url=REDIS_URL, singleton_key_prefix=f"{prefix}:sl:")

    @app.task(base=QueueOnce, name=f"{prefix}.once", once={"graceful": True})
    def once_task(i: int) -> None:
        pass

    @app.task(base=Singleton, name=f"{prefix}.singleton")
    def singleton_task(i: int) -> None:
        pass

    once_backend = once_task.once_backend

    def once(i: int) -> None:
        key = once_task.get_key(args=(i,), kwargs={})
        once_backend.raise_or_lock(key, timeout=once_task.default_timeout)
        once_backend.clear_lock(key)

    def singleton(i: int) -> None:
        lock = singleton_task.generate_lock(singleton_task.name, task_args=(i,))
        assert singleton_task.aquire_lock(lock, uuid.uuid4().hex)
        singleton_task.unlock(lock)

    return {
        "celery-resilience": resilience,
        "redis-py Lock": redis_lock,
        "celery-once": once,
        "celery-singleton": singleton,
    }


def main(argv: list[str] | None = None) -> int:
    n, rounds, json_out = rounds_options(__doc__ or "", "operations per library", argv)
    run_id = secrets.token_hex(3)
    prefix = f"bench{run_id}:locks"
    r = client()
    try:
        ops = make_ops(prefix)
        log(f"locks: {rounds} rounds x {n} acquire+release per library ...")
        raw = timed_rounds(ops, n, rounds)
    finally:
        delete_keys(r, f"*{run_id}*")
    summary = {
        name: {k: spread(x[k] for x in rr) for k in ("p50_us", "p99_us")}
        for name, rr in raw.items()
    }
    write_json(json_out, {"n": n, "rounds": rounds, "summary": summary, "raw": raw,
                               "versions": versions()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
