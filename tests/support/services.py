"""The real services the worker suites need: reachable, or skipped (failed under CI)."""

from __future__ import annotations

import os

import pytest
import redis
from kombu.utils.url import maybe_sanitize_url


def unavailable(message: str, suite: str) -> None:
    """Skip: a missing service is a local inconvenience; under CI it is a failure."""
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
