"""Helpers shared by the benchmark modules: Redis URLs, statistics, worker processes.

Every benchmark uses Redis database 14 (``BENCH_REDIS``, default
``redis://127.0.0.1:6379/14``) and puts a run id in every key it creates, so it
deletes only its own keys (:func:`delete_keys`). Times are seconds unless a name
says otherwise (``_ms``, ``_us``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")


def log(msg: str) -> None:
    """Progress on stderr (stdout is kept for results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def delete_keys(r: redis.Redis, *patterns: str) -> int:
    """Delete the keys matching ``patterns`` (each must contain the run id); return how many."""
    n = 0
    for pattern in patterns:
        batch: list[bytes] = []
        for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += int(r.delete(*batch))
                batch = []
        if batch:
            n += int(r.delete(*batch))
    return n


# -- statistics ---------------------------------------------------------------------


def pctl(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank on the sorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def rounds_options(doc: str, each: str, argv: list[str] | None) -> tuple[int, int, str | None]:
    """Parse the options of a :func:`timed_rounds` script (``--quick``, ``--n``,
    ``--rounds``, ``--json-out``); ``each`` names what ``--n`` counts. Returns
    (calls per op and round, rounds, JSON path)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 calls x 2 rounds")
    p.add_argument("--n", type=int, default=2000, help=f"{each} per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    n, rounds = (300, 2) if args.quick else (args.n, args.rounds)
    return n, rounds, args.json_out


def timed_rounds(
    ops: dict[str, Callable[[int], None]], n: int, rounds: int, warmup: int = 200
) -> dict[str, list[dict[str, float]]]:
    """Time ``n`` calls of each op per round, the ops interleaved (order rotated each
    round, so none always runs first on a warm cache); each op gets a fresh integer.

    Returns, per op, each round's ``{"p50_us", "p99_us"}`` (``perf_counter_ns``), after
    ``warmup`` untimed calls of each (connections, script loading).
    """
    names, i = list(ops), 0
    for name in names:
        for _ in range(warmup):
            i += 1
            ops[name](i)
    raw: dict[str, list[dict[str, float]]] = {}
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            op, t_ns = ops[name], []
            for _ in range(n):
                i += 1
                t = time.perf_counter_ns()
                op(i)
                t_ns.append(time.perf_counter_ns() - t)
            raw.setdefault(name, []).append(
                {"p50_us": pctl(t_ns, 50) / 1e3, "p99_us": pctl(t_ns, 99) / 1e3}
            )
    return raw


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max of per-round figures."""
    v = [x for x in values if x == x]  # drop NaN
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_spread(s: dict[str, float], digits: int = 1, unit: str = "") -> str:
    """``median (min-max)`` for a table cell."""
    if s.get("n", 0) == 0:
        return "n/a"
    f = f"{{:.{digits}f}}"
    m, lo, hi = (f.format(s[k]) for k in ("median", "min", "max"))
    return f"{m}{unit} ({lo}-{hi})" if s["n"] > 1 else f"{m}{unit}"


# -- worker processes ---------------------------------------------------------------


@dataclass
class WorkerProc:
    """A ``celery worker`` in its own process group (killed as a whole)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        """PIDs of the pool processes."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the group after 5 s; reap the main process."""
        stop_groups([self.proc], 5.0)


def stop_groups(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM the process group of each of ``procs`` at once, wait up to ``timeout``
    for them together, then SIGKILL every group (orphaned children too) and reap."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def start_worker(
    module: str,
    name: str,
    env: dict[str, str],
    queues: str,
    log_path: str,
    concurrency: int = 1,
    loglevel: str = "WARNING",
    extra_args: Sequence[str] = (),
) -> WorkerProc:
    """Start ``celery -A module worker`` (prefork) with this directory on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([HERE, *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env)
    hostname = f"{name}@{socket.gethostname()}"
    cmd = [
        sys.executable, "-m", "celery", "-A", module, "worker",
        "--pool", "prefork", "--concurrency", str(concurrency),
        "--loglevel", loglevel, "--hostname", hostname, "--queues", queues,
        "--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args,
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return WorkerProc(hostname, proc, log_path)


def rss_kib(pids: Iterable[int]) -> dict[str, int]:
    """Summed VmRSS and Pss (KiB) of ``pids`` (Linux /proc)."""
    out = {"rss_kib": 0, "pss_kib": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss_kib"] += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        out["pss_kib"] += int(line.split()[1])
    return out


# -- a redis-server of the benchmark's own --------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    """A ``redis-server`` only this benchmark uses (see :func:`private_redis`)."""

    url: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def private_redis(directory: str) -> Iterator[PrivateRedis]:
    """Start ``redis-server`` on a free loopback port, without persistence, so that its
    ``INFO`` counters count only the benchmark's commands; end it (by its pid) after."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    cmd = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", directory,
           "--logfile", os.path.join(directory, f"redis-{port}.log")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    server = PrivateRedis(f"redis://127.0.0.1:{port}/0", proc)
    try:
        r = redis.Redis.from_url(server.url, socket_connect_timeout=1)
        if not wait_for(lambda: _answers(r), 30.0):
            raise RuntimeError(f"redis-server on port {port} did not answer within 30 s")
        r.close()
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _answers(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


def redis_usage(r: redis.Redis) -> dict[str, float]:
    """The server's CPU seconds (user + sys, all its threads), commands processed (those
    Lua scripts run included), used memory (bytes) and clients, from one ``INFO``."""
    info = r.info()
    return {
        "cpu_s": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "commands": float(info["total_commands_processed"]),
        "used_memory": float(info["used_memory"]),
        "clients": float(info["connected_clients"]),
    }


def versions(r: redis.Redis | None = None) -> dict[str, str]:
    """Versions of Python, the packages the figures depend on and the Redis server
    (``r``'s, by default :data:`REDIS_URL`'s)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("celery", "kombu", "redis", "celery-resilience", "celery-once",
                 "celery-singleton", "prometheus-client"):  # fmt: skip
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    info = (r or client()).info("server")
    out["redis-server"] = str(info.get("redis_version"))
    return out


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path``, or print it when no path is given."""
    text = json.dumps(result, indent=2, default=str)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text)


def wait_for(pred: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``pred()`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
