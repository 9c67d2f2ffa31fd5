"""The coordination backend contract, run against every built-in backend."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import pytest

from celery_resilience.backends.base import Admission, CoordinationBackend
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.runtime import build_backend
from celery_resilience.settings import load_settings


@pytest.fixture
def backend(backend_url: str, key_prefix: str) -> Iterator[CoordinationBackend]:
    """A backend built the way the library builds it: through the plugin hook."""
    settings = load_settings(
        {"resilience_url": backend_url, "resilience_key_prefix": key_prefix}, environ={}
    )
    b = build_backend(get_plugin_manager(), settings)
    yield b
    b.close()


def admit(backend: CoordinationBackend, task_id: str, attempt: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    params: dict[str, object] = {
        "owner": "o1",
        "lock_key": None,
        "lease_ttl": 30.0,
        "max_crashes": 3,
        "record_ttl": 60.0,
    }
    params.update(kw)
    return backend.admit(task_id, attempt, **params)  # type: ignore[arg-type]


def finish(backend: CoordinationBackend, task_id: str, attempt: int = 0, **kw: object) -> bool:
    params: dict[str, object] = {
        "owner": "o1",
        "lock_key": None,
        "succeeded": True,
        "record_ttl": 60.0,
    }
    params.update(kw)
    return backend.finish(task_id, attempt, **params)  # type: ignore[arg-type]


def new_id() -> str:
    return uuid.uuid4().hex


def test_backend_satisfies_the_protocol(backend: CoordinationBackend) -> None:
    """Each built-in backend is a CoordinationBackend and answers ping."""
    assert isinstance(backend, CoordinationBackend)
    backend.ping()


def test_first_delivery_is_admitted_and_counted(backend: CoordinationBackend) -> None:
    """A new task id is admitted as delivery 1, without a fencing token when unlocked."""
    result = admit(backend, new_id())
    assert result.admission is Admission.ADMITTED
    assert result.deliveries == 1
    assert result.fencing_token is None


def test_completed_task_id_is_a_duplicate(backend: CoordinationBackend) -> None:
    """After a successful finish, the same task id is refused as a duplicate, any attempt."""
    tid = new_id()
    admit(backend, tid)
    finish(backend, tid, succeeded=True)
    assert admit(backend, tid).admission is Admission.DUPLICATE
    assert admit(backend, tid, attempt=4).admission is Admission.DUPLICATE


def test_failed_finish_leaves_no_completion_record(backend: CoordinationBackend) -> None:
    """A body that failed may run again (retry, replay): no completion record."""
    tid = new_id()
    admit(backend, tid)
    finish(backend, tid, succeeded=False)
    result = admit(backend, tid)
    assert result.admission is Admission.ADMITTED
    assert result.deliveries == 1


def test_lost_deliveries_spend_the_crash_budget(backend: CoordinationBackend) -> None:
    """Deliveries never finished count per attempt; past max_crashes the attempt is refused."""
    tid = new_id()
    seen = [admit(backend, tid, max_crashes=2) for _ in range(4)]
    assert [r.admission for r in seen] == [
        Admission.ADMITTED,
        Admission.ADMITTED,
        Admission.CRASH_BUDGET_SPENT,
        Admission.CRASH_BUDGET_SPENT,
    ]
    assert [r.deliveries for r in seen] == [1, 2, 3, 4]
    assert admit(backend, tid, attempt=1, max_crashes=2).deliveries == 1


def test_delivery_counter_expires_with_record_ttl(backend: CoordinationBackend) -> None:
    """The delivery counter of an abandoned attempt does not live forever."""
    tid = new_id()
    admit(backend, tid, record_ttl=0.05)
    time.sleep(0.12)
    assert admit(backend, tid).deliveries == 1


def test_lock_is_exclusive_until_released_by_its_owner(backend: CoordinationBackend) -> None:
    """A held lease refuses other owners; only the owner's finish releases it."""
    key = f"k-{new_id()}"
    first = admit(backend, new_id(), owner="a", lock_key=key, lease_ttl=30.0)
    assert first.admission is Admission.ADMITTED
    assert first.fencing_token is not None
    other_tid = new_id()
    held = admit(backend, other_tid, owner="b", lock_key=key, lease_ttl=30.0)
    assert held.admission is Admission.LOCK_CONTENDED
    assert 25.0 < held.lease_remaining <= 30.0
    assert finish(backend, other_tid, owner="b", lock_key=key, succeeded=False) is False
    assert admit(backend, new_id(), owner="c", lock_key=key).admission is Admission.LOCK_CONTENDED


