"""Harness of the chaos suite: real worker nodes on a Redis broker, real signals.

Each test builds its clusters through the ``chaos_clusters`` factory: worker nodes
(``celery -A tests.chaos.app worker``, prefork, concurrency 2) in their own process
groups, so a test can SIGKILL one pool child, SIGKILL or SIGTERM a whole node, and
teardown can kill what is left. Every wait is bounded and fails with diagnostics.

The suite is not collected by a bare ``pytest`` (``norecursedirs`` in pyproject);
run it with ``pytest tests/chaos`` or ``tox -e chaos``. What it measures (recovery
times, duplicates, lost tasks) is printed at the end of the run and written to
``chaos-summary.json`` in pytest's base temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from celery_resilience import DeadLetter, DeadLetterQueue

from . import app as chaos_app

T = TypeVar("T")

REDIS_URL = os.environ.get("CELERY_RESILIENCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[2]

# Bounds, not expectations (the machine may be shared and slow).
READY_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05
_LOG_TAIL_LINES = 60


def _kombu_sweeps_every_second() -> bool:
    """Whether kombu's own restore sweep can be set to every second (kombu >= 5.7)."""
    from kombu.transport import redis as kombu_redis

    return hasattr(kombu_redis.Channel, "unacked_restore_interval")


KOMBU_FAST_SWEEP = _kombu_sweeps_every_second()


