"""``resilience_lock_replicas``: an acquisition is confirmed by WAIT before the body runs,
and one the replicas did not confirm is not an acquisition. On a real primary and
replica (the Sentinel topology), the replica paused with SIGSTOP to withhold its ack."""

from __future__ import annotations

import time
import uuid

import pytest

from celery_resilience.backends.base import Admission, CoordinationBackend
from celery_resilience.errors import BackendUnavailable
from celery_resilience.testing import backend_for
from tests.support.topology import SentinelTopology

ADMIT = {"publish": "p", "lease_ttl": 30.0, "max_crashes": 3, "record_ttl": 60.0}


def _backend(topology: SentinelTopology, replicas: int) -> CoordinationBackend:
    options = {"master_name": topology.master_name}
    prefix = f"crtest:{uuid.uuid4().hex[:8]}"
    return backend_for(topology.url, prefix, transport_options=options, lock_replicas=replicas)


def test_a_confirmed_acquisition_is_admitted_with_its_token(
    sentinel_topology: SentinelTopology,
) -> None:
    backend = _backend(sentinel_topology, 1)
    try:
        admitted = backend.admit("t1", owner="a", lock_key="k", **ADMIT)
        assert admitted.admission is Admission.ADMITTED
        assert admitted.fencing_token is not None
        assert backend.holds("t1", "k", "a")
    finally:
        backend.close()


def test_an_unconfirmed_acquisition_is_released_and_raises(
    fresh_sentinel_topology: SentinelTopology,
) -> None:
    """Replica paused: WAIT times out after 1 s with 0 acks; the leases are given back."""
    topology = fresh_sentinel_topology
    backend, plain = _backend(topology, 1), _backend(topology, 0)
    topology.replica.pause()
    try:
        started = time.monotonic()
        with pytest.raises(
            BackendUnavailable, match=r"confirmed by 0 of 1 replicas within 1000 ms"
        ):
            backend.admit("t1", owner="a", lock_key="k", **ADMIT)
        assert 0.9 < time.monotonic() - started < 5.0
        assert not backend.holds("t1", "k", "a")
        # Not acquired: another task may take the lock at once.
        other = plain.admit("t2", owner="b", lock_key="k", **ADMIT)
        assert other.admission is Admission.ADMITTED
    finally:
        topology.replica.resume()
        backend.close()
        plain.close()