def test_contended_attempt_does_not_count_as_a_crash(backend: CoordinationBackend) -> None:
    """An attempt refused by the lock ends in a retry, so its delivery is not counted."""
    key = f"k-{new_id()}"
    admit(backend, new_id(), owner="a", lock_key=key)
    tid = new_id()
    for _ in range(5):
        result = admit(backend, tid, owner="b", lock_key=key, max_crashes=1)
        assert result.admission is Admission.LOCK_CONTENDED


def test_lost_deliveries_carry_over_when_the_redelivery_is_contended(
    backend: CoordinationBackend,
) -> None:
    """A crashed holder's redelivery that meets its own dead lease keeps its crash count."""
    key = f"k-{new_id()}"
    tid = new_id()
    admit(backend, tid, owner="d1", lock_key=key, lease_ttl=0.2)  # runs, is lost
    contended = admit(backend, tid, owner="d2", lock_key=key, lease_ttl=0.2)
    assert contended.admission is Admission.LOCK_CONTENDED
    time.sleep(0.3)  # the dead holder's lease expires; the retry (attempt 1) runs
    retry = admit(backend, tid, attempt=1, owner="d3", lock_key=key, lease_ttl=0.2)
    assert retry.admission is Admission.ADMITTED
    assert (retry.deliveries, retry.lost, retry.crashes) == (1, 1, 1)


def test_carried_losses_spend_the_budget_of_a_locked_poison_task(
    backend: CoordinationBackend,
) -> None:
    """Crash, contended redelivery, retry, crash: max_crashes=2 stops the second redelivery."""
    key = f"k-{new_id()}"
    tid = new_id()
    seen = []
    for attempt in range(2):
        for owner in ("run", "redelivery"):
            result = admit(
                backend,
                tid,
                attempt,
                owner=f"{owner}{attempt}",
                lock_key=key,
                lease_ttl=0.1,
                max_crashes=2,
            )
            seen.append(result.admission)
        time.sleep(0.15)  # the dead holder's lease expires
    assert seen == [
        Admission.ADMITTED,
        Admission.LOCK_CONTENDED,
        Admission.ADMITTED,
        Admission.CRASH_BUDGET_SPENT,
    ]


def test_finished_body_clears_carried_losses(backend: CoordinationBackend) -> None:
    """A body that ran to an end (even failing) resets the task's crash history."""
    key = f"k-{new_id()}"
    tid = new_id()
    admit(backend, tid, owner="a", lock_key=key, lease_ttl=0.1)
    admit(backend, tid, owner="b", lock_key=key, lease_ttl=0.1)
    time.sleep(0.15)
    assert admit(backend, tid, attempt=1, owner="c", lock_key=key).lost == 1
    finish(backend, tid, attempt=1, owner="c", lock_key=key, succeeded=False)
    assert admit(backend, tid, attempt=2, owner="d", lock_key=key).lost == 0


def test_owner_release_frees_the_key_for_the_next_owner(backend: CoordinationBackend) -> None:
    """finish() by the owner releases the lease and the next owner gets a larger token."""
    key = f"k-{new_id()}"
    tid = new_id()
    first = admit(backend, tid, owner="a", lock_key=key)
    assert finish(backend, tid, owner="a", lock_key=key) is True
    second = admit(backend, new_id(), owner="b", lock_key=key)
    assert second.admission is Admission.ADMITTED
    assert second.fencing_token is not None
    assert first.fencing_token is not None
    assert second.fencing_token > first.fencing_token


def test_fencing_tokens_strictly_increase_per_key(backend: CoordinationBackend) -> None:
    """Many acquisitions in a row get strictly increasing tokens."""
    key = f"k-{new_id()}"
    tokens = []
    for i in range(50):
        tid = new_id()
        result = admit(backend, tid, owner=f"o{i}", lock_key=key)
        tokens.append(result.fencing_token)
        finish(backend, tid, owner=f"o{i}", lock_key=key)
    assert all(b > a for a, b in itertools.pairwise(tokens))


