#!/usr/bin/env python
"""Sentinel and Cluster: locked operations over 1,000 keys, lock_replicas, DLQ of 100,000.

Run from the repository root (it imports ``tests/support/topology.py`` to start the
servers; ``redis-server`` and ``redis-cli`` on PATH)::

    .venv/bin/python benchmarks/ha.py [--quick] [--json-out FILE]

Every server is the script's own, on free loopback ports, without persistence, and is
ended by its pid at the end (the machine's shared Redis is not used): one plain
``redis-server`` (*one node*), a plain ``redis-server`` used only as the Celery broker
of the replays, a six-node Cluster (three primaries with a replica each,
``ClusterTopology``) and a Sentinel topology (a primary, one replica, three sentinels,
``SentinelTopology``). Backends are built as an app builds them
(``celery_resilience.testing.backend_for`` / ``dlq_backend_for``).

1. **Locked operations over 1,000 lock keys.** One operation = the coordination
   backend's ``admit`` of a fresh task id under lock key ``k<i % 1000>`` and its
   ``finish`` (what a delivery with ``lock=`` costs). ``--procs`` processes x
   ``--threads`` threads (default 2 x 4: 8 clients on 2 cores), each process with one
   backend per variant, run ``--ops`` operations per thread and round against (a) the
   one node and (b) the Cluster; rounds interleave the two (order rotated). Reported
   per round: operations per second (all clients, from the common start to the last
   finish), p50/p99 of one operation, CPU per operation of the client processes
   (``os.times``) and of the variant's servers (``INFO`` ``used_cpu_*``, all six nodes
   for the Cluster); median and min-max over rounds; the ratio Cluster / one node per
   round. Also how the 1,000 keys spread over the primaries
   (the slot of a delivery's keys is that of its hash tag ``{lock:<lock key>}``) and
   the keys each primary holds afterwards. A lock key another thread holds at that
   moment is counted as not admitted. On one 2-core machine the clients' CPU
   bounds the throughput of both; the point is the same workload running on the Cluster
   with its keys spread.
2. **resilience_lock_replicas.** admit + finish latency on the Sentinel topology
   with ``lock_replicas`` 0 and 1 (each admission followed by ``WAIT 1 1000`` on the
   same connection), one client, ``--n`` operations per variant and round, ``--rounds``
   rounds interleaved; p50/p99 in microseconds and the ratio 1 / 0 per round.
3. **DLQ of ``--dlq-n`` entries (100,000), one node vs the Cluster.** Stored one by one
   with the backend's ``store`` as the gate does (``max_entries`` 200,000 so all stay,
   retention 7 days); then the public ``DeadLetterQueue``: ``count()``, the first page
   of 100, paging through all (100 a page), ``get(id)``, and ``replay_all()`` at full
   rate of the last ``--replay`` entries (a task name of their own; default all) to a
   broker queue nobody consumes, on the plain broker server (kombu has no Cluster
   transport). One round per variant (a round of 100,000 takes minutes). On the
   Cluster every DLQ key shares the hash tag ``{<prefix>:dlq}``: the script counts the
   DLQ's keys on each primary after the store.
4. **The memory DLQ's per-write scan.** ``dlq_backend_for("memory://bench-<uuid>")``
   filled to 1,000, 10,000 and 100,000 entries (put in its dict directly: filling by
   ``store`` is itself quadratic), then ``--mem-stores`` timed ``store`` calls at each
   level: each store walks every entry for the retention and sorts the task name's
   entries for the cap.

Units: seconds for whole phases, operations or entries per second for rates,
microseconds (``_us``) or milliseconds (``_ms``) for one call.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)

import redis  # noqa: E402
from common import log, pctl, spread, timed_rounds, write_json  # noqa: E402
from dlq_bench import letter  # noqa: E402  (the entries dlq_bench.py stores)

LOCK_KEYS = 1000
RECORD_TTL = 3600.0
LOCK_FIGURES = ("ops_per_s", "p50_us", "p99_us", "client_cpu_us_per_op", "server_cpu_us_per_op")
RETENTION = 7 * 86400.0
MAX_ENTRIES = 200_000


# -- 1. locked operations, several client processes and threads --------------------------


def _lock_op(backend: Any, lock_key: str) -> bool:
    """admit + finish of a fresh task id under ``lock_key``; whether it was admitted."""
    tid = uuid.uuid4().hex
    got = backend.admit(tid, owner=tid, publish=tid, lock_key=lock_key, lease_ttl=30.0,
                        max_crashes=3, record_ttl=RECORD_TTL)  # fmt: skip
    if got.fencing_token is None:
        return False
    backend.finish(tid, owner=tid, publish=tid, lock_key=lock_key, succeeded=True,
                   record_ttl=RECORD_TTL)  # fmt: skip
    return True


def _lock_thread(backend: Any, worker: int, base: int, ops: int, width: int,
                 start_at: float, out: dict[str, Any]) -> None:  # fmt: skip
    """One client thread's share of a round: operation ``base + k * width + worker`` for
    k < ops, from ``start_at`` (``time.monotonic``, the same clock in every process)."""
    lat, refused = [], 0
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    for k in range(ops):
        i = base + k * width + worker
        t0 = time.perf_counter_ns()
        if not _lock_op(backend, f"k{i % LOCK_KEYS}"):
            refused += 1
        lat.append(time.perf_counter_ns() - t0)
    out.update(lat=lat, end=time.monotonic(), refused=refused)


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


def server_cpu_s(ports: list[int]) -> float:
    """Summed ``used_cpu_user + used_cpu_sys`` of the servers on ``ports`` (``INFO``)."""
    total = 0.0
    for port in ports:
        r = redis.Redis(port=port)
        info = r.info("cpu")
        r.close()
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def _lock_client(conn: Any, urls: dict[str, str], prefix: str, proc: int, threads: int) -> None:
    """A client process: one backend per variant, shared by ``threads`` threads; runs
    the rounds the parent sends (``(variant, base, ops, width, start_at)``)."""
    from celery_resilience.testing import backend_for

    backends = {
        name: backend_for(url, f"{prefix}:locks-{name.replace(' ', '')}")
        for name, url in urls.items()
    }
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        variant, base, ops, width, start_at = msg
        results: list[dict[str, Any]] = [{} for _ in range(threads)]
        pool = [
            threading.Thread(
                target=_lock_thread,
                args=(
                    backends[variant],
                    proc * threads + t,
                    base,
                    ops,
                    width,
                    start_at,
                    results[t],
                ),
            )
            for t in range(threads)
        ]
        cpu0 = _cpu_s()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        cpu = _cpu_s() - cpu0
        lat = [x for res in results for x in res["lat"]]
        end = max(res["end"] for res in results)
        conn.send((lat, end, sum(res["refused"] for res in results), cpu))
    for backend in backends.values():
        backend.close()


@contextlib.contextmanager
def lock_clients(
    urls: dict[str, str], prefix: str, procs: int, threads: int
) -> Iterator[list[Any]]:
    """``procs`` client processes (spawned), ready; ended (joined, else terminated) after."""
    ctx = mp.get_context("spawn")
    pipes, workers = [], []
    try:
        for p in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_lock_client, args=(child, urls, prefix, p, threads))
            proc.start()
            pipes.append(parent)
            workers.append(proc)
        for parent in pipes:
            if not parent.poll(60) or parent.recv() != "ready":
                raise RuntimeError("a lock client process did not start within 60 s")
        yield pipes
    finally:
        for parent in pipes:
            with contextlib.suppress(OSError):
                parent.send(None)
        for proc in workers:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def lock_round(
    pipes: list[Any], variant: str, base: int, ops: int, threads: int, ports: list[int]
) -> dict:
    """One round of one variant over every client; its rate, latencies, and CPU per op
    of the client processes and of the variant's servers (``ports``)."""
    width = len(pipes) * threads
    server0 = server_cpu_s(ports)
    start_at = time.monotonic() + 0.2
    for parent in pipes:
        parent.send((variant, base, ops, width, start_at))
    lat: list[int] = []
    end, refused, cpu = 0.0, 0, 0.0
    for parent in pipes:
        got, got_end, got_refused, got_cpu = parent.recv()
        lat += got
        end, refused, cpu = max(end, got_end), refused + got_refused, cpu + got_cpu
    server = server_cpu_s(ports) - server0
    wall = end - start_at
    n = len(lat)
    return {"ops": n, "wall_s": wall, "ops_per_s": n / wall,
            "p50_us": pctl(lat, 50) / 1e3, "p99_us": pctl(lat, 99) / 1e3,
            "client_cpu_us_per_op": cpu / n * 1e6, "server_cpu_us_per_op": server / n * 1e6,
            "not_admitted": refused}  # fmt: skip


