#!/usr/bin/env python
"""Worker death and long tasks, with real ``celery worker`` processes and real signals.

Run from the repository root (``run.py`` runs it for the tables)::

    benchmarks/.venv/bin/python benchmarks/recovery.py [--quick] [--json-out FILE]

Scenarios, all started at once (each in its own threads and worker processes, each
with its own Redis key prefix, so one scenario's restore sweeps never touch another's
messages), and measured with a cap instead of waiting out hour-long defaults:

- **child kill**: a task runs for 6 s; 1 s in, its pool child gets SIGKILL. Measured:
  seconds from the kill until the task's body starts again (on the same worker).
- **node kill**: two workers consume the queue; 3 s into a 12 s task, the worker running
  it gets SIGKILL on its whole process group (main process and children). Measured:
  seconds from the kill until the body starts again on the other worker.
- **lock blocked**: after the child kill, how long the lock key of the killed task
  still holds the dead holder (celery-resilience: its lease; celery-once,
  celery-singleton: their key), polled every 50 ms.
- **duplicates**: on healthy workers with ``visibility_timeout=4``, a 12 s task and
  a 110 s task (longer than kombu's 100 s restore-sweep period): how many deliveries
  reached the worker's task code and how many times the body started.

Times are Unix-time stamps taken by the tasks (``benchapp.record``) minus the
driver's kill time (same machine, one clock), in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchapp import make_app
from common import (
    WorkerProc,
    client,
    delete_keys,
    log,
    spread,
    start_worker,
    versions,
    wait_for,
    write_json,
)

RECOVERY_SETUPS: dict[str, float | None] = {
    "plain": None,  # Celery's defaults: visibility_timeout 3600 s, acks early
    "plain_acks_late": 30.0,
    "resilient": 30.0,
}
LOCK_SETUPS = ("once", "singleton")  # celery-resilience's lock is measured in "resilient"
DUP_SETUPS = ("plain", "plain_acks_late", "resilient")
DUP_VT = 4.0
TASK_SECONDS = 6.0
KILL_AFTER = 1.0
# A node is killed later into a longer task: the heartbeat refreshes a message it
# received within one sweep interval (visibility_timeout / 20 = 1.5 s here); a node
# killed before that has its message back after a whole timeout (docs/recovery.md).
NODE_TASK_SECONDS = 12.0
NODE_KILL_AFTER = 3.0


class Run:
    """Shared state of one run: the run id, Redis, the workers to clean up."""

    def __init__(self, workdir: str) -> None:
        self.run_id = secrets.token_hex(3)
        self.r = client()
        self.workdir = workdir
        self.workers: list[WorkerProc] = []
        self.lock = threading.Lock()
        self.results: dict[str, Any] = {}

    def prefix(self, name: str) -> str:
        return f"bench{self.run_id}:{name}"

    def worker(
        self, setup: str, prefix: str, vt: float | None, node: str, concurrency: int
    ) -> WorkerProc:
        env = {"BENCH_SETUP": setup, "BENCH_PREFIX": prefix, "BENCH_NODE": node}
        if vt is not None:
            env["BENCH_VT"] = str(vt)
        log_path = os.path.join(self.workdir, f"{prefix.replace(':', '_')}-{node}.log")
        w = start_worker("benchapp", f"{prefix}-{node}", env, f"{prefix}.q", log_path,
                         concurrency=concurrency)  # fmt: skip
        with self.lock:
            self.workers.append(w)
        return w

    def wait_ready(self, prefix: str, n: int, workers: list[WorkerProc]) -> None:
        def ready() -> bool:
            if any(w.proc.poll() is not None for w in workers):
                return True
            return int(self.r.llen(f"{prefix}:ready:node")) >= n

        ok = wait_for(ready, 90, 0.1) and all(w.proc.poll() is None for w in workers)
        if not ok:
            tails = "\n".join(w.log_tail(6) for w in workers)
            raise RuntimeError(f"{prefix}: workers not ready after 90 s:\n{tails}")

    def events(self, prefix: str, what: str, tag: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{prefix}:{what}:{tag}", 0, -1)]

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()


def _poll(until: Callable[[], bool], cap: float) -> None:
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline and not until():
        time.sleep(0.05)


def _lock_value(run: Run, setup: str, prefix: str, tag: str, task_id: str) -> bytes | None:
    """The lock key's value now (None: free)."""
    r = run.r
    if setup.startswith("resilient"):
        return r.get(f"{prefix}:res:lock:bench:{tag}")  # type: ignore[return-value]
    if setup == "once":
        for key in r.scan_iter(match=f"qo_{prefix}.sleepy*{tag}*"):
            return r.get(key)  # type: ignore[return-value]
        return None
    for key in r.scan_iter(match=f"{prefix}:sl:*"):
        v = r.get(key)
        if v is not None and v.decode() == task_id:
            return v  # type: ignore[return-value]
    return None


