#!/usr/bin/env python
"""The dead-letter queue at its default cap: store, list/page, count, replay 10,000 entries.

Run from the repository root::

    benchmarks/.venv/bin/python benchmarks/dlq_bench.py [--quick] [--json-out FILE]

Against the Redis DLQ backend (db 14, a key prefix of its own), through the public
API (``celery_resilience.DeadLetterQueue``) except for storing, which goes through the
backend's ``store`` as the gate does when a task gives up (entries built as in
tests/test_dlq_contract.py). Replays publish to a Redis broker queue nobody consumes
(db 14, a prefixed queue), at full rate (``rate`` far above what it reaches). Each
round starts from an empty queue; figures are per round, then median and min-max over
rounds. Units: seconds for whole phases, entries per second for rates, milliseconds
per page.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from celery import Celery
from common import REDIS_URL, client, delete_keys, log, pctl, spread, versions, write_json


def letter(task_name: str, at: float) -> Any:
    from celery_resilience.deadletter import DeadLetter

    return DeadLetter(
        id=uuid.uuid4().hex,
        task_id=str(uuid.uuid4()),
        task_name=task_name,
        reason="max_retries",
        exception_type="builtins.ConnectionError",
        exception_message="upstream refused",
        traceback="Traceback (most recent call last):\nConnectionError: upstream refused\n",
        attempts=11,
        deliveries=1,
        first_failure_at=at - 600,
        last_failure_at=at,
        args=[12345, "0123456789abcdef0123456789abcdef01234567"],
        kwargs={},
        queue="celery",
        exchange="",
        routing_key="celery",
    )


def one_round(prefix: str, n: int, page: int) -> dict[str, float]:
    from celery_resilience import DeadLetterQueue, resilient

    app = Celery(prefix, broker=REDIS_URL, backend=None, set_as_current=False)
    app.conf.update(
        resilience_url=REDIS_URL,
        resilience_key_prefix=f"{prefix}:res",
        broker_transport_options={"global_keyprefix": f"{prefix}:"},
        task_ignore_result=True,
    )
    name = f"{prefix}.task"

    @resilient(dlq=True)
    @app.task(name=name)
    def task(repoid: int, commitid: str) -> None:
        pass

    dlq = DeadLetterQueue(app)
    backend = dlq.backend
    now = time.time()
    entries = [letter(name, now - n + k) for k in range(n)]
    out: dict[str, float] = {}
    t = time.perf_counter()
    for e in entries:
        backend.store(e, retention=7 * 86400.0, max_entries=10_000)
    out["store_s"] = time.perf_counter() - t
    out["store_per_s"] = n / out["store_s"]
    t = time.perf_counter()
    out["count"] = dlq.count()
    out["count_ms"] = (time.perf_counter() - t) * 1e3
    pages: list[float] = []
    seen = 0
    cursor = None
    t = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        pg = dlq.list(limit=page, cursor=cursor)
        pages.append((time.perf_counter() - t1) * 1e3)
        seen += len(pg.entries)
        if pg.cursor is None:
            break
        cursor = pg.cursor
    out["list_all_s"] = time.perf_counter() - t
    out["listed"] = seen
    out["page_p50_ms"] = pctl(pages, 50)
    out["page_p99_ms"] = pctl(pages, 99)
    t = time.perf_counter()
    first = dlq.list(limit=100)
    out["first_page_100_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    dlq.get(first.entries[0].id)
    out["get_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    report = dlq.replay_all(rate=1e9)
    out["replay_s"] = time.perf_counter() - t
    out["replayed"] = len(report.replayed)
    out["replay_per_s"] = len(report.replayed) / out["replay_s"]
    out["left_after_replay"] = dlq.count()
    out["published"] = int(client().llen(f"{prefix}:celery"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=10_000, help="entries")
    p.add_argument("--page", type=int, default=100, help="entries per page when listing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    n, rounds = (2000, 1) if args.quick else (args.n, args.rounds)
    run_id = secrets.token_hex(3)
    r = client()
    raw: list[dict[str, float]] = []
    try:
        for rnd in range(rounds):
            log(f"dlq: round {rnd + 1}/{rounds}: {n} entries ...")
            prefix = f"bench{run_id}:dlq{rnd}"
            raw.append(one_round(prefix, n, args.page))
            delete_keys(r, f"*{prefix}*")
    finally:
        delete_keys(r, f"*{run_id}*")
    summary = {k: spread(x[k] for x in raw) for k in raw[0]}
    write_json(args.json_out, {"n": n, "page": args.page, "rounds": rounds,
                               "summary": summary, "raw": raw, "versions": versions()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
