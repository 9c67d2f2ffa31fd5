"""``CoordinationBackendContract``: the suite every coordination backend passes."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery_resilience.backends.base import (
    Admission,
    AdmitResult,
    CoordinationBackend,
    HeldLock,
    LockListing,
)

if TYPE_CHECKING:
    pass

from celery_resilience.testing.contract import _cases, _Contract

_SHORT_LEASE = 0.2
"""A lease TTL (seconds) short enough for a test to wait it out."""

_ADMIT: dict[str, Any] = {
    "owner": "o1",
    "publish": "p1",
    "lock_key": None,
    "lease_ttl": 30.0,
    "max_crashes": 3,
    "record_ttl": 60.0,
}
_FINISH: dict[str, Any] = {
    "owner": "o1",
    "publish": "p1",
    "lock_key": None,
    "succeeded": True,
    "record_ttl": 60.0,
}


def _admit(backend: CoordinationBackend, task_id: str, **kw: Any) -> AdmitResult:
    """``backend.admit`` with the ``ADMIT`` arguments, overridden by ``kw``."""
    return backend.admit(task_id, **{**_ADMIT, **kw})


def _finish(backend: CoordinationBackend, task_id: str, **kw: Any) -> bool:
    """``backend.finish`` with the ``FINISH`` arguments, overridden by ``kw``."""
    return backend.finish(task_id, **{**_FINISH, **kw})


def _lose(
    backend: CoordinationBackend, task_id: str, owner: str, lock_key: str | None = None
) -> None:
    """Admit a delivery of ``owner`` that then dies: its leases expire unfinished."""
    result = _admit(backend, task_id, owner=owner, lock_key=lock_key, lease_ttl=_SHORT_LEASE)
    assert result.admission is Admission.ADMITTED
    _wait_out_leases()


def _wait_out_leases() -> None:
    time.sleep(_SHORT_LEASE + 0.1)


def _complete(
    backend: CoordinationBackend, task_id: str, *, owner: str = "o1", publish: str
) -> None:
    """Run one delivery of ``publish`` to a successful end."""
    assert _admit(backend, task_id, owner=owner, publish=publish).admission is Admission.ADMITTED
    _finish(backend, task_id, owner=owner, publish=publish)


MIXED_LOCK_KEYS = (
    "test_contended_delivery_removes_its_own_run_lease",
    "test_release_frees_the_run_lease_where_the_lock_is_another_owners",
    "test_renew_returns_false_when_the_lock_lease_is_another_owners",
)
"""The contract's tests that call about one task id with and without a lock key."""


def _run_lease_and_lock_elsewhere(backend: CoordinationBackend, owner: str) -> tuple[str, str]:
    """A new task id whose run lease ``owner`` holds, and a new lock key owner "x" holds
    (a state only a task id admitted without, then with, a lock key reaches)."""
    tid, key = _new_id(), _new_key()
    _admit(backend, tid, owner=owner)
    _admit(backend, _new_id(), owner="x", lock_key=key)
    return tid, key


def _lister(backend: CoordinationBackend) -> LockListing:
    """``backend`` as a ``LockListing``; the test is skipped for a backend without it
    (optional: only the web page's "Locks held" needs it)."""
    if not isinstance(backend, LockListing):
        import pytest

        pytest.skip(f"{type(backend).__name__} has no held_locks (optional)")
    return backend


def _held(backend: CoordinationBackend) -> dict[str, HeldLock]:
    return {lock.key: lock for lock in _lister(backend).held_locks()}


def _new_id() -> str:
    return uuid.uuid4().hex


def _new_key() -> str:
    return f"k-{_new_id()}"


def _outcome(result: AdmitResult) -> tuple[Admission, int, bool]:
    """What a caller branches on: the admission, the crash count, whether one was found."""
    return result.admission, result.crashes, result.lost_predecessor


