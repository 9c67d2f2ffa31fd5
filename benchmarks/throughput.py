#!/usr/bin/env python
"""Throughput of a no-op task with celery-resilience, as ratios to plain Celery.

Run from the repository root::

    .venv/bin/python benchmarks/throughput.py                 # table
    .venv/bin/python benchmarks/throughput.py --json          # JSON on stdout
    .venv/bin/python benchmarks/throughput.py --tasks 4000 --rounds 5
    .venv/bin/python benchmarks/throughput.py --profile lock  # + py-spy of the worker

What it measures, in one run, so that every number is compared with plain Celery
measured on the same (noisy) machine a few seconds apart:

1. Tasks per second of a no-op task on a real ``celery worker`` (prefork pool,
   concurrency 2, Redis broker on a database of its own, no result backend),
   for four variants:

   - ``plain``           ``@app.task`` with Celery's defaults (acks early),
   - ``plain_acks_late`` ``@app.task(acks_late=True)``: the cost of acks_late alone,
   - ``nolock``          ``@resilient()`` (which sets acks_late itself),
   - ``lock``            ``@resilient(lock="k:{i}")``, one lock key per task.

   Each task's body is the same: one ``INCR`` of a per-phase counter in Redis.

2. Round trips to the coordination backend per successful delivery, counted for
   real on the resilience Redis connection (``MONITOR``; see ``count_round_trips``).

How (details in the comments of ``main`` and ``Bench.run_phase``; the workers' app is
``throughput_app.py``, worker processes and clean-up are ``common.py``'s):

- Two workers, each started once for the whole run: the plain variants run on a
  worker that never imports celery-resilience, the resilient ones on a worker that
  has it installed (``--single-worker``: everything on the latter). Only one of them
  consumes at a time; a warm-up phase per variant runs first.
- Each phase publishes its tasks to a fresh queue nobody consumes, then starts the
  worker on it with ``add_consumer``; tasks/s = ``(n - 1) / (last - first completion)``,
  stamped inside the worker. Rounds interleave the variants, rotating the order.
- The median over rounds per variant is reported, with min-max, the ratio of medians
  to plain and to plain+acks_late, and the median of the same-round ("paired") ratios.
- Noise: for each phase, the CPU used by other processes on the machine is measured
  (``/proc/stat`` minus the worker, Redis and this script); a phase during which it
  exceeded ``--max-other-load`` is measured again (bounded by ``--max-repeats``).
- CPU time per task of the worker's main process, of the pool children and of the
  Redis server (``/proc/<pid>/task/*/schedstat``, ``INFO cpu``) shows where a
  variant's extra cost goes.

Redis: the broker, the benchmark's counters (``--broker-db``) and the coordination
backend (``--resilience-db``) all use database 14 by default, the benchmarks' own.
At start and at exit the script deletes only its own keys: those holding its run id
and kombu's ``unacked*`` and ``_kombu.binding.*`` keys of that database. The worker
processes are started in their own process groups and killed on exit, on errors, on
SIGTERM and on Ctrl-C. A default run takes about a minute (more when phases are
repeated because of other load).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from celery import Celery
from common import (
    WorkerProc,
    delete_keys,
    free_port,
    log,
    spread,
    start_worker,
    stop_groups,
    versions,
    wait_for,
)
from throughput_app import TASK_NAMES, VARIANTS, make_app, now

LABELS = {
    "plain": "plain @app.task (Celery defaults: acks early)",
    "plain_acks_late": "plain @app.task(acks_late=True)",
    "nolock": "@resilient() (no lock)",
    "lock": '@resilient(lock="k:{i}")',
    "lock_metrics": '@resilient(lock="k:{i}") + prometheus port',
}
# Which worker runs which variant (see "One worker per role" in main()).
WORKER_OF = {
    "plain": "plain",
    "plain_acks_late": "plain",
    "nolock": "resilient",
    "lock": "resilient",
    "lock_metrics": "metrics",
}


class BenchError(RuntimeError):
    pass


def db_url(base: str, db: int, **query: str) -> str:
    parts = urlsplit(base)
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", q, ""))


@dataclass
class Phase:
    variant: str
    round: int
    n: int
    rate: float  # (n - 1) / (last completion - first completion)
    span: float
    wall: float  # add_consumer sent -> last completion (includes consumer start-up)
    # CPU time per task (microseconds) spent during the phase, by process; see cpu_snapshot.
    cpu_us: dict[str, float] = field(default_factory=dict)
    # CPUs busy with anything but this benchmark during the phase (other people's
    # processes on a shared machine): a noise indicator, see Bench.run_phase.
    other_load: float = float("nan")


@dataclass
class Bench:
    args: argparse.Namespace
    run_id: str
    broker_url: str
    resilience_url: str
    key_prefix: str
    res_client_name: str
    app: Celery
    r: redis.Redis
    workdir: str
    workers: dict[str, WorkerProc] = field(default_factory=dict)
    phase_no: int = 0
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stopped: bool = False

    # -- workers -----------------------------------------------------------------

    def start_worker(self, role: str) -> WorkerProc:
        env = {
            "BENCH_ROLE": role,
            "BENCH_BROKER_URL": self.broker_url,
            "BENCH_RESILIENCE_URL": self.resilience_url,
            "BENCH_METRICS_PORT": str(free_port()),
            "BENCH_KEY_PREFIX": self.key_prefix,
        }
        # The worker starts on an idle queue of its own; each measured phase adds its
        # queue with add_consumer and cancels it afterwards. Background chatter is off
        # (the same for every variant); the task path is unchanged.
        w = start_worker(
            "throughput_app",
            f"{role}-{self.run_id}",
            env,
            f"bench.{self.run_id}.idle.{role}",
            os.path.join(self.workdir, f"worker-{role}.log"),
            concurrency=self.args.concurrency,
        )
        self.workers[role] = w
        return w

    def wait_ready(self, w: WorkerProc, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if w.proc.poll() is not None:
                raise BenchError(f"worker {w.name} exited ({w.proc.returncode}):\n{w.log_tail()}")
            pong = self.app.control.ping(destination=[w.name], timeout=0.5)
            return bool(pong) and len(w.children()) >= self.args.concurrency

        if not wait_for(ready, timeout, 0.2):
            raise BenchError(f"worker {w.name} not ready after {timeout:.0f} s:\n{w.log_tail()}")

    def stop_workers(self) -> None:
        if self.stopped:  # called from finally and again from atexit
            return
        self.stopped = True
        stop_groups([w.proc for w in self.workers.values()] + self.helpers, 10.0)

    # -- one phase: publish n tasks, then let one worker consume them --------------

    def run_phase(self, variant: str, n: int, before_consume: Any = None, rnd: int = -1) -> Phase:
        """Publish ``n`` tasks of ``variant`` to a fresh queue, then consume them.

        Methodology. All ``n`` messages are in Redis before any worker consumes the
        queue: the queue is new (one per phase) and nobody listens to it while we
        publish, so the worker is never starved by the publisher and never competes
        with it for the CPU. Then ``add_consumer`` makes the worker consume it.

        The clock: each task stamps, in the worker, the moment it finished; we take
        ``(n - 1) / (last - first)`` between the first and the last completion. The
        moment of ``add_consumer`` is a worse start: kombu's Redis transport adds a
        queue to its BRPOP only after the BRPOP already outstanding on the idle queue
        returns (up to ``brpop_timeout`` = 1 s), which would add up to a second of
        nothing to one phase and not another. ``wall`` (add_consumer to last
        completion) is reported in the JSON for reference.

        A queue per phase also means a BRPOP still outstanding from the previous phase
        cannot take a message of this one after its consumer was cancelled.
        """
        self.phase_no += 1
        queue = f"bench.{self.run_id}.{self.phase_no}"
        key = f"bench:{self.run_id}:count:{self.phase_no}"
        worker = self.workers[WORKER_OF[variant]]
        name = TASK_NAMES[variant]
        with self.app.producer_or_acquire() as producer:
            for i in range(n):
                self.app.send_task(name, args=(i, key, n), queue=queue, producer=producer)
        queued = self.r.llen(queue)
        if queued != n:
            raise BenchError(f"published {n} tasks to {queue} but it holds {queued}")
        if before_consume is not None:
            before_consume()
        cpu0 = self.cpu_snapshot(worker)
        busy0 = _machine_busy_ns(), time.process_time_ns(), now()
        t0 = now()
        reply = self.app.control.add_consumer(
            queue, destination=[worker.name], reply=True, timeout=10
        )
        if not reply or "ok" not in next(iter(reply[0].values())):
            raise BenchError(f"add_consumer({queue}) on {worker.name}: {reply!r}")
        deadline = now() + max(60.0, n / 20)
        while True:
            done = int(self.r.get(key) or 0)
            if done >= n:
                break
            if worker.proc.poll() is not None:
                raise BenchError(f"worker {worker.name} died:\n{worker.log_tail()}")
            if now() > deadline:
                raise BenchError(
                    f"{variant}: only {done}/{n} tasks done after {now() - t0:.0f} s; "
                    f"worker log:\n{worker.log_tail()}"
                )
            time.sleep(0.05)  # only for the driver: the stamps are taken in the worker
        first = float(self.r.get(f"{key}:first"))
        last = float(self.r.get(f"{key}:last"))
        # Let the acks (acks_late: after the body) land before the next phase starts.
        wait_for(lambda: not self.r.hlen("unacked"), 10, 0.01)
        cpu1 = self.cpu_snapshot(worker)
        busy1 = _machine_busy_ns(), time.process_time_ns(), now()
        self.app.control.cancel_consumer(queue, destination=[worker.name], reply=True, timeout=10)
        self.r.delete(key, f"{key}:first", f"{key}:last", queue)
        span = last - first
        rate = (n - 1) / span if span > 0 else float("nan")
        cpu = {k: round((cpu1[k] - cpu0[k]) / n / 1000, 1) for k in cpu0 if k in cpu1}
        other = float("nan")
        if busy0[0] is not None and busy1[0] is not None:
            # Busy CPU time of the whole machine minus ours (worker, Redis, this driver).
            ours = sum(cpu1[k] - cpu0[k] for k in cpu0 if k != "worker_main_runqueue_wait")
            ours += busy1[1] - busy0[1]
            other = max(0.0, busy1[0] - busy0[0] - ours) / ((busy1[2] - busy0[2]) * 1e9)
        return Phase(variant, rnd, n, rate, span, last - t0, cpu, round(other, 2))

    def cpu_snapshot(self, worker: WorkerProc) -> dict[str, float]:
        """CPU time so far, in ns: the worker's main process, its pool children's main
        threads and their other threads (the lease keeper), and the Redis server.

        Linux ``/proc/<pid>/task/<tid>/schedstat`` (ns on the CPU) for the worker; Redis's
        own ``INFO cpu`` for the server (shared with any other client of the server,
        which is why it is an approximation on a shared Redis).
        """
        snap: dict[str, float] = {}
        try:
            snap["worker_main"] = sum(_thread_ns(worker.proc.pid).values())
            # Time the worker's main thread was runnable but waiting for a CPU.
            snap["worker_main_runqueue_wait"] = _thread_ns(worker.proc.pid, field=1)[
                worker.proc.pid
            ]
            kids = main = 0.0
            for pid in worker.children():
                threads = _thread_ns(pid)
                main += threads.pop(pid, 0)
                kids += sum(threads.values())
            snap["children_main_thread"] = main
            snap["children_other_threads"] = kids
        except OSError:
            pass
        info = self.r.info("cpu")
        snap["redis_server"] = (info["used_cpu_sys"] + info["used_cpu_user"]) * 1e9
        return snap

    # -- round trips -------------------------------------------------------------

    def count_round_trips(self, variant: str, n: int) -> dict[str, Any]:
        """Count the commands the worker sends on its resilience Redis connection.

        Method: the resilience URL carries ``client_name=<unique>``, so every
        connection the coordination backend opens is named; ``MONITOR`` streams every
        command the server executes with the client address that sent it. We keep the
        lines from the named connections while ``n`` tasks run. ``INFO commandstats``
        would be simpler but counts the whole server, which other people's tests share;
        its delta is reported as a cross-check only. Commands a Lua script runs inside
        the server (``[db lua]`` lines) are not round trips; they are counted apart.
        """
        lines: list[bytes] = []
        mon = Monitor(self.r, lines)
        stats_before = self.r.info("commandstats")

        def start() -> None:
            mon.start()

        self.run_phase(variant, n, before_consume=start)
        # The finish script runs after the body's INCR: wait until every delivery was
        # acked (after finish), then give MONITOR a moment to deliver its stream.
        time.sleep(0.5)
        mon.stop()
        stats_after = self.r.info("commandstats")
        addrs = {c["addr"] for c in self.r.client_list() if c.get("name") == self.res_client_name}
        shas = _script_shas()
        per_cmd: Counter[str] = Counter()
        inside: Counter[str] = Counter()
        res_db = str(self.args.resilience_db)
        pattern = re.compile(rb'^\+?[\d.]+ \[(\d+) ([^\]]+)\] "([^"]+)"(?: "([^"]*)")?')
        for line in lines:
            m = pattern.match(line)
            if not m:
                continue
            db, addr, cmd, arg1 = (g.decode(errors="replace") if g else "" for g in m.groups())
            cmd = cmd.upper()
            if addr in addrs:
                if cmd in ("EVALSHA", "EVAL"):
                    cmd = f"{cmd} {shas.get(arg1, arg1[:12])}"
                per_cmd[cmd] += 1
            elif addr == "lua" and db == res_db and arg1.startswith(self.key_prefix):
                inside[cmd] += 1  # a command of our scripts (kombu's touch other keys)
        if not addrs:
            raise BenchError(
                f"no Redis connection named {self.res_client_name!r}: the coordination "
                "backend did not use resilience_url's client_name"
            )
        total = sum(per_cmd.values())

        def calls(stats: dict[str, Any], names: tuple[str, ...]) -> int:
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in names)

        scripts = ("evalsha", "eval")
        return {
            "variant": variant,
            "deliveries": n,
            "round_trips": total,
            "round_trips_per_delivery": total / n,
            "by_command": dict(per_cmd.most_common()),
            "connections": len(addrs),
            "commands_inside_scripts_per_delivery": sum(inside.values()) / n,
            "commands_inside_scripts": dict(inside.most_common()),
            "commandstats_eval_per_delivery_server_wide": (
                calls(stats_after, scripts) - calls(stats_before, scripts)
            )
            / n,
        }

    # -- profile -----------------------------------------------------------------

    def profile(self, variant: str, n: int) -> dict[str, Any]:
        pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which(
            "py-spy"
        )
        if pyspy is None:
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        worker = self.workers[WORKER_OF[variant]]
        out_dir = self.args.profile_dir or tempfile.mkdtemp(prefix="celery-resilience-pyspy-")
        os.makedirs(out_dir, exist_ok=True)
        targets = {"main": worker.proc.pid}
        targets.update({f"child{k}": pid for k, pid in enumerate(worker.children())})
        spies: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

        def start() -> None:
            for label, pid in targets.items():
                path = os.path.join(out_dir, f"pyspy-{variant}-{label}.txt")
                p = subprocess.Popen(
                    [pyspy, "record", "--pid", str(pid), "--rate", "250", "--idle",
                     "--format", "raw", "--output", path, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
                self.helpers.append(p)
                spies[label] = (p, path)
            time.sleep(1.0)  # py-spy attaches

        phase = self.run_phase(variant, n, before_consume=start)
        for p, _ in spies.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        for p, _ in spies.values():
            p.wait(30)
        report: dict[str, Any] = {"variant": variant, "tasks": n, "rate": phase.rate}
        for label, (_, path) in spies.items():
            report[label] = summarize_pyspy(path)
            report[label]["file"] = path
        return report


def _machine_busy_ns() -> float | None:
    """Busy CPU time of the whole machine so far (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy * 1e9 / os.sysconf("SC_CLK_TCK")


def _thread_ns(pid: int, field: int = 0) -> dict[int, float]:
    """Per thread of ``pid``: ns on a CPU (field 0) or waiting on a run queue (field 1)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            out[int(tid)] = float(f.read().split()[field])
    return out


def _script_shas() -> dict[str, str]:
    """The coordination backend's scripts by SHA1, to name them in MONITOR's output."""
    try:
        from celery_resilience.backends import redis as backend
    except ImportError:
        return {}
    names = ("admit", "finish", "renew", "release")
    return {hashlib.sha1(backend.lua(name).encode()).hexdigest(): name for name in names}


class Monitor:
    """Reads Redis MONITOR output on a raw socket in a thread."""

    def __init__(self, client: redis.Redis, lines: list[bytes]) -> None:
        self.kw = client.connection_pool.connection_kwargs
        self.lines = lines
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        kw = self.kw
        sock = socket.create_connection((kw.get("host", "127.0.0.1"), kw.get("port", 6379)), 5)
        f = sock.makefile("rb")
        if kw.get("password"):
            auth = [b"AUTH"] + [str(x).encode() for x in (kw.get("username"), kw["password"]) if x]
            sock.sendall(_resp(auth))
            f.readline()
        sock.sendall(_resp([b"MONITOR"]))
        if not f.readline().startswith(b"+OK"):
            raise BenchError("Redis refused MONITOR")
        self.sock = sock
        self.thread = threading.Thread(target=self._read, args=(f,), daemon=True)
        self.thread.start()

    def _read(self, f: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in f:
                self.lines.append(line.rstrip(b"\r\n"))

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        if self.thread is not None:
            self.thread.join(5)


def _resp(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def summarize_pyspy(path: str, top: int = 80) -> dict[str, Any]:
    """Aggregate a py-spy ``--format raw`` file (collapsed stacks, all threads).

    py-spy runs with ``--idle``, so time waiting on a socket or a pipe is sampled too:
    these are shares of wall time. For a pool child, the main thread's samples are
    split into "in a task" (a ``trace_task`` frame on the stack) and the rest (mostly
    waiting for the next task from the worker's main process); inside a task, each
    function's inclusive share (it or anything it calls) and the leaf (self) shares.
    For the worker's main process the anchor is the event loop (``Hub.create_loop``).
    """
    anchors = ("build_tracer.<locals>.trace_task ", "Hub.create_loop ")
    incl: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = main_thread = anchored = 0
    try:
        with open(path, errors="replace") as f:
            rows = f.read().splitlines()
    except OSError:
        return {"error": f"no profile at {path}"}
    for row in rows:
        stack, _, count_s = row.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_short(re.sub(r":\d+\)$", ")", fr)) for fr in stack.split(";")]
        if not frames[0].startswith("_run_module_as_main"):
            continue  # another thread (in a lock-variant child: the lease keeper)
        main_thread += count
        at = next((k for k, fr in enumerate(frames) if fr.startswith(anchors)), None)
        if at is None:
            continue
        anchored += count
        below = frames[at + 1 :] or [frames[at]]
        for fr in set(below):
            incl[fr] += count
        leaf[below[-1]] += count
    if not anchored:
        return {"samples": total, "samples_main_thread": main_thread, "samples_anchored": 0}
    return {
        "samples": total,
        "samples_main_thread": main_thread,
        "samples_anchored": anchored,
        "anchored_share_of_main_thread": round(anchored / main_thread, 4),
        "inclusive": {k: round(v / anchored, 4) for k, v in incl.most_common(top)},
        "self": {k: round(v / anchored, 4) for k, v in leaf.most_common(top)},
    }


def _short(frame: str) -> str:
    """'run (/x/site-packages/celery_resilience/gate.py)' -> 'run (celery_resilience/gate.py)'."""
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# -- statistics and output ----------------------------------------------------------


def summarize(phases: list[Phase]) -> dict[str, Any]:
    by: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_round: dict[int, dict[str, float]] = {}
    for p in phases:
        by[p.variant].append(p.rate)
        per_round.setdefault(p.round, {})[p.variant] = p.rate
    over_rounds = {v: spread(rates) for v, rates in by.items() if rates}
    med = {v: x["median"] for v, x in over_rounds.items()}

    def paired(v: str, base: str) -> float:
        # Median over rounds of variant / base within the same round (slow drift cancels).
        return statistics.median(x[v] / x[base] for x in per_round.values())

    cpu: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for p in phases:
        for k, x in p.cpu_us.items():
            cpu[p.variant].setdefault(k, []).append(x)
    out: dict[str, Any] = {}
    for v, rates in by.items():
        if not rates:
            continue
        out[v] = {
            "other_load_max": max(p.other_load for p in phases if p.variant == v),
            "cpu_us_per_task_median": {
                k: round(statistics.median(x), 1) for k, x in cpu[v].items()
            },
            "paired_ratio_to_plain": round(paired(v, "plain"), 3),
            "paired_ratio_to_plain_acks_late": round(paired(v, "plain_acks_late"), 3),
            "rates": [round(x, 1) for x in rates],
            "median": round(med[v], 1),
            "min": round(over_rounds[v]["min"], 1),
            "max": round(over_rounds[v]["max"], 1),
            "ratio_to_plain": round(med[v] / med["plain"], 3),
            "ratio_to_plain_acks_late": round(med[v] / med["plain_acks_late"], 3),
        }
    return out


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    s = result["throughput"]
    print()
    print(
        f"celery-resilience throughput: {cfg['tasks']} no-op tasks per variant x "
        f"{cfg['rounds']} rounds; prefork -c {cfg['concurrency']}, prefetch x4, "
        f"Redis broker db {cfg['broker_db']}, no result backend; workers: {cfg['workers']}"
    )
    print(f"load average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}")
    limit = cfg["max_other_load"]
    noisy = [p for p in result["phases"] if p["other_load"] > limit]
    print(
        f"{len(result['discarded_noisy_phases'])} phases measured again because other "
        f"processes used > {limit} CPUs; {len(noisy)} of the {len(result['phases'])} kept "
        "phases are still noisy"
        + (f" (up to {max(p['other_load'] for p in noisy):.2f} CPUs)" if noisy else "")
    )
    print()
    head = (
        f"{'variant':<46} {'median/s':>8} {'min - max':>11} {'vs plain':>8} "
        f"{'vs acks_late':>12} {'paired':>13}"
    )
    print(head)
    print("-" * len(head))
    for v in VARIANTS:
        if v not in s:
            continue
        x = s[v]
        span = f"{x['min']:.0f}-{x['max']:.0f}"
        paired = f"{x['paired_ratio_to_plain']:.3f}/{x['paired_ratio_to_plain_acks_late']:.3f}"
        print(
            f"{LABELS[v]:<46} {x['median']:>8.0f} {span:>11} "
            f"{x['ratio_to_plain']:>8.3f} {x['ratio_to_plain_acks_late']:>12.3f} {paired:>13}"
        )
    print()
    print(
        "median/s: median over rounds of (n - 1) / (last - first completion), with the\n"
        "  queue filled before the worker consumes it. 'plain' runs with Celery's defaults\n"
        "  (acks early); resilient tasks set acks_late=True themselves, so 'vs acks_late'\n"
        "  (ratio of medians to plain with acks_late=True) is the cost of the gate alone.\n"
        "  paired: median over rounds of the same-round ratio, to plain / to acks_late."
    )
    if any("cpu_us_per_task_median" in x for x in s.values()):
        print()
        cols = (
            "worker_main",
            "children_main_thread",
            "children_other_threads",
            "redis_server",
            "worker_main_runqueue_wait",
        )
        names = ("worker main", "children", "child threads", "redis-server", "main waits")
        print(f"{'CPU per task, us (median)':<46} " + " ".join(f"{n:>13}" for n in names))
        for v in VARIANTS:
            c = s.get(v, {}).get("cpu_us_per_task_median", {})
            print(f"{LABELS[v]:<46} " + " ".join(f"{c.get(k, float('nan')):>13.0f}" for k in cols))
        print(
            "  (child threads: the pool children's non-main threads, e.g. the lease keeper;\n"
            "  redis-server: the whole server, shared with its other clients; main waits:\n"
            "  time the worker's main process was runnable but waited for a CPU)"
        )
    rt = result.get("round_trips")
    if rt:
        a, b = rt["nolock"], rt["lock"]
        print()
        print(
            "round trips per successful delivery: "
            f"{a['round_trips_per_delivery']:g} (without lock), "
            f"{b['round_trips_per_delivery']:g} (with lock)"
        )
        for label, x in (("without lock", a), ("with lock", b)):
            cmds = ", ".join(f"{k} {v}" for k, v in x["by_command"].items())
            print(
                f"  {label}: {x['deliveries']} deliveries -> {x['round_trips']} commands on "
                f"the resilience connection ({cmds}); "
                f"{x['commands_inside_scripts_per_delivery']:g} commands per delivery run "
                "inside the scripts"
            )
    prof = result.get("profile")
    if prof:
        print()
        print(
            f"py-spy (wall time, --idle) of {prof['variant']} "
            f"({prof['tasks']} tasks at {prof['rate']:.0f}/s under the profiler):"
        )
        for label in sorted(k for k in prof if k.startswith(("main", "child"))):
            x = prof[label]
            what = "in the event loop" if label == "main" else "in a task"
            print(
                f"  {label} ({x.get('file')}): {x.get('anchored_share_of_main_thread', 0):.1%} "
                f"of the main thread's samples {what}; of those, inclusive:"
            )
            shown = [
                (func, share)
                for func, share in x.get("inclusive", {}).items()
                if _interesting(func, label == "main")
            ]
            for func, share in shown[:14]:
                print(f"    {share:6.1%}  {func}")


def _interesting(func: str, event_loop: bool) -> bool:
    """The frames worth printing: the gate and its Redis calls, or the loop's big parts."""
    if event_loop:
        return func.startswith(
            ("Transport.on_readable", "QoS.append", "QoS.ack", "_epoll.poll", "Pipeline.execute ",
             "AsynPool", "ResultHandler", "Request.", "TaskPool.", "Consumer.")
        )  # fmt: skip
    return "celery_resilience/" in func or func.startswith(
        ("Redis.execute_command ", "_done ", "Signature.bind ", "Condition.notify ",
         "secrets.token_hex ", "token_hex ", "notify ")
    )  # fmt: skip


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=2000, help="tasks per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the variants interleave")
    p.add_argument("--warmup", type=int, default=300, help="unmeasured tasks per variant first")
    p.add_argument("--rt-tasks", type=int, default=300, help="deliveries for the round-trip count")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="CPUs used by other processes above which a phase is measured again",
    )
    p.add_argument("--max-repeats", type=int, default=10, help="repeated phases per run, at most")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (no db)")
    p.add_argument("--broker-db", type=int, default=14, help="broker db (the benchmarks' own)")
    p.add_argument("--resilience-db", type=int, default=14, help="resilience_url db")
    p.add_argument(
        "--single-worker",
        action="store_true",
        help="run every variant on one worker with celery-resilience installed "
        "(default: plain variants on a worker without it)",
    )
    p.add_argument("--profile", choices=VARIANTS, help="after the run, py-spy this variant")
    p.add_argument("--profile-tasks", type=int, default=20000)
    p.add_argument("--profile-dir", help="where py-spy writes (default: a temp dir, kept)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = p.parse_args(argv)
    if args.tasks < 2 or args.rounds < 1:
        p.error("--tasks must be >= 2 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = secrets.token_hex(3)
    broker_url = db_url(args.redis, args.broker_db)
    res_client_name = f"bench-res-{run_id}"
    resilience_url = db_url(args.redis, args.resilience_db, client_name=res_client_name)
    key_prefix = f"bench{run_id}"
    driver_app = make_app("driver", broker_url, None, key_prefix)
    r = redis.Redis.from_url(broker_url)
    r_res = redis.Redis.from_url(db_url(args.redis, args.resilience_db))
    own = _own_keys(run_id, key_prefix)
    delete_keys(r, *own)
    workdir = tempfile.mkdtemp(prefix="celery-resilience-bench-")
    b = Bench(args, run_id, broker_url, resilience_url, key_prefix, res_client_name,
              driver_app, r, workdir)  # fmt: skip

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(b.stop_workers)
    t_start = now()
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        # One worker per role, each started once for the whole run. The plain variants
        # run on a worker that does not import celery-resilience at all (plain Celery:
        # no boot step, nothing worker-wide); the resilient ones on a worker with it.
        # Starting once avoids timing worker start-up and cold children; the two
        # workers are started before anything is measured and only one consumes at a
        # time (the other waits on its idle queue). --single-worker runs everything on
        # the resilient worker instead.
        roles = ["all"] if args.single_worker else ["plain", "resilient", "metrics"]
        if args.single_worker:
            for v in VARIANTS:
                WORKER_OF[v] = "all"
        log(f"starting worker(s) {', '.join(roles)} (logs in {workdir}) ...")
        for role in roles:
            b.start_worker(role)
        for role in roles:
            b.wait_ready(b.workers[role])
        log(f"warm-up: {args.warmup} tasks per variant ...")
        for v in VARIANTS:
            b.run_phase(v, args.warmup)
        # Interleave the variants, rotating the order each round so that no variant
        # always runs first or after the same neighbour.
        # A phase during which other processes on the machine used more than
        # --max-other-load CPUs (someone's test suite) is measured again right away,
        # up to 2 more times per phase and --max-repeats times per run; the last
        # attempt is kept either way and the table says how many phases were noisy.
        phases: list[Phase] = []
        repeats_left = args.max_repeats
        discarded: list[Phase] = []
        for rnd in range(args.rounds):
            order = VARIANTS[rnd % len(VARIANTS) :] + VARIANTS[: rnd % len(VARIANTS)]
            for v in order:
                for attempt in range(3):
                    ph = b.run_phase(v, args.tasks, rnd=rnd)
                    noisy = ph.other_load > args.max_other_load
                    log(
                        f"round {rnd + 1}/{args.rounds} {v:<16} {ph.rate:8.0f} tasks/s"
                        f"   (other load on the machine: {ph.other_load:.2f} CPUs)"
                        + (
                            "  noisy, measuring again"
                            if noisy and repeats_left and attempt < 2
                            else ""
                        )
                    )
                    if not noisy or not repeats_left or attempt == 2:
                        break
                    repeats_left -= 1
                    discarded.append(ph)
                phases.append(ph)
        log(f"round trips: {args.rt_tasks} deliveries without and with a lock (MONITOR) ...")
        round_trips = {v: b.count_round_trips(v, args.rt_tasks) for v in ("nolock", "lock")}
        profile = None
        if args.profile:
            log(f"profiling {args.profile}: {args.profile_tasks} tasks under py-spy ...")
            profile = b.profile(args.profile, args.profile_tasks)
        result = {
            "config": {
                "tasks": args.tasks,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "concurrency": args.concurrency,
                "max_other_load": args.max_other_load,
                "prefetch_multiplier": 4,
                "broker_db": args.broker_db,
                "resilience_db": args.resilience_db,
                "workers": "single" if args.single_worker else "plain and resilient",
                "loadavg_start": load_start,
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "versions": versions(r),
                "seconds": round(now() - t_start, 1),
                "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
            },
            "phases": [vars(p) for p in phases],
            "discarded_noisy_phases": [vars(p) for p in discarded],
            "throughput": summarize(phases),
            "round_trips": round_trips,
        }
        if profile:
            result["profile"] = profile
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=2)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
            sys.stdout.flush()
            log(f"(total {result['config']['seconds']} s)")
        return 0
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted: stopping the workers")
        return 130
    finally:
        b.stop_workers()
        with contextlib.suppress(redis.RedisError):
            delete_keys(r, *own)
            delete_keys(r_res, *own)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def _own_keys(run_id: str, key_prefix: str) -> list[str]:
    """Key patterns this run owns: its run id, and kombu's keys in the benchmark db."""
    return [f"*{run_id}*", f"{key_prefix}:*", "unacked", "unacked_index", "unacked_mutex",
            "_kombu.binding*"]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
