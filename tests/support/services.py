"""The real services the tests need: their URLs, and whether they answer.

A service that cannot be reached skips the tests that need it locally and fails them
under ``CI=true``. The URLs are read from the environment once, here; the worker apps
the suites start import them too (for their defaults), so this module imports pytest
only when it skips or fails (pytest costs a worker process 0.4 s to import).
"""

from __future__ import annotations

import os

import redis
from kombu.utils.url import maybe_sanitize_url

# The real Redis of the tests: a database of their own, keys under a prefix per test.
REDIS_URL = os.environ.get("CELERY_RESILIENCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The real RabbitMQ of the integration suite's AMQP variant.
AMQP_URL = os.environ.get("CELERY_RESILIENCE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def unavailable(message: str, suite: str) -> None:
    """Skip: a missing service is a local inconvenience; under CI it is a failure."""
    import pytest

    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{message} (CI=true: {suite} services must be up)")
    pytest.skip(message)


def reachable_redis(url: str, suite: str) -> str:
    """``url`` if its Redis answers a PING; otherwise skip (or fail under CI)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {maybe_sanitize_url(url)} is unreachable: {exc}", suite)
    finally:
        client.close()
    return url