def unavailable(message: str) -> None:
    """Skip locally when a service is down; fail under CI=true."""
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{message} (CI=true: the chaos suite's services must be up)")
    pytest.skip(message)


def wait_until(
    predicate: Callable[[], T],
    what: str,
    diagnostics: Callable[[], str],
    timeout: float = WAIT_TIMEOUT_S,
    poll: float = _POLL_S,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with diagnostics if never."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}\n{diagnostics()}")
        time.sleep(poll)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class Node:
    """One ``celery worker`` node (prefork, concurrency 2) in its own process group."""

    def __init__(self, name: str, base: str, env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.base = base  # the role it plays in its cluster ("n1"), kept by a replacement
        self.log = logdir / f"{name}.log"
        self.output = logdir / f"{name}.out"
        self.killed_at: float | None = None
        self.terminated_at: float | None = None
        command = [
            sys.executable, "-m", "celery", "-A", chaos_app.__name__, "worker",
            "-P", "prefork", "-c", "2", "-n", f"{name}@%h", "-Q", env[chaos_app.QUEUE],
            "-l", "INFO", "-f", str(self.log),
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_ready(self) -> bool:
        if not self.alive:
            pytest.fail(
                f"worker {self.name} exited with {self.process.returncode}\n{self.report()}"
            )
        return " ready." in self.text()

    def kill(self) -> float:
        """SIGKILL the whole node, main process and pool children (a pod dying); when."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        at = time.time()
        if self.killed_at is None:
            self.killed_at = at
        self.process.wait(STOP_TIMEOUT_S)
        return at

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM, once)."""
        if self.alive and self.terminated_at is None:
            self.process.send_signal(signal.SIGTERM)
            self.terminated_at = time.time()

    def stop(self) -> None:
        """Warm shutdown, bounded; then SIGKILL whatever is left of the group."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)

    def received(self, task_name: str, task_id: str) -> int:
        """How many times this node received a message of ``task_id``."""
        return self.text().count(f"{task_name}[{task_id}] received")

    def report(self, lines: int = _LOG_TAIL_LINES) -> str:
        state = "running" if self.alive else f"exited {self.process.returncode}"
        return (
            f"--- node {self.name} ({state}) log {self.log} ---\n{_tail(self.log, lines)}\n"
            f"--- node {self.name} stdout/stderr ---\n{_tail(self.output, 20)}"
        )


class ChaosCluster:
    """Worker nodes sharing one queue and one Redis prefix, and a client app to publish."""

    def __init__(
        self,
        label: str,
        redis_url: str,
        logdir: Path,
        *,
        visibility_timeout: float,
        fast_sweep: bool = False,
    ) -> None:
        run = uuid.uuid4().hex[:10]
        self.label = label
        self.prefix = f"chaos:{run}"
        self.queue = f"chaos.{run}"
        self.redis_url = redis_url
        self.logdir = logdir
        self.visibility_timeout = visibility_timeout
        inherited = {
            name: value
            for name, value in os.environ.items()
            # A CELERY_RESILIENCE_* setting of the caller would override the app's.
            if not name.startswith("CELERY_RESILIENCE_")
        }
        self.env = {
            **inherited,
            chaos_app.PREFIX: self.prefix,
            chaos_app.REDIS_URL: redis_url,
            chaos_app.QUEUE: self.queue,
            chaos_app.VISIBILITY_TIMEOUT: str(visibility_timeout),
            chaos_app.FAST_SWEEP: "1" if fast_sweep else "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.app = chaos_app.create_app(self.env)
        self.records = chaos_app.Records(self.prefix, redis_url)
        self.redis: redis.Redis[str] = redis.Redis.from_url(redis_url, decode_responses=True)
        self.nodes: list[Node] = []
        self._dlq: DeadLetterQueue | None = None
        self._generation = 0

    # -- processes -------------------------------------------------------

    def spawn(self, *names: str) -> list[Node]:
        """Start nodes ``names`` (without waiting for them)."""
        started = [
            Node(f"{self.label}-{name}-{self.prefix[-6:]}", name, self.env, self.logdir)
            for name in names
        ]
        self.nodes += started
        return started

    def start(self, *names: str) -> list[Node]:
        """Start nodes ``names`` together and wait until each logs ``ready.``."""
        started = self.spawn(*names)
        for node in started:
            self.wait_ready(node)
        return started

    def wait_ready(self, node: Node) -> None:
        wait_until(node.is_ready, f"node {node.name} to be ready", self.report, READY_TIMEOUT_S)

    def replace(self, node: Node) -> Node:
        """Start a fresh node in place of ``node`` (a new pod after one died)."""
        self._generation += 1
        (fresh,) = self.spawn(f"{node.base}r{self._generation}")
        return fresh

    def node(self, name: str) -> Node:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def close(self) -> None:
        for node in self.nodes:  # all asked at once, then waited for
            node.terminate()
        for node in self.nodes:
            node.stop()
        if self._dlq is not None:
            self._dlq.backend.close()
        _delete_keys(self.redis, f"{self.prefix}:*")
        self.redis.close()
        self.records.close()
        self.app.close()

    # -- tasks -----------------------------------------------------------

    def send_locked(self, key: str, seconds: float) -> AsyncResult:
        return self.app.tasks["chaos.locked"].apply_async((key, seconds))

    def send_held(self, tag: str, seconds: float) -> AsyncResult:
        return self.app.tasks["chaos.held"].apply_async((tag, seconds))

    def release(self, tag: str, times: int = 1) -> None:
        self.redis.rpush(self.records.release(tag), *["go"] * times)

    def result(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)

    # -- what happened ---------------------------------------------------

    def log(self, start: int = 0) -> list[dict[str, Any]]:
        """The bodies' start/end records from index ``start`` on."""
        return [json.loads(line) for line in self.redis.lrange(self.records.log, start, -1)]

    def starts(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.log() if e["ev"] == "start" and e["id"] == task_id]

    def completions(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.records.completions).items()}

    def overlaps(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.redis.lrange(self.records.overlaps, 0, -1)]

    def events(self, task_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.records.events(task_id)).items()}

    def received(self, task_name: str, task_id: str) -> int:
        return sum(node.received(task_name, task_id) for node in self.nodes)

    @property
    def dlq(self) -> DeadLetterQueue:
        if self._dlq is None:
            self._dlq = DeadLetterQueue(self.app)
        return self._dlq

    def dead_letters(self) -> list[DeadLetter]:
        return list(self.dlq.iter())

    def broker_counts(self) -> tuple[int, int]:
        """(queued, unacked) messages in the Redis broker, in one snapshot."""
        broker = f"{self.prefix}:broker:"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(broker + self.queue)
            pipe.hlen(broker + "unacked")
            queued, unacked = pipe.execute()
        return int(queued), int(unacked)

    def settled(self) -> bool:
        """Nothing queued and nothing unacked: no message can start a body any more."""
        return self.broker_counts() == (0, 0)

    def wait_settled(self, diagnostics: Callable[[], str]) -> None:
        """Settled twice in a row 0.2 s apart (a popped message is briefly nowhere)."""

        def twice() -> bool:
            if not self.settled():
                return False
            time.sleep(0.2)
            return self.settled()

        wait_until(twice, "every message acked", diagnostics)

    def report(self, *task_ids: str, lines: int = _LOG_TAIL_LINES) -> str:
        """Task states, their events and records, broker counts, every node's log tail."""
        queued, unacked = self.broker_counts()
        parts = [
            f"cluster {self.label}: prefix {self.prefix}, queue {self.queue}, "
            f"visibility timeout {self.visibility_timeout:g} s; broker: {queued} queued, "
            f"{unacked} unacked"
        ]
        completions = self.completions()
        log = self.log()
        for task_id in task_ids:
            result = self.result(task_id)
            mine = [
                f"{e['ev']}:{e['node']}/{e['pid']}@{e['t']:.2f}" for e in log if e["id"] == task_id
            ]
            parts.append(
                f"task {task_id}: state={result.state} result={result.result!r} "
                f"completions={completions.get(task_id, 0)} events={self.events(task_id)} "
                f"bodies={mine}"
            )
        overlaps = self.overlaps()
        if overlaps:
            parts.append(f"overlaps: {overlaps}")
        parts += [node.report(lines) for node in self.nodes]
        return "\n".join(parts)

    @contextlib.contextmanager
    def sweeping(self, every: float = 0.25) -> Iterator[list[BaseException]]:
        """Run kombu's restore sweep every ``every`` s from this process; yields its errors.

        The fastest sweep kombu < 5.7 can be made to run (those versions have no option
        for it), as tests/integration/test_heartbeat.py does.
        """
        errors: list[BaseException] = []
        stopped = threading.Event()
        options = chaos_app.broker_options(self.env)

        def run() -> None:
            with Connection(self.redis_url, transport_options=options) as connection:
                channel: Any = connection.default_channel
                while not stopped.wait(every):
                    try:
                        channel.qos.restore_visible(num=None, interval=1)
                    except Exception as exc:
                        errors.append(exc)

        thread = threading.Thread(target=run, name=f"sweeper-{self.label}", daemon=True)
        thread.start()
        try:
            yield errors
        finally:
            stopped.set()
            thread.join(5)


def _delete_keys(client: redis.Redis[str], pattern: str) -> None:
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def chaos_redis_url() -> str:
    """The real Redis used as broker, result backend and coordination backend."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the chaos suite needs Linux (process groups, /proc)")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {maybe_sanitize_url(REDIS_URL)} is unreachable: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def chaos_clusters(
    chaos_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ChaosCluster]]:
    """A factory of clusters (``label, visibility_timeout=, fast_sweep=``), all closed after."""
    made: list[ChaosCluster] = []

    def make(label: str, *, visibility_timeout: float, fast_sweep: bool = False) -> ChaosCluster:
        cluster = ChaosCluster(
            label,
            chaos_redis_url,
            tmp_path_factory.mktemp(f"chaos-{label}"),
            visibility_timeout=visibility_timeout,
            fast_sweep=fast_sweep,
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


# -- the summary ---------------------------------------------------------------

_SUMMARY: dict[str, Any] = {}
_SUMMARY_FILE: list[Path] = []


@pytest.fixture(scope="session")
def chaos_summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dict each scenario adds its measurements to; written as JSON after the run."""
    path = tmp_path_factory.getbasetemp() / "chaos-summary.json"
    try:
        yield _SUMMARY
    finally:
        path.write_text(json.dumps(_SUMMARY, indent=2, sort_keys=True) + "\n")
        _SUMMARY_FILE.append(path)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the scenarios measured, and where the JSON summary is."""
    if not _SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos summary")
    for name, section in _SUMMARY.items():
        write(f"{name}:")
        for line in section.get("lines", []):
            write(f"  {line}")
    if _SUMMARY_FILE:
        write(f"JSON summary: {_SUMMARY_FILE[0]}")
