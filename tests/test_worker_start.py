"""What a real worker checks and says when it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPPORT_DIR = Path(__file__).parent / "support"
READY_TIMEOUT = 60.0
AMQP_URL = os.environ.get("CELERY_RESILIENCE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _start(app: str, env: dict[str, str], tmp_path: Path) -> tuple[int | None, str]:
    """Start ``celery -A app worker``; return its exit code (None: it became ready and
    was stopped) and its log."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_RESILIENCE_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT_DIR), clean.get("PYTHONPATH")]))
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "--pool=solo",
         "--loglevel=INFO", "-Q", f"cr-start-{os.getpid()}", "-n", f"cr-start-{os.getpid()}@%h",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-f", str(log)],
        cwd=tmp_path, env={**clean, **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready." not in (text := log.read_text() if log.exists() else ""):
            if worker.poll() is not None:
                return worker.returncode, log.read_text() if log.exists() else ""
            if time.monotonic() > deadline:
                pytest.fail(f"worker neither became ready nor exited:\n{text}")
            time.sleep(0.1)
    finally:
        if worker.poll() is None:
            worker.terminate()
        worker.wait(30)
    return None, text


@pytest.mark.integration
def test_worker_warns_when_the_dlq_redis_can_evict_or_lose_dead_letters(
    redis_url: str, evicting_redis: str, tmp_path: Path
) -> None:
    """A DLQ Redis that may evict keys, and that has no persistence, is named at start."""
    code, text = _start(
        "security_app",
        {"CR_SECURITY_BROKER_URL": redis_url, "CR_SECURITY_RESILIENCE_URL": redis_url,
         "CELERY_RESILIENCE_DLQ_URL": evicting_redis},
        tmp_path,
    )  # fmt: skip
    assert code is None, text
    warnings = [line for line in text.splitlines() if "maxmemory-policy allkeys-lru" in line]
    assert warnings, text
    assert evicting_redis in warnings[0]
    (lost,) = [line for line in text.splitlines() if "a restart loses every dead letter" in line]
    assert "WARNING" in lost
    assert "resilience_dlq_url (from environment variable CELERY_RESILIENCE_DLQ_URL):" in lost
    (coordination,) = [line for line in text.splitlines() if "every lease, crash count" in line]
    assert f"the Redis at {redis_url} has no persistence" in coordination


@pytest.mark.integration
def test_worker_on_rabbitmq_without_resilience_url_refuses_to_start(tmp_path: Path) -> None:
    """memory:// by default would guard nothing: one critical line with the fix, exit 1."""
    code, text = _start("doctor_app", {"CR_DOCTOR_BROKER_URL": AMQP_URL}, tmp_path)
    assert code == 1, text
    (line,) = [line for line in text.splitlines() if "CRITICAL" in line]
    assert "celery-resilience: resilience_url is unset and broker_url is 'amqp://" in line
    assert "Fix: set resilience_url to a redis:// URL (or to 'memory://'" in line
    assert "Traceback" not in text


@pytest.mark.integration
def test_worker_with_a_typod_scheme_names_the_setting_the_user_set(
    redis_url: str, tmp_path: Path
) -> None:
    """resilience_url=redsi://... fails start naming resilience_url and the schemes served."""
    env = {"CR_DOCTOR_BROKER_URL": redis_url, "CR_DOCTOR_RESILIENCE_URL": "redsi://h:6379/0"}
    code, text = _start("doctor_app", env, tmp_path)
    assert code == 1, text
    (line,) = [line for line in text.splitlines() if "CRITICAL" in line]
    assert "celery-resilience: setting resilience_url='redsi://h:6379/0': no installed" in line
    assert "unix://, sentinel://, redis+cluster://, rediss+cluster://)" in line
