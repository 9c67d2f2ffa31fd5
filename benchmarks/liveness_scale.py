#!/usr/bin/env python
"""Liveness at scale: what a fleet's heartbeats cost the broker's Redis, side by side with
the heartbeat before liveness, and how long a dead node's 10,000 messages take to return.

Run from the repository root (``run.py`` runs it for the tables)::

    benchmarks/.venv/bin/python benchmarks/liveness_scale.py [--quick] [--json-out FILE]

Everything runs against a ``redis-server`` of its own (a free loopback port, no
persistence, ended by its pid), so the server's CPU (``INFO`` ``used_cpu_user +
used_cpu_sys``) and commands (``total_commands_processed``, which counts the commands
Lua scripts run, too) over a measured window are the benchmark's alone.

**Scale.** 1, 10, 100 and 500 simulated nodes on one Redis, idle and each holding 1,000
messages, for each heartbeat, in processes of up to ``--per-process`` nodes each:

- ``liveness``: the heartbeat as it is. Each node is a kombu Redis channel adopted by
  a ``Node``, fetching reliably, whose real ``Ticker`` is called every
  ``ticker.every`` seconds (as ``VisibilityHeartbeat.start``'s ``tick`` on the
  consumer's timer): presence renewal every ``ttl / 3``, visibility refresh every
  ``tick_interval``, liveness sweep every second, restore sweep every
  ``sweep_interval``.
- ``before``: the heartbeat before liveness, the ``tick`` of ``heartbeat.py`` at the
  commit before bd9235c, copied in :class:`BeforeNode`: every ``sweep_interval`` the
  refresh of messages delivered since the last tick and kombu's own restore sweep;
  every ``tick_interval`` one ``ZADD XX`` (per 1,000 tags) of every held tag.

Defaults as a worker has them: node TTL 6 s, visibility timeout 3600 s. Held messages
are written as the reliable fetch records them (kombu's ``unacked`` hash and
``unacked_index``, plus the node's held set for ``liveness``, kombu's in-memory
``QoS._delivered`` for ``before``), copies of one real published message. Each
node's tick phase and each step's phase are random, as in a fleet whose nodes started
at random times. No consumer polls: the fetch's own commands (the same per node with or
without liveness) are not counted. Each simulator process reports how late its ticks
started (kombu's timer schedules the next run ``every`` seconds after a run starts)
and counts its round trips (redis-py's ``send_packed_command``: one per command, one
per pipeline). Per-node cost is the window's figure less an idle server's, divided by
the nodes.

**Recovery.** A live node (its real ``Ticker``) and a dead one that fetched 10,000
messages with the real reliable fetch and then stops renewing its presence: seconds
from the presence's deadline (the server's clock) until all 10,000 are on the queue;
then checks that each came back exactly once (the queue holds each delivery tag once,
kombu's unacked keys and every held set are empty). For ``before`` the same 10,000
(fetched by kombu's own ``BRPOP``) are made due, as a visibility timeout after the dead
node's last refresh, and a live node's restore sweep (kombu's) puts them back.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from common import (
    PrivateRedis,
    log,
    pctl,
    private_redis,
    redis_usage,
    spread,
    versions,
    write_json,
)

MECHANISMS = ("before", "liveness")
NODE_TTL = 6.0  # resilience_node_ttl's default
VISIBILITY_TIMEOUT = 3600.0  # kombu's default
QUEUE = "lq"
TAG = "@@tag@@"  # stands for the delivery tag in the message template
BATCH = 1000  # entries per pipelined write
LATE = 0.1  # seconds: a tick started later than this is off its schedule
READY_TIMEOUT = 600.0


@dataclass(frozen=True)
class Spec:
    """What one simulator process runs: ``nodes`` nodes of ``mechanism``."""

    url: str
    prefix: str  # kombu's global_keyprefix
    mechanism: str
    nodes: int
    held: int  # messages each node holds
    template: str  # one published message's JSON, delivery tag replaced by TAG
    seed: int


def transport_options(prefix: str) -> dict[str, Any]:
    return {"global_keyprefix": prefix, "visibility_timeout": VISIBILITY_TIMEOUT}


_round_trips = [0]


def count_round_trips() -> None:
    """Count every write of a command (or a whole pipeline) to Redis in this process."""
    from redis.connection import AbstractConnection

    send: Callable[..., None] = AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        _round_trips[0] += 1
        send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def entry(template: str, tag: str) -> str:
    """kombu's ``unacked`` entry of a message fetched from ``QUEUE``, as ``FETCH`` writes it."""
    return f'[{template.replace(TAG, tag)}, "{QUEUE}", "{QUEUE}"]'