def test_expired_lease_is_free_for_another_owner(backend: CoordinationBackend) -> None:
    """A holder that stops renewing loses the key within one TTL."""
    key = f"k-{new_id()}"
    admit(backend, new_id(), owner="dead", lock_key=key, lease_ttl=0.1)
    time.sleep(0.2)
    assert admit(backend, new_id(), owner="b", lock_key=key).admission is Admission.ADMITTED
    assert backend.renew(key, "dead", 30.0) is False


def test_renew_extends_only_the_owners_lease(backend: CoordinationBackend) -> None:
    """renew() keeps the owner's lease alive past its first TTL and refuses others."""
    key = f"k-{new_id()}"
    admit(backend, new_id(), owner="a", lock_key=key, lease_ttl=0.3)
    for _ in range(4):
        time.sleep(0.1)
        assert backend.renew(key, "a", 0.3) is True
    assert backend.renew(key, "b", 0.3) is False
    contended = admit(backend, new_id(), owner="b", lock_key=key)
    assert contended.admission is Admission.LOCK_CONTENDED


def test_late_finish_of_a_lost_lease_does_not_release_the_new_owner(
    backend: CoordinationBackend,
) -> None:
    """Compare-and-delete: an old owner finishing late leaves the new owner's lease."""
    key = f"k-{new_id()}"
    old = new_id()
    admit(backend, old, owner="old", lock_key=key, lease_ttl=0.1)
    time.sleep(0.2)
    admit(backend, new_id(), owner="new", lock_key=key, lease_ttl=30.0)
    assert finish(backend, old, owner="old", lock_key=key) is False
    assert admit(backend, new_id(), owner="x", lock_key=key).admission is Admission.LOCK_CONTENDED


def test_completion_record_expires_with_record_ttl(backend: CoordinationBackend) -> None:
    """The completion record lasts record_ttl seconds."""
    tid = new_id()
    admit(backend, tid)
    finish(backend, tid, record_ttl=0.1)
    assert admit(backend, tid).admission is Admission.DUPLICATE
    time.sleep(0.2)
    assert admit(backend, tid).admission is Admission.ADMITTED


def test_prefix_separates_namespaces(backend_url: str, key_prefix: str) -> None:
    """Two prefixes on one store do not see each other's leases or records."""
    pm = get_plugin_manager()
    a, b = (
        build_backend(
            pm,
            load_settings(
                {"resilience_url": backend_url, "resilience_key_prefix": f"{key_prefix}:{ns}"},
                environ={},
            ),
        )
        for ns in "ab"
    )
    key = f"k-{new_id()}"
    assert admit(a, new_id(), lock_key=key).admission is Admission.ADMITTED
    assert admit(b, new_id(), lock_key=key).admission is Admission.ADMITTED
    a.close()
    b.close()


def test_fencing_tokens_keep_increasing_after_the_counter_expired(
    backend: CoordinationBackend,
) -> None:
    """The per-key token counter expires with record_ttl; later tokens are still larger."""
    key = f"k-{new_id()}"
    tid = new_id()
    first = admit(backend, tid, owner="a", lock_key=key, record_ttl=0.05)
    finish(backend, tid, owner="a", lock_key=key, record_ttl=0.05)
    time.sleep(0.1)
    second = admit(backend, new_id(), owner="b", lock_key=key, record_ttl=0.05)
    assert first.fencing_token is not None
    assert second.fencing_token is not None
    assert second.fencing_token > first.fencing_token


def test_contended_admit_names_the_holder_and_release_is_owner_only(
    backend: CoordinationBackend,
) -> None:
    """A contended admit reports who holds the key; only that owner's release frees it."""
    key = f"k-{new_id()}"
    admit(backend, new_id(), owner="holder-1", lock_key=key)
    contended = admit(backend, new_id(), owner="other", lock_key=key)
    assert contended.holder == "holder-1"
    assert backend.release(key, "other") is False
    assert backend.release(key, "holder-1") is True
    assert backend.release(key, "holder-1") is False
    assert admit(backend, new_id(), owner="next", lock_key=key).admission is Admission.ADMITTED
