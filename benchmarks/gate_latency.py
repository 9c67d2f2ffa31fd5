#!/usr/bin/env python
"""Latency the gate adds to one delivery, and its Redis round trips, in-process.

Run from the repository root::

    benchmarks/.venv/bin/python benchmarks/gate_latency.py [--quick] [--json-out FILE]

Each delivery is ``task.apply()`` of a no-op task (Celery's tracer, the same code
path a worker child runs, without the broker) against the coordination backend on
Redis (loopback, db 14). The benchmark wraps, only in this process:

- ``Gate.__call__`` (entry and exit) and the task body (start and end):
  *before-body* = body start - gate entry (building the delivery, rendering the lock
  key, the ``admit`` script, starting the lease keeper);
  *after-body* = (gate exit - body end) + the time of ``Gate.after_return`` (stopping
  the lease keeper, the ``finish`` script);
- ``redis.Redis.execute_command`` on the coordination backend's client: the round
  trips per delivery.

Rounds interleave ``@resilient()`` and ``@resilient(lock=...)``, and a plain task's
``apply()`` for the whole-delivery reference. Units: microseconds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from celery import Celery
from common import REDIS_URL, client, delete_keys, log, pctl, spread, versions, write_json

_ns = time.perf_counter_ns


def build(prefix: str) -> tuple[Celery, dict[str, Any], dict[str, list[int]]]:
    from celery_resilience import gate as gate_mod
    from celery_resilience import resilient

    app = Celery(prefix, broker="memory://", backend=None, set_as_current=False)
    app.conf.update(
        resilience_url=REDIS_URL, resilience_key_prefix=f"{prefix}:res", task_ignore_result=True
    )
    stamps: dict[str, list[int]] = {"enter": [], "exit": [], "bs": [], "be": [], "after": []}

    def body() -> None:
        stamps["bs"].append(_ns())
        stamps["be"].append(_ns())

    def plain_fn(i: int) -> None:
        pass

    def nolock_fn(i: int) -> None:
        body()

    def lock_fn(i: int) -> None:
        body()

    tasks = {
        "plain": app.task(name=f"{prefix}.plain")(plain_fn),
        "nolock": resilient()(app.task(name=f"{prefix}.nolock")(nolock_fn)),
        "lock": resilient(lock="g:{i}")(app.task(name=f"{prefix}.lock")(lock_fn)),
    }
    orig_call, orig_after = gate_mod.Gate.__call__, gate_mod.Gate.after_return

    def timed_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        stamps["enter"].append(_ns())
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            stamps["exit"].append(_ns())

    def timed_after(self: Any, status: str, task_id: str) -> None:
        t = _ns()
        orig_after(self, status, task_id)
        stamps["after"].append(_ns() - t)

    gate_mod.Gate.__call__ = timed_call  # type: ignore[method-assign]
    gate_mod.Gate.after_return = timed_after  # type: ignore[method-assign]
    return app, tasks, stamps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=2000, help="deliveries per variant and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    n, rounds = (300, 2) if args.quick else (args.n, args.rounds)
    run_id = secrets.token_hex(3)
    prefix = f"bench{run_id}:gate"
    r = client()
    app, tasks, stamps = build(prefix)
    from celery_resilience.runtime import runtime

    backend = runtime(app).backend
    rclient = backend._client  # type: ignore[attr-defined]
    calls: list[str] = []
    orig_exec = rclient.execute_command

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(str(a[0]))
        return orig_exec(*a, **kw)

    rclient.execute_command = counting
    results: dict[str, Any] = {v: {"rounds": []} for v in tasks}
    i = 0
    try:
        for v in ("nolock", "lock"):  # warm-up (connections, script loading)
            for _ in range(100):
                i += 1
                tasks[v].apply(args=(i,))
        log(f"gate latency: {rounds} rounds x {n} deliveries per variant ...")
        for _ in range(rounds):
            for v in ("plain", "nolock", "lock"):
                for k in stamps.values():
                    k.clear()
                calls.clear()
                total: list[int] = []
                for _ in range(n):
                    i += 1
                    t = _ns()
                    tasks[v].apply(args=(i,))
                    total.append(_ns() - t)
                rec: dict[str, Any] = {"total_p50_us": pctl(total, 50) / 1e3,
                                       "total_p99_us": pctl(total, 99) / 1e3}  # fmt: skip
                if v != "plain":
                    if not (len(stamps["bs"]) == len(stamps["after"]) == n):
                        raise RuntimeError(f"{v}: gate stamps incomplete ({len(stamps['after'])})")
                    before = [b - e for b, e in zip(stamps["bs"], stamps["enter"], strict=True)]
                    after = [
                        (x - be) + a
                        for x, be, a in zip(
                            stamps["exit"], stamps["be"], stamps["after"], strict=True
                        )
                    ]
                    rec.update(
                        before_p50_us=pctl(before, 50) / 1e3,
                        before_p99_us=pctl(before, 99) / 1e3,
                        after_p50_us=pctl(after, 50) / 1e3,
                        after_p99_us=pctl(after, 99) / 1e3,
                        round_trips_per_delivery=len(calls) / n,
                        commands=sorted(set(calls)),
                    )
                results[v]["rounds"].append(rec)
    finally:
        delete_keys(r, f"*{run_id}*")
    summary: dict[str, Any] = {}
    for v, x in results.items():
        keys = x["rounds"][0].keys() - {"commands"}
        summary[v] = {k: spread(rr[k] for rr in x["rounds"]) for k in keys}
        if "commands" in x["rounds"][0]:
            summary[v]["commands"] = x["rounds"][0]["commands"]
    write_json(args.json_out, {"n": n, "rounds": rounds, "summary": summary,
                               "raw": results, "versions": versions()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