def write_held(
    r: redis.Redis, prefix: str, template: str, tags: list[str], held_key: str | None
) -> None:
    """Record ``tags`` as the reliable fetch does: kombu's ``unacked`` entry
    ``[payload, exchange, routing key]``, the ``unacked_index`` scored with the server's
    clock, and (``held_key``) the node's held set."""
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    pipe = r.pipeline(transaction=False)
    for start in range(0, len(tags), BATCH):
        chunk = tags[start : start + BATCH]
        pipe.zadd(prefix + "unacked_index", dict.fromkeys(chunk, now))
        entries = {t: entry(template, t) for t in chunk}
        pipe.hset(prefix + "unacked", mapping=entries)  # type: ignore[arg-type]
        if held_key is not None:
            pipe.sadd(held_key, *chunk)
    pipe.execute()


@functools.cache
def app_of(url: str, prefix: str) -> Any:
    """The Celery app of this process's nodes (its settings, plugins and liveness keys)."""
    from celery import Celery

    app = Celery("liveness-scale", set_as_current=False)
    app.conf.update(
        broker_url=url, broker_transport_options=transport_options(prefix),
        resilience_url="memory://",
    )  # fmt: skip
    return app


class LivenessNode:
    """One node running the heartbeat as it is: ``VisibilityHeartbeat.start``'s ``tick``."""

    def __init__(self, spec: Spec, index: int) -> None:
        from kombu import Connection

        from celery_resilience import fetch, liveness
        from celery_resilience.heartbeat import Ticker
        from celery_resilience.liveness.node import Node, adopt
        from celery_resilience.runtime import runtime

        options = transport_options(spec.prefix)
        app = app_of(spec.url, spec.prefix)
        rt = runtime(app)
        self.connection = Connection(spec.url, transport_options=options)
        self.channel: Any = self.connection.channel()
        keys = liveness.keys_of(app.conf, rt.settings)
        self.node = Node(keys, NODE_TTL, f"sim{spec.seed}-{index}@bench", [QUEUE])
        self._adopt, self._install = adopt, fetch.install
        adopt(self.channel, self.node)
        fetch.install(self.channel, self.node)
        self.ticker = Ticker(rt, self.node, float(self.channel.visibility_timeout))
        self.every = self.ticker.every

    def hold(self, r: redis.Redis, spec: Spec, tags: list[str]) -> None:
        write_held(r, spec.prefix, spec.template, tags, self.node.held)

    def start(self, at: float, rng: random.Random) -> None:
        """Register the presence; put each step at a random phase of its period."""
        with self.channel.conn_or_acquire() as client:
            self.node.renew(client)
        plan = self.ticker.plan
        self.ticker._due = {step: at + rng.uniform(0, every) for step, every in plan.items()}

    def tick(self) -> list[str]:
        """One timer tick; return the steps that ran."""
        due = dict(self.ticker._due)
        self._adopt(self.channel, self.node)
        self._install(self.channel, self.node)
        self.ticker(self.channel)
        return [step for step, at in due.items() if self.ticker._due[step] != at]

    def close(self) -> None:
        self.channel.qos._delivered.clear()  # a dead node restores nothing at close
        self.connection.release()


