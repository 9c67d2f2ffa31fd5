"""Real ``celery worker`` nodes for the suites that start them, and bounded waits.

Shared by the integration suite (``tests/integration``) and the chaos suite
(``tests/chaos``). A node is ``celery -A <app module> worker`` in its own session, so a
test can SIGKILL a pool child or the whole node, and teardown can kill the process
group. Nothing is mocked; every wait is bounded and fails with diagnostics.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import redis
from kombu import Connection

T = TypeVar("T")

POLL_S = 0.05
# The bound of a wait that names none: a healthy run is far below it (the machine may
# be shared and slow).
WAIT_TIMEOUT_S = 60.0


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies, whose sockets are closed, don't)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _ppid, group = stat.read_text().rpartition(")")[2].split()[:3]
            if int(group) == pgid and state != "Z":
                return True
    return False


def wait_until(
    predicate: Callable[[], T],
    what: str,
    diagnostics: Callable[[], str],
    timeout: float = WAIT_TIMEOUT_S,
    poll: float = POLL_S,
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


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of the file at ``path``, or why there are none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def delete_keys(client: redis.Redis[Any], pattern: str) -> None:
    """Delete every key matching ``pattern`` (SCAN + DEL, never FLUSHDB)."""
    batch: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


def inherited_environment() -> dict[str, str]:
    """This process's environment for a worker, without celery-resilience settings.

    A ``CELERY_RESILIENCE_*`` setting in the caller's environment would override the
    app's and break isolation; ``CELERY_RESILIENCE_TEST_*`` are the tests' own.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CELERY_RESILIENCE_") or name.startswith("CELERY_RESILIENCE_TEST_")
    }


def import_root(module: ModuleType) -> Path:
    """The directory ``module``'s top-level package is imported from."""
    assert module.__file__ is not None
    return Path(module.__file__).resolve().parents[module.__name__.count(".")]


def celery_command(module: ModuleType, *argv: str, preamble: str | None = None) -> list[str]:
    """``celery -A <module> *argv``; with ``preamble``, Python run in that process first."""
    if preamble is None:
        start = [sys.executable, "-m", "celery"]
    else:
        start = [sys.executable, "-c", f"{preamble}\nfrom celery.__main__ import main\nmain()"]
    return [*start, "-A", module.__name__, *argv]


def command_environment(module: ModuleType, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``module``'s import root first on ``PYTHONPATH``."""
    root = str(import_root(module))
    paths = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


class WorkerNode:
    """One ``celery -A <app module> worker`` node in its own process group."""

    def __init__(
        self,
        app_module: ModuleType,
        name: str,
        env: Mapping[str, str],
        logdir: Path,
        *,
        queue: str,
        pool: str = "prefork",
        concurrency: int = 2,
        stop_timeout: float = 10.0,
        preamble: str | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self.output = logdir / f"{name}.out"
        self.stop_timeout = stop_timeout
        self.killed_at: float | None = None
        self.terminated_at: float | None = None
        command = celery_command(
            app_module,
            "worker",
            "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h", "-Q", queue,
            "-l", "INFO", "-f", str(self.log),
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            preamble=preamble,
        )  # fmt: skip
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [*wrap, *command],
                env=command_environment(app_module, env),
                cwd=import_root(app_module),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        """The node's log so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_ready(self) -> bool:
        """Whether the node logged ``ready.``; fails the test if it exited."""
        if not self.alive:
            pytest.fail(
                f"worker {self.name} exited with {self.process.returncode} before it was "
                f"ready\n{self.report()}"
            )
        return " ready." in self.text()

    def received(self, task_name: str, task_id: str) -> int:
        """How many times this node received a message of ``task_id`` (its log says so)."""
        return self.text().count(f"{task_name}[{task_id}] received")

    def wait_ready(self, timeout: float, diagnostics: Callable[[], str] | None = None) -> None:
        wait_until(
            self.is_ready, f"worker {self.name} to be ready", diagnostics or self.report, timeout
        )

    def kill(self) -> float:
        """SIGKILL the whole node, main process and pool children (a pod dying); when."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        at = time.time()
        if self.killed_at is None:
            self.killed_at = at
        self.process.wait(self.stop_timeout)
        # The main process can be reaped while a pool child still dies: until the child's
        # sockets close, Redis may still hand it a reply (a BLPOP's token) that nobody reads.
        wait_until(
            lambda: not _group_alive(self.process.pid),
            f"every process of node {self.name} to exit after SIGKILL",
            lambda: "",
            self.stop_timeout,
        )
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
            self.process.wait(self.stop_timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(self.stop_timeout)

    def report(self, lines: int = 60, output_lines: int = 30) -> str:
        state = "running" if self.alive else f"exited {self.process.returncode}"
        return (
            f"--- worker {self.name} ({state}) log {self.log} ---\n{tail(self.log, lines)}\n"
            f"--- worker {self.name} stdout/stderr ---\n{tail(self.output, output_lines)}"
        )


def redis_broker_options(
    prefix: str, visibility_timeout: float, *, fast_sweep: bool
) -> dict[str, Any]:
    """Redis transport options: every key under ``prefix:broker:``, the given timeout.

    ``fast_sweep``: kombu's own restore sweep every second (understood by kombu >= 5.7,
    ignored before).
    """
    options: dict[str, Any] = {
        "global_keyprefix": f"{prefix}:broker:",
        "visibility_timeout": visibility_timeout,
    }
    if fast_sweep:
        options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    return options


@contextlib.contextmanager
def restore_sweeper(
    url: str, options: Mapping[str, Any], every: float, name: str
) -> Iterator[list[BaseException]]:
    """Run kombu's restore sweep every ``every`` s from this process; yields its errors.

    The fastest sweep a worker of kombu < 5.7 can be made to run (those versions have
    no option for it).
    """
    errors: list[BaseException] = []
    stopped = threading.Event()

    def run() -> None:
        with Connection(url, transport_options=dict(options)) as connection:
            channel: Any = connection.default_channel
            while not stopped.wait(every):
                try:
                    channel.qos.restore_visible(num=None, interval=1)
                except Exception as exc:
                    errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stopped.set()
        thread.join(5)