def _lock_ttl(run: Run, setup: str, prefix: str, tag: str, task_id: str) -> float | None:
    """Seconds the lock key had left at the kill (None: no expiry)."""
    r = run.r
    if setup.startswith("resilient"):
        keys = [f"{prefix}:res:lock:bench:{tag}"]
    elif setup == "once":
        keys = list(r.scan_iter(match=f"qo_{prefix}.sleepy*{tag}*"))
    else:
        keys = [
            k for k in r.scan_iter(match=f"{prefix}:sl:*") if (r.get(k) or b"") == task_id.encode()
        ]
    for k in keys:
        ms = int(r.pttl(k))
        return None if ms == -1 else ms / 1000
    return float("nan")


def child_kill(
    run: Run, setup: str, vt: float | None, rounds: int, cap: float, delay: float
) -> dict[str, Any]:
    """Kill the pool child running each of ``rounds`` concurrent tasks; time the re-run.

    Starts after ``delay`` seconds, once the other scenarios' workers have started: a
    re-run takes a fresh pool child, which is slow while 20 workers boot on 2 cores.
    """
    time.sleep(delay)
    prefix = run.prefix(f"{setup}-child")
    w = run.worker(setup, prefix, vt, "a", concurrency=rounds)
    run.wait_ready(prefix, 1, [w])
    _, tasks = make_app(setup, prefix, vt)
    tags = [f"c{k}" for k in range(rounds)]
    ids = {}
    for tag in tags:
        res = tasks["sleepy"].apply_async(kwargs={"tag": tag, "seconds": TASK_SECONDS})
        ids[tag] = res.id if res is not None else ""
    kills: dict[str, float] = {}
    dead: dict[str, bytes | None] = {}
    ttl: dict[str, float | None] = {}
    for tag in tags:
        if not wait_for(lambda t=tag: run.events(prefix, "starts", t), 60):
            raise RuntimeError(f"{prefix}: task {tag} never started:\n{w.log_tail()}")
    time.sleep(KILL_AFTER)
    for tag in tags:
        pid = run.events(prefix, "starts", tag)[0]["pid"]
        dead[tag] = _lock_value(run, setup, prefix, tag, ids[tag])
        ttl[tag] = _lock_ttl(run, setup, prefix, tag, ids[tag])
        os.kill(pid, signal.SIGKILL)
        kills[tag] = time.time()
        time.sleep(0.2)
    freed: dict[str, float] = {}

    def done() -> bool:
        now = time.time()
        for tag in tags:
            if (
                tag not in freed
                and dead[tag] is not None
                and _lock_value(run, setup, prefix, tag, ids[tag]) != dead[tag]
            ):
                freed[tag] = now - kills[tag]
        reran = all(len(run.events(prefix, "starts", t)) > 1 for t in tags)
        return reran and all(t in freed or dead[t] is None for t in tags)

    _poll(done, cap)
    out: dict[str, Any] = {"setup": setup, "visibility_timeout": vt, "cap": cap, "rounds": []}
    for tag in tags:
        starts = run.events(prefix, "starts", tag)
        again = starts[1]["t"] - kills[tag] if len(starts) > 1 else None
        out["rounds"].append({
            "rerun_after": again,
            "lock_blocked_for": freed.get(tag) if dead[tag] is not None else None,
            "lock_held_at_kill": dead[tag] is not None,
            "lock_ttl_at_kill": ttl[tag],
        })  # fmt: skip
    # Where is the killed message? (plain Celery acks it when it starts.)
    out["queue_len_after"] = int(run.r.llen(f"{prefix}:{prefix}.q"))
    out["unacked_after"] = int(run.r.hlen(f"{prefix}:unacked"))
    return out