def slot_owners(port: int) -> dict[int, int]:
    """Slot -> port of the primary serving it, from one node's ``CLUSTER SLOTS``."""
    r = redis.Redis(port=port)
    owners: dict[int, int] = {}
    for first, last, primary, *_ in r.execute_command("CLUSTER SLOTS"):
        for slot in range(int(first), int(last) + 1):
            owners[slot] = int(primary[1])
    r.close()
    return owners


def bench_locks(one: Any, cluster: Any, args: argparse.Namespace, prefix: str) -> dict:
    from redis.crc import key_slot

    owners = slot_owners(cluster.nodes[0].port)
    primaries = sorted(set(owners.values()))
    spread_keys = Counter(owners[key_slot(f"lock:k{j}".encode())] for j in range(LOCK_KEYS))
    for j in range(5):  # the topology's own answer agrees with the slot map
        port = cluster.primary_of(f"lock:k{j}").port
        assert port == owners[key_slot(f"lock:k{j}".encode())], (j, port)
    urls = {"one node": one.url, "cluster": cluster.url}
    ports = {"one node": [one.port], "cluster": [node.port for node in cluster.nodes]}
    raw: dict[str, list[dict]] = {name: [] for name in urls}
    ratios: list[float] = []
    base = 0
    log(f"locks: {args.procs} processes x {args.threads} threads, {args.lock_rounds} rounds x "
        f"{args.ops} ops per thread, one node vs cluster ...")  # fmt: skip
    with lock_clients(urls, prefix, args.procs, args.threads) as pipes:
        names = list(urls)
        for name in names:  # warm-up: connections, script loading, every node
            lock_round(pipes, name, base, 100, args.threads, ports[name])
            base += 100 * args.procs * args.threads
        for rnd in range(args.lock_rounds):
            this: dict[str, dict] = {}
            for name in names[rnd % 2 :] + names[: rnd % 2]:
                this[name] = lock_round(pipes, name, base, args.ops, args.threads, ports[name])
                base += args.ops * args.procs * args.threads
                raw[name].append(this[name])
            ratios.append(this["cluster"]["ops_per_s"] / this["one node"]["ops_per_s"])
    held = {}
    for node in cluster.nodes:
        r = redis.Redis(port=node.port)
        if node.port in primaries:
            held[node.port] = int(r.dbsize())
        r.close()
    summary = {
        name: {k: spread(x[k] for x in rr) for k in LOCK_FIGURES} for name, rr in raw.items()
    }
    return {
        "procs": args.procs, "threads": args.threads, "ops_per_thread": args.ops,
        "rounds": args.lock_rounds, "summary": summary,
        "ratio_cluster_to_one": spread(ratios), "ratios": ratios,
        "not_admitted": {name: sum(x["not_admitted"] for x in rr) for name, rr in raw.items()},
        "keys_per_primary": {str(p): spread_keys[p] for p in primaries},
        "slots_per_primary": {str(p): sum(1 for o in owners.values() if o == p)
                              for p in primaries},
        "db_keys_per_primary_after": {str(p): n for p, n in held.items()},
        "raw": raw,
    }  # fmt: skip


