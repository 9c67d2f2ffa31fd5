"""resilience doctor on Sentinel and Cluster URLs: sentinels that do not answer, a
master name no sentinel knows, a cluster without every slot: one finding each, with
the fix, and the CLI's exit code 1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_resilience.doctor import diagnose
from tests.support import workers
from tests.support.redis_server import RedisServer
from tests.support.topology import ClusterTopology, SentinelTopology
from tests.test_doctor import _doctor, make_app


def _problems(**conf: object) -> list[str]:
    return [str(finding) for finding in diagnose(make_app(**conf))]


def test_sentinels_that_do_not_answer_are_one_finding() -> None:
    ports = [workers.free_port(), workers.free_port()]
    url = ";".join(f"sentinel://127.0.0.1:{port}" for port in ports)
    (problem,) = _problems(resilience_url=url, resilience_transport_options={"master_name": "m"})
    assert problem.startswith("resilience_url: no sentinel of the URL answers: 127.0.0.1:")
    assert f"127.0.0.1:{ports[1]} (ConnectionError" in problem
    assert "Fix: correct the sentinels' host names and ports in the URL" in problem


def test_a_master_name_no_sentinel_knows_names_the_ones_they_monitor(
    sentinel_topology: SentinelTopology,
) -> None:
    options = {"master_name": "mymaster"}
    (problem,) = _problems(
        resilience_url=sentinel_topology.url, resilience_transport_options=options
    )
    assert problem == (
        "resilience_url: no sentinel knows the master name 'mymaster' (they monitor: "
        f"{sentinel_topology.master_name}). Fix: set master_name in resilience_transport_options "
        "to the name in the sentinels' 'sentinel monitor' line (SENTINEL MASTERS lists them)."
    )


def test_a_healthy_sentinel_and_cluster_get_only_the_storage_findings(
    sentinel_topology: SentinelTopology, redis_cluster: ClusterTopology
) -> None:
    """The topologies run without persistence: that, and nothing about reaching them."""
    options = {"master_name": sentinel_topology.master_name}
    for conf in (
        {"resilience_url": sentinel_topology.url, "resilience_transport_options": options},
        {"resilience_url": redis_cluster.url},
    ):
        (problem,) = _problems(**conf)
        assert "has no persistence" in problem


@pytest.fixture
def half_a_cluster(tmp_path: Path) -> Iterator[str]:
    """One cluster-enabled node serving slots 0-8191 only (cluster_state fail)."""
    # The bus port is the node's + 10000 unless given: a free port of its own.
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    server = RedisServer(tmp_path, options=[*cluster, "--cluster-port", str(workers.free_port())])
    with server.running():
        client = redis.Redis(port=server.port)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
        client.close()
        yield f"redis+cluster://127.0.0.1:{server.port}"


def test_a_cluster_without_every_slot_is_one_finding_with_the_fix(half_a_cluster: str) -> None:
    port = half_a_cluster.rpartition(":")[2]
    (problem,) = _problems(resilience_url=half_a_cluster)
    assert problem == (
        f"resilience_url: the cluster of 127.0.0.1:{port} covers 8192 of 16384 hash slots "
        "(cluster_state fail): keys of the others can be neither read nor written. Fix: "
        f"assign the missing slots, e.g. redis-cli --cluster fix 127.0.0.1:{port}, or wait "
        "for a failover to finish."
    )


def test_the_cli_prints_the_finding_and_exits_one(half_a_cluster: str, redis_url: str) -> None:
    env = {"CR_DOCTOR_BROKER_URL": redis_url, "CR_DOCTOR_VISIBILITY_TIMEOUT": "60"}
    result = _doctor({**env, "CELERY_RESILIENCE_URL": half_a_cluster})
    assert result.returncode == 1, result.stdout + result.stderr
    finding, _ = result.stdout.splitlines()
    assert finding.startswith("resilience_url (from environment variable CELERY_RESILIENCE_URL)")
    assert "covers 8192 of 16384 hash slots" in finding
