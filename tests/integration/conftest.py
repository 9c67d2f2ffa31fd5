"""Fixtures of the integration suite: the real services, and worker clusters per module.

Redis (``CELERY_RESILIENCE_TEST_REDIS_URL``) and RabbitMQ
(``CELERY_RESILIENCE_TEST_AMQP_URL``) that cannot be reached skip the tests that need
them locally, and fail them when ``CI=true``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support import services
from tests.support.redis_server import RedisServer
from tests.support.services import AMQP_URL, REDIS_URL

from .harness import Cluster


def unavailable(message: str) -> None:
    """Skip: a missing service is a local inconvenience; under CI it is a failure."""
    services.unavailable(message, "integration")


@pytest.fixture(scope="session")
def integration_redis_url() -> str:
    """The real Redis used as broker, result backend and coordination backend."""
    return services.reachable_redis(REDIS_URL, "integration")


@pytest.fixture(scope="session")
def integration_amqp_url() -> str:
    """The real RabbitMQ used as the broker of the AMQP variant."""
    from kombu import Connection

    connection = Connection(AMQP_URL, connect_timeout=3)
    try:
        connection.connect()
    except Exception as exc:  # amqp, socket and auth errors alike
        unavailable(f"RabbitMQ at {connection.as_uri()} is unreachable: {exc!r}")
    finally:
        connection.release()
    return AMQP_URL


@pytest.fixture(scope="module", params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest, integration_redis_url: str) -> str:
    """Each broker a module's clusters run on in turn: the main Redis, then RabbitMQ.

    Redis stays the result, coordination and DLQ store on both; RabbitMQ being down
    skips (or, under CI, fails) only the ``amqp`` half.
    """
    if request.param == "amqp":
        return str(request.getfixturevalue("integration_amqp_url"))
    return integration_redis_url


@pytest.fixture(scope="session")
def redis_server_executable() -> str:
    """The ``redis-server`` binary, for tests that run a Redis they can stop."""
    executable = shutil.which("redis-server")
    if executable is None:
        unavailable("redis-server is not installed")
    assert executable is not None
    return executable


@pytest.fixture(scope="module")
def redis_cluster(
    integration_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two worker nodes (prefork, concurrency 2) on a Redis broker, shared by a module."""
    cluster = Cluster(redis_url=integration_redis_url, logdir=tmp_path_factory.mktemp("workers"))
    with cluster.running("node1", "node2"):
        yield cluster


@pytest.fixture(scope="module")
def broker_cluster(
    integration_redis_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two worker nodes on each broker in turn (``broker_url``), shared by a module;
    Redis for results and coordination on both."""
    cluster = Cluster(
        redis_url=integration_redis_url,
        broker_url=broker_url,
        logdir=tmp_path_factory.mktemp("workers"),
    )
    with cluster.running("node1", "node2"):
        yield cluster


@pytest.fixture(scope="module")
def flaky_backend(
    redis_server_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A private redis-server on a free port, used as the coordination backend only."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), redis_server_executable)
    with server.running():
        yield server


@pytest.fixture(scope="module")
def dlq_server(
    redis_server_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A private redis-server holding the workers' dead letters only."""
    with RedisServer(
        tmp_path_factory.mktemp("dlq-redis"), redis_server_executable
    ).running() as server:
        yield server


@pytest.fixture(scope="module")
def flaky_backend_cluster(
    integration_redis_url: str,
    broker_url: str,
    flaky_backend: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """One worker node on each broker whose coordination backend is ``flaky_backend``.

    The broker (the main Redis or RabbitMQ) and the result backend (the main Redis)
    stay up, so the task and its records survive the coordination backend going away.
    """
    cluster = Cluster(
        redis_url=integration_redis_url,
        broker_url=broker_url,
        resilience_url=flaky_backend.url,
        logdir=tmp_path_factory.mktemp("workers"),
    )
    with cluster.running("flaky1"):
        yield cluster
