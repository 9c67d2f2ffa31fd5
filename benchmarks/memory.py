#!/usr/bin/env python
"""Worker memory (main process + pool children) with and without celery-resilience.

Run from the repository root::

    benchmarks/.venv/bin/python benchmarks/memory.py [--quick] [--json-out FILE]

Three real ``celery worker`` processes (prefork, concurrency 2, Redis broker on db 14,
each with its own key prefix), started together, each given the same workload: a
no-op task (one Redis ``INCR``) ``--tasks`` times per batch, ``--rounds`` batches.
After each batch (all its tasks done, 1 s to settle) the summed VmRSS and PSS of the
worker's main process and children are read from /proc. Setups: ``plain``
(``@app.task``), ``resilient`` (``@resilient(lock=...)``, a key per task) and
``resilient_metrics`` (the same, plus ``resilience_prometheus_port``). Units: MiB.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchapp import make_app
from common import (
    WorkerProc,
    client,
    delete_keys,
    free_port,
    log,
    rss_kib,
    spread,
    start_worker,
    versions,
    wait_for,
    write_json,
)

SETUPS = ("plain", "resilient", "resilient_metrics")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tasks", type=int, default=2000, help="tasks per batch")
    p.add_argument("--rounds", type=int, default=3, help="batches")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    n, rounds = (300, 2) if args.quick else (args.tasks, args.rounds)
    run_id = secrets.token_hex(3)
    r = client()
    workdir = tempfile.mkdtemp(prefix="bench-memory-")
    workers: dict[str, WorkerProc] = {}
    samples: dict[str, list[dict[str, int]]] = {s: [] for s in SETUPS}
    try:
        for setup in SETUPS:
            prefix = f"bench{run_id}:mem-{setup}"
            env = {"BENCH_SETUP": setup, "BENCH_PREFIX": prefix, "BENCH_NODE": "a",
                   "BENCH_METRICS_PORT": str(free_port())}  # fmt: skip
            log_path = os.path.join(workdir, f"{setup}.log")
            workers[setup] = start_worker(
                "benchapp", prefix, env, f"{prefix}.q", log_path, concurrency=2
            )
        for setup, w in workers.items():
            prefix = f"bench{run_id}:mem-{setup}"
            if not wait_for(lambda p=prefix: r.llen(f"{p}:ready:node") >= 1, 90, 0.1):
                raise RuntimeError(f"{setup}: worker not ready:\n{w.log_tail()}")
        apps = {s: make_app(s, f"bench{run_id}:mem-{s}", None) for s in SETUPS}
        samples0 = {s: rss_kib([w.pid, *w.children()]) for s, w in workers.items()}
        i = 0
        for rnd in range(rounds):
            log(f"memory: batch {rnd + 1}/{rounds}: {n} tasks on each worker ...")
            for setup, (app, tasks) in apps.items():
                key = f"bench{run_id}:mem-{setup}:count"
                with app.producer_or_acquire() as producer:
                    for _ in range(n):
                        i += 1
                        tasks["noop"].apply_async(args=(key, i), producer=producer)
            for setup in SETUPS:
                key = f"bench{run_id}:mem-{setup}:count"
                want = n * (rnd + 1)
                if not wait_for(lambda k=key, w=want: int(r.get(k) or 0) >= w, 300, 0.1):
                    raise RuntimeError(f"{setup}: tasks not done:\n{workers[setup].log_tail()}")
            time.sleep(1.0)
            for setup, w in workers.items():
                samples[setup].append(rss_kib([w.pid, *w.children()]))
    finally:
        for w in workers.values():
            w.stop()
        delete_keys(r, f"*{run_id}*")
    summary: dict[str, Any] = {}
    for setup in SETUPS:
        summary[setup] = {
            "rss_mib": spread(x["rss_kib"] / 1024 for x in samples[setup]),
            "pss_mib": spread(x["pss_kib"] / 1024 for x in samples[setup]),
            "rss_mib_at_start": samples0[setup]["rss_kib"] / 1024,
        }
    write_json(args.json_out, {"tasks_per_batch": n, "rounds": rounds, "summary": summary,
                               "raw": samples, "versions": versions()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
