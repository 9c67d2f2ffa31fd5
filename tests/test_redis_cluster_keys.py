"""The coordination backend's Redis Cluster key names, checked on the test Redis: every
key one script touches shares one hash slot, and the contract holds with those names.

A real six-node cluster runs the same contract in tests/topology; this checks the naming
on every Python and Celery line, where no cluster is started.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from celery_resilience.backends.base import Admission, CoordinationBackend
from celery_resilience.backends.redis import RedisCoordinationBackend
from celery_resilience.testing import CoordinationBackendContract
from celery_resilience.testing.coordination import MIXED_LOCK_KEYS

ADMIT = {"publish": "p", "lease_ttl": 30.0, "max_crashes": 3, "record_ttl": 60.0}


def _tagged(url: str, prefix: str, key_prefix: str = "main") -> CoordinationBackend:
    return RedisCoordinationBackend(url, f"{prefix}:{key_prefix}", cluster=True)


class TestClusterKeyNames(CoordinationBackendContract):
    # A task id's keys carry its lock key's tag, so the state these build (a task id's
    # run lease under no lock, its lock elsewhere) cannot arise; the gate passes one
    # lock key per task id. docs/concepts.md, "Keys on Redis Cluster".
    test_contended_delivery_removes_its_own_run_lease = None
    test_release_frees_the_run_lease_where_the_lock_is_another_owners = None
    test_renew_returns_false_when_the_lock_lease_is_another_owners = None

    @pytest.fixture
    def backend_factory(
        self, redis_url: str, key_prefix: str
    ) -> Callable[..., CoordinationBackend]:
        return functools.partial(_tagged, redis_url, key_prefix)


def test_the_left_out_tests_are_the_contracts_mixed_lock_key_tests() -> None:
    left_out = {
        name for name, value in vars(TestClusterKeyNames).items() if name.startswith("test_")
    } - {name for name, value in vars(TestClusterKeyNames).items() if value is not None}
    assert left_out == set(MIXED_LOCK_KEYS)
    assert all(callable(getattr(CoordinationBackendContract, name)) for name in left_out)


def _slots(client: redis.Redis, prefix: str) -> dict[bytes, int]:
    return {key: key_slot(key) for key in client.scan_iter(match=f"{prefix}:*", count=1000)}


@pytest.mark.parametrize("lock_key", [None, "sync:42", "a}b{c"])
def test_a_deliverys_keys_share_one_slot(redis_url: str, key_prefix: str, lock_key: str) -> None:
    """admit writes the run lease, start mark, crash count (after a lost predecessor),
    lock and fencing counter; finish writes the completion record: one slot for all."""
    backend = RedisCoordinationBackend(redis_url, key_prefix, cluster=True)
    client = redis.Redis.from_url(redis_url)
    try:
        first = backend.admit("t1", owner="dead", lock_key=lock_key, **ADMIT)
        assert first.admission is Admission.ADMITTED
        backend.release("t1", lock_key, "dead")  # the start mark stays: a lost delivery
        again = backend.admit("t1", owner="o2", lock_key=lock_key, **ADMIT)
        assert (again.admission, again.lost_predecessor) == (Admission.ADMITTED, True)
        before = _slots(client, key_prefix)
        assert backend.finish(
            "t1", owner="o2", publish="p", lock_key=lock_key, succeeded=True, record_ttl=60.0
        ) is (lock_key is not None)
        written = {**before, **_slots(client, key_prefix)}
        kinds = {key.decode().rsplit(":", 2 if lock_key is None else 1)[0] for key in written}
        assert len(set(written.values())) == 1, written
        assert len(written) == (4 if lock_key is None else 6), kinds
    finally:
        backend.close()
        client.close()


def test_tasks_under_one_lock_meet_it_in_its_slot_and_others_spread(
    redis_url: str, key_prefix: str
) -> None:
    """The tag is the lock key when there is one, else the task id."""
    backend = RedisCoordinationBackend(redis_url, key_prefix, cluster=True)
    locked = [backend._keys(f"t{i}", "repo:1") for i in range(20)]
    free = [backend._keys(f"t{i}", None) for i in range(20)]
    backend.close()
    assert len({key_slot(k.encode()) for keys in locked for k in keys}) == 1
    assert len({key_slot(keys[0].encode()) for keys in free}) > 10


def test_plain_names_are_those_of_earlier_releases(redis_url: str, key_prefix: str) -> None:
    """Off Cluster nothing is tagged: a rolling upgrade shares leases with old workers."""
    backend = RedisCoordinationBackend(redis_url, key_prefix)
    keys = backend._keys("t1", "k")
    backend.close()
    p = key_prefix
    assert keys == [
        f"{p}:done:t1", f"{p}:run:t1", f"{p}:started:t1", f"{p}:crashes:t1",
        f"{p}:lock:k", f"{p}:fence:k",
    ]  # fmt: skip
