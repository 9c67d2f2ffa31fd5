"""The demo with real worker processes: ``celery-resilience demo --redis URL``.

Two ``celery worker`` nodes (prefork) run against the given Redis as broker, result
backend, coordination backend and DLQ. One node is SIGKILLed (main process and pool
children) in the middle of a task, and a poison task SIGKILLs its own pool child on
every delivery. Every key the run writes is under one prefix and deleted at the
end; the worker processes are stopped (their process groups killed if need be)
whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from celery_resilience.demo import DemoError, scenarios
from celery_resilience.demo.app import (
    PREFIX_ENV,
    REDIS_URL_ENV,
    VISIBILITY_TIMEOUT_S,
    isolated,
    redis_app,
)
from celery_resilience.demo.celery_compat import work_around_celery_10477
from celery_resilience.demo.observer import PLUGIN_NAME, EventForwarder
from celery_resilience.demo.report import Report
from celery_resilience.demo.scenarios import Context
from celery_resilience.demo.store import RedisStore
from celery_resilience.dlq import DeadLetterQueue
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.urls import mask_url

if TYPE_CHECKING:
    from celery import Celery

NODES = ("demo1", "demo2")
CONCURRENCY = 3
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 15
WORKER_MODULE = "celery_resilience.demo.worker_app"


def check_url(url: str) -> None:
    """Raise :class:`DemoError` unless ``url`` looks like a Redis URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        parts = None
    if parts is None or "://" not in url or parts.scheme.lower() not in ("redis", "rediss"):
        raise DemoError(
            f"--redis {mask_url(url)!r}: expected a Redis URL such as redis://localhost:6379/13"
        )


def ping(url: str) -> None:
    """Raise :class:`DemoError` unless the Redis at ``url`` answers within 2 s."""
    try:
        import redis
    except ImportError:
        raise DemoError(
            "--redis needs the redis package: pip install 'celery-resilience[redis]'"
        ) from None
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise DemoError(f"cannot reach Redis at {mask_url(url)}: {exc}") from None
    finally:
        client.close()


