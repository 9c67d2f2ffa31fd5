"""The topology fixtures are real: Sentinel replicates and fails over, Cluster shards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterCrossSlotError

from tests.support.topology import CLUSTER_SLOTS, ClusterTopology, SentinelTopology

# The bound a failover must stay under: generous, for a slow shared CI machine (a
# healthy one takes some 3 s with these timeouts).
FAILOVER_BOUND_S = 30.0

# Sets both keys: the server refuses it unless they hash to the same slot.
SET_BOTH = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 2"


@pytest.fixture
def prefix() -> str:
    return f"crtopo:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def cluster_client(redis_cluster: ClusterTopology, prefix: str) -> Iterator[RedisCluster]:
    """A cluster client of the session cluster; the test's keys are deleted afterwards."""
    client = _cluster_client(redis_cluster)
    yield client
    for key in client.scan_iter(match=f"*{prefix}*", target_nodes=RedisCluster.PRIMARIES):
        client.delete(key)
    client.close()


def _cluster_client(topology: ClusterTopology) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in topology.startup_nodes],
        decode_responses=True,
        socket_timeout=2,
    )


def test_a_write_through_the_sentinels_reaches_the_replica(
    sentinel_topology: SentinelTopology, prefix: str
) -> None:
    with sentinel_topology.client(decode_responses=True) as sentinel:
        primary = sentinel.master_for(sentinel_topology.master_name)
        replica = sentinel.slave_for(sentinel_topology.master_name)
        try:
            primary.set(f"{prefix}:k", "v")
            assert primary.execute_command("WAIT", 1, 1000) == 1
            assert replica.get(f"{prefix}:k") == "v"
            assert replica.execute_command("ROLE")[0] == "slave"
            primary.delete(f"{prefix}:k")
        finally:
            primary.close()
            replica.close()
    assert sentinel_topology.current_primary() is sentinel_topology.primary


# Celery's Redis backend stores a result with SETEX, which redis-py >= 8 deprecates.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_celery_s_sentinel_result_backend_takes_the_url(
    sentinel_topology: SentinelTopology,
) -> None:
    ports = sentinel_topology.sentinel_ports
    assert sentinel_topology.url == ";".join(f"sentinel://127.0.0.1:{p}" for p in ports)
    app = Celery("topology", set_as_current=False)
    app.conf.result_backend = sentinel_topology.url
    app.conf.result_backend_transport_options = {"master_name": sentinel_topology.master_name}
    task_id = f"crtopo-{uuid.uuid4().hex}"
    try:
        app.backend.store_result(task_id, 42, "SUCCESS")
        assert app.backend.get_task_meta(task_id)["result"] == 42
        app.backend.forget(task_id)
    finally:
        app.close()
        app.backend.client.connection_pool.disconnect()


def test_a_killed_primary_is_failed_over_and_writes_work_again(
    fresh_sentinel_topology: SentinelTopology, prefix: str
) -> None:
    topology = fresh_sentinel_topology
    with topology.client(decode_responses=True) as sentinel:
        primary = sentinel.master_for(topology.master_name)
        try:
            primary.set(f"{prefix}:before", "1")
            assert primary.execute_command("WAIT", 1, 1000) == 1

            old = topology.kill_primary()
            assert old is topology.primary
            seconds = topology.wait_for_failover(old.port)
            assert seconds < FAILOVER_BOUND_S
            assert topology.current_primary() is topology.replica

            # The same client finds the new primary, which has the replicated write.
            assert primary.get(f"{prefix}:before") == "1"
            primary.set(f"{prefix}:after", "2")
            assert primary.get(f"{prefix}:after") == "2"

            topology.restart_old_primary(old)
            assert primary.execute_command("WAIT", 1, 1000) == 1
            former = redis.Redis.from_url(old.url, decode_responses=True)
            try:
                assert former.get(f"{prefix}:after") == "2"
            finally:
                former.close()
        finally:
            primary.close()


def test_the_cluster_serves_every_slot(redis_cluster: ClusterTopology) -> None:
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{node.port}" for node in redis_cluster.nodes[:3]
    )
    assert len(redis_cluster.primaries()) == 3
    for node in redis_cluster.nodes:
        client = redis.Redis.from_url(node.url, decode_responses=True)
        try:
            info = client.cluster("INFO")
        finally:
            client.close()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS


def test_keys_spread_over_the_primaries(
    redis_cluster: ClusterTopology, cluster_client: RedisCluster, prefix: str
) -> None:
    keys = [f"{prefix}:{index}" for index in range(100)]
    for index, key in enumerate(keys):
        cluster_client.set(key, index)
    assert [cluster_client.get(key) for key in keys] == [str(i) for i in range(100)]
    served_by = {cluster_client.get_node_from_key(key).port for key in keys}
    assert served_by == {node.port for node in redis_cluster.primaries()}


def test_a_script_over_two_slots_is_refused_and_over_one_tag_runs(
    redis_cluster: ClusterTopology, cluster_client: RedisCluster, prefix: str
) -> None:
    apart = [f"{prefix}:a", f"{prefix}:b"]
    assert redis_cluster.slot_of(apart[0]) != redis_cluster.slot_of(apart[1])
    # Sent to the node of the first key as is: the server itself refuses it.
    node = redis.Redis.from_url(redis_cluster.primary_of(apart[0]).url)
    try:
        # redis-py raises the server's CROSSSLOT error as ClusterCrossSlotError.
        with pytest.raises(ClusterCrossSlotError, match="same slot"):
            node.eval(SET_BOTH, 2, *apart, "x")
    finally:
        node.close()

    together = [f"{{{prefix}}}:a", f"{{{prefix}}}:b"]
    assert cluster_client.eval(SET_BOTH, 2, *together, "x") == 2
    assert cluster_client.mget(together) == ["x", "x"]


def test_a_killed_cluster_primary_is_failed_over(
    fresh_redis_cluster: ClusterTopology, prefix: str
) -> None:
    topology = fresh_redis_cluster
    client = _cluster_client(topology)
    key = f"{prefix}:k"
    try:
        client.set(key, "v")
        assert client.execute_command("WAIT", 1, 1000, target_nodes=client.get_node_from_key(key))
        old = topology.kill_primary_of(key)
        seconds = topology.wait_for_failover(key, old.port)
        assert seconds < FAILOVER_BOUND_S
        assert topology.primary_of(key) is not old
        assert len(topology.primaries()) == 3

        assert client.get(key) == "v"
        client.set(key, "w")
        topology.restart_node(old)
        assert old not in topology.primaries()
        assert len(topology.primaries()) == 3
        assert client.execute_command("WAIT", 1, 1000, target_nodes=client.get_node_from_key(key))
    finally:
        client.close()
