"""Sentinel and Cluster URLs, ``resilience_transport_options`` and ``resilience_lock_replicas``:
how they are read, what falls back to the broker's, and the one error each mistake gets."""

from __future__ import annotations

import pytest
import redis
import redis.cluster
import redis.sentinel

from celery_resilience import ConfigurationError
from celery_resilience.backends.clients import connect
from celery_resilience.settings import load_settings
from celery_resilience.urls import cluster_nodes, mask_url

SENTINELS = "sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26380/2"


def test_a_sentinel_broker_lends_its_url_and_master_name() -> None:
    """No resilience_url: the whole Sentinel broker URL and its master name are used."""
    conf = {
        "broker_url": SENTINELS,
        "broker_transport_options": {"master_name": "mymaster", "visibility_timeout": 60},
    }
    s = load_settings(conf, environ={})
    assert s.url == s.dlq_url == SENTINELS
    assert dict(s.transport_options) == {"master_name": "mymaster"}
    assert s.name_of("transport_options") == "broker_transport_options"


def test_a_sentinel_url_without_a_master_name_is_one_error_naming_both_settings() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_url": SENTINELS}, environ={})
    message = str(info.value)
    assert "resilience_url=" in message
    assert "resilience_transport_options sets no master_name" in message
    assert "pw" not in message
    with pytest.raises(ConfigurationError, match="broker_transport_options sets no master_name"):
        load_settings({"broker_url": SENTINELS}, environ={})


def test_transport_options_from_the_environment_are_json() -> None:
    env = {"CELERY_RESILIENCE_TRANSPORT_OPTIONS": '{"master_name": "m", "min_other_sentinels": 1}'}
    s = load_settings({"resilience_url": SENTINELS}, environ=env)
    assert dict(s.transport_options) == {"master_name": "m", "min_other_sentinels": 1}


@pytest.mark.parametrize(
    "options", [{"master": "m"}, {"master_name": "m", "sentinel_kwargs": "pw"}, "not json"]
)
def test_unknown_or_malformed_transport_options_name_the_setting_and_the_keys(
    options: object,
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_transport_options": options}, environ={})
    assert "resilience_transport_options=" in str(info.value)
    assert "master_name, sentinel_kwargs, min_other_sentinels, connection_kwargs" in str(info.value)


def test_lock_replicas_defaults_to_0_and_takes_a_count() -> None:
    assert load_settings({}, environ={}).lock_replicas == 0
    assert load_settings({"resilience_lock_replicas": "2"}, environ={}).lock_replicas == 2
    with pytest.raises(ConfigurationError, match=r"resilience_lock_replicas=-1: expected an in"):
        load_settings({"resilience_lock_replicas": -1}, environ={})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sentinel://s1:26379;redis://s2:6379", "is not a sentinel:// URL"),
        ("sentinel://s1:port", "malformed URL"),
        ("redis+cluster://a:1,b:x", "startup node 'b:x' is malformed"),
    ],
)
def test_malformed_ha_urls_name_the_setting(url: str, problem: str) -> None:
    options = {"master_name": "m"}
    with pytest.raises(ConfigurationError, match=problem) as info:
        load_settings({"resilience_url": url, "resilience_transport_options": options}, {})
    assert str(info.value).startswith("setting resilience_url=")


def test_passwords_are_masked_in_every_sentinel_chunk_and_cluster_url() -> None:
    assert mask_url(SENTINELS) == "sentinel://:**@s1:26379/2;sentinel://:**@s2:26380/2"
    assert "hunter2" not in mask_url("redis+cluster://u:hunter2@a:7000,b:7001")


def test_cluster_nodes_default_the_port() -> None:
    assert cluster_nodes("rediss+cluster://u:p@a:7000,b") == [("a", 7000), ("b", 6379)]


def test_clients_are_of_the_topology_the_url_names() -> None:
    """No connection is made: each client is built for what its URL says."""
    master = connect(SENTINELS, "coordination", {"master_name": "mymaster"})
    pool = master.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("pw", 2)
    sentinels = pool.sentinel_manager.sentinels
    assert [c.connection_pool.connection_kwargs["port"] for c in sentinels] == [26379, 26380]
    assert all(c.connection_pool.connection_kwargs["password"] is None for c in sentinels)
    assert isinstance(connect("redis://h:1/0", "DLQ"), redis.Redis)
    assert connect("unix:///tmp/r.sock", "DLQ").connection_pool.connection_kwargs["path"] == (
        "/tmp/r.sock"
    )