def node_kill(
    run: Run, setup: str, vt: float | None, k: int, cap: float, delay: float
) -> dict[str, Any]:
    """Two workers; SIGKILL the group of the one running the task; time the re-run."""
    time.sleep(delay)  # rounds start a few seconds apart: start-up CPU spread out
    prefix = run.prefix(f"{setup}-node{k}")
    a = run.worker(setup, prefix, vt, "a", concurrency=1)
    b = run.worker(setup, prefix, vt, "b", concurrency=1)
    run.wait_ready(prefix, 2, [a, b])
    _, tasks = make_app(setup, prefix, vt)
    tag = "n"
    tasks["sleepy"].apply_async(kwargs={"tag": tag, "seconds": NODE_TASK_SECONDS})
    if not wait_for(lambda: run.events(prefix, "starts", tag), 60):
        raise RuntimeError(f"{prefix}: task never started:\n{a.log_tail()}")
    time.sleep(NODE_KILL_AFTER)
    pid = run.events(prefix, "starts", tag)[0]["pid"]
    victim = a if pid in a.children() else b
    held = _lock_value(run, setup, prefix, tag, "")
    victim.kill(signal.SIGKILL)
    t_kill = time.time()
    freed: list[float] = []

    def done() -> bool:
        if held is not None and not freed and _lock_value(run, setup, prefix, tag, "") != held:
            freed.append(time.time() - t_kill)
        return len(run.events(prefix, "starts", tag)) > 1 and (held is None or bool(freed))

    _poll(done, cap)
    starts = run.events(prefix, "starts", tag)
    return {
        "setup": setup,
        "visibility_timeout": vt,
        "cap": cap,
        "rerun_after": starts[1]["t"] - t_kill if len(starts) > 1 else None,
        "lock_blocked_for": freed[0] if freed else None,
        "queue_len_after": int(run.r.llen(f"{prefix}:{prefix}.q")),
        "unacked_after": int(run.r.hlen(f"{prefix}:unacked")),
    }


