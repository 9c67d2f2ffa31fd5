#!/usr/bin/env python
"""The web page (``celery -A proj resilience web``) at scale: how fast each page answers.

Run from the repository root (``redis-server`` on PATH)::

    .venv/bin/python benchmarks/web_pages.py [--quick] [--json-out FILE]

Everything runs against a ``redis-server`` of the script's own (``common.private_redis``:
a free loopback port, no persistence, ended by its pid at the end; the machine's shared
Redis is not used). One Celery app, ``Celery("webbench")``, has its broker, its
coordination backend (``resilience_url``) and its DLQ (``resilience_dlq_url``) all on
that server, key prefix ``webbench``, and 10 tasks ``bench.t0`` .. ``bench.t9``, each
``@resilient(lock="t<i>:{key}")``. The script fills the server with:

1. **Dead letters**: 100,000 (``--quick``: 10,000), 10,000 per task name (the default
   cap), the reasons spread evenly over ``GIVE_UP_REASONS`` (so ``bench.t3`` with
   reason ``error`` has a quarter of its task's entries), the failure times one second
   apart. Stored one by one through ``DeadLetterQueue(app).backend.store`` (retention
   7 days, ``max_entries`` 10,000) as the gate stores a task that gives up.
2. **Locks held**: 1,000 (``--quick``: 100), 100 per task (lock keys ``t<i>:<n>``),
   each taken by the coordination backend's ``admit`` as a delivery's admission takes
   it (owner ``new_owner("celery@node-a", task_id)``, lease TTL 600 s).
3. **Unrelated keys**: 100,000 (``--quick``: 10,000) ``other:<n>`` strings (a redis-py
   pipeline), so that the ``SCAN`` behind the locks list walks a keyspace where lock
   leases are few (the DLQ's keys are there too; the server's ``DBSIZE`` is reported).

Then the real ``WebServer`` (``celery_resilience.web.server``, no token, not read-only)
serves the app in this process on a free port (a thread running ``serve_forever``),
and each page gets 2 warm-up GETs and then ``--gets`` (20) timed GETs with
``urllib.request`` on a new connection each, one after the other: the median and
the maximum in milliseconds (request sent to body read), and the body's size in kB
(1,000 bytes). The pages:

- ``/``: the dead-letter list, first page;
- ``/?task=bench.t3&reason=error``: the list filtered by task and reason;
- ``/?cursor=...``: the next page, its cursor taken from the first page's "next page"
  link (the ``cursor`` parameter of its href, HTML-unescaped);
- ``/entries/<id>``: one entry (one of the middle of the stored ones);
- ``/nodes``: the nodes (no worker runs: none live) and the locks held;
- ``/nodes?task=bench.t3``: the locks of one task (100).

Each row also counts what the page lists (entry links, or lock rows). Besides the
pages, 20 calls each, in-process, without HTTP: the coordination backend's
``held_locks(limit=10_000)`` (what ``/nodes`` reads: a ``SCAN`` of the keyspace, then
a pipeline of each lease's holder, TTL and token) and ``celery_resilience.nodes.
read_nodes(app)`` (the nodes part), median and maximum in milliseconds.

The machine is a shared 2-core one: the client, the server's threads and
``redis-server`` share the two cores, so figures are of one run and only their order
of magnitude and their ratios mean much.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from common import log, private_redis, versions, write_json  # noqa: E402

from celery_resilience import DeadLetterQueue, resilient  # noqa: E402
from celery_resilience.backends.base import Admission, LockListing  # noqa: E402
from celery_resilience.deadletter import GIVE_UP_REASONS, DeadLetter  # noqa: E402
from celery_resilience.leases import new_owner  # noqa: E402
from celery_resilience.nodes import read_nodes  # noqa: E402
from celery_resilience.runtime import runtime  # noqa: E402
from celery_resilience.web.security import Guard  # noqa: E402
from celery_resilience.web.server import WebServer  # noqa: E402

TASKS = 10
PREFIX = "webbench"
MACHINE = "a shared 2-core machine (client, server threads and redis-server on the same cores)"


def make_app(url: str) -> Celery:
    """The app: broker, coordination backend and DLQ on ``url``; 10 locked tasks."""
    app = Celery("webbench", set_as_current=False)
    app.conf.update(
        broker_url=url,
        resilience_url=url,
        resilience_dlq_url=url,
        resilience_key_prefix=PREFIX,
    )
    for i in range(TASKS):

        @resilient(lock=f"t{i}:{{key}}")
        @app.task(name=f"bench.t{i}", shared=False)
        def task(key: str) -> None:
            """Never run here: its dead letters and locks are written directly."""

    return app


def letter(k: int, now: float, n: int) -> DeadLetter:
    """The ``k``-th dead letter of ``n``: task ``k % 10``, reasons in turn, 1 s apart."""
    at = now - n + k
    return DeadLetter(
        id=uuid.uuid4().hex,
        task_id=str(uuid.uuid4()),
        task_name=f"bench.t{k % TASKS}",
        reason=GIVE_UP_REASONS[(k // TASKS) % len(GIVE_UP_REASONS)],
        exception_type="builtins.ConnectionError",
        exception_message="upstream refused",
        traceback="Traceback (most recent call last):\nConnectionError: upstream refused\n",
        attempts=3,
        deliveries=1,
        first_failure_at=at - 10,
        last_failure_at=at,
        args=[f"{k}"],
        kwargs={},
        argnames=["key"],
        queue="celery",
        exchange="",
        routing_key="celery",
    )


def fill_dlq(app: Celery, n: int) -> list[str]:
    """Store ``n`` dead letters one by one; their ids, in storing order."""
    backend = DeadLetterQueue(app).backend
    now = time.time()
    ids = []
    for k in range(n):
        entry = letter(k, now, n)
        backend.store(entry, retention=7 * 86400.0, max_entries=10_000)
        ids.append(entry.id)
    return ids


def take_locks(app: Celery, per_task: int) -> int:
    """Take ``per_task`` locks for each task (keys ``t<i>:<n>``); how many were taken."""
    backend = runtime(app).backend
    taken = 0
    for i in range(TASKS):
        for n in range(per_task):
            task_id = str(uuid.uuid4())
            result = backend.admit(
                task_id,
                owner=new_owner("celery@node-a", task_id),
                publish="p",
                lock_key=f"t{i}:{n}",
                lease_ttl=600.0,
                max_crashes=3,
                record_ttl=600.0,
            )
            taken += result.admission is Admission.ADMITTED
    return taken


def other_keys(r: redis.Redis, n: int) -> None:
    """``n`` unrelated strings ``other:<n>``, in pipelines of 10,000."""
    for start in range(0, n, 10_000):
        pipe = r.pipeline(transaction=False)
        for k in range(start, min(n, start + 10_000)):
            pipe.set(f"other:{k}", "x" * 16)
        pipe.execute()


def get(base: str, path: str) -> tuple[float, bytes]:
    """One GET of ``path``: the milliseconds until the body is read, and the body."""
    t = time.perf_counter()
    with urllib.request.urlopen(base + path, timeout=120) as response:
        body = response.read()
        status = response.status
    ms = (time.perf_counter() - t) * 1e3
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status}")
    return ms, body


def listed(path: str, body: bytes) -> int:
    """What the page lists: lock rows on /nodes, entry links on the list."""
    text = body.decode("utf-8", "replace")
    if path.startswith("/nodes"):
        return text.count('<span class="key">')
    if path.startswith("/entries/"):
        return 1
    return len(set(re.findall(r'href="/entries/([^"/]+)"', text)))


def time_page(base: str, path: str, gets: int) -> dict[str, Any]:
    for _ in range(2):
        get(base, path)
    times, body = [], b""
    for _ in range(gets):
        ms, body = get(base, path)
        times.append(ms)
    return {
        "path": path,
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "kb": len(body) / 1000,
        "listed": listed(path, body),
        "raw_ms": times,
    }


def time_call(fn: Any, calls: int) -> dict[str, Any]:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "max_ms": max(times), "raw_ms": times}


def next_cursor(body: bytes) -> str:
    """The ``cursor`` parameter of the page's "next page" link, HTML-unescaped."""
    found = re.search(r'<a href="([^"]*)">next page</a>', body.decode("utf-8"))
    if found is None:
        raise RuntimeError('the first page has no "next page" link')
    return parse_qs(urlsplit(html.unescape(found.group(1))).query)["cursor"][0]


