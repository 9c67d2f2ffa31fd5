#!/usr/bin/env python
"""Publish-time cost of ``.delay()`` with ``dedup=``, against a plain ``.delay()``, same run.

Run from the repository root (Redis on loopback; no worker is started)::

    python benchmarks/dedup.py [--quick] [--json-out FILE]

Every variant publishes to a Redis broker (database 14) queue no worker reads:

``plain``            ``@app.task``: Celery's own ``.delay()``
``resilient``        ``@resilient`` without ``dedup=`` (the publish id stamp)
``dedup, published`` ``@resilient(dedup=...)`` with a fresh key per call: the key is
                     taken (one script), then the message is published
``dedup, collapsed`` the same task with one key a queued task holds: one script
                     answers with the holder and nothing is published

Rounds interleave the variants (order rotated each round); each round times ``--n``
calls per variant with ``perf_counter_ns``. Reported: p50 and p99 per round, median
and min-max over rounds, in microseconds, and each variant's p50 over plain's.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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

from celery_resilience import resilient

Call = Callable[[int], None]


def make_calls(prefix: str) -> tuple[Celery, dict[str, Call]]:
    """One ``.delay()`` callable per variant; the argument makes a fresh key."""
    app = Celery(prefix, broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{prefix}:queue",
        broker_transport_options={"global_keyprefix": f"{prefix}:broker:"},
        resilience_url=REDIS_URL,
        resilience_key_prefix=f"{prefix}:res",
    )

    @app.task(name=f"{prefix}.plain")
    def plain(n: int) -> None: ...

    @resilient
    @app.task(name=f"{prefix}.resilient")
    def stamped(n: int) -> None: ...

    @resilient(dedup="sync:{n}")
    @app.task(name=f"{prefix}.dedup")
    def deduplicated(n: int) -> None: ...

    held = deduplicated.delay(-1).id

    def collapsed(n: int) -> None:
        assert deduplicated.delay(-1).id == held

    return app, {
        "plain": lambda n: plain.delay(n) and None,
        "resilient": lambda n: stamped.delay(n) and None,
        "dedup, published": lambda n: deduplicated.delay(n) and None,
        "dedup, collapsed": collapsed,
    }


def main(argv: list[str] | None = None) -> int:
    n, rounds, json_out = rounds_options(__doc__ or "", "calls per variant", argv)
    run_id = secrets.token_hex(3)
    prefix = f"bench{run_id}:dedup"
    r = client()
    app, calls = make_calls(prefix)
    try:
        log(f"dedup: {rounds} rounds x {n} .delay() calls per variant ...")
        raw = timed_rounds(calls, n, rounds)
    finally:
        app.close()
        delete_keys(r, f"*{run_id}*")
    summary = {
        name: {k: spread(x[k] for x in rr) for k in ("p50_us", "p99_us")}
        for name, rr in raw.items()
    }
    plain_p50 = summary["plain"]["p50_us"]["median"]
    ratios = {name: s["p50_us"]["median"] / plain_p50 for name, s in summary.items()}
    for name, s in summary.items():
        print(
            f"{name:18} p50 {s['p50_us']['median']:7.1f} us  p99 {s['p99_us']['median']:7.1f} us"
            f"  x{ratios[name]:.2f} of plain"
        )
    write_json(json_out, {"n": n, "rounds": rounds, "summary": summary, "ratios": ratios,
                               "raw": raw, "versions": versions()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