class BeforeNode:
    """One node running the heartbeat before liveness: the ``tick`` of
    ``VisibilityHeartbeat.start`` in heartbeat.py at bd9235c^, with its ``held_tags``,
    ``refresh`` and ``sweep``, copied unchanged but for names."""

    CHUNK = 1000  # tags per ZADD, as it was

    def __init__(self, spec: Spec, index: int) -> None:
        from kombu import Connection

        from celery_resilience.heartbeat import sweep_interval, tick_interval

        self.connection = Connection(spec.url, transport_options=transport_options(spec.prefix))
        self.channel: Any = self.connection.channel()
        timeout = float(self.channel.visibility_timeout)
        self.interval, self.every = tick_interval(timeout), sweep_interval(timeout)
        self.next_refresh, self.refreshed = 0.0, set[str]()

    def hold(self, r: redis.Redis, spec: Spec, tags: list[str]) -> None:
        write_held(r, spec.prefix, spec.template, tags, None)
        for tag in tags:  # what kombu's QoS.append keeps in memory for each delivery
            self.channel.qos._delivered[tag] = None
        self.refreshed = set(tags)  # refreshed by the tick that saw them delivered

    def start(self, at: float, rng: random.Random) -> None:
        self.next_refresh = at + rng.uniform(0, self.interval)

    def held_tags(self) -> list[str]:
        qos = self.channel.qos
        for _ in range(100):
            try:
                delivered, acked = list(qos._delivered), set(qos._dirty)
            except RuntimeError:
                continue
            return [tag for tag in delivered if tag not in acked]
        return []

    def refresh(self, tags: list[str]) -> int:
        channel = self.channel
        if not tags:
            return 0
        now = time.time() - float(channel.visibility_timeout) / 2
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for start in range(0, len(tags), self.CHUNK):
                chunk = tags[start : start + self.CHUNK]
                pipe.zadd(channel.unacked_index_key, dict.fromkeys(chunk, now), xx=True)
            pipe.execute()
        return len(tags)

    def tick(self) -> list[str]:
        steps = ["restore sweep"]
        held = self.held_tags()
        if time.monotonic() >= self.next_refresh:
            self.next_refresh = time.monotonic() + self.interval
            self.refresh(held)
            steps.append("visibility refresh")
        else:  # messages received since the last tick: at once, not a tick later
            self.refresh([tag for tag in held if tag not in self.refreshed])
        self.refreshed = set(held)
        self.channel.qos.restore_visible(num=self.channel.unacked_restore_limit, interval=1)
        return steps

    def close(self) -> None:
        self.channel.qos._delivered.clear()
        self.connection.release()


NODES: dict[str, Callable[[Spec, int], LivenessNode | BeforeNode]] = {
    "liveness": LivenessNode,
    "before": BeforeNode,
}


def simulate(conn: mpc.Connection, spec: Spec) -> None:
    """A simulator process: make the nodes, hold their messages, say ready; tick them on
    their schedule from the start time received until told to stop; report the ticks
    that started within the window received."""
    count_round_trips()
    rng = random.Random(spec.seed)
    nodes = [NODES[spec.mechanism](spec, i) for i in range(spec.nodes)]
    r = redis.Redis.from_url(spec.url)
    for node in nodes:
        node.hold(r, spec, [str(uuid.uuid4()) for _ in range(spec.held)])
    conn.send("ready")
    start: float = conn.recv()
    time.sleep(max(0.0, start - time.monotonic()))
    for node in nodes:
        node.start(start, rng)
    heap = [(start + rng.uniform(0, node.every), i) for i, node in enumerate(nodes)]
    heapq.heapify(heap)
    ticks: list[tuple[float, float, float, int, float, list[str]]] = []
    while True:
        due, i = heap[0]
        if conn.poll(max(0.0, due - time.monotonic())):
            break  # the window to report
        if time.monotonic() < due:
            continue
        node = nodes[i]
        began, cpu, trips = time.monotonic(), time.process_time(), _round_trips[0]
        steps = node.tick()
        took = time.monotonic() - began
        ticks.append((due, began, took, _round_trips[0] - trips, time.process_time() - cpu, steps))
        heapq.heapreplace(heap, (began + node.every, i))  # kombu's timer: `every` after a start
    t0, t1 = conn.recv()
    inside = [t for t in ticks if t0 <= t[1] < t1]
    longest = max(ticks, key=lambda t: t[2], default=(0.0, 0.0, 0.0, 0, 0.0, []))
    conn.send(
        {
            "ticks": len(inside),
            "late_s": [t[1] - t[0] for t in inside],
            "took_s": [t[2] for t in inside],
            "round_trips": sum(t[3] for t in inside),
            "client_cpu_s": sum(t[4] for t in inside),
            "steps": dict(Counter(step for t in inside for step in t[5])),
            "max_took_s": longest[2],
            "max_tick_round_trips": longest[3],
        }
    )
    for node in nodes:
        node.close()
    r.close()