def table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Web pages, {s['entries']:,} dead letters, {s['locks']:,} locks held, "
        f"{s['other_keys']:,} other keys (DBSIZE {s['dbsize']:,}); "
        f"{result['gets']} GETs per page after 2 warm-ups; {MACHINE}",
        "",
        "| page | median ms | max ms | size kB | listed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["pages"]:
        path = row["path"]
        if "cursor=" in path:
            path = "/?cursor=... (next page)"
        elif path.startswith("/entries/"):
            path = "/entries/<id>"
        lines.append(
            f"| `{path}` | {row['median_ms']:.1f} | {row['max_ms']:.1f} "
            f"| {row['kb']:.1f} | {row['listed']:,} |"
        )
    for name, call in result["calls"].items():
        lines.append(
            f"| {name} (in-process) | {call['median_ms']:.1f} | {call['max_ms']:.1f} | | |"
        )
    lines += [
        "",
        f"Filling: DLQ {s['store_s']:.1f} s, locks {s['locks_s']:.1f} s, "
        f"other keys {s['other_s']:.1f} s; whole run {result['run_s']:.0f} s.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10,000 entries, 100 locks")
    p.add_argument("--gets", type=int, default=20, help="timed GETs per page")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    entries, per_task, others = (10_000, 10, 10_000) if args.quick else (100_000, 100, 100_000)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="webbench-") as tmp, private_redis(tmp) as srv:
        r = redis.Redis.from_url(srv.url)
        app = make_app(srv.url)
        setup: dict[str, Any] = {"entries": entries, "other_keys": others}
        log(f"web: storing {entries:,} dead letters ...")
        t = time.perf_counter()
        ids = fill_dlq(app, entries)
        setup["store_s"] = time.perf_counter() - t
        log(f"web: taking {per_task * TASKS:,} locks ...")
        t = time.perf_counter()
        setup["locks"] = take_locks(app, per_task)
        setup["locks_s"] = time.perf_counter() - t
        log(f"web: {others:,} other keys ...")
        t = time.perf_counter()
        other_keys(r, others)
        setup["other_s"] = time.perf_counter() - t
        setup["dbsize"] = int(r.dbsize())
        log(f"web: DBSIZE {setup['dbsize']:,}")

        queue = DeadLetterQueue(app)
        server = WebServer(("127.0.0.1", 0), queue, frozenset(), Guard(None, read_only=False), 1e3)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pages: list[dict[str, Any]] = []
        calls: dict[str, dict[str, Any]] = {}
        try:
            _, first = get(base, "/")
            cursor = next_cursor(first)
            paths = [
                "/",
                "/?" + urlencode({"task": "bench.t3", "reason": "error"}),
                "/?" + urlencode({"cursor": cursor}),
                f"/entries/{ids[len(ids) // 2]}",
                "/nodes",
                "/nodes?" + urlencode({"task": "bench.t3"}),
            ]
            for path in paths:
                log(f"web: GET {path[:60]} x {args.gets} ...")
                pages.append(time_page(base, path, args.gets))
            backend = runtime(app).backend
            assert isinstance(backend, LockListing)
            held = len(backend.held_locks(limit=10_000))
            log(f"web: held_locks x 20 ({held:,} locks) ...")
            calls["held_locks(limit=10_000)"] = time_call(
                lambda: backend.held_locks(limit=10_000), 20
            )
            calls["held_locks(limit=10_000)"]["locks"] = held
            calls["read_nodes(app)"] = time_call(lambda: read_nodes(app), 20)
        finally:
            server.shutdown()
            server.server_close()
            runtime(app).backend.close()
            app.close()
        result: dict[str, Any] = {
            "quick": args.quick,
            "gets": args.gets,
            "setup": setup,
            "cursor": cursor,
            "pages": pages,
            "calls": calls,
            "machine": MACHINE,
            "versions": versions(r),
        }
        r.close()
    result["run_s"] = time.perf_counter() - started
    write_json(args.json_out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