# -- 2. resilience_lock_replicas on Sentinel ---------------------------------------------


def bench_replicas(sentinel: Any, args: argparse.Namespace, prefix: str) -> dict:
    from celery_resilience.testing import backend_for

    options = {"master_name": sentinel.master_name}
    backends = {
        f"lock_replicas={n}": backend_for(sentinel.url, f"{prefix}:r{n}",
                                          transport_options=options, lock_replicas=n)
        for n in (0, 1)
    }  # fmt: skip

    def op_of(backend: Any) -> Callable[[int], None]:
        def op(i: int) -> None:
            assert _lock_op(backend, f"k{i % LOCK_KEYS}")

        return op

    log(f"lock_replicas: {args.rounds} rounds x {args.n} admit+finish, 0 vs 1, Sentinel ...")
    try:
        raw = timed_rounds({name: op_of(b) for name, b in backends.items()}, args.n, args.rounds)
    finally:
        for b in backends.values():
            b.close()
    summary = {
        name: {k: spread(x[k] for x in rr) for k in ("p50_us", "p99_us")}
        for name, rr in raw.items()
    }
    zero, one = raw["lock_replicas=0"], raw["lock_replicas=1"]
    ratio = {
        k: spread(b[k] / a[k] for a, b in zip(zero, one, strict=True)) for k in ("p50_us", "p99_us")
    }
    return {"n": args.n, "rounds": args.rounds, "summary": summary, "ratio_1_to_0": ratio,
            "raw": raw}  # fmt: skip