class CoordinationBackendContract(_Contract):
    """The coordination backend contract: every built-in backend passes these tests.

    Subclass it in a test module as ``Test<YourBackend>`` and give it one fixture,
    ``backend_factory``: a callable that returns a new backend on the store under test,
    in the key namespace ``key_prefix`` (keyword, with a default of your choice). Each
    test gets a fresh factory and calls it once for its ``backend`` fixture (closed
    after the test) or several times, with other prefixes, to check that prefixes
    separate namespaces; backends from one factory share one store.
    ``functools.partial(backend_for, url)`` builds your backend through its plugin,
    as an app does. The tests wait out leases of 0.2 s, so the store must expire keys
    to the tenth of a second.

    Each test passes one lock key (or none) for all calls about a task id, as the
    gate does, except the ``MIXED_LOCK_KEYS`` tests: they build states that arise
    only when a task id's lock key changes between calls. A backend that keeps a task
    id's state under its lock key's hash tag (Redis Cluster) sets those to ``None``.
    """

    _fixture_name = "backend"

    # --- the backend itself ---------------------------------------------------------------

    def test_backend_satisfies_the_protocol(self, backend: CoordinationBackend) -> None:
        """The backend is a CoordinationBackend and answers ping."""
        assert isinstance(backend, CoordinationBackend)
        backend.ping()

    def test_prefix_separates_namespaces(
        self, backend_factory: Callable[..., CoordinationBackend]
    ) -> None:
        """Two prefixes on one store do not see each other's leases or records."""
        a, b = (backend_factory(key_prefix=f"namespace-{ns}") for ns in "ab")
        key, tid = _new_key(), _new_id()
        assert _admit(a, tid, owner="a", lock_key=key).admission is Admission.ADMITTED
        assert _admit(b, tid, owner="b", lock_key=key).admission is Admission.ADMITTED
        _finish(a, tid, owner="a", lock_key=key)
        assert _admit(b, tid, owner="b2", lock_key=key).admission is Admission.RUNNING
        a.close()
        b.close()

    def test_first_delivery_is_admitted_and_counted(self, backend: CoordinationBackend) -> None:
        """A new task id is admitted as delivery 1, without a fencing token when unlocked."""
        tid = _new_id()
        result = _admit(backend, tid)
        assert _outcome(result) == (Admission.ADMITTED, 0, False)
        assert result.deliveries == 1
        assert result.fencing_token is None
        assert backend.holds(tid, None, "o1") is True

    # --- completion records, per publish --------------------------------------------------

    def test_completed_task_id_is_a_duplicate(self, backend: CoordinationBackend) -> None:
        """After a successful finish, the same publish of the task id is refused, for any owner."""
        tid = _new_id()
        _admit(backend, tid)
        _finish(backend, tid, succeeded=True)
        assert _admit(backend, tid, owner="o2").admission is Admission.DUPLICATE
        assert _admit(backend, tid, owner="o3").admission is Admission.DUPLICATE
        assert backend.holds(tid, None, "o2") is False

    def test_completion_record_of_another_publish_does_not_block_a_new_publish(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """A new publish that reuses a completed task id runs; the completed publish does not."""
        tid = _new_id()
        _complete(backend, tid, publish="first")
        second = _admit(backend, tid, owner="o2", publish="second")
        assert _outcome(second) == (Admission.ADMITTED, 0, False)
        _finish(backend, tid, owner="o2", publish="second")
        assert _admit(backend, tid, owner="o3", publish="second").admission is Admission.DUPLICATE

    @_cases(
        ("recorded", "later"),
        [("p1", ""), ("", "p2"), ("", ""), ("1", "p2")],
        ids=["delivery-without-publish-id", "record-without-publish-id", "both-without", "legacy"],
    )
    def test_record_or_delivery_without_publish_id_is_a_duplicate(
        self, backend: CoordinationBackend, recorded: str, later: str
    ) -> None:
        """An empty publish, or a record of one (or '1', as older releases wrote), is DUPLICATE."""
        tid = _new_id()
        _complete(backend, tid, publish=recorded)
        assert _admit(backend, tid, owner="o2", publish=later).admission is Admission.DUPLICATE

    def test_failed_finish_leaves_no_completion_record(self, backend: CoordinationBackend) -> None:
        """A body that failed may run again (retry, replay): no completion record."""
        tid = _new_id()
        _admit(backend, tid)
        _finish(backend, tid, succeeded=False)
        assert _outcome(_admit(backend, tid, owner="o2")) == (Admission.ADMITTED, 0, False)

    def test_completion_record_expires_with_record_ttl(self, backend: CoordinationBackend) -> None:
        """The completion record lasts record_ttl seconds."""
        tid = _new_id()
        _admit(backend, tid)
        _finish(backend, tid, record_ttl=0.1)
        assert _admit(backend, tid, owner="o2").admission is Admission.DUPLICATE
        time.sleep(0.2)
        assert _admit(backend, tid, owner="o3").admission is Admission.ADMITTED

    def test_duplicate_is_decided_before_a_running_body(self, backend: CoordinationBackend) -> None:
        """A completed publish is DUPLICATE even while a later publish's body runs."""
        tid = _new_id()
        _complete(backend, tid, owner="a", publish="first")
        _admit(backend, tid, owner="b", publish="second")
        assert _admit(backend, tid, owner="c", publish="first").admission is Admission.DUPLICATE
        running = _admit(backend, tid, owner="c", publish="third")
        assert (running.admission, running.holder) == (Admission.RUNNING, "b")

    # --- run leases: one body per task id -------------------------------------------------

    def test_other_owners_run_lease_answers_running_and_changes_nothing(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """While one owner's body runs, another delivery gets RUNNING and takes nothing."""
        tid, key = _new_id(), _new_key()
        _admit(backend, tid, owner="a", lock_key=key)
        for _ in range(3):
            running = _admit(backend, tid, owner="b", lock_key=key, max_crashes=1)
            assert _outcome(running) == (Admission.RUNNING, 0, False)
            assert running.holder == "a"
            assert 25.0 < running.lease_remaining <= 30.0
            assert running.fencing_token is None
        assert backend.holds(tid, key, "a") is True
        assert backend.holds(tid, key, "b") is False
        assert _admit(backend, _new_id(), owner="x", lock_key=key).holder == "a"
        _finish(backend, tid, owner="a", lock_key=key, succeeded=False)
        admitted = _admit(backend, tid, owner="c", lock_key=key)
        assert _outcome(admitted) == (Admission.ADMITTED, 0, False)

    def test_admit_again_by_the_same_owner_is_admitted_without_a_crash(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """admit twice for one owner (a late retry of the call) admits it again, uncounted."""
        tid, key = _new_id(), _new_key()
        first = _admit(backend, tid, owner="a", lock_key=key)
        again = _admit(backend, tid, owner="a", lock_key=key)
        assert _outcome(again) == (Admission.ADMITTED, 0, False)
        assert first.fencing_token is not None
        assert again.fencing_token is not None
        assert again.fencing_token > first.fencing_token
        assert backend.holds(tid, key, "a") is True
        assert _finish(backend, tid, owner="a", lock_key=key) is True

    def test_same_owner_after_its_run_lease_expired_is_not_counted_as_lost(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """A start mark of the owner itself is its own: re-admitting it counts no crash."""
        tid = _new_id()
        _lose(backend, tid, "a")
        assert _outcome(_admit(backend, tid, owner="a")) == (Admission.ADMITTED, 0, False)

    def test_readmission_after_a_counted_crash_counts_it_once(
        self, backend: CoordinationBackend
    ) -> None:
        """The delivery that found a lost one and admits again does not count it a second time."""
        tid = _new_id()
        _lose(backend, tid, "dead")
        assert _outcome(_admit(backend, tid, owner="b")) == (Admission.ADMITTED, 1, True)
        again = _admit(backend, tid, owner="b")
        assert _outcome(again) == (Admission.ADMITTED, 1, False)
        assert again.deliveries == 2

    # --- adoptable owners: deliveries that gave up waiting --------------------------------

    def test_adoptable_owners_run_lease_is_adopted(self, backend: CoordinationBackend) -> None:
        """A run lease left by an adoptable owner's late admission admits the new delivery."""
        tid = _new_id()
        _admit(backend, tid, owner="gave-up")
        adopted = _admit(backend, tid, owner="b", adoptable=("earlier", "gave-up"))
        assert _outcome(adopted) == (Admission.ADMITTED, 0, False)
        assert backend.holds(tid, None, "b") is True
        assert backend.holds(tid, None, "gave-up") is False

    def test_adoptable_owners_lock_lease_is_adopted(self, backend: CoordinationBackend) -> None:
        """A lock lease of an adoptable owner is taken over with a larger fencing token."""
        tid, key = _new_id(), _new_key()
        left = _admit(backend, tid, owner="gave-up", lock_key=key)
        adopted = _admit(backend, tid, owner="b", lock_key=key, adoptable=("gave-up",))
        assert _outcome(adopted) == (Admission.ADMITTED, 0, False)
        assert left.fencing_token is not None
        assert adopted.fencing_token is not None
        assert adopted.fencing_token > left.fencing_token
        assert backend.holds(tid, key, "b") is True
        assert backend.holds(tid, key, "gave-up") is False

    def test_adoptable_owners_start_mark_is_not_counted_as_a_crash(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """An adoptable owner's expired delivery is this one's own, so no crash is counted."""
        adopted_tid, other_tid = _new_id(), _new_id()
        _lose(backend, adopted_tid, "gave-up")
        _lose(backend, other_tid, "gave-up")
        adopted = _admit(backend, adopted_tid, owner="b", adoptable=("gave-up",))
        assert _outcome(adopted) == (Admission.ADMITTED, 0, False)
        assert _outcome(_admit(backend, other_tid, owner="b")) == (Admission.ADMITTED, 1, True)

    def test_adoptable_does_not_adopt_other_owners(self, backend: CoordinationBackend) -> None:
        """Only the named owners are adopted: another owner's body still answers RUNNING."""
        tid = _new_id()
        _admit(backend, tid, owner="x")
        running = _admit(backend, tid, owner="b", adoptable=("gave-up",))
        assert (running.admission, running.holder) == (Admission.RUNNING, "x")

    # --- lost deliveries and the crash budget ---------------------------------------------

    def test_expired_run_lease_counts_the_delivery_as_lost(
        self, backend: CoordinationBackend
    ) -> None:
        """A delivery whose run lease expired before it finished is counted once as a crash."""
        tid = _new_id()
        _lose(backend, tid, "dead")
        found = _admit(backend, tid, owner="b")
        assert _outcome(found) == (Admission.ADMITTED, 1, True)
        assert found.deliveries == 2

    def test_released_run_lease_counts_the_delivery_as_lost(
        self, backend: CoordinationBackend
    ) -> None:
        """release() frees a dead holder's leases, keeps its start mark: the next one counts it."""
        tid, key = _new_id(), _new_key()
        _admit(backend, tid, owner="dead", lock_key=key)
        assert backend.release(tid, key, "dead") is True
        found = _admit(backend, tid, owner="b", lock_key=key)
        assert _outcome(found) == (Admission.ADMITTED, 1, True)
        assert found.fencing_token is not None

    def test_lost_deliveries_spend_the_crash_budget(self, backend: CoordinationBackend) -> None:
        """Each lost delivery counts once; at max_crashes the task id is refused."""
        tid = _new_id()
        seen = []
        for owner in ("d0", "d1"):
            seen.append(
                _outcome(_admit(backend, tid, owner=owner, lease_ttl=_SHORT_LEASE, max_crashes=2))
            )
            _wait_out_leases()
        seen += [_outcome(_admit(backend, tid, owner=o, max_crashes=2)) for o in ("d2", "d3")]
        assert seen == [
            (Admission.ADMITTED, 0, False),
            (Admission.ADMITTED, 1, True),
            (Admission.CRASH_BUDGET_SPENT, 2, True),
            (Admission.CRASH_BUDGET_SPENT, 2, False),
        ]

    def test_spent_crash_budget_takes_no_lease(self, backend: CoordinationBackend) -> None:
        """A delivery refused for the crash budget holds nothing, so it is never counted lost."""
        tid = _new_id()
        _lose(backend, tid, "dead")
        assert (
            _admit(backend, tid, owner="b", max_crashes=1).admission is Admission.CRASH_BUDGET_SPENT
        )
        assert backend.holds(tid, None, "b") is False
        assert _outcome(_admit(backend, tid, owner="c", max_crashes=5)) == (
            Admission.ADMITTED,
            1,
            False,
        )

    def test_finished_body_clears_carried_losses(self, backend: CoordinationBackend) -> None:
        """A body that ran to an end (even failing) resets the task's crash count."""
        tid = _new_id()
        _lose(backend, tid, "dead")
        assert _admit(backend, tid, owner="b").crashes == 1
        _finish(backend, tid, owner="b", succeeded=False)
        assert _outcome(_admit(backend, tid, owner="c")) == (Admission.ADMITTED, 0, False)

    def test_crash_count_expires_with_record_ttl(self, backend: CoordinationBackend) -> None:
        """The crash count of an abandoned task id does not live forever."""
        tid = _new_id()
        _lose(backend, tid, "dead")
        assert _admit(backend, tid, owner="b", lease_ttl=0.1, record_ttl=0.2).crashes == 1
        time.sleep(0.3)
        assert _outcome(_admit(backend, tid, owner="c")) == (Admission.ADMITTED, 0, False)

    def test_crash_budget_is_decided_before_lock_contention(
        self, backend: CoordinationBackend
    ) -> None:
        """A lost delivery found while the lock is held elsewhere still spends the budget."""
        tid, key = _new_id(), _new_key()
        _lose(backend, tid, "dead", lock_key=key)
        _admit(backend, _new_id(), owner="x", lock_key=key)
        spent = _admit(backend, tid, owner="b", lock_key=key, max_crashes=1)
        assert _outcome(spent) == (Admission.CRASH_BUDGET_SPENT, 1, True)

    def test_lost_deliveries_carry_over_when_the_redelivery_is_contended(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """A loss found by a contended delivery is kept and counted once."""
        tid, key = _new_id(), _new_key()
        _lose(backend, tid, "dead", lock_key=key)
        _admit(backend, _new_id(), owner="x", lock_key=key, lease_ttl=_SHORT_LEASE)
        contended = _admit(backend, tid, owner="b", lock_key=key)
        assert _outcome(contended) == (Admission.LOCK_CONTENDED, 1, True)
        _wait_out_leases()
        assert _outcome(_admit(backend, tid, owner="c", lock_key=key)) == (
            Admission.ADMITTED,
            1,
            False,
        )

    # --- lock leases and fencing tokens ---------------------------------------------------

    def test_lock_is_exclusive_until_released_by_its_owner(
        self, backend: CoordinationBackend
    ) -> None:
        """A held lock lease refuses other owners, naming the holder; only its owner frees it."""
        key = f"k-{_new_id()}"
        first_tid = _new_id()
        first = _admit(backend, first_tid, owner="a", lock_key=key)
        assert first.admission is Admission.ADMITTED
        assert first.fencing_token is not None
        other_tid = _new_id()
        held = _admit(backend, other_tid, owner="b", lock_key=key)
        assert (held.admission, held.holder, held.fencing_token) == (
            Admission.LOCK_CONTENDED,
            "a",
            None,
        )
        assert 25.0 < held.lease_remaining <= 30.0
        assert _finish(backend, other_tid, owner="b", lock_key=key, succeeded=False) is False
        assert (
            _admit(backend, _new_id(), owner="c", lock_key=key).admission
            is Admission.LOCK_CONTENDED
        )
        assert _finish(backend, first_tid, owner="a", lock_key=key) is True
        assert _admit(backend, _new_id(), owner="c", lock_key=key).admission is Admission.ADMITTED

    def test_contended_attempt_does_not_count_as_a_crash(
        self, backend: CoordinationBackend
    ) -> None:
        """A delivery refused by the lock leaves no start mark, so it is never counted lost."""
        key, holder_tid, tid = _new_key(), _new_id(), _new_id()
        _admit(backend, holder_tid, owner="a", lock_key=key)
        for owner in ("b1", "b2", "b3"):
            result = _admit(backend, tid, owner=owner, lock_key=key, max_crashes=1)
            assert _outcome(result) == (Admission.LOCK_CONTENDED, 0, False)
        assert backend.holds(tid, None, "b3") is False
        _finish(backend, holder_tid, owner="a", lock_key=key)
        admitted = _admit(backend, tid, owner="c", lock_key=key, max_crashes=1)
        assert _outcome(admitted) == (Admission.ADMITTED, 0, False)

    def test_contended_delivery_removes_its_own_run_lease(
        self, backend: CoordinationBackend
    ) -> None:
        """A delivery meeting the lock after taking its run lease gives the lease up uncounted."""
        tid, key = _run_lease_and_lock_elsewhere(backend, "b")
        assert _admit(backend, tid, owner="b", lock_key=key).admission is Admission.LOCK_CONTENDED
        assert backend.holds(tid, None, "b") is False
        assert _outcome(_admit(backend, tid, owner="c")) == (Admission.ADMITTED, 0, False)

    @_cases(
        ("owner", "adoptable"), [("b", ()), ("b2", ("b",))], ids=["same-owner", "adoptable-owner"]
    )
    def test_contended_delivery_removes_its_own_start_mark(
        self, backend: CoordinationBackend, owner: str, adoptable: tuple[str, ...]
    ) -> None:
        """A leftover start mark of this delivery's own is removed on contention, never counted."""
        tid, key, other = _new_id(), _new_key(), _new_id()
        _lose(backend, tid, "b", lock_key=key)
        _admit(backend, other, owner="x", lock_key=key)
        contended = _admit(backend, tid, owner=owner, lock_key=key, adoptable=adoptable)
        assert _outcome(contended) == (Admission.LOCK_CONTENDED, 0, False)
        _finish(backend, other, owner="x", lock_key=key)
        admitted = _admit(backend, tid, owner="c", lock_key=key)
        assert _outcome(admitted) == (Admission.ADMITTED, 0, False)

    def test_owner_release_frees_the_key_for_the_next_owner(
        self, backend: CoordinationBackend
    ) -> None:
        """finish() by the owner releases the lease and the next owner gets a larger token."""
        key = f"k-{_new_id()}"
        tid = _new_id()
        first = _admit(backend, tid, owner="a", lock_key=key)
        assert _finish(backend, tid, owner="a", lock_key=key) is True
        second = _admit(backend, _new_id(), owner="b", lock_key=key)
        assert second.admission is Admission.ADMITTED
        assert second.fencing_token is not None
        assert first.fencing_token is not None
        assert second.fencing_token > first.fencing_token

    def test_fencing_tokens_strictly_increase_per_key(self, backend: CoordinationBackend) -> None:
        """Many acquisitions in a row get strictly increasing tokens."""
        key = f"k-{_new_id()}"
        tokens: list[int] = []
        for i in range(50):
            tid = _new_id()
            result = _admit(backend, tid, owner=f"o{i}", lock_key=key)
            assert result.fencing_token is not None
            tokens.append(result.fencing_token)
            _finish(backend, tid, owner=f"o{i}", lock_key=key)
        assert all(b > a for a, b in itertools.pairwise(tokens))

    def test_fencing_tokens_keep_increasing_after_the_counter_expired(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """The per-key token counter expires with record_ttl; later tokens are still larger."""
        key = f"k-{_new_id()}"
        tid = _new_id()
        first = _admit(backend, tid, owner="a", lock_key=key, record_ttl=0.05)
        _finish(backend, tid, owner="a", lock_key=key, record_ttl=0.05)
        time.sleep(0.1)
        second = _admit(backend, _new_id(), owner="b", lock_key=key, record_ttl=0.05)
        assert first.fencing_token is not None
        assert second.fencing_token is not None
        assert second.fencing_token > first.fencing_token

    def test_expired_lease_is_free_for_another_owner(self, backend: CoordinationBackend) -> None:
        """A holder that stops renewing loses the key within one TTL."""
        key, tid = _new_key(), _new_id()
        _lose(backend, tid, "dead", lock_key=key)
        assert _admit(backend, _new_id(), owner="b", lock_key=key).admission is Admission.ADMITTED
        assert backend.renew(tid, key, "dead", 30.0) is False

    # --- finish ---------------------------------------------------------------------------

    def test_finish_releases_only_the_owners_leases(self, backend: CoordinationBackend) -> None:
        """Another owner's finish leaves the holder's run and lock leases in place."""
        tid, key = _new_id(), _new_key()
        _admit(backend, tid, owner="a", lock_key=key)
        assert _finish(backend, tid, owner="b", lock_key=key, succeeded=False) is False
        assert backend.holds(tid, key, "a") is True
        assert _admit(backend, tid, owner="c", lock_key=key).admission is Admission.RUNNING

    def test_finish_without_a_lock_returns_false_and_frees_the_run_lease(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """finish() with no lock key releases no lock lease; the next delivery runs uncounted."""
        tid = _new_id()
        _admit(backend, tid, owner="a")
        assert _finish(backend, tid, owner="a", succeeded=False) is False
        assert backend.holds(tid, None, "a") is False
        assert _outcome(_admit(backend, tid, owner="b")) == (Admission.ADMITTED, 0, False)

    def test_late_finish_of_a_lost_lease_does_not_release_the_new_owner(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """Compare-and-delete: an old owner finishing late leaves the new owner's leases."""
        tid, key = _new_id(), _new_key()
        _lose(backend, tid, "old", lock_key=key)
        assert _admit(backend, tid, owner="new", lock_key=key).admission is Admission.ADMITTED
        assert _finish(backend, tid, owner="old", lock_key=key, succeeded=False) is False
        assert backend.holds(tid, key, "new") is True
        assert (
            _admit(backend, _new_id(), owner="x", lock_key=key).admission
            is Admission.LOCK_CONTENDED
        )

    def test_finish_twice_leaves_the_state_of_one_finish(
        self, backend: CoordinationBackend
    ) -> None:
        """A repeated finish releases nothing more and keeps the completion record."""
        tid, key = _new_id(), _new_key()
        _admit(backend, tid, owner="a", lock_key=key)
        assert _finish(backend, tid, owner="a", lock_key=key) is True
        assert _finish(backend, tid, owner="a", lock_key=key) is False
        assert _admit(backend, tid, owner="b", lock_key=key).admission is Admission.DUPLICATE
        assert _admit(backend, _new_id(), owner="b", lock_key=key).admission is Admission.ADMITTED

    # --- release, renew, holds ------------------------------------------------------------

    def test_contended_admit_names_the_holder_and_release_is_owner_only(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """A contended admit reports who holds the key; only that owner's release frees it."""
        key, tid = _new_key(), _new_id()
        _admit(backend, tid, owner="holder-1", lock_key=key)
        contended = _admit(backend, _new_id(), owner="other", lock_key=key)
        assert contended.holder == "holder-1"
        assert backend.release(tid, key, "other") is False
        assert backend.holds(tid, key, "holder-1") is True
        assert backend.release(tid, key, "holder-1") is True
        assert backend.release(tid, key, "holder-1") is False
        assert (
            _admit(backend, _new_id(), owner="next", lock_key=key).admission is Admission.ADMITTED
        )

    def test_release_frees_the_run_lease_where_the_lock_is_another_owners(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """release() deletes each lease the owner holds and leaves the others' lock lease."""
        tid, key = _run_lease_and_lock_elsewhere(backend, "a")
        assert backend.release(tid, key, "a") is True
        assert backend.holds(tid, None, "a") is False
        assert _admit(backend, _new_id(), owner="y", lock_key=key).holder == "x"

    def test_renew_extends_only_the_owners_lease(self, backend: CoordinationBackend) -> None:
        """renew() keeps the owner's leases alive past their first TTL and refuses others."""
        key, tid = _new_key(), _new_id()
        _admit(backend, tid, owner="a", lock_key=key, lease_ttl=0.3)
        for _ in range(4):
            time.sleep(0.1)
            assert backend.renew(tid, key, "a", 0.3) is True
        assert backend.renew(tid, key, "b", 0.3) is False
        assert backend.holds(tid, key, "a") is True
        assert _admit(backend, tid, owner="b", lock_key=key).admission is Admission.RUNNING
        contended = _admit(backend, _new_id(), owner="b", lock_key=key)
        assert contended.admission is Admission.LOCK_CONTENDED

    def test_renew_returns_false_once_the_run_lease_expired(
        self, backend: CoordinationBackend
    ) -> None:
        """A run lease that expired is lost: renew() says so and does not bring it back."""
        tid = _new_id()
        _lose(backend, tid, "a")
        assert backend.renew(tid, None, "a", 30.0) is False
        assert backend.holds(tid, None, "a") is False

    def test_renew_returns_false_when_the_lock_lease_is_another_owners(
        self,
        backend: CoordinationBackend,
    ) -> None:
        """Holding the run lease is not enough: a lock lease held elsewhere makes renew() False."""
        tid, key = _run_lease_and_lock_elsewhere(backend, "a")
        assert backend.renew(tid, None, "a", 30.0) is True
        assert backend.renew(tid, key, "a", 30.0) is False

    def test_holds_tells_whether_the_owner_holds_every_lease(
        self, backend: CoordinationBackend
    ) -> None:
        """holds() is True for the admitted owner's run and lock leases, False otherwise."""
        tid, key, other_key = _new_id(), _new_key(), _new_key()
        _admit(backend, tid, owner="a", lock_key=key)
        _admit(backend, _new_id(), owner="x", lock_key=other_key)
        assert backend.holds(tid, key, "a") is True
        assert backend.holds(tid, key, "b") is False
        assert backend.holds(tid, other_key, "a") is False
        assert backend.holds(_new_id(), None, "a") is False
        _finish(backend, tid, owner="a", lock_key=key)
        assert backend.holds(tid, key, "a") is False

    # --- listing held locks (optional: LockListing) ---------------------------------------

    def test_held_locks_name_each_holder_its_token_and_times(
        self, backend: CoordinationBackend
    ) -> None:
        """Each lock held is listed once, sorted by key, with its holder, the token its
        acquisition got, the seconds left of its lease and the seconds held so far."""
        keys = sorted(_new_key() for _ in range(3))
        tokens = {}
        for i, key in enumerate(keys):
            tokens[key] = _admit(backend, _new_id(), owner=f"o{i}", lock_key=key).fencing_token
        _admit(backend, _new_id(), owner="no-lock")
        held = _lister(backend).held_locks()
        assert [lock.key for lock in held] == keys
        for i, lock in enumerate(held):
            assert lock.holder == f"o{i}"
            assert lock.fencing_token == tokens[lock.key]
            assert 0 < lock.expires_in <= _ADMIT["lease_ttl"]
            assert lock.held_for is not None
            assert 0 <= lock.held_for < 10

    def test_held_locks_count_from_the_acquisition_not_the_renewal(
        self, backend: CoordinationBackend
    ) -> None:
        """A renewal extends ``expires_in``; ``held_for`` keeps counting from the admission."""
        key, tid = _new_key(), _new_id()
        _admit(backend, tid, lock_key=key, lease_ttl=1.0)
        time.sleep(0.3)
        assert backend.renew(tid, key, "o1", 30.0) is True
        lock = _held(backend)[key]
        assert lock.expires_in > 1.0
        assert lock.held_for is not None
        assert lock.held_for >= 0.3

    def test_held_locks_leave_out_freed_expired_and_other_prefixes_locks(
        self, backend_factory: Callable[..., CoordinationBackend]
    ) -> None:
        """A lock finished, released or expired is not listed, nor one of another prefix."""
        a, b = (backend_factory(key_prefix=f"held-{ns}") for ns in "ab")
        finished, released, expired, kept = (_new_key() for _ in range(4))
        ids = {key: _new_id() for key in (finished, released, expired, kept)}
        for key in (finished, released, kept):
            _admit(a, ids[key], lock_key=key)
        _admit(a, ids[expired], lock_key=expired, lease_ttl=_SHORT_LEASE)
        _admit(b, _new_id(), owner="b", lock_key=_new_key())
        _finish(a, ids[finished], lock_key=finished)
        a.release(ids[released], released, "o1")
        _wait_out_leases()
        assert list(_held(a)) == [kept]
        assert len(_held(b)) == 1
        a.close()
        b.close()

    def test_held_locks_keep_keys_as_rendered_and_stop_at_the_limit(
        self, backend: CoordinationBackend
    ) -> None:
        """Keys with the characters of a SCAN pattern, colons and non-ASCII text come back
        as the task rendered them; at most ``limit`` locks come back."""
        tag = _new_id()[:8]
        keys = sorted(f"{tag}:{s}" for s in ("a*b", "q?[x]", "lock:x:lock:x", "}{", "día\\"))
        for key in keys:
            _admit(backend, _new_id(), lock_key=key)
        assert sorted(_held(backend)) == keys
        assert len(_lister(backend).held_locks(limit=2)) == 2

    # --- dedup keys -----------------------------------------------------------------------

    def test_dedup_key_is_taken_once_and_names_its_holder(
        self, backend: CoordinationBackend
    ) -> None:
        """The first claim takes a free key; another task's claim gets the holder's id and
        changes nothing; the holder's own claim again keeps it."""
        key, first, second = _new_key(), _new_id(), _new_id()
        assert backend.dedup_claim(key, first, ttl=60) is None
        assert backend.dedup_claim(key, second, ttl=60) == first
        assert backend.dedup_claim(key, first, ttl=60) is None
        assert backend.dedup_claim(key, second, ttl=60) == first

    def test_dedup_release_is_the_holders_only(self, backend: CoordinationBackend) -> None:
        """Only the holding task frees a key; once freed, the next claim takes it."""
        key, first, second = _new_key(), _new_id(), _new_id()
        backend.dedup_claim(key, first, ttl=60)
        assert backend.dedup_release(key, second) is False
        assert backend.dedup_claim(key, second, ttl=60) == first
        assert backend.dedup_release(key, first) is True
        assert backend.dedup_release(key, first) is False
        assert backend.dedup_claim(key, second, ttl=60) is None

    def test_dedup_claim_takes_over_only_the_holder_found_done(
        self, backend: CoordinationBackend
    ) -> None:
        """``stale`` names the holder the caller found done: that one is replaced, another
        holder (the key changed hands meanwhile) is not."""
        key, done, live, new = _new_key(), _new_id(), _new_id(), _new_id()
        backend.dedup_claim(key, done, ttl=60)
        assert backend.dedup_claim(key, new, ttl=60, stale=done) is None
        assert backend.dedup_claim(key, live, ttl=60) == new
        assert backend.dedup_claim(key, live, ttl=60, stale=done) == new

    def test_dedup_key_expires_after_its_ttl(self, backend: CoordinationBackend) -> None:
        """A key never released is free once its TTL has passed."""
        key, first, second = _new_key(), _new_id(), _new_id()
        backend.dedup_claim(key, first, ttl=_SHORT_LEASE)
        assert backend.dedup_claim(key, second, ttl=60) == first
        _wait_out_leases()
        assert backend.dedup_claim(key, second, ttl=60) is None

    def test_dedup_keys_are_apart_from_locks_and_prefixes(
        self, backend_factory: Callable[..., CoordinationBackend]
    ) -> None:
        """A dedup key does not hold the lock of the same text, nor the key of another prefix."""
        a, b = (backend_factory(key_prefix=f"dedup-{ns}") for ns in "ab")
        key = _new_key()
        assert a.dedup_claim(key, "t1", ttl=60) is None
        assert _admit(a, _new_id(), lock_key=key).admission is Admission.ADMITTED
        assert b.dedup_claim(key, "t2", ttl=60) is None
        a.close()
        b.close()

    def test_racing_dedup_claims_take_one_holder(self, backend: CoordinationBackend) -> None:
        """Of 8 threads claiming one free key at once, exactly one takes it, and the others
        all name it."""
        key, ids = _new_key(), [_new_id() for _ in range(8)]
        barrier = threading.Barrier(len(ids))

        def claim(task_id: str) -> str | None:
            barrier.wait()
            return backend.dedup_claim(key, task_id, ttl=60)

        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            holders = list(pool.map(claim, ids))
        winners = [tid for tid, holder in zip(ids, holders, strict=True) if holder is None]
        assert len(winners) == 1
        assert holders.count(winners[0]) == len(ids) - 1
