"""The coordination and DLQ contract suites on Redis Sentinel and on Redis Cluster, each
backend built as an app builds it: through the plugin hook, from its URL."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celery_resilience.backends.base import CoordinationBackend, DeadLetterBackend
from celery_resilience.testing import (
    CoordinationBackendContract,
    DeadLetterBackendContract,
    backend_for,
    dlq_backend_for,
)
from tests.support.topology import ClusterTopology, SentinelTopology


def _sentinel_options(topology: SentinelTopology) -> dict[str, Any]:
    return {"transport_options": {"master_name": topology.master_name}}


def _prefix() -> str:
    return f"crtest:{uuid.uuid4().hex[:12]}"


class TestSentinelCoordination(CoordinationBackendContract):
    @pytest.fixture
    def backend_factory(
        self, sentinel_topology: SentinelTopology
    ) -> Callable[..., CoordinationBackend]:
        prefix = _prefix()

        def build(key_prefix: str = "main") -> CoordinationBackend:
            url, options = sentinel_topology.url, _sentinel_options(sentinel_topology)
            return backend_for(url, f"{prefix}:{key_prefix}", **options)

        return build


class TestClusterCoordination(CoordinationBackendContract):
    # A task id's keys carry its lock key's hash tag: the states these build need a
    # task id whose lock key changes between calls (docs/concepts.md, "Redis Cluster";
    # tests/test_redis_cluster_keys.py checks these are the contract's MIXED_LOCK_KEYS).
    test_contended_delivery_removes_its_own_run_lease = None
    test_release_frees_the_run_lease_where_the_lock_is_another_owners = None
    test_renew_returns_false_when_the_lock_lease_is_another_owners = None

    @pytest.fixture
    def backend_factory(self, redis_cluster: ClusterTopology) -> Callable[..., CoordinationBackend]:
        prefix = _prefix()

        def build(key_prefix: str = "main") -> CoordinationBackend:
            return backend_for(redis_cluster.url, f"{prefix}:{key_prefix}")

        return build


class TestSentinelDeadLetters(DeadLetterBackendContract):
    @pytest.fixture
    def backend_factory(
        self, sentinel_topology: SentinelTopology
    ) -> Callable[[], DeadLetterBackend]:
        url, options = sentinel_topology.url, _sentinel_options(sentinel_topology)
        return functools.partial(dlq_backend_for, url, _prefix(), **options)


class TestClusterDeadLetters(DeadLetterBackendContract):
    @pytest.fixture
    def backend_factory(self, redis_cluster: ClusterTopology) -> Callable[[], DeadLetterBackend]:
        return functools.partial(dlq_backend_for, redis_cluster.url, _prefix())
