"""Fixtures of the topology suite: real Redis Sentinel and Redis Cluster topologies.

Every test under ``tests/topology`` is marked ``topology``. The session topologies are
started on first use and shared: a test that kills a primary takes a ``fresh_*`` one of
its own. A missing ``redis-server`` (or ``redis-cli``) skips the tests locally and fails
them when ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.topology import ClusterTopology, SentinelTopology

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``topology`` the tests of this directory (before ``-m`` selects), no others."""
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.topology)


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """A primary, its replica and three sentinels, shared by the session: don't fault it."""
    with SentinelTopology(tmp_path_factory.mktemp("sentinel")).running() as topology:
        yield topology


@pytest.fixture
def fresh_sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A Sentinel topology of this test alone, which it may fail over."""
    with SentinelTopology(tmp_path).running() as topology:
        yield topology


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    """A six-node Redis Cluster (three primaries, a replica each), shared by the session:
    don't fault it."""
    with ClusterTopology(tmp_path_factory.mktemp("cluster")).running() as topology:
        yield topology


@pytest.fixture
def fresh_redis_cluster(tmp_path: Path) -> Iterator[ClusterTopology]:
    """A Redis Cluster of this test alone, which it may fail over."""
    with ClusterTopology(tmp_path).running() as topology:
        yield topology