class WorkerNode:
    """One ``celery worker`` node in its own process group, logging to one file.

    Its stdout and stderr both go to :attr:`log`, so what a node says before its
    logging is set up (an import error, a bad option) is there too.
    """

    def __init__(self, name: str, env: dict[str, str], logdir: Path, queue: str) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        command = [
            sys.executable, "-m", "celery", "-A", WORKER_MODULE, "worker",
            "-P", "prefork", "-c", str(CONCURRENCY), "-n", f"{name}@%h", "-Q", queue,
            "-l", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=logdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        """Whether the node logged that it is ready; :class:`DemoError` if it exited."""
        if self.process.poll() is not None:
            tail = self._text().splitlines()[-LOG_TAIL_LINES:]
            raise DemoError(
                f"worker {self.name} exited with status {self.process.returncode} before it "
                f"was ready; the last lines of {self.log}:\n"
                + "\n".join(f"  | {line}" for line in tail)
            )
        return " ready." in self._text()

    def _text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL the whole node, main process and pool children, as a pod dying."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), bounded; then SIGKILL whatever is left of the group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT_S)
        self.kill()


def run(url: str, out: TextIO, *, verbose: bool = False) -> int:
    """Run every scenario against real workers on ``url``; return the exit code.

    Raises :class:`DemoError` for a bad URL, a missing redis package, an unreachable
    Redis or a worker that does not start. 0 when every scenario ended as promised,
    else 2 (see :meth:`Report.exit_code`).
    """
    check_url(url)
    with isolated(os.environ) as ignored:
        ping(url)
        return _run(url, out, ignored, verbose=verbose)


def _run(url: str, out: TextIO, ignored: list[str], *, verbose: bool) -> int:
    work_around_celery_10477()  # this process polls results from Redis
    prefix = f"celery_resilience_demo:{uuid.uuid4().hex[:10]}"
    store = RedisStore(url, prefix)
    report = Report(out)
    app = redis_app(url, prefix, store, _never)
    logdir = Path(tempfile.mkdtemp(prefix="celery-resilience-demo-"))
    env = {**os.environ, REDIS_URL_ENV: url, PREFIX_ENV: prefix}
    nodes: list[WorkerNode] = []
    plugins = get_plugin_manager()
    plugins.register(EventForwarder(store), name=PLUGIN_NAME)
    dlq: DeadLetterQueue | None = None
    code = 1
    try:
        _header(report, url, prefix, ignored)
        nodes = [WorkerNode(name, env, logdir, app.conf.task_default_queue) for name in NODES]
        _wait_ready(nodes)
        report.line(f"  {len(nodes)} worker nodes ready after {time.time() - report.t0:.1f} s")
        report.line()
        dlq = DeadLetterQueue(app)
        ctx = Context(app, store, report, dlq, timeout=30.0)
        _story(ctx, nodes)
        scenarios.run(report, "metrics", lambda: scenarios.metrics_agree(ctx, None))
        report.metrics(
            None,
            "each worker process counts into its own registry; set "
            "resilience_prometheus_port and a worker serves them all (docs/metrics.md)",
        )
        report.summary()
        code = report.exit_code(sys.stderr)
    finally:
        plugins.unregister(name=PLUGIN_NAME)
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in nodes:
            node.stop()
        _cleanup(app, store, dlq, prefix)
        if code == 0 and not verbose:
            _remove(logdir)
        else:
            sys.stderr.write(f"worker logs kept in {logdir}\n")
    return code


def _never(task_id: str) -> None:
    """The publishing side never runs task bodies."""
    raise AssertionError("the demo process does not run tasks")


def _header(report: Report, url: str, prefix: str, ignored: list[str]) -> None:
    report.line(f"celery-resilience demo: real worker processes on Redis {mask_url(url)}")
    report.line(
        f"  {len(NODES)} nodes of `celery worker -P prefork -c {CONCURRENCY}`; broker "
        f"visibility timeout {VISIBILITY_TIMEOUT_S:g} s, kept safe by the visibility heartbeat"
    )
    report.line(f"  broker, results, leases and DLQ under {prefix}:*, deleted at the end")
    if ignored:
        report.line(f"  ignored from the environment: {', '.join(ignored)}")


def _wait_ready(nodes: list[WorkerNode]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(node.ready() for node in nodes):
        if time.monotonic() > deadline:
            raise DemoError(f"the worker nodes were not ready within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _story(ctx: Context, nodes: list[WorkerNode]) -> None:
    def kill(hostname: str) -> str:
        name = hostname.split("@", 1)[0]
        node = next((n for n in nodes if n.name == name), None)
        if node is None:
            raise scenarios.ScenarioFailed(f"the task ran on an unknown node {hostname!r}")
        node.kill()
        return f"worker node {hostname} (process group {node.process.pid}, children too)"

    report = ctx.report
    scenarios.run(report, "retry with backoff", lambda: scenarios.retry_with_backoff(ctx))
    scenarios.run(report, "lock exclusion", lambda: scenarios.lock_exclusion(ctx))
    scenarios.run(report, "DLQ and replay", lambda: scenarios.dead_letter_and_replay(ctx))
    scenarios.run(
        report,
        "worker node SIGKILLed mid-task",
        lambda: scenarios.worker_killed(ctx, kill, VISIBILITY_TIMEOUT_S),
    )
    scenarios.run(
        report, "crash budget (real SIGKILLs)", lambda: scenarios.crash_budget(ctx, simulate=False)
    )


def _cleanup(app: Celery, store: RedisStore, dlq: DeadLetterQueue | None, prefix: str) -> None:
    """Delete every key of this run (SCAN + DEL, never FLUSHDB) and close the clients."""
    with contextlib.suppress(Exception):  # Redis gone meanwhile: nothing more to do
        client: Any = store.client()
        batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(batch), 500):
            client.delete(*batch[start : start + 500])
    if dlq is not None:
        with contextlib.suppress(Exception):
            dlq.backend.close()
    store.close()
    app.close()


def _remove(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
