"""The Celery app the integration workers run, and the tests publish with.

A worker runs ``celery -A <this module> worker`` and gets ``app = create_app(os.environ)``;
the test process calls :func:`create_app` with the same mapping to publish tasks and read
their results. Everything a run touches in Redis lives under one prefix (``CRT_PREFIX``):
the broker's keys, the result backend's keys, the coordination keys and the records the
task bodies write, so parallel runs never meet and cleanup is one pattern.

Task bodies record what happened in Redis (``CRT_RECORD_URL``), never in memory: the
test process and the worker processes share nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu.utils import json as kombu_json

from celery_resilience import Backoff, current_attempt, resilient
from tests.support.apps import ProcessRedis, worker_settings
from tests.support.recording import record_events_in_workers
from tests.support.services import REDIS_URL as _DEFAULT_REDIS
from tests.support.workers import redis_broker_options

# Environment variables the workers are configured with.
BROKER_URL = "CRT_BROKER_URL"
RESULT_URL = "CRT_RESULT_URL"
RECORD_URL = "CRT_RECORD_URL"
RESILIENCE_URL = "CRT_RESILIENCE_URL"
DLQ_URL = "CRT_RESILIENCE_DLQ_URL"  # optional: the DLQ shares RESILIENCE_URL when unset
QUEUE = "CRT_QUEUE"
PREFIX = "CRT_PREFIX"
VISIBILITY_TIMEOUT = "CRT_VISIBILITY_TIMEOUT"  # optional: the Redis broker's, in seconds
SETTINGS = "CRT_SETTINGS"  # optional: a JSON object of Celery settings, applied last


# How long a body that waits for the test's go-ahead waits at most (a bound, so a
# failed test cannot leave a child blocked for ever).
RELEASE_WAIT_S = 30

# Short leases and backoff keep the suite fast; they are the values under test.
LOCK_TTL = 2
QUICK_BACKOFF = Backoff(base=0.2, cap=1.0, jitter="none")


class Records:
    """Names the Redis keys of one run and gives each process its own client."""

    def __init__(self, prefix: str, url: str) -> None:
        self.prefix = prefix
        self.url = url
        self.client = ProcessRedis(url, socket_timeout=RELEASE_WAIT_S + 5)

    def key(self, tag: str, *parts: object) -> str:
        """The key of record ``parts`` of the test identified by ``tag``."""
        return ":".join([self.prefix, "rec", tag, *map(str, parts)])

    def events_key(self, task_id: str) -> str:
        """The list of observer-hook events seen for ``task_id``."""
        return f"{self.prefix}:events:{task_id}"

    def push_event(self, task_id: str, event: str) -> None:
        """Append ``event`` to the events of ``task_id`` (``record_events_in_workers``)."""
        self.client().rpush(self.events_key(task_id), event)


class DiesWhileStored:
    """A return value whose first serialization SIGKILLs the process serializing it.

    Simulates a child OOM-killed while Celery stores the task's result: after the body
    returned, before the result is in the result backend and the message is acked.
    Later serializations (a re-run) store ``"stored"``.
    """

    def __init__(self, records: Records, tag: str) -> None:
        self.records = records
        self.tag = tag


def _encode_dies_while_stored(value: DiesWhileStored) -> str:
    r = value.records.client()
    if r.rpush(value.records.key(value.tag, "serializations"), os.getpid()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "stored"


kombu_json.register_type(
    DiesWhileStored, "crt_dies_while_stored", _encode_dies_while_stored, lambda value: value
)


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the test app from ``env`` (the worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, "crtest:unconfigured")
    broker_url = env.get(BROKER_URL, _DEFAULT_REDIS)
    result_url = env.get(RESULT_URL, _DEFAULT_REDIS)
    queue = env.get(QUEUE, f"{prefix}:queue")
    records = Records(prefix, env.get(RECORD_URL, result_url))

    app = Celery("celery_resilience_integration", set_as_current=False)
    app.conf.update(
        worker_settings(prefix, queue),
        broker_url=broker_url,
        result_backend=result_url,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:result:"},
        resilience_url=env.get(RESILIENCE_URL, result_url),
    )
    if env.get(DLQ_URL):
        app.conf.resilience_dlq_url = env[DLQ_URL]
    if broker_url.startswith(("redis://", "rediss://")):
        # Queues, unacked hash and its index under this run's prefix only.
        app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:broker:"}
        if env.get(VISIBILITY_TIMEOUT):
            app.conf.broker_transport_options = redis_broker_options(
                prefix, float(env[VISIBILITY_TIMEOUT]), fast_sweep=False
            )
    else:
        # AMQP heartbeats put a short timer in the worker's event loop; without one the
        # loop sleeps up to 5 s between wake-ups and notices SIGTERM that late.
        app.conf.broker_heartbeat = 2

    if env.get(SETTINGS):
        app.conf.update(json.loads(env[SETTINGS]))

    record_events_in_workers(app, "integration-event-recorder", records.push_event)

    # shared=False everywhere: the test process builds one app per module, and shared
    # tasks would leak between them.

    @resilient(
        lock="exclusive:{tag}:{key}",
        lock_ttl=LOCK_TTL,
        max_retries=100,
        backoff=Backoff(base=0.05, cap=0.5, jitter="full"),
    )
    @app.task(bind=True, shared=False, name="crt.exclusive")
    def exclusive(self: Any, tag: str, key: str, n: int) -> int:
        """Runs a short critical section on ``key``, recording overlaps and fencing tokens."""
        r = records.client()
        token = current_attempt().fencing_token
        active = r.incr(records.key(tag, "active", key))
        try:
            if active > 1:
                r.rpush(records.key(tag, "overlaps"), f"{key} run {n}: {active} bodies at once")
            r.rpush(records.key(tag, "tokens", key), str(token))
            r.rpush(records.key(tag, "hosts"), self.request.hostname)
            # Widen the window in which an overlap would show.
            time.sleep(0.02)
        finally:
            r.decr(records.key(tag, "active", key))
        r.rpush(records.key(tag, "done"), n)
        return n

    @resilient(lock="held:{tag}", lock_ttl=LOCK_TTL, max_retries=20, backoff=QUICK_BACKOFF)
    @app.task(shared=False, name="crt.blocks_until_released")
    def blocks_until_released(tag: str) -> str:
        """Records its start, then holds its lock until the test pushes to ``release``."""
        r = records.client()
        r.rpush(records.key(tag, "starts"), os.getpid())
        if r.blpop([records.key(tag, "release")], timeout=RELEASE_WAIT_S) is None:
            raise TimeoutError(f"{tag}: the test never released this task")
        r.rpush(records.key(tag, "completions"), os.getpid())
        return "released"

    @resilient(lock="held:{tag}", max_retries=1, lock_timeout=1.5, backoff=QUICK_BACKOFF)
    @app.task(shared=False, name="crt.contends")
    def contends(tag: str) -> str:
        """Wants the lock ``blocks_until_released`` holds; records a start if it ever runs."""
        records.client().rpush(records.key(tag, "contender_starts"), os.getpid())
        return "ran"

    @resilient(max_crashes=3, max_retries=0)
    @app.task(shared=False, name="crt.kills_its_worker")
    def kills_its_worker(tag: str) -> None:
        """Records its start, then SIGKILLs the process running it (a poison message)."""
        records.client().rpush(records.key(tag, "starts"), os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    @resilient(max_retries=0)
    @app.task(shared=False, name="crt.killed_while_storing_its_result")
    def killed_while_storing_its_result(tag: str) -> DiesWhileStored:
        """Records its start and succeeds; storing its result kills the child once."""
        records.client().rpush(records.key(tag, "starts"), os.getpid())
        return DiesWhileStored(records, tag)

    @resilient(max_retries=2, retry_on=(ConnectionError,), backoff=QUICK_BACKOFF)
    @app.task(shared=False, name="crt.always_fails")
    def always_fails(tag: str) -> None:
        """Records its start and raises a retryable error every time."""
        run = records.client().rpush(records.key(tag, "starts"), os.getpid())
        raise ConnectionError(f"upstream refused run {run} of {tag}")

    @resilient(lock="doubles:{tag}", lock_ttl=LOCK_TTL, max_retries=50, backoff=QUICK_BACKOFF)
    @app.task(shared=False, name="crt.doubles")
    def doubles(tag: str, value: int) -> int:
        """Records its start and returns ``2 * value``."""
        records.client().rpush(records.key(tag, "starts"), os.getpid())
        return 2 * value

    @app.task(shared=False, name="crt.collects")
    def collects(results: list[int], tag: str) -> int:
        """A plain chord body: records the header's results it was called with."""
        records.client().rpush(records.key(tag, "collected"), json.dumps(sorted(results)))
        return sum(results)

    @resilient(max_retries=2, retry_on=(ConnectionError,), backoff=QUICK_BACKOFF)
    @app.task(bind=True, shared=False, name="crt.fails_until_fixed")
    def fails_until_fixed(self: Any, tag: str, n: int, *, label: str) -> str:
        """Records its start, arguments and retries, then fails until the test sets ``fixed``."""
        r = records.client()
        r.rpush(records.key(tag, "starts"), os.getpid())
        r.rpush(records.key(tag, "runs"), json.dumps([tag, n, label, self.request.retries]))
        if not r.exists(records.key(tag, "fixed")):
            raise ConnectionError(f"upstream refused {n} of {tag}")
        return f"{label}-{n}"

    @resilient
    @app.task(shared=False, name="crt.fails_terminally")
    def fails_terminally(tag: str) -> None:
        """Records its start and raises an error that is never retried."""
        records.client().rpush(records.key(tag, "starts"), os.getpid())
        raise ValueError(f"invalid input in {tag}")

    def record_body(task: Any, tag: str, seconds: float) -> str:
        """Record the body's start (``starts``), sleep ``seconds``, record its span
        (``bodies``: task id, pid, retries, start and end times)."""
        r = records.client()
        started = time.time()
        r.rpush(records.key(tag, "starts"), os.getpid())
        time.sleep(seconds)
        span = {
            "id": task.request.id,
            "pid": os.getpid(),
            "retries": task.request.retries,
            "start": started,
            "end": time.time(),
        }
        r.rpush(records.key(tag, "bodies"), json.dumps(span))
        return "recorded"

    @resilient(backoff=QUICK_BACKOFF)
    @app.task(bind=True, shared=False, name="crt.records_its_body")
    def records_its_body(self: Any, tag: str, seconds: float) -> str:
        """Takes no lock; records when its body starts and ends, ``seconds`` apart."""
        return record_body(self, tag, seconds)

    @resilient(lock="records:{tag}", max_retries=100, backoff=QUICK_BACKOFF)
    @app.task(bind=True, shared=False, name="crt.locked_records_its_body")
    def locked_records_its_body(self: Any, tag: str, seconds: float) -> str:
        """Holds lock ``records:<tag>`` (the default lease length); records its body's span."""
        return record_body(self, tag, seconds)

    def waits_for_release(task: Any, tag: str) -> str:
        """Record the body's start (``starts``: task id and pid), wait for the test's
        go-ahead on ``release``, record the end (``completions``: task id)."""
        r = records.client()
        r.rpush(records.key(tag, "starts"), f"{task.request.id} {os.getpid()}")
        if r.blpop([records.key(tag, "release")], timeout=RELEASE_WAIT_S) is None:
            raise TimeoutError(f"{tag}: the test never released this task")
        r.rpush(records.key(tag, "completions"), task.request.id)
        return task.request.id

    @resilient(dedup="dedup:{tag}:{key}", max_retries=0)
    @app.task(bind=True, shared=False, name="crt.dedup_until_start")
    def dedup_until_start(self: Any, tag: str, key: int = 0) -> str:
        """Collapses calls while one is queued; waits for the test's go-ahead."""
        return waits_for_release(self, tag)

    @resilient(
        dedup="dedup:{tag}:{key}", lock="dedup:{tag}:{key}", max_retries=0, backoff=QUICK_BACKOFF
    )
    @app.task(bind=True, shared=False, name="crt.coalesces")
    def coalesces(self: Any, tag: str, key: int = 0) -> str:
        """dedup= and lock= on one key: at most one run, and at most one queued behind it."""
        return waits_for_release(self, tag)

    @resilient(dedup="dedup:{tag}:{key}", dedup_until="finish", max_retries=0)
    @app.task(bind=True, shared=False, name="crt.dedup_until_finish")
    def dedup_until_finish(self: Any, tag: str, key: int = 0) -> str:
        """Collapses calls while one is queued or running; waits for the test's go-ahead."""
        return waits_for_release(self, tag)

    @resilient(dedup="dedup:{tag}", dedup_until="finish", max_retries=0)
    @app.task(shared=False, name="crt.dedup_fails")
    def dedup_fails(tag: str) -> None:
        """Records its start and fails for good: dead-lettered on its first run."""
        records.client().rpush(records.key(tag, "starts"), os.getpid())
        raise ValueError(f"invalid input in {tag}")

    return app


app = create_app(os.environ)
