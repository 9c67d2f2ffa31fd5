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


@pytest.mark.integration
def test_worker_warns_when_the_dlq_redis_can_evict_dead_letters(
    redis_url: str, evicting_redis: str, tmp_path: Path
) -> None:
    """A DLQ on a Redis with an evicting maxmemory-policy is named in a warning at start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_RESILIENCE_")}
    env.update(
        CR_SECURITY_BROKER_URL=redis_url,
        CR_SECURITY_RESILIENCE_URL=redis_url,
        CELERY_RESILIENCE_DLQ_URL=evicting_redis,
        PYTHONPATH=os.pathsep.join(filter(None, [str(SUPPORT_DIR), env.get("PYTHONPATH")])),
    )
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "security_app", "worker", "--pool=solo",
         "--loglevel=INFO", "-Q", f"cr-start-{os.getpid()}", "-n", f"cr-start-{os.getpid()}@%h",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-f", str(log)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready." not in (text := log.read_text() if log.exists() else ""):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not become ready:\n{text}")
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(30)
    warnings = [line for line in text.splitlines() if "maxmemory-policy allkeys-lru" in line]
    assert warnings, text
    assert evicting_redis in warnings[0]
