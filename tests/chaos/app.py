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
  events for that task (redelivery seen, duplicate suppressed, crash budget spent...).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, signals

from celery_resilience import Backoff, current_attempt, get_plugin_manager, hookimpl, resilient
from celery_resilience.outcome import GiveUp

# Environment variables the workers are configured with.
PREFIX = "CHAOS_PREFIX"
REDIS_URL = "CHAOS_REDIS_URL"
QUEUE = "CHAOS_QUEUE"
VISIBILITY_TIMEOUT = "CHAOS_VISIBILITY_TIMEOUT"
FAST_SWEEP = "CHAOS_FAST_SWEEP"  # "1": kombu's own restore sweep every second (kombu >= 5.7)

_DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
_UNCONFIGURED = "chaos:unconfigured"

# Leases outlive the longest short body many times over; a killed holder on this
# machine is freed at once by the gate anyway (its process is provably gone).
LOCK_TTL = 10.0
# Contended tasks wait for up to 15 others on their key and for a killed node's
# visibility timeout: retries are cheap and plenty.
MAX_RETRIES = 400
BACKOFF = Backoff(base=0.2, factor=2.0, cap=1.5, jitter="full")
# How long a held body waits for the test's go-ahead at most.
HELD_MAX_S = 120.0


class Records:
    """The record keys of one cluster, and a Redis client per process."""

    def __init__(self, prefix: str, url: str) -> None:
        self.prefix = prefix
        self.url = url
        self._clients: dict[int, redis.Redis[str]] = {}

    def client(self) -> redis.Redis[str]:
        """A client of this process (a forked pool child makes its own)."""
        pid = os.getpid()
        if pid not in self._clients:
            self._clients[pid] = redis.Redis.from_url(
                self.url, decode_responses=True, socket_timeout=HELD_MAX_S + 30
            )
        return self._clients[pid]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, "rec", *map(str, parts)])

    @property
    def log(self) -> str:
        return self.key("log")

    @property
    def completions(self) -> str:
        return self.key("completions")

    @property
    def overlaps(self) -> str:
        return self.key("overlaps")

    def events(self, task_id: str) -> str:
        return self.key("events", task_id)

    def release(self, tag: str) -> str:
        return self.key("release", tag)


def broker_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The broker transport options of a cluster's workers (and of a test's sweeper)."""
    options: dict[str, Any] = {
        "global_keyprefix": f"{env.get(PREFIX, _UNCONFIGURED)}:broker:",
        "visibility_timeout": float(env.get(VISIBILITY_TIMEOUT, 3600)),
    }
    if env.get(FAST_SWEEP) == "1":
        options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    return options


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


class EventCounter:
    """A celery-resilience plugin counting every observer event per task id in Redis."""

    def __init__(self, records: Records) -> None:
        self.records = records

    def _count(self, task_id: str, event: str) -> None:
        self.records.client().hincrby(self.records.events(task_id), event, 1)

    @hookimpl
    def resilience_retry_scheduled(
        self, task_name: str, task_id: str, attempt: int, reason: str, countdown: float
    ) -> None:
        self._count(task_id, f"retry_scheduled:{reason}")

    @hookimpl
    def resilience_redelivery_seen(
        self, task_name: str, task_id: str, attempt: int, deliveries: int
    ) -> None:
        self._count(task_id, "redelivery_seen")

    @hookimpl
    def resilience_crash_budget_spent(
        self, task_name: str, task_id: str, attempt: int, deliveries: int, max_crashes: int
    ) -> None:
        self._count(task_id, "crash_budget_spent")

    @hookimpl
    def resilience_duplicate_suppressed(self, task_name: str, task_id: str) -> None:
        self._count(task_id, "duplicate_suppressed")

    @hookimpl
    def resilience_task_gave_up(self, outcome: GiveUp) -> None:
        self._count(outcome.task_id, f"gave_up:{outcome.reason}")


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the app of one chaos cluster from ``env`` (a worker passes ``os.environ``)."""
    prefix = env.get(PREFIX, _UNCONFIGURED)
    url = env.get(REDIS_URL, _DEFAULT_REDIS)
    queue = env.get(QUEUE, f"{prefix}.queue")
    records = Records(prefix, url)

    app = Celery("celery_resilience_chaos", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options=broker_options(env),
        result_backend=url,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:result:"},
        task_default_queue=queue,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        resilience_url=url,
        resilience_key_prefix=f"{prefix}:res",
        resilience_visibility_heartbeat=True,
    )

    def register_counter(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            manager = get_plugin_manager()
            if not manager.has_plugin("chaos-event-counter"):
                manager.register(EventCounter(records), name="chaos-event-counter")

    # In the worker's main process, before the pool forks its children.
    signals.worker_init.connect(register_counter, weak=False)

    def log(event: str, task: Any, **fields: Any) -> None:
        node = str(task.request.hostname).split("@")[0]
        line = {"ev": event, "id": task.request.id, "node": node, "pid": os.getpid()}
        line.update(fields, t=time.time())
        records.client().rpush(records.log, json.dumps(line))

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
        )
        detector = OverlapDetector(records, lock)
        detector.enter(run, info)
        try:
            if wait_for is None:
                time.sleep(seconds)
            else:
                records.client().blpop([wait_for], timeout=seconds)
        finally:
            detector.leave(run)
        records.client().hincrby(records.completions, task.request.id, 1)
        log("end", task, key=lock, run=run)
        return seconds

    # shared=False: the test process builds one app per cluster.

    @resilient(lock="{key}", lock_ttl=LOCK_TTL, max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.locked")
    def locked(self: Any, key: str, seconds: float) -> float:
        """Holds lock ``key`` for ``seconds``, recording start, end and overlaps."""
        return body(self, key, seconds, None)

    @resilient(lock="held:{tag}", lock_ttl=LOCK_TTL, max_retries=MAX_RETRIES, backoff=BACKOFF)
    @app.task(bind=True, shared=False, name="chaos.held")
    def held(self: Any, tag: str, seconds: float) -> float:
        """Holds lock ``held:<tag>`` until the test releases it, or ``seconds`` at most."""
        return body(self, f"held:{tag}", min(seconds, HELD_MAX_S), records.release(tag))

    return app


app = create_app(os.environ)
