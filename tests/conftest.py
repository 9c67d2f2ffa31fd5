"""Shared fixtures: the real Redis, and a coordination backend per built-in kind."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_resilience.demo.celery_compat import work_around_celery_10477
from tests.support.redis_server import RedisServer
from tests.support.services import REDIS_URL, reachable_redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the real Redis the tests use; skips (fails under CI) if it is down."""
    return reachable_redis(REDIS_URL, "the test")


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix of this test alone; its Redis keys are removed afterwards."""
    prefix = f"crtest:{uuid.uuid4().hex[:12]}"
    yield prefix
    if "redis_url" in request.fixturenames:
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each built-in coordination backend (a fresh memory store each time)."""
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:8]}"
    return str(request.getfixturevalue("redis_url"))


@contextlib.contextmanager
def _private_redis(directory: Path, *options: str) -> Iterator[str]:
    """A redis-server of this test alone on a free loopback port, with ``options``;
    yields its URL (db 0, the full-permission default user)."""
    with RedisServer(directory, options=options).running() as server:
        yield server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test alone that it may pause, kill and restart."""
    with RedisServer(tmp_path).running() as server:
        yield server


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server whose maxmemory-policy may evict keys."""
    with _private_redis(tmp_path, "--maxmemory-policy", "allkeys-lru") as url:
        yield url


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for a module's ACL users (``tests.support.acl``); its URL
    is the full-permission default user's."""
    with _private_redis(tmp_path_factory.mktemp("acl-redis")) as url:
        yield url


def pytest_configure(config: pytest.Config) -> None:
    # Celery < 5.7 can hang this process for good (celery/celery#10477); see there.
    work_around_celery_10477()
