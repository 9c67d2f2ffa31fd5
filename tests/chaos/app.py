"""The Celery app of the chaos suite: what the worker nodes run and the tests publish with.

A worker runs ``celery -A tests.chaos.app worker`` and gets ``app = create_app(os.environ)``;
the test process builds the same app from the same mapping. Everything one cluster
touches lives under its Redis prefix (``CHAOS_PREFIX``): the broker's queue, ``unacked``
hash and index (``global_keyprefix``), results, coordination keys, and the records the
bodies write for the test to check:

- ``rec:log``: one JSON line per body start and end (task id, lock key, node, pid, time,
  fencing token), in order;
- ``rec:completions``: a hash task id -> how many bodies ran to their end;
- ``rec:active:<key>`` / ``rec:holders:<key>``: the overlap detector of one lock key, an
  INCR/DECR counter of the bodies inside it and who they are. A body SIGKILLed inside
  never decrements, so a body that finds the counter above one first drops the
  entries of holders whose process is gone (checked in ``/proc`` here, independently of
  the library); what is left above one is an overlap, appended to ``rec:overlaps``;
- ``rec:events:<task id>``: a hash hook name -> count of celery-resilience's observer
  events for that task (redelivery seen, duplicate suppressed, crash budget spent...);
- ``rec:starts`` / ``rec:completions``: the counters of ``chaos.trivial``, the task
  published by the thousand (a hash task id -> bodies started / ended, nothing else).

A node started with ``CHAOS_GATE`` set waits, once imported and before it starts its
pool and consumer, until the test pushes to that Redis list (it sets ``<gate>:waiting``
meanwhile): it is ready a fraction of a second after, where a cold start takes seconds.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from celery_resilience import Backoff, current_attempt, resilient
from tests.support.apps import ProcessRedis, worker_settings
from tests.support.recording import record_events_in_workers
from tests.support.services import REDIS_URL as _DEFAULT_REDIS
from tests.support.workers import redis_broker_options

# Environment variables the workers are configured with.
PREFIX = "CHAOS_PREFIX"
REDIS_URL = "CHAOS_REDIS_URL"
QUEUE = "CHAOS_QUEUE"
VISIBILITY_TIMEOUT = "CHAOS_VISIBILITY_TIMEOUT"
FAST_SWEEP = "CHAOS_FAST_SWEEP"  # "1": kombu's own restore sweep every second (kombu >= 5.7)
RESILIENCE_URL = "CHAOS_RESILIENCE_URL"  # optional: the coordination Redis, if not REDIS_URL
SETTINGS = "CHAOS_SETTINGS"  # optional: a JSON object of Celery settings, applied last
LOCK_TTL_S = "CHAOS_LOCK_TTL"  # optional: the lock leases' TTL, seconds (default LOCK_TTL)
GATE = "CHAOS_GATE"  # optional: a Redis list the worker waits on before it consumes

_UNCONFIGURED = "chaos:unconfigured"

# Leases outlive the longest short body many times over; a killed holder on this
# machine is freed at once by the gate anyway (its process is provably gone).
LOCK_TTL = 10.0
# Contended tasks wait for up to 15 others on their key and for a killed node's
# visibility timeout: retries are cheap and plenty.
MAX_RETRIES = 400
# A retry budget for failures, far below the number of tasks queued on one key.
FEW_RETRIES = 3
BACKOFF = Backoff(base=0.2, factor=2.0, cap=1.5, jitter="full")
# How long a held body waits for the test's go-ahead at most.
HELD_MAX_S = 120.0
# How long a gated node waits for the test's go-ahead at most (then it starts anyway).
GATE_MAX_S = 120.0


class Records:
    """The record keys of one cluster, and a Redis client per process."""

    def __init__(self, prefix: str, url: str) -> None:
        self.prefix = prefix
        self.url = url
        self.client = ProcessRedis(url, socket_timeout=HELD_MAX_S + 30)

    def close(self) -> None:
        self.client.close()

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, "rec", *map(str, parts)])

    @property
    def log(self) -> str:
        return self.key("log")

    @property
    def completions(self) -> str:
        return self.key("completions")

    @property
    def starts(self) -> str:
        return self.key("starts")

    @property
    def overlaps(self) -> str:
        return self.key("overlaps")

    def events(self, task_id: str) -> str:
        return self.key("events", task_id)

    def release(self, tag: str) -> str:
        return self.key("release", tag)

    def count_event(self, task_id: str, event: str) -> None:
        """Count one ``event`` of ``task_id`` (``record_events_in_workers`` calls it)."""
        self.client().hincrby(self.events(task_id), event, 1)


def broker_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The broker transport options of a cluster's workers (and of a test's sweeper)."""
    return redis_broker_options(
        env.get(PREFIX, _UNCONFIGURED),
        float(env.get(VISIBILITY_TIMEOUT, 3600)),
        fast_sweep=env.get(FAST_SWEEP) == "1",
    )


