"""Clean-install check: does ``pip install 'celery-resilience[EXTRAS]'`` give a working worker?

Run by tox's ``install-*`` environments in a venv holding only the package and the
named extras (no test dependencies, no pytest), from a directory outside the source
tree. Uses only the standard library and what the extras install. Steps, each
printed; the first that fails ends the run with exit status 1, a one-line reason and
the worker's log tail:

1. the environment holds the installed package (not the source tree) and no pytest;
2. ``celery -A install_app worker`` (this venv's ``celery``) starts on the Redis at
   ``CELERY_RESILIENCE_TEST_REDIS_URL`` (default redis://127.0.0.1:6379/15);
3. a ``@resilient`` task that fails once with a retryable error ends in SUCCESS
   (Redis result backend), and one that gives up lands in the DLQ;
4. ``celery -A install_app resilience dlq ls --json`` exits 0 and lists it;
5. with ``prometheus``: the worker serves ``celery_resilience_retries_total`` on
   ``resilience_prometheus_port``; with ``otel``: the exporters build and record
   with opentelemetry-api alone.

The worker (its whole process group) is stopped on every way out, and every Redis
key of the run (one prefix) is deleted.

    python .ci/install_check.py redis [prometheus] [otel]
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("CELERY_RESILIENCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
READY_TIMEOUT_S = 45.0
RESULT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
KNOWN_EXTRAS = ("redis", "prometheus", "otel")


class CheckFailed(Exception):
    """A step failed; the message says which and why, in one line."""


def say(message: str) -> None:
    print(f"install-check: {message}", flush=True)


class Worker:
    """``celery -A install_app worker`` in its own process group, logging to one file."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.log = workdir / "worker.log"
        celery = Path(sys.executable).with_name("celery")
        command = [
            str(celery), "-A", "install_app", "worker", "-P", "prefork", "-c", "1",
            "-Q", f"{env['INSTALL_CHECK_PREFIX']}:queue", "-n", f"install-check-{os.getpid()}@%h",
            "-l", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        say(f"starting worker: {' '.join(command)}")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        say(f"worker pid {self.process.pid}, log {self.log}")

    def text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")
        return ""

    def tail(self) -> str:
        return "\n".join(self.text().splitlines()[-LOG_TAIL_LINES:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while " ready." not in self.text():
            if self.process.poll() is not None:
                raise CheckFailed(
                    f"the worker exited with status {self.process.returncode} before it was ready"
                )
            if time.monotonic() > deadline:
                raise CheckFailed(f"the worker was not ready within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), bounded; then SIGKILL the whole process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)
        say(f"worker pid {self.process.pid} stopped (exit status {self.process.returncode})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_environment(extras: list[str]) -> None:
    """The package comes from this venv, not a source tree, and no test tool is around."""
    from importlib.metadata import version

    import celery_resilience

    where = Path(celery_resilience.__file__).resolve()
    if not where.is_relative_to(Path(sys.prefix).resolve()):
        raise CheckFailed(f"celery_resilience imported from {where}, not from {sys.prefix}")
    if importlib.util.find_spec("pytest") is not None:
        raise CheckFailed("pytest is importable: this venv is not a clean install of the extras")
    versions = []
    for dist in ("celery-resilience", "celery", "kombu", "redis", "packaging"):
        try:
            versions.append(f"{dist} {version(dist)}")
        except Exception:
            versions.append(f"{dist} (not installed)")
    say(f"python {sys.version.split()[0]}, extras [{','.join(extras)}]: {', '.join(versions)}")
    say(f"celery_resilience from {where.parent}; pytest absent")


def run_tasks(worker: Worker) -> str:
    """Run ``add`` to SUCCESS and ``give_up`` into the DLQ; return the dead letter's task id."""
    import install_app

    result = install_app.add.delay(2, 3)
    say(f"sent install_app.add(2, 3) id {result.id}; waiting up to {RESULT_TIMEOUT_S:.0f} s")
    value = result.get(timeout=RESULT_TIMEOUT_S, propagate=False)
    if result.state != "SUCCESS" or value != 5:
        raise CheckFailed(
            f"install_app.add ended {result.state} with {value!r}, expected SUCCESS 5"
        )
    retried = [line for line in worker.text().splitlines() if f"[{result.id}] retry:" in line]
    if not retried:
        raise CheckFailed(f"install_app.add[{result.id}] succeeded without the retry it needs")
    say(f"install_app.add: SUCCESS 5, after: {retried[0].split('] ', 1)[-1].strip()}")
    failing = install_app.give_up.delay()
    failing.get(timeout=RESULT_TIMEOUT_S, propagate=False)
    say(f"install_app.give_up id {failing.id}: {failing.state}")
    install_app.app.close()
    return str(failing.id)


def check_dlq_ls(env: dict[str, str], workdir: Path, task_id: str) -> None:
    celery = Path(sys.executable).with_name("celery")
    command = [str(celery), "-A", "install_app", "resilience", "dlq", "ls", "--json"]
    say(f"running: {' '.join(command)}")
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while True:
        done = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise CheckFailed(
                f"`resilience dlq ls` exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        ids = [entry.get("task_id") for entry in json.loads(done.stdout)["entries"]]
        if task_id in ids:
            say(f"dlq ls: exit 0, lists the dead letter of task {task_id}")
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"`resilience dlq ls` does not list task {task_id}: {done.stdout}")
        time.sleep(0.5)


def check_prometheus(port: int) -> None:
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except OSError as exc:
            body = f"({exc})"
        samples = [
            line
            for line in body.splitlines()
            if line.startswith("celery_resilience_retries_total{") and "install_app.add" in line
        ]
        if samples and float(samples[0].rsplit(" ", 1)[1]) >= 1:
            say(f"scraped {url}: {samples[0]}")
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"{url} has no celery_resilience_retries_total of install_app.add")
        time.sleep(0.5)


def check_otel() -> None:
    """With opentelemetry-api alone: the built-in exporter gets instruments, ours record."""
    import install_app
    from opentelemetry.metrics import NoOpMeterProvider

    from celery_resilience.exporters import otel

    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        raise CheckFailed("opentelemetry-sdk is importable: the [otel] extra brings the API only")
    otel.require_opentelemetry("the install check")
    if otel.exporter.instruments() is None:
        raise CheckFailed("the built-in OtelExporter has no instruments with opentelemetry-api")
    own = otel.OtelExporter(NoOpMeterProvider())
    own.resilience_retry_scheduled(
        task_name="install_app.add", attempt=0, reason="error", countdown=0.2
    )
    gauge = otel.observe_dead_letters(install_app.app)
    if gauge is None:
        raise CheckFailed("observe_dead_letters returned None with opentelemetry-api installed")
    gauge.close()
    say("otel: OtelExporter and the DLQ gauge built and recorded with opentelemetry-api only")


def cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        say(f"deleted {len(keys)} Redis keys under {prefix}:*")
    finally:
        client.close()


def check(extras: list[str], workdir: Path) -> None:
    prefix = f"install_check:{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "INSTALL_CHECK_REDIS_URL": REDIS_URL,
        "INSTALL_CHECK_PREFIX": prefix,
        "PYTHONPATH": str(HERE),
    }
    port = free_port() if "prometheus" in extras else None
    if port is not None:
        env["INSTALL_CHECK_PROMETHEUS_PORT"] = str(port)
    os.environ.update(env)
    sys.path.insert(0, str(HERE))
    check_environment(extras)
    say(f"Redis {REDIS_URL}, keys under {prefix}:*")
    worker = Worker(env, workdir)
    try:
        try:
            worker.wait_ready()
            say("worker ready")
            dead_letter = run_tasks(worker)
            check_dlq_ls(env, workdir, dead_letter)
            if port is not None:
                check_prometheus(port)
            if "otel" in extras:
                check_otel()
            failures = [
                line
                for line in worker.text().splitlines()
                if "plugin" in line and "failed in" in line
            ]
            if failures:
                raise CheckFailed(f"a celery-resilience plugin failed in the worker: {failures[0]}")
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            say(f"FAILED: {reason}")
            print(f"--- last {LOG_TAIL_LINES} lines of {worker.log} ---", flush=True)
            print(worker.tail(), flush=True)
            print("--- end of worker log ---", flush=True)
            raise
    finally:
        with deferred_signals():
            worker.stop()
            with contextlib.suppress(Exception):
                cleanup(prefix)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops the worker


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGTERM/SIGINT wait until the block (stopping the worker) is done, then exit."""
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _terminate)
    if received:
        say(f"signal {received[0]} received: exiting")
        raise SystemExit(128 + received[0])


def main(argv: list[str]) -> int:
    extras = argv or ["redis"]
    unknown = sorted(set(extras) - set(KNOWN_EXTRAS))
    if unknown:
        print(f"error: unknown extras {unknown}; expected some of {KNOWN_EXTRAS}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="install-check-") as tmp:
        try:
            check(extras, Path(tmp))
        except CheckFailed as exc:
            print(f"install-check: error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:
            print(f"install-check: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    say(f"OK in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
