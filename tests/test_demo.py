"""``celery-resilience demo``: run as a user runs it, and checked on what it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_resilience.demo import DemoError
from celery_resilience.demo.app import PREFIX_ENV, REDIS_URL_ENV
from celery_resilience.demo.cli import main
from celery_resilience.demo.redis_mode import WorkerNode, _wait_ready
from tests.support.workers import free_port

DEMO_TIMEOUT_S = 120
SCRIPT = Path(sys.executable).with_name("celery-resilience")


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *argv],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )


def _report(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"


def test_demo_with_no_services_passes_every_scenario_and_ignores_service_settings() -> None:
    """`celery-resilience demo` exits 0 with every scenario PASS, never using the env's URLs."""
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: any use would fail
    stray = {"CELERY_BROKER_URL": dead, "CELERY_RESILIENCE_URL": dead, "CELERY_LOADER": "no.Such"}
    done = _run("demo", env=stray)
    out = done.stdout
    assert done.returncode == 0, _report(done)
    assert done.stderr == "", _report(done)
    assert (
        "ignored from the environment: CELERY_BROKER_URL, CELERY_LOADER, CELERY_RESILIENCE_URL"
        in out
    )
    for title in (
        "retry with backoff",
        "lock exclusion",
        "DLQ and replay",
        "crash budget (simulated)",
        "metrics",
    ):
        assert re.search(rf"^  {re.escape(title)} +PASS ", out, re.MULTILINE), _report(done)
    assert "FAIL" not in out, _report(done)
    assert "retried after 0.20 s and 0.40 s, run 3 succeeded" in out
    assert "never two at once on one account" in out
    assert "(reason max_retries)" in out
    assert "dead_letter_replayed: entry" in out
    assert "simulated: delivery 3 is lost" in out
    assert "crash_budget_spent: 3 deliveries lost (max_crashes=3)" in out
    assert re.search(r"resilience_crash_budget_spent +demo\.render_pdf +1$", out, re.MULTILINE)


def test_python_dash_m_is_the_same_command() -> None:
    """`python -m celery_resilience demo --help` describes the demo and its exit statuses."""
    done = subprocess.run(
        [sys.executable, "-m", "celery_resilience", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, _report(done)
    assert "--redis URL" in done.stdout
    assert "exit status: 0 every scenario ended as promised" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["demo", "--redis", "localhost:6379"],
            "error: --redis 'localhost:6379': expected a Redis URL",
        ),
        (
            ["demo", "--redis", "amqp://localhost//"],
            "error: --redis 'amqp://localhost//': expected",
        ),
        (["demo", "--redis", "redis://localhost:port/0"], "expected a Redis URL"),
        (["demo", "--bogus"], "error: unrecognized arguments: --bogus"),
        (["dance"], "error: argument COMMAND: invalid choice: 'dance'"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed URL or bad usage: exit 1, one `error:` line on stderr, nothing run."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: "), captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert message in captured.err


def test_redis_down_is_one_error_line_with_the_password_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--redis at a port nothing listens on: exit 1, `error: cannot reach Redis`, no password."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/13"
    monkeypatch.setenv("CELERY_RESILIENCE_MAX_RETRIES", "7")
    assert main(["demo", "--redis", url]) == 1
    assert os.environ["CELERY_RESILIENCE_MAX_RETRIES"] == "7"  # ignored, then put back
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: cannot reach Redis at redis://:**@127.0.0.1:"), (
        captured.err
    )
    assert captured.err.count("\n") == 1
    assert "hunter2" not in captured.err


def test_worker_that_fails_to_start_is_reported_with_its_log_file_and_last_lines(
    tmp_path: Path,
) -> None:
    """A node that exits before ready: the error names its log file, which exists, and quotes it."""
    env = {k: v for k, v in os.environ.items() if k not in (REDIS_URL_ENV, PREFIX_ENV)}
    node = WorkerNode("demo1", env, tmp_path, "unused-queue")  # its app cannot import
    try:
        with pytest.raises(DemoError, match="exited with status") as raised:
            _wait_ready([node])
    finally:
        node.stop()
    first, *quoted = str(raised.value).splitlines()
    log = tmp_path / "demo1.log"
    assert first == (
        f"worker demo1 exited with status {node.process.returncode} before it was ready; "
        f"the last lines of {log}:"
    )
    assert log.is_file()
    assert quoted == [f"  | {line}" for line in log.read_text().splitlines()[-len(quoted) :]]
    assert any(REDIS_URL_ENV in line for line in quoted), quoted


@pytest.mark.integration
def test_demo_on_redis_whose_workers_cannot_start_quotes_the_worker_log(
    redis_url: str, tmp_path: Path
) -> None:
    """--redis with workers that exit at start: exit 1, the error quotes an existing log file."""
    done = _run(
        "demo", "--redis", redis_url, env={"CELERY_WORKER_PIDFILE": str(tmp_path / "no" / "x.pid")}
    )
    assert done.returncode == 1, _report(done)
    match = re.search(
        r"^error: worker demo\d exited with status 1 before it was ready; "
        r"the last lines of (\S+\.log):$",
        done.stderr,
        re.MULTILINE,
    )
    assert match, _report(done)
    assert Path(match.group(1)).is_file(), _report(done)
    assert "  | celery.platforms.LockFailed: [Errno 2] No such file or directory" in done.stderr


def _processes_with(variable: str) -> list[int]:
    """Pids of the processes whose environment contains ``variable`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.integration
def test_demo_on_redis_sigkills_real_workers_and_leaves_nothing_behind(redis_url: str) -> None:
    """--redis: workers recover from real SIGKILLs, every scenario PASSes, nothing stays."""
    import redis

    done = _run("demo", "--redis", redis_url)
    out = done.stdout
    assert done.returncode == 0, _report(done)
    for title in (
        "retry with backoff",
        "lock exclusion",
        "DLQ and replay",
        "worker node SIGKILLed mid-task",
        "crash budget (real SIGKILLs)",
        "metrics",
    ):
        assert re.search(rf"^  {re.escape(title)} +PASS ", out, re.MULTILINE), _report(done)
    assert re.search(r"SIGKILL worker node demo\d@\S+ \(process group \d+", out), _report(done)
    assert "and it completed once" in out
    assert out.count(", SIGKILL): the pool child dies mid-task") == 3, _report(done)

    match = re.search(r"under (celery_resilience_demo:[0-9a-f]+):\*", out)
    assert match, _report(done)
    prefix = match.group(1)
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{prefix}:*", count=1000)) == []
    finally:
        client.close()
    if Path("/proc/self/environ").exists():
        assert _processes_with(f"CRDEMO_PREFIX={prefix}") == []
