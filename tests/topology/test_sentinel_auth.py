"""Passwords on Sentinel: one for the data nodes (in the URL, as Celery's result backend
takes it) and one for the sentinels (``sentinel_kwargs``), set on a real topology."""

from __future__ import annotations

import uuid

import pytest
import redis

from celery_resilience.backends.base import Admission
from celery_resilience.errors import BackendUnavailable
from celery_resilience.testing import backend_for, dlq_backend_for
from tests.support.topology import SentinelTopology

ADMIT = {"publish": "p", "lease_ttl": 30.0, "max_crashes": 3, "record_ttl": 60.0}
DATA_PW, SENTINEL_PW = "data-pw", "sentinel-pw"


def _protect(topology: SentinelTopology) -> None:
    """Require DATA_PW on the primary and replica, SENTINEL_PW on the sentinels."""
    for server in (topology.primary, topology.replica):
        client = redis.Redis(port=server.port)
        client.config_set("masterauth", DATA_PW)
        client.config_set("requirepass", DATA_PW)
        client.close()
    for port in topology.sentinel_ports:
        client = redis.Redis(port=port)
        client.execute_command("SENTINEL", "SET", topology.master_name, "auth-pass", DATA_PW)
        client.execute_command("SENTINEL", "CONFIG", "SET", "sentinel-pass", SENTINEL_PW)
        client.execute_command("ACL", "SETUSER", "default", "on", f">{SENTINEL_PW}")
        client.close()


def _url(topology: SentinelTopology, password: str) -> str:
    return ";".join(f"sentinel://:{password}@127.0.0.1:{p}/0" for p in topology.sentinel_ports)


def test_both_passwords_reach_their_servers(fresh_sentinel_topology: SentinelTopology) -> None:
    topology = fresh_sentinel_topology
    _protect(topology)
    options = {"master_name": topology.master_name, "sentinel_kwargs": {"password": SENTINEL_PW}}
    prefix = f"crtest:{uuid.uuid4().hex[:8]}"
    backend = backend_for(_url(topology, DATA_PW), prefix, transport_options=options)
    dlq = dlq_backend_for(_url(topology, DATA_PW), prefix, transport_options=options)
    try:
        assert backend.admit("t1", owner="a", lock_key="k", **ADMIT).admission is Admission.ADMITTED
        assert dlq.count() == 0
    finally:
        backend.close()
        dlq.close()


@pytest.mark.parametrize(
    ("data_pw", "sentinel_kwargs", "refused"),
    [
        ("wrong", {"password": SENTINEL_PW}, "AuthenticationError"),
        (DATA_PW, {}, "MasterNotFoundError"),  # the sentinels refuse to name the primary
    ],
    ids=["wrong data-node password", "no sentinel password"],
)
def test_a_missing_or_wrong_password_is_backend_unavailable_without_the_password(
    fresh_sentinel_topology: SentinelTopology,
    data_pw: str,
    sentinel_kwargs: dict[str, str],
    refused: str,
) -> None:
    topology = fresh_sentinel_topology
    _protect(topology)
    options = {"master_name": topology.master_name, "sentinel_kwargs": sentinel_kwargs}
    backend = backend_for(_url(topology, data_pw), "crtest:auth", transport_options=options)
    try:
        with pytest.raises(BackendUnavailable, match=refused) as info:
            backend.ping()
        assert DATA_PW not in str(info.value)
        assert "wrong" not in str(info.value)
    finally:
        backend.close()