def _process_start(pid: int) -> str | None:
    """The start time of live process ``pid`` (field 22 of /proc/<pid>/stat), None if gone.

    A zombie (killed, not yet reaped) is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == b"Z" or len(fields) <= 19:
        return None
    return fields[19].decode()


class OverlapDetector:
    """The INCR/DECR counter of the bodies inside one lock key (see the module doc)."""

    def __init__(self, records: Records, lock: str) -> None:
        self.r = records.client()
        self.records = records
        self.lock = lock
        self.active = records.key("active", lock)
        self.holders = records.key("holders", lock)

    def enter(self, run: str, info: dict[str, Any]) -> None:
        me = {**info, "pid": os.getpid(), "pstart": _process_start(os.getpid())}
        with self.r.pipeline() as pipe:
            pipe.hset(self.holders, run, json.dumps(me))
            pipe.incr(self.active)
            _, active = pipe.execute()
        if int(active) > 1:
            self.check(run, "start")

    def check(self, run: str, where: str) -> None:
        """Drop holders whose process is gone; record an overlap if others are left."""
        others = {k: json.loads(v) for k, v in self.r.hgetall(self.holders).items() if k != run}
        for other, info in others.items():
            # A body killed inside never left; only one cleaner decrements for it.
            gone = _process_start(int(info["pid"])) != info["pstart"]
            if gone and self.r.hdel(self.holders, other) == 1:
                self.r.decr(self.active)
        active = int(self.r.get(self.active) or 0)
        if active > 1:
            self.r.rpush(
                self.records.overlaps,
                json.dumps(
                    {
                        "lock": self.lock,
                        "run": run,
                        "where": where,
                        "active": active,
                        "holders": self.r.hgetall(self.holders),
                        "t": time.time(),
                    }
                ),
            )

    def leave(self, run: str) -> None:
        if int(self.r.get(self.active) or 0) > 1:
            self.check(run, "end")
        with self.r.pipeline() as pipe:
            pipe.hdel(self.holders, run)
            pipe.decr(self.active)
            pipe.execute()


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the app of one chaos cluster from ``env`` (a worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, _UNCONFIGURED)
    url = env.get(REDIS_URL, _DEFAULT_REDIS)
    queue = env.get(QUEUE, f"{prefix}.queue")
    records = Records(prefix, url)

    app = Celery("celery_resilience_chaos", set_as_current=False)
    app.conf.update(
        worker_settings(prefix, queue),
        broker_url=url,
        broker_transport_options=broker_options(env),
        result_backend=url,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:result:"},
        resilience_url=env.get(RESILIENCE_URL) or url,
        resilience_visibility_heartbeat=True,
    )
    if env.get(RESILIENCE_URL):
        # Dead letters stay on the main Redis, so a coordination restart keeps them.
        app.conf.resilience_dlq_url = url
    if env.get(SETTINGS):
        app.conf.update(json.loads(env[SETTINGS]))
    record_events_in_workers(app, "chaos-event-counter", records.count_event)
    lock_ttl = float(env.get(LOCK_TTL_S, LOCK_TTL))
    if env.get(GATE):
        gate = env[GATE]

        def wait_for_the_gate(**_: Any) -> None:
            records.client().set(gate + ":waiting", 1, ex=int(GATE_MAX_S))
            records.client().blpop([gate], timeout=GATE_MAX_S)

        signals.worker_init.connect(wait_for_the_gate, weak=False)

    def log(event: str, task: Any, **fields: Any) -> None:
        """Append one record; ``t`` is this process's clock, ``srv`` the Redis server's."""
        r = records.client()
        node = str(task.request.hostname).split("@")[0]
        line = {"ev": event, "id": task.request.id, "node": node, "pid": os.getpid()}
        seconds, micros = r.time()
        line.update(fields, t=time.time(), srv=seconds + micros / 1e6)
        r.rpush(records.log, json.dumps(line))

    def body(task: Any, lock: str, seconds: float, wait_for: str | None) -> float:
        attempt = current_attempt()
        run = uuid.uuid4().hex
        info = {"id": task.request.id, "node": str(task.request.hostname).split("@")[0]}
        log(
            "start",
            task,
            key=lock,
            secs=seconds,
            run=run,
            token=attempt.fencing_token,
            attempt=attempt.attempt,
            deliveries=attempt.deliveries,
            retries=task.request.retries,
        )
        detector = OverlapDetector(records, lock)
        detector.enter(run, info)
        try:
            if wait_for is None:
                time.sleep(seconds)
            else:
                # BLMOVE onto the same list leaves the token for the next body: a node
                # SIGKILLed while blocked here can still be served it by Redis (the server
                # may run the RPUSH before it sees the dead client's socket close).
                records.client().blmove(wait_for, wait_for, seconds, "LEFT", "RIGHT")
        finally:
            detector.leave(run)
        records.client().hincrby(records.completions, task.request.id, 1)
        log("end", task, key=lock, run=run)
        return seconds

    # shared=False: the test process builds one app per cluster.

    @resilient(lock="{key}", lock_ttl=lock_ttl, max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.locked")
    def locked(self: Any, key: str, seconds: float) -> float:
        """Holds lock ``key`` for ``seconds``, recording start, end and overlaps."""
        return body(self, key, seconds, None)

    @resilient(lock="held:{tag}", lock_ttl=lock_ttl, max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.held")
    def held(self: Any, tag: str, seconds: float) -> float:
        """Holds lock ``held:<tag>`` until the test releases it, or ``seconds`` at most."""
        return body(self, f"held:{tag}", min(seconds, HELD_MAX_S), records.release(tag))

    @resilient(lock="{key}", lock_ttl=lock_ttl, max_retries=FEW_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.locked_few_retries")
    def locked_few_retries(self: Any, key: str, seconds: float) -> float:
        """``chaos.locked`` with a user's small retry budget (waiting is not failing)."""
        return body(self, key, seconds, None)

    @resilient(max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.unlocked")
    def unlocked(self: Any, seconds: float) -> float:
        """Runs ``seconds`` without a lock; the overlap detector watches its task id."""
        return body(self, f"id:{self.request.id}", seconds, None)

    @resilient(max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.trivial")
    def trivial(self: Any) -> None:
        """Counts its start and its end, nothing else (two round trips)."""
        r = records.client()
        r.hincrby(records.starts, self.request.id, 1)
        r.hincrby(records.completions, self.request.id, 1)

    return app


app = create_app(os.environ)