class Fleet:
    """Simulator processes for ``nodes`` nodes of one mechanism, started and stopped together."""

    def __init__(self, spec: Spec, per_process: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # nothing of this process's state crosses
        self.procs: list[Any] = []
        self.conns: list[mpc.Connection] = []
        count = max(1, math.ceil(spec.nodes / per_process))
        for k in range(count):
            share = spec.nodes // count + (1 if k < spec.nodes % count else 0)
            ours, theirs = ctx.Pipe()
            part = Spec(**{**spec.__dict__, "nodes": share, "seed": spec.seed * 1000 + k})
            proc = ctx.Process(target=simulate, args=(theirs, part), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns.append(ours)

    def ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for conn, proc in zip(self.conns, self.procs, strict=True):
            while not conn.poll(1.0):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"simulator {proc.pid} did not get ready")
            assert conn.recv() == "ready"

    def start(self, at: float) -> None:
        for conn in self.conns:
            conn.send(at)

    def stop(self, t0: float, t1: float) -> list[dict[str, Any]]:
        """Stop every simulator; return what each ran within ``t0 .. t1`` (monotonic)."""
        for conn in self.conns:
            conn.send((t0, t1))
        out = [conn.recv() for conn in self.conns]
        self.close()
        return out

    def close(self) -> None:
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def template(r: redis.Redis, url: str, prefix: str) -> str:
    """One message as kombu publishes it to ``QUEUE`` (its delivery tag replaced by TAG)."""
    from kombu import Connection, Exchange, Producer, Queue

    with Connection(url, transport_options=transport_options(prefix)) as connection:
        queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
        Producer(connection.default_channel).publish(
            {"args": [12345, "0123456789abcdef"], "kwargs": {}},
            exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
            headers={"task": "bench.noop", "id": "6f1c7f1e-1c1e-4b8e-9a7e-000000000000"},
        )  # fmt: skip
    raw = r.rpop(prefix + QUEUE)
    assert isinstance(raw, bytes)
    payload = json.loads(raw)
    payload["properties"]["delivery_tag"] = TAG
    return json.dumps(payload)


def per_second(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
    """Redis CPU (% of one core) and commands/s between two ``redis_usage`` snapshots (the
    snapshot's own ``INFO`` not counted)."""
    return {
        "redis_cpu_pct": (b["cpu_s"] - a["cpu_s"]) / seconds * 100,
        "commands_per_s": (b["commands"] - a["commands"] - 1) / seconds,
    }


def measure(
    r: redis.Redis, spec: Spec, per_process: int, warmup: float, window: float,
    baseline: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """One configuration: start the fleet, tick ``warmup`` s, measure for ``window`` s."""
    r.flushall()
    t = time.monotonic()
    fleet = Fleet(spec, per_process)
    try:
        fleet.ready()
        setup_s = time.monotonic() - t
        fleet.start(time.monotonic() + 0.5)
        time.sleep(0.5 + warmup)
        a, t0 = redis_usage(r), time.monotonic()
        time.sleep(window)
        b, t1 = redis_usage(r), time.monotonic()
        parts = fleet.stop(t0, t1)
    finally:
        fleet.close()
    seconds = t1 - t0
    out: dict[str, Any] = {
        "mechanism": spec.mechanism, "nodes": spec.nodes, "held_per_node": spec.held,
        "processes": len(parts), "window_s": seconds, "setup_s": setup_s,
        **per_second(a, b, seconds),
        "used_memory_mib": b["used_memory"] / 2**20, "clients": b["clients"],
    }  # fmt: skip
    late = [x for p in parts for x in p["late_s"]]
    took = [x for p in parts for x in p["took_s"]]
    steps: Counter[str] = Counter()
    for p in parts:
        steps.update(p["steps"])
    out["round_trips_per_s"] = sum(p["round_trips"] for p in parts) / seconds
    out["client_cpu_pct"] = sum(p["client_cpu_s"] for p in parts) / seconds * 100
    out["ticks"] = {
        "count": len(late), "late_p50_ms": pctl(late, 50) * 1e3,
        "late_p99_ms": pctl(late, 99) * 1e3, "late_max_ms": max(late, default=0) * 1e3,
        "late_share": sum(x > LATE for x in late) / max(1, len(late)),
        "took_p50_ms": pctl(took, 50) * 1e3, "took_p99_ms": pctl(took, 99) * 1e3,
        "took_max_ms": max(took, default=0) * 1e3,
    }  # fmt: skip
    out["steps_per_node"] = {k: v / spec.nodes for k, v in sorted(steps.items())}
    n = spec.nodes
    out["per_node"] = {
        "commands_per_s": (out["commands_per_s"] - baseline["commands_per_s"]) / n,
        "redis_cpu_us_per_s": (out["redis_cpu_pct"] - baseline["redis_cpu_pct"]) / 100 * 1e6 / n,
        "round_trips_per_s": out["round_trips_per_s"] / n,
        "client_cpu_us_per_s": out["client_cpu_pct"] / 100 * 1e6 / n,
    }
    out["lost_nodes"] = int(r.llen(spec.prefix + "celery_resilience:lost"))
    return out


# -- recovery ---------------------------------------------------------------------------


def fetched(url: str, prefix: str, n: int, node: Any | None) -> tuple[Any, Any, list[str]]:
    """Publish ``n`` messages to ``QUEUE`` and fetch them unacked on a new channel: reliably
    for ``node`` (adopted, its presence registered), with kombu's own ``BRPOP`` without.
    Returns the connection, the channel and the delivery tags; the connection is left
    open, as a dead node's socket would be until the kernel closed it."""
    from kombu import Connection, Consumer, Exchange, Producer, Queue

    from celery_resilience import fetch
    from celery_resilience.liveness.node import adopt

    connection = Connection(url, transport_options=transport_options(prefix))
    channel = connection.channel()
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    producer = Producer(channel)
    for k in range(n):
        producer.publish({"args": [k], "kwargs": {}}, exchange=queue.exchange,
                         routing_key=QUEUE, declare=[queue] if k == 0 else [])  # fmt: skip
    if node is not None:  # as the heartbeat leaves a consumer's channel before it fetches
        adopt(channel, node)
        assert fetch.install(channel, node)
        with channel.conn_or_acquire() as client:
            node.renew(client)
    tags: list[str] = []
    consumer = Consumer(channel, [queue], no_ack=False)
    consumer.register_callback(lambda body, message: tags.append(message.delivery_tag))
    consumer.consume()
    while len(tags) < n:
        connection.drain_events(timeout=10)
    return connection, channel, tags


def recover(
    server: PrivateRedis, r: redis.Redis, mechanism: str, n: int, seed: int
) -> dict[str, Any]:
    """One dead node holding ``n`` messages, one live node: seconds until all are back."""
    from celery_resilience.liveness.keys import Keys
    from celery_resilience.liveness.node import Node

    r.flushall()
    prefix = f"rec{seed}:"
    spec = Spec(server.url, prefix, mechanism, 1, 0, "", seed)
    live = Fleet(spec, 1)
    out: dict[str, Any] = {"messages": n}
    try:
        live.ready()
        begun = time.monotonic()
        live.start(begun)
        time.sleep(3.0)  # the live node has swept: the sweep clock is fresh
        keys = Keys.of(prefix, "celery_resilience")
        dead = Node(keys, NODE_TTL, "dead@bench", [QUEUE]) if mechanism == "liveness" else None
        t = time.monotonic()
        connection, channel, tags = fetched(server.url, prefix, n, dead)
        out["fetch_s"] = time.monotonic() - t
        index = prefix + "unacked_index"
        if dead is not None:
            dead.renew(r)  # its last renewal: from here on it is dead
            deadline = float(r.zscore(keys.presence, dead.id) or 0) / 1000
        else:  # the visibility timeout has passed since the dead node's last refresh
            seconds, micros = r.time()
            deadline = seconds + micros / 1e6
            r.zadd(index, dict.fromkeys(tags, deadline - VISIBILITY_TIMEOUT - 0.001), xx=True)
        channel.qos._delivered.clear()  # it restores nothing at close: it is dead
        first = back = None
        limit = time.monotonic() + NODE_TTL + 120
        while time.monotonic() < limit:
            pipe = r.pipeline(transaction=False)
            pipe.time()
            pipe.llen(prefix + QUEUE)
            if dead is not None:
                pipe.zscore(keys.presence, dead.id)
            now_pair, length, *score = pipe.execute()
            now = now_pair[0] + now_pair[1] / 1e6
            if score and score[0] is not None:
                deadline = float(score[0]) / 1000  # as last seen (a sweep may extend it)
            if length and first is None:
                first = now
            if length >= n:
                back = now
                break
            time.sleep(0.005)
        time.sleep(3.0)  # three more sweeps: nothing more may come back
        out["expired_to_first_s"] = None if first is None else first - deadline
        out["expired_to_all_s"] = None if back is None else back - deadline
        out["restore_s"] = None if back is None or first is None else back - first
        queued = [
            json.loads(x)["properties"]["delivery_tag"] for x in r.lrange(prefix + QUEUE, 0, -1)
        ]
        held = list(r.scan_iter(match=prefix + "celery_resilience:held:*"))
        out["checks"] = {
            "queue_length": len(queued),
            "distinct_tags_back": len(set(queued)),
            "each_back_once": sorted(queued) == sorted(tags),
            "unacked_left": int(r.hlen(prefix + "unacked")),
            "unacked_index_left": int(r.zcard(index)),
            "held_left": sum(int(r.scard(k)) for k in held),
        }
        lost = [json.loads(x) for x in r.lrange(keys.lost, 0, -1)]
        out["lost_records"] = [x.get("recovered") for x in lost]
        (part,) = live.stop(begun, time.monotonic())
        out["live_tick_max_ms"] = part["max_took_s"] * 1e3  # the tick that recovered
        out["live_tick_round_trips"] = part["max_tick_round_trips"]
        connection.release()
    finally:
        live.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 and 10 nodes, short windows")
    p.add_argument("--nodes", default="1,10,100,500",
                   help="comma-separated node counts ('' for the recovery alone)")  # fmt: skip
    p.add_argument("--held", type=int, default=1000, help="messages each node holds")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured, idle")
    p.add_argument("--held-window", type=float, default=60.0,
                   help="seconds measured, holding (two visibility refreshes)")  # fmt: skip
    p.add_argument("--warmup", type=float, default=5.0, help="seconds ticked before a window")
    p.add_argument("--per-process", type=int, default=50, help="nodes per simulator process")
    p.add_argument("--recover", type=int, default=10_000, help="messages of the dead node")
    p.add_argument("--rounds", type=int, default=3, help="recoveries per mechanism")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.held, args.window, args.held_window = "1,10", 100, 4.0, 6.0
        args.warmup, args.recover, args.rounds = 2.0, 1000, 1
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    run_id = secrets.token_hex(3)
    scale: list[dict[str, Any]] = []
    recovery: dict[str, list[dict[str, Any]]] = {m: [] for m in MECHANISMS}
    with tempfile.TemporaryDirectory() as workdir, private_redis(workdir) as server:
        r = redis.Redis.from_url(server.url)
        log(f"liveness: redis-server pid {server.pid} at {server.url}")
        a, t0 = redis_usage(r), time.monotonic()
        time.sleep(min(args.window, 10.0))
        baseline = per_second(a, redis_usage(r), time.monotonic() - t0)
        log(f"liveness: idle server {baseline['redis_cpu_pct']:.2f}% CPU")
        prefix = f"bench{run_id}:"
        tpl = template(r, server.url, prefix)
        for n in counts:
            for held, window in ((0, args.window), (args.held, args.held_window)):
                for seed, mechanism in enumerate(MECHANISMS):
                    log(f"liveness: {mechanism}, {n} node(s), {held} held each, {window:g} s ...")
                    spec = Spec(server.url, prefix, mechanism, n, held, tpl, seed + 1)
                    res = measure(r, spec, args.per_process, args.warmup, window, baseline)
                    late = res["ticks"]["late_p99_ms"]
                    log(f"  {res['redis_cpu_pct']:.2f}% CPU, {res['commands_per_s']:.0f} cmd/s, "
                        f"p99 late {late:.0f} ms, setup {res['setup_s']:.0f} s, "
                        f"{res['used_memory_mib']:.0f} MiB")  # fmt: skip
                    scale.append(res)
        for rnd in range(args.rounds):
            for mechanism in MECHANISMS:
                log(f"liveness: recovery {rnd + 1}/{args.rounds}, {mechanism}, {args.recover} ...")
                res = recover(server, r, mechanism, args.recover, rnd)
                log(f"  all back {res['expired_to_all_s']} s after the expiry; {res['checks']}")
                recovery[mechanism].append(res)
        server_version = str(r.info("server").get("redis_version"))
        r.close()
    summary = {
        m: {k: spread(x[k] for x in rs if x[k] is not None)
            for k in ("expired_to_first_s", "expired_to_all_s", "restore_s", "fetch_s")}
        for m, rs in recovery.items()
    }  # fmt: skip
    v = versions()
    v["redis-server"] = server_version
    write_json(args.json_out, {
        "config": {"node_ttl": NODE_TTL, "visibility_timeout": VISIBILITY_TIMEOUT,
                   "held": args.held, "window": args.window, "held_window": args.held_window,
                   "per_process": args.per_process, "recover": args.recover,
                   "rounds": args.rounds, "late_s": LATE, "warmup_s": args.warmup,
                   "entry_bytes": len(entry(tpl, str(uuid.uuid4())))},
        "baseline": baseline, "scale": scale, "recovery": recovery,
        "recovery_summary": summary, "versions": v,
    })  # fmt: skip
    bad = [x for rs in recovery.values() for x in rs
           if not x["checks"]["each_back_once"] or x["checks"]["unacked_left"]]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
