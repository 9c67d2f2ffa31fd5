"""The coordination backend contract (``celery_resilience.testing``), run against every
built-in backend, each built the way the library builds it: through the plugin hook."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable

import pytest

from celery_resilience.backends.base import CoordinationBackend
from celery_resilience.testing import CoordinationBackendContract, backend_for


class TestMemoryBackend(CoordinationBackendContract):
    @pytest.fixture
    def backend_factory(self) -> Callable[..., CoordinationBackend]:
        """memory:// on a store of this test alone."""
        return functools.partial(backend_for, f"memory://test-{uuid.uuid4().hex[:8]}")


def _under(url: str, test_prefix: str, key_prefix: str = "main") -> CoordinationBackend:
    """The backend of ``url`` with ``key_prefix`` under ``test_prefix``."""
    return backend_for(url, f"{test_prefix}:{key_prefix}")


class TestRedisBackend(CoordinationBackendContract):
    @pytest.fixture
    def backend_factory(
        self, redis_url: str, key_prefix: str
    ) -> Callable[..., CoordinationBackend]:
        """The test Redis, every prefix under this test's own (removed after the test)."""
        return functools.partial(_under, redis_url, key_prefix)