def duplicates(run: Run, setup: str, lengths: list[float]) -> dict[str, Any]:
    """Long tasks under ``visibility_timeout=4`` on one healthy worker: count starts."""
    prefix = run.prefix(f"{setup}-dup")
    w = run.worker(setup, prefix, DUP_VT, "a", concurrency=4)
    run.wait_ready(prefix, 1, [w])
    _, tasks = make_app(setup, prefix, DUP_VT)
    t0 = time.time()
    for s in lengths:
        tasks["sleepy"].apply_async(kwargs={"tag": f"d{s:g}", "seconds": s})
    horizon = max(lengths) + 12
    time.sleep(max(0.0, t0 + horizon - time.time()))
    out: dict[str, Any] = {"setup": setup, "visibility_timeout": DUP_VT, "tasks": {}}
    for s in lengths:
        tag = f"d{s:g}"
        out["tasks"][f"{s:g}"] = {
            "deliveries": len(run.events(prefix, "deliveries", tag)),
            "body_starts": len(run.events(prefix, "starts", tag)),
            "body_ends": len(run.events(prefix, "ends", tag)),
            "observed_for": horizon,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, short caps (~1 min)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cap", type=float, default=150.0, help="seconds to wait for a node re-run")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cap = 25.0 if args.quick else args.cap
    child_cap = 15.0 if args.quick else 40.0
    dup_lengths = [12.0] if args.quick else [12.0, 110.0]
    child_delay = 0.0 if args.quick else 25.0
    workdir = tempfile.mkdtemp(prefix="bench-recovery-")
    run = Run(workdir)
    jobs: dict[str, Callable[[], Any]] = {}
    for setup, vt in RECOVERY_SETUPS.items():
        jobs[f"child/{setup}"] = lambda s=setup, v=vt: child_kill(
            run, s, v, rounds, child_cap, child_delay
        )
        for k in range(rounds):
            jobs[f"node/{setup}/{k}"] = lambda s=setup, v=vt, k=k: node_kill(
                run, s, v, k, cap, delay=4.0 * k
            )
    for setup in LOCK_SETUPS:
        jobs[f"child/{setup}"] = lambda s=setup: child_kill(
            run, s, None, rounds, child_cap, child_delay
        )
    for setup in DUP_SETUPS:
        jobs[f"dup/{setup}"] = lambda s=setup: duplicates(run, s, dup_lengths)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def runner(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = fn()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    t0 = time.monotonic()
    log(f"recovery: {len(jobs)} scenarios at once (node-kill cap {cap:.0f} s) ...")
    threads = [threading.Thread(target=runner, args=(n, f), daemon=True) for n, f in jobs.items()]
    try:
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join()
    finally:
        run.stop_all()
        delete_keys(run.r, f"*{run.run_id}*")
    if errors:
        log(f"recovery: errors: {errors}")
    out = summarize(results, rounds, cap, child_cap)
    out["errors"] = errors
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["versions"] = versions()
    out["workdir"] = workdir
    write_json(args.json_out, out)
    return 1 if errors else 0


def summarize(results: dict[str, Any], rounds: int, cap: float, child_cap: float) -> dict[str, Any]:
    """Median and min-max over rounds; ``None`` re-runs (not within the cap) are counted."""
    out: dict[str, Any] = {"rounds": rounds, "cap": cap, "child_cap": child_cap, "raw": results}
    table: dict[str, Any] = {}
    for setup, vt in {**RECOVERY_SETUPS, **dict.fromkeys(LOCK_SETUPS)}.items():
        row: dict[str, Any] = {"visibility_timeout": vt}
        c = results.get(f"child/{setup}")
        if c:
            rr = [x["rerun_after"] for x in c["rounds"]]
            row["child"] = spread(x for x in rr if x is not None)
            row["child_missing"] = sum(x is None for x in rr)
            row["child_message_in_redis_after"] = c["queue_len_after"] + c["unacked_after"]
            lb = [x["lock_blocked_for"] for x in c["rounds"] if x["lock_held_at_kill"]]
            row["lock"] = spread(x for x in lb if x is not None)
            row["lock_still_blocked"] = sum(x is None for x in lb)
            row["lock_ttl_at_kill"] = [x["lock_ttl_at_kill"] for x in c["rounds"]]
        nodes = [results[k] for k in sorted(results) if k.startswith(f"node/{setup}/")]
        if nodes:
            rr = [x["rerun_after"] for x in nodes]
            row["node"] = spread(x for x in rr if x is not None)
            row["node_missing"] = sum(x is None for x in rr)
            row["node_message_in_redis_after"] = [
                x["queue_len_after"] + x["unacked_after"] for x in nodes
            ]
            lb = [x["lock_blocked_for"] for x in nodes]
            row["node_lock"] = spread(x for x in lb if x is not None)
        table[setup] = row
    out["table"] = table
    out["duplicates"] = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("dup/")}
    return out


if __name__ == "__main__":
    sys.exit(main())