# -- 3. DLQ of 100,000 entries -----------------------------------------------------------


def dlq_variant(dlq_url: str, broker_url: str, prefix: str, n: int, replay: int,
                memory_of: Callable[[], float],
                after_store: Callable[[], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    from celery import Celery

    from celery_resilience import DeadLetterQueue, resilient

    app = Celery(prefix, broker=broker_url, backend=None, set_as_current=False)
    app.conf.update(
        resilience_url=dlq_url,
        resilience_key_prefix=f"{prefix}:res",
        broker_transport_options={"global_keyprefix": f"{prefix}:"},
        task_ignore_result=True,
    )
    kept, replayed = f"{prefix}.kept", f"{prefix}.replayed"
    for name in (kept, replayed):

        @resilient(dlq=True)
        @app.task(name=name)
        def task(repoid: int, commitid: str) -> None:
            pass

    dlq = DeadLetterQueue(app)
    backend = dlq.backend
    now = time.time()
    entries = [letter(kept if k < n - replay else replayed, now - n + k) for k in range(n)]
    out: dict[str, Any] = {"entries": n}
    mem0 = memory_of()
    t = time.perf_counter()
    for e in entries:
        backend.store(e, retention=RETENTION, max_entries=MAX_ENTRIES)
    out["store_s"] = time.perf_counter() - t
    out["store_per_s"] = n / out["store_s"]
    out["memory_per_entry_b"] = (memory_of() - mem0) / n
    out.update(after_store())
    t = time.perf_counter()
    out["count"] = dlq.count()
    out["count_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    first = dlq.list(limit=100)
    out["first_page_100_ms"] = (time.perf_counter() - t) * 1e3
    pages: list[float] = []
    seen, cursor = 0, None
    t = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        pg = dlq.list(limit=100, cursor=cursor)
        pages.append((time.perf_counter() - t1) * 1e3)
        seen += len(pg.entries)
        if pg.cursor is None:
            break
        cursor = pg.cursor
    out["list_all_s"] = time.perf_counter() - t
    out["listed"] = seen
    out["pages"] = len(pages)
    out["page_p50_ms"] = pctl(pages, 50)
    out["page_p99_ms"] = pctl(pages, 99)
    gets = []
    for e in first.entries[:20]:
        t = time.perf_counter()
        dlq.get(e.id)
        gets.append((time.perf_counter() - t) * 1e3)
    out["get_ms"] = pctl(gets, 50)
    log(f"dlq: replaying {replay} of {n} ...")
    t = time.perf_counter()
    report = dlq.replay_all(task_name=None if replay == n else replayed, rate=1e9)
    out["replay_s"] = time.perf_counter() - t
    out["replayed"] = len(report.replayed)
    out["replay_per_s"] = len(report.replayed) / out["replay_s"]
    out["refused"] = len(report.refused) + len(report.not_removed)
    out["left_after_replay"] = dlq.count()
    r = redis.Redis.from_url(broker_url)
    out["published"] = int(r.llen(f"{prefix}:celery"))
    r.close()
    app.close()
    return out


def bench_dlq(one: Any, broker: Any, cluster: Any, args: argparse.Namespace, prefix: str) -> dict:
    from redis.crc import key_slot

    def used_memory(port: int) -> Callable[[], float]:
        def read() -> float:
            r = redis.Redis(port=port)
            try:
                return float(r.info("memory")["used_memory"])
            finally:
                r.close()

        return read

    n, replay = args.dlq_n, min(args.replay or args.dlq_n, args.dlq_n)
    out: dict[str, Any] = {"n": n, "replay": replay, "rounds": 1}
    owners = slot_owners(cluster.nodes[0].port)
    for name, url in (("one node", one.url), ("cluster", cluster.url)):
        vprefix = f"{prefix}:dlq-{name.replace(' ', '')}"
        port = (one.port if name == "one node"
                else owners[key_slot(f"{vprefix}:res:dlq".encode())])  # fmt: skip

        def keys_per_primary(
            name: str = name, vprefix: str = vprefix, port: int = port
        ) -> dict[str, Any]:
            """The DLQ's keys on each primary (Cluster), right after the store."""
            if name != "cluster":
                return {}
            keys = {}
            for p in sorted(set(owners.values())):
                r = redis.Redis(port=p)
                keys[str(p)] = sum(1 for _ in r.scan_iter(match=f"*{vprefix}*", count=1000))
                r.close()
            return {"dlq_primary": port, "dlq_keys_per_primary": keys}

        log(f"dlq: {name}: storing {n} entries ...")
        out[name] = dlq_variant(url, broker.url, vprefix, n, replay, used_memory(port),
                                keys_per_primary)  # fmt: skip
        r = redis.Redis.from_url(broker.url)
        r.delete(f"{vprefix}:celery")
        r.close()
    return out


# -- 4. the memory DLQ's per-write scan --------------------------------------------------


def bench_memory_dlq(levels: list[int], stores: int) -> dict:
    from celery_resilience.backends import memory_dlq
    from celery_resilience.testing import dlq_backend_for

    out: dict[str, Any] = {"stores": stores, "levels": {}}
    for level in levels:
        log(f"memory dlq: {stores} stores at {level} entries held ...")
        backend = dlq_backend_for(f"memory://bench-{uuid.uuid4().hex}")
        now = time.time()
        with memory_dlq._LOCK:
            for k in range(level):
                e = letter("bench.task", now - level - stores + k)
                backend._entries[e.id] = e  # type: ignore[attr-defined]
        t_ns = []
        fresh = [letter("bench.task", now - stores + k) for k in range(stores)]
        for e in fresh:
            t = time.perf_counter_ns()
            backend.store(e, retention=RETENTION, max_entries=MAX_ENTRIES)
            t_ns.append(time.perf_counter_ns() - t)
        assert backend.count() == level + stores
        backend.purge()
        backend.close()
        out["levels"][str(level)] = {
            "total_s": sum(t_ns) / 1e9,
            "mean_us": sum(t_ns) / len(t_ns) / 1e3,
            "p50_us": pctl(t_ns, 50) / 1e3,
            "p99_us": pctl(t_ns, 99) / 1e3,
        }
    return out


# -- report ------------------------------------------------------------------------------


def f(s: dict[str, float], digits: int = 0) -> str:
    """``median (min-max)`` with thousands separators."""
    if s.get("n", 0) == 0:
        return "n/a"
    m, lo, hi = (f"{s[k]:,.{digits}f}" for k in ("median", "min", "max"))
    return f"{m} ({lo}-{hi})" if s["n"] > 1 else m


def tables(res: dict) -> str:
    lines = []
    lk = res["locks"]
    lines += [
        f"locked ops over {LOCK_KEYS} keys: {lk['procs']} processes x {lk['threads']} threads,"
        f" {lk['ops_per_thread']} ops per thread and round, {lk['rounds']} rounds",
        "| variant | ops/s | p50 µs | p99 µs | ratio to one node (ops/s) | client CPU µs/op "
        "| server CPU µs/op |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("one node", "cluster"):
        s = lk["summary"][name]
        ratio = "1.00" if name == "one node" else f(lk["ratio_cluster_to_one"], 2)
        lines.append(f"| {name} | {f(s['ops_per_s'])} | {f(s['p50_us'])} | {f(s['p99_us'])} "
                     f"| {ratio} | {f(s['client_cpu_us_per_op'])} "
                     f"| {f(s['server_cpu_us_per_op'])} |")  # fmt: skip
    lines.append(f"keys per primary: {lk['keys_per_primary']}; slots per primary: "
                 f"{lk['slots_per_primary']}; keys held after: "
                 f"{lk['db_keys_per_primary_after']}; "
                 f"not admitted: {lk['not_admitted']}")  # fmt: skip
    rp = res["replicas"]
    lines += [
        "",
        f"lock_replicas on Sentinel: {rp['rounds']} rounds x {rp['n']} admit+finish",
        "| variant | p50 µs | p99 µs |",
        "| --- | --- | --- |",
    ]
    for name, s in rp["summary"].items():
        lines.append(f"| {name} | {f(s['p50_us'])} | {f(s['p99_us'])} |")
    r = rp["ratio_1_to_0"]
    lines.append(f"| ratio 1 / 0 | {f(r['p50_us'], 2)} | {f(r['p99_us'], 2)} |")
    d = res["dlq"]
    rows = [
        ("store, s", "store_s", 1), ("store rate, entries/s", "store_per_s", 0),
        ("Redis memory per entry, bytes", "memory_per_entry_b", 0),
        ("count(), ms", "count_ms", 2), ("count() answer", "count", 0),
        ("first page of 100, ms", "first_page_100_ms", 1),
        ("page through all, 100 a page, s", "list_all_s", 1), ("entries listed", "listed", 0),
        ("one page, p50 ms", "page_p50_ms", 1), ("one page, p99 ms", "page_p99_ms", 1),
        ("get(id), ms", "get_ms", 2), ("replay_all(), s", "replay_s", 1),
        ("replay rate, entries/s", "replay_per_s", 0), ("replayed", "replayed", 0),
        ("left after replay", "left_after_replay", 0), ("published", "published", 0),
    ]  # fmt: skip
    lines += [
        "",
        f"DLQ of {d['n']:,} entries (replay of {d['replay']:,}), one round",
        "| | one node | cluster | cluster / one node |",
        "| --- | --- | --- | --- |",
    ]
    for label, key, digits in rows:
        a, b = d["one node"][key], d["cluster"][key]
        ratio = f"{b / a:.2f}" if a else "-"
        lines.append(f"| {label} | {a:,.{digits}f} | {b:,.{digits}f} | {ratio} |")
    c = d["cluster"]
    lines.append(f"cluster: DLQ keys per primary after the store: {c['dlq_keys_per_primary']} "
                 f"(the DLQ's hash tag is served by :{c['dlq_primary']})")  # fmt: skip
    m = res["memory_dlq"]
    lines += [
        "",
        f"memory DLQ: {m['stores']} stores at each level",
        "| entries held | mean µs per store | p50 µs | p99 µs | total s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for level, s in m["levels"].items():
        lines.append(f"| {int(level):,} | {s['mean_us']:,.0f} | {s['p50_us']:,.0f} | "
                     f"{s['p99_us']:,.0f} | {s['total_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--procs", type=int, default=2, help="lock client processes")
    p.add_argument("--threads", type=int, default=4, help="threads per lock client process")
    p.add_argument("--ops", type=int, default=1000, help="locked ops per thread and round")
    p.add_argument("--lock-rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=2000, help="lock_replicas: ops per variant, round")
    p.add_argument("--rounds", type=int, default=5, help="lock_replicas rounds")
    p.add_argument("--dlq-n", type=int, default=100_000, help="DLQ entries")
    p.add_argument("--replay", type=int, default=0, help="DLQ entries replayed (0: all)")
    p.add_argument("--mem-stores", type=int, default=1000)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    levels = [1000, 10_000, 100_000]
    if args.quick:
        args.ops, args.lock_rounds, args.n, args.rounds = 200, 2, 300, 2
        args.dlq_n, args.replay, args.mem_stores = 3000, 1000, 200
        levels = [1000, 10_000]

    from tests.support.redis_server import RedisServer
    from tests.support.topology import ClusterTopology, SentinelTopology

    prefix = f"bench{secrets.token_hex(3)}:ha"
    started = time.time()
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-ha-") as tmp, contextlib.ExitStack() as stack:
        dirs = {name: Path(tmp, name) for name in ("one", "broker", "cluster", "sentinel")}
        for d in dirs.values():
            d.mkdir()
        log("starting one node, broker, a six-node cluster ...")
        one = stack.enter_context(RedisServer(dirs["one"]).running())
        broker = stack.enter_context(RedisServer(dirs["broker"]).running())
        cluster = stack.enter_context(ClusterTopology(dirs["cluster"]).running())
        res["locks"] = bench_locks(one, cluster, args, prefix)
        log("starting the Sentinel topology ...")
        with SentinelTopology(dirs["sentinel"]).running() as sentinel:
            res["replicas"] = bench_replicas(sentinel, args, prefix)
        res["dlq"] = bench_dlq(one, broker, cluster, args, prefix)
        info = redis.Redis(port=one.port).info("server")
        res["versions"] = {"python": sys.version.split()[0],
                           "redis-server": str(info["redis_version"])}  # fmt: skip
        from importlib.metadata import version

        for dist in ("celery", "kombu", "redis"):
            res["versions"][dist] = version(dist)
    res["memory_dlq"] = bench_memory_dlq(levels, args.mem_stores)
    res["wall_s"] = time.time() - started
    res["cpus"] = os.cpu_count()
    print(tables(res))
    print(f"\nwall time {res['wall_s']:.0f} s, {res['versions']}")
    if args.json_out:
        write_json(args.json_out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
