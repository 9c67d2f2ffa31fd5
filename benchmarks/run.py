#!/usr/bin/env python
"""Run every benchmark and print the tables of docs/benchmarks.md.

From the repository root, with any Python 3.10+::

    python benchmarks/run.py            # full run, about 30 minutes on 2 shared cores
    python benchmarks/run.py --quick    # smoke run, 3-4 minutes
    python benchmarks/run.py --only locks,dlq

It first makes the benchmark's own environment, ``benchmarks/.venv`` (with ``uv`` when
it finds one, else ``venv`` + pip): this repository installed editable with its
``redis`` and ``prometheus`` extras, plus ``benchmarks/requirements.txt``
(celery-once, celery-singleton, py-spy: never dependencies of the project), then
re-runs itself there. Each benchmark runs as its own process, writes JSON into
``benchmarks/results/<time>/`` and the tables go to stdout (Markdown) and to
``tables.md`` beside the JSON. Needs Redis on 127.0.0.1:6379 (database 14; only the
benchmarks' own keys are deleted). Progress goes to stderr.
"""

# Markdown table rows are built as single long f-strings:
# ruff: noqa: E501
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
REQS = os.path.join(HERE, "requirements.txt")
STAMP = os.path.join(VENV, ".bench-requirements")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_venv() -> None:
    """Create or update benchmarks/.venv when requirements.txt changed."""
    with open(REQS, "rb") as f:
        want = hashlib.sha256(f.read() + ROOT.encode()).hexdigest()
    if os.path.exists(STAMP):
        with open(STAMP) as f:
            if f.read() == want:
                return
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.join(ROOT, ".venv", "bin"))
    log(f"making {os.path.relpath(VENV)} ({'uv' if uv else 'venv + pip'}) ...")
    pkgs = ["-e", f"{ROOT}[redis,prometheus]", "-r", REQS]
    if uv:
        if not os.path.exists(VENV_PY):
            subprocess.run([uv, "venv", "-q", "--python", sys.executable, VENV], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", VENV_PY, *pkgs], check=True)
    else:
        if not os.path.exists(VENV_PY):
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([VENV_PY, "-m", "pip", "install", "-q", *pkgs], check=True)
    with open(STAMP, "w") as f:
        f.write(want)


# -- the benchmarks -------------------------------------------------------------------

QUICK_ARGS = {
    "throughput": ["--tasks", "400", "--rounds", "2", "--warmup", "50", "--rt-tasks", "50",
                   "--max-repeats", "0"],
}  # fmt: skip
FULL_ARGS = {
    "throughput": ["--tasks", "2000", "--rounds", "5", "--warmup", "300", "--rt-tasks", "300",
                   "--max-repeats", "6"],
}  # fmt: skip
SCRIPTS = {
    "throughput": "throughput.py",
    "gate": "gate_latency.py",
    "locks": "locks.py",
    "dlq": "dlq_bench.py",
    "memory": "memory.py",
    "recovery": "recovery.py",
    "liveness": "liveness_scale.py",
}


def run_one(name: str, quick: bool, out_dir: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, f"{name}.json")
    args = (QUICK_ARGS if quick else FULL_ARGS).get(name)
    if args is None:
        args = ["--quick"] if quick else []
    cmd = [sys.executable, os.path.join(HERE, SCRIPTS[name]), *args, "--json-out", path]
    t = time.monotonic()
    log(f"{name}: {' '.join(os.path.relpath(c) if c.startswith('/') else c for c in cmd)}")
    with open(os.path.join(out_dir, f"{name}.log"), "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    log(f"{name}: exit {rc} after {time.monotonic() - t:.0f} s")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    result["_exit"] = rc
    result["_seconds"] = round(time.monotonic() - t, 1)
    return result


# -- tables -----------------------------------------------------------------------------


def cell(s: dict[str, Any] | None, digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)`` of a spread dict."""
    if not s or not s.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    m, lo, hi = (f.format(s[k] * scale) for k in ("median", "min", "max"))
    return f"{m} ({lo}-{hi})" if s["n"] > 1 else m


def t_throughput(d: dict[str, Any]) -> list[str]:
    from throughput import LABELS, VARIANTS

    s = d["throughput"]
    rows = ["| task | tasks/s, median (min-max) | ratio to plain | ratio to plain acks_late "
            "| paired ratio to plain, median (min-max) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for v in VARIANTS:
        if v not in s:
            continue
        x = s[v]
        paired = _paired(d, v)
        rows.append(
            f"| {LABELS[v]} | {x['median']:.0f} ({x['min']:.0f}-{x['max']:.0f}) | "
            f"{x['ratio_to_plain']:.3f} | {x['ratio_to_plain_acks_late']:.3f} | {paired} |"
        )
    cfg = d["config"]
    noisy = [p for p in d["phases"] if p["other_load"] > cfg["max_other_load"]]
    rows.append("")
    rows.append(
        f"{cfg['tasks']} tasks per phase, {cfg['rounds']} rounds, prefork concurrency "
        f"{cfg['concurrency']}; {len(d['discarded_noisy_phases'])} phases measured again "
        f"because other processes used > {cfg['max_other_load']} CPUs, {len(noisy)} kept "
        "phases still noisy."
    )
    rt = d.get("round_trips")
    if rt:
        rows.append("")
        rows.append(
            "| Redis round trips per successful delivery (MONITOR) | without lock | with lock |"
        )
        rows.append("| --- | --- | --- |")
        a, b = rt["nolock"], rt["lock"]
        rows.append(f"| commands on the coordination backend's connections | "
                    f"{a['round_trips_per_delivery']:g} | {b['round_trips_per_delivery']:g} |")  # fmt: skip
        rows.append(f"| commands run inside its Lua scripts (not round trips) | "
                    f"{a['commands_inside_scripts_per_delivery']:g} | "
                    f"{b['commands_inside_scripts_per_delivery']:g} |")  # fmt: skip
    cpu = [v for v in VARIANTS if s.get(v, {}).get("cpu_us_per_task_median")]
    if cpu:
        rows += ["", "| CPU per task, µs (median) | worker main | pool children | redis-server |",
                 "| --- | --- | --- | --- |"]  # fmt: skip
        for v in cpu:
            c = s[v]["cpu_us_per_task_median"]
            rows.append(f"| {LABELS[v]} | {c.get('worker_main', 0):.0f} | "
                        f"{c.get('children_main_thread', 0) + c.get('children_other_threads', 0):.0f}"
                        f" | {c.get('redis_server', 0):.0f} |")  # fmt: skip
    return rows


def _paired(d: dict[str, Any], v: str) -> str:
    per: dict[int, dict[str, float]] = {}
    for p in d["phases"]:
        per.setdefault(p["round"], {})[p["variant"]] = p["rate"]
    ratios = sorted(x[v] / x["plain"] for x in per.values() if v in x and "plain" in x)
    if not ratios:
        return "n/a"
    import statistics

    return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"


def t_gate(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    rows = ["| µs per delivery, median of rounds (min-max) | `@resilient()` | "
            "`@resilient(lock=...)` |", "| --- | --- | --- |"]  # fmt: skip
    for key, label in (("before_p50_us", "gate before the body, p50"),
                       ("before_p99_us", "gate before the body, p99"),
                       ("after_p50_us", "gate after the body, p50"),
                       ("after_p99_us", "gate after the body, p99"),
                       ("total_p50_us", "whole `apply()`, p50"),
                       ("total_p99_us", "whole `apply()`, p99"),
                       ("round_trips_per_delivery", "Redis round trips per delivery")):  # fmt: skip
        digits = 2 if key.startswith("round") else 0
        rows.append(f"| {label} | {cell(s['nolock'].get(key), digits)} | "
                    f"{cell(s['lock'].get(key), digits)} |")  # fmt: skip
    rows += ["", f"Plain `@app.task` `apply()` for reference: p50 "
             f"{cell(s['plain']['total_p50_us'])} µs, p99 {cell(s['plain']['total_p99_us'])} µs "
             f"({d['n']} deliveries per variant and round, {d['rounds']} rounds)."]  # fmt: skip
    return rows


def t_locks(d: dict[str, Any]) -> list[str]:
    rows = ["| library, acquire + release | p50 µs, median (min-max) | p99 µs, median (min-max) |",
            "| --- | --- | --- |"]  # fmt: skip
    for name, x in d["summary"].items():
        rows.append(f"| {name} | {cell(x['p50_us'])} | {cell(x['p99_us'])} |")
    rows += ["", f"{d['n']} operations per library and round, {d['rounds']} rounds."]
    return rows


def t_dlq(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    n = d["n"]
    return [
        f"| {n:,} entries | median (min-max) |",
        "| --- | --- |",
        f"| store {n:,} (one `store` each), s | {cell(s['store_s'], 2)} |",
        f"| store rate, entries/s | {cell(s['store_per_s'])} |",
        f"| `count()`, ms | {cell(s['count_ms'], 2)} |",
        f"| first page of 100 (`list(limit=100)`), ms | {cell(s['first_page_100_ms'], 1)} |",
        f"| page through all {n:,}, {d['page']} a page, s | {cell(s['list_all_s'], 2)} |",
        f"| one page of {d['page']}, p50 / p99, ms | {cell(s['page_p50_ms'], 1)} / "
        f"{cell(s['page_p99_ms'], 1)} |",
        f"| `get(id)`, ms | {cell(s['get_ms'], 2)} |",
        f"| `replay_all()` of {n:,} at full rate, s | {cell(s['replay_s'], 1)} |",
        f"| replay rate, entries/s | {cell(s['replay_per_s'])} |",
        f"| entries left after replay / messages published | {cell(s['left_after_replay'])} / "
        f"{cell(s['published'])} |",
        "",
        f"{d['rounds']} rounds, each from an empty DLQ.",
    ]


def t_memory(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    base = s["plain"]["rss_mib"]["median"]
    rows = ["| worker (main + 2 children) | RSS MiB, median (min-max) | vs plain | PSS MiB |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    names = {"plain": "plain `@app.task`", "resilient": "`@resilient(lock=...)`",
             "resilient_metrics": "`@resilient(lock=...)` + prometheus port"}  # fmt: skip
    for k, x in s.items():
        delta = x["rss_mib"]["median"] - base
        rows.append(f"| {names.get(k, k)} | {cell(x['rss_mib'], 1)} | {delta:+.1f} MiB | "
                    f"{cell(x['pss_mib'], 1)} |")  # fmt: skip
    rows += ["", f"After each of {d['rounds']} batches of {d['tasks_per_batch']:,} no-op tasks."]
    return rows


def _secs(s: dict[str, Any] | None, missing: int, cap: float, note: str = "") -> str:
    if not s or not s.get("n"):
        return f"> {cap:.0f} s (not within the measurement window{note})"
    txt = cell(s, 1) + " s"
    if missing:
        txt += f"; {missing} run(s) > {cap:.0f} s"
    return txt


def t_recovery(d: dict[str, Any]) -> list[str]:
    t = d["table"]
    cap, ccap = d["cap"], d["child_cap"]
    names = {
        "plain": "plain Celery, defaults (acks early, visibility_timeout 3600 s)",
        "plain_acks_late": "plain Celery, acks_late + reject_on_worker_lost, visibility_timeout 30 s",
        "resilient": "celery-resilience, recommended (acks late, heartbeat on), visibility_timeout 30 s",
    }  # fmt: skip
    rows = ["| setup | child SIGKILL → runs again | node SIGKILL → runs again |",
            "| --- | --- | --- |"]  # fmt: skip
    for k, label in names.items():
        x = t.get(k, {})
        child_note = ""
        node_note = ""
        if k == "plain":
            child_note = "; the message was acked when the task started: lost"
            node_note = "; acked when it started: lost, never returns"
        elif k == "plain_acks_late":
            node_note = "; kombu restores every ~100 s"
        rows.append(f"| {label} | {_secs(x.get('child'), x.get('child_missing', 0), ccap, child_note)}"
                    f" | {_secs(x.get('node'), x.get('node_missing', 0), cap, node_note)} |")  # fmt: skip
    rows += ["", "| lock library | key blocked after its holder's child was SIGKILLed | "
             "the library's default expiry |", "| --- | --- | --- |"]  # fmt: skip
    r = t.get("resilient", {})
    rows.append(f"| celery-resilience (same host: dead holder freed) | "
                f"{_secs(r.get('lock'), r.get('lock_still_blocked', 0), ccap)} | lease TTL 30 s "
                f"(whole node killed: key free after {_secs(r.get('node_lock'), 0, cap)}) |")  # fmt: skip
    for k, label, default in (("once", "celery-once", "3600 s (`default_timeout`)"),
                              ("singleton", "celery-singleton", "none: never expires")):  # fmt: skip
        x = t.get(k, {})
        ttl = [v for v in x.get("lock_ttl_at_kill", []) if v is not None]
        seen = f"; PTTL at the kill {min(ttl):.0f} s" if ttl and ttl[0] == ttl[0] else ""
        rows.append(f"| {label} | {_secs(x.get('lock'), x.get('lock_still_blocked', 0), ccap)} "
                    f"| {default}{seen} |")  # fmt: skip
    rows += ["", "| healthy worker, visibility_timeout 4 s | task length | deliveries | "
             "body starts |", "| --- | --- | --- | --- |"]  # fmt: skip
    dn = {"plain": "plain Celery, defaults (acks early)", "plain_acks_late": "plain Celery, acks_late",
          "resilient": "celery-resilience (heartbeat on)"}  # fmt: skip
    for k, x in d.get("duplicates", {}).items():
        for length, y in x["tasks"].items():
            rows.append(f"| {dn.get(k, k)} | {length} s | {y['deliveries']} | {y['body_starts']} |")
    rows += ["", f"{d['rounds']} rounds per cell (median, min-max); caps: {ccap:.0f} s after a "
             f"child kill, {cap:.0f} s after a node kill."]  # fmt: skip
    return rows


def _pair(xs: tuple[dict[str, Any], ...], key: str, digits: int = 0) -> str:
    """``before / liveness``: the figure ``key`` (``"a.b"`` for ``x["a"]["b"]``) of each."""
    out = []
    for x in xs:
        value: Any = x
        for part in key.split("."):
            value = value[part]
        out.append(f"{float(value):,.{digits}f}")
    return " / ".join(out)


def t_liveness(d: dict[str, Any]) -> list[str]:
    cfg = d["config"]
    by = {(x["nodes"], x["held_per_node"], x["mechanism"]): x for x in d["scale"]}
    rows = ["| nodes | messages held per node | Redis CPU, % of one core | commands/s | "
            "round trips/s | per node: commands/s | per node: Redis CPU, µs/s | "
            "ticks > 100 ms late (p99 lateness) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for nodes, held in sorted({(k[0], k[1]) for k in by}):
        b, li = by.get((nodes, held, "before")), by.get((nodes, held, "liveness"))
        if b is None or li is None:
            continue
        xs = (b, li)
        late = " / ".join(f"{x['ticks']['late_share'] * 100:.1f}% ({x['ticks']['late_p99_ms']:.0f} ms)"
                          for x in xs)  # fmt: skip
        rows.append(f"| {nodes:,} | {held:,} | {_pair(xs, 'redis_cpu_pct', 2)} | "
                    f"{_pair(xs, 'commands_per_s')} | {_pair(xs, 'round_trips_per_s')} | "
                    f"{_pair(xs, 'per_node.commands_per_s', 1)} | "
                    f"{_pair(xs, 'per_node.redis_cpu_us_per_s')} | {late} |")  # fmt: skip
    base = d["baseline"]
    rows += ["", f"Each cell: before liveness / with liveness. Node TTL {cfg['node_ttl']:g} s, "
             f"visibility timeout {cfg['visibility_timeout']:g} s; windows {cfg['window']:g} s idle, "
             f"{cfg['held_window']:g} s holding, after {cfg['warmup_s']:g} s of ticking; up to "
             f"{cfg['per_process']} nodes per simulator process. Per node: less the idle server "
             f"({base['redis_cpu_pct']:.2f}% CPU, {base['commands_per_s']:.1f} commands/s), "
             "divided by the nodes."]  # fmt: skip
    rows += ["", "| heartbeat | messages held by the dead node | expiry → first back, s | "
             "expiry → all back, s | restore, s | round trips of the restoring tick | "
             "each back exactly once |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    names = {"liveness": "liveness (presence expired)",
             "before": "before liveness (messages due: a visibility timeout after the refresh)"}  # fmt: skip
    for m, rs in d["recovery"].items():
        s = d["recovery_summary"][m]
        once = sum(bool(x["checks"]["each_back_once"]) and not x["checks"]["unacked_left"]
                   and not x["checks"]["held_left"] for x in rs)  # fmt: skip
        trips = sorted(x["live_tick_round_trips"] for x in rs if "live_tick_round_trips" in x)
        trips_cell = f"{trips[len(trips) // 2]:,}" if trips else "n/a"
        rows.append(f"| {names.get(m, m)} | {cfg['recover']:,} | {cell(s['expired_to_first_s'], 2)} | "
                    f"{cell(s['expired_to_all_s'], 2)} | {cell(s['restore_s'], 2)} | {trips_cell} | "
                    f"{once} of {len(rs)} rounds |")  # fmt: skip
    rows += ["", f"{cfg['rounds']} rounds per heartbeat (median, min-max)."]
    return rows


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "throughput": ("Throughput", t_throughput),
    "gate": ("Latency the gate adds per delivery", t_gate),
    "locks": ("Lock operations", t_locks),
    "recovery": ("Recovery after death, lock keys of the dead, duplicates", t_recovery),
    "dlq": ("Dead-letter queue", t_dlq),
    "memory": ("Worker memory", t_memory),
    "liveness": ("Liveness at scale", t_liveness),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, 3-4 minutes")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--no-venv", action="store_true", help="run with this Python as it is")
    args = p.parse_args(argv)
    if not args.no_venv and os.path.realpath(sys.prefix) != os.path.realpath(VENV):
        ensure_venv()
        os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])
    sys.path.insert(0, HERE)
    names = args.only.split(",") if args.only else list(SCRIPTS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(HERE, "results", stamp + ("-quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for name in names:
        results[name] = run_one(name, args.quick, out_dir)
    wall = time.monotonic() - t0
    from common import versions

    v = versions()
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M')} ({'quick' if args.quick else 'full'}), "
             f"{os.cpu_count()} CPUs, Python {v['python']}, celery {v.get('celery')}, kombu "
             f"{v.get('kombu')}, redis-py {v.get('redis')}, Redis server {v.get('redis-server')}; "
             f"wall time {wall:.0f} s."]  # fmt: skip
    failed = []
    for name in names:
        title, fn = TABLES[name]
        lines += ["", f"### {title}", ""]
        res = results[name]
        if res is None:
            lines.append("(failed: see the log)")
            failed.append(name)
            continue
        if res.get("_exit"):
            failed.append(name)
        try:
            lines += fn(res)
        except (KeyError, TypeError, ValueError) as exc:
            lines.append(f"(no table: {type(exc).__name__}: {exc})")
            failed.append(name)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"results in {os.path.relpath(out_dir)}; total {wall:.0f} s")
    if failed:
        log(f"failed or incomplete: {', '.join(failed)} (logs in {os.path.relpath(out_dir)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
