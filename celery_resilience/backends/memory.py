"""``memory://``: an in-process backend for unit tests, eager mode and the demo.

State lives in this process only, so with the prefork pool each child has its own:
leases and crash budgets then do not hold across children. The worker warns about it.
Backends built from the same URL in one process share one store.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery_resilience.backends.base import Admission, AdmitResult, HeldLock, held_for
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings


def fence_token(previous: int, now_us: int) -> int:
    """Return the next fencing token: ``max(previous + 1, now_us)``.

    Tying tokens to the clock keeps them increasing even after the stored token of
    an idle key has expired. Redis' Lua script computes the same.
    """
    return max(previous + 1, now_us)


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    # key -> (value, expires at on time.monotonic(), or None for no expiry)
    data: dict[str, tuple[Any, float | None]] = field(default_factory=dict)

    def get(self, key: str, now: float) -> Any:
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= now:
            del self.data[key]
            return None
        return value

    def ttl(self, key: str, now: float) -> float:
        item = self.data.get(key)
        if item is None or item[1] is None:
            return 0.0
        return max(0.0, item[1] - now)

    def set(self, key: str, value: Any, ttl: float | None, now: float) -> None:
        self.data[key] = (value, None if ttl is None else now + ttl)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _store_for(url: str) -> _Store:
    with _STORES_LOCK:
        return _STORES.setdefault(url, _Store())


class MemoryCoordinationBackend:
    """In-process ``celery_resilience.backends.base.CoordinationBackend``."""

    def __init__(self, url: str = "memory://", key_prefix: str = "celery_resilience") -> None:
        self.url = url
        self._prefix = key_prefix
        self._store = _store_for(url)

    def _keys(self, task_id: str) -> tuple[str, str, str, str]:
        p = self._prefix
        return (
            f"{p}:done:{task_id}",
            f"{p}:run:{task_id}",
            f"{p}:started:{task_id}",
            f"{p}:crashes:{task_id}",
        )

    def _lock_keys(self, lock_key: str) -> tuple[str, str]:
        return f"{self._prefix}:lock:{lock_key}", f"{self._prefix}:fence:{lock_key}"

    def _leases(self, task_id: str, lock_key: str | None) -> list[str]:
        keys = [f"{self._prefix}:run:{task_id}"]
        return keys if lock_key is None else [*keys, self._lock_keys(lock_key)[0]]

    def admit(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
        adoptable: tuple[str, ...] = (),
    ) -> AdmitResult:
        done_key, run_key, started_key, crashes_key = self._keys(task_id)
        own = {owner, *adoptable}
        store = self._store
        with store.lock:
            now = time.monotonic()
            done = store.get(done_key, now)
            if done is not None and (done in (publish, "1") or not publish):
                return AdmitResult(Admission.DUPLICATE)
            run = store.get(run_key, now)
            if run is not None and run not in own:
                return AdmitResult(
                    Admission.RUNNING, lease_remaining=store.ttl(run_key, now), holder=run
                )
            crashes = store.get(crashes_key, now) or 0
            started = store.get(started_key, now)
            lost = started is not None and started not in own and run is None
            if lost:
                crashes += 1
                store.set(crashes_key, crashes, record_ttl, now)
                store.data.pop(started_key, None)
                started = None
            if crashes >= max_crashes:
                return AdmitResult(Admission.CRASH_BUDGET_SPENT, crashes, lost_predecessor=lost)
            lease = fence = ""
            holder = None
            if lock_key is not None:
                lease, fence = self._lock_keys(lock_key)
                holder = store.get(lease, now)
            if holder is not None and holder not in own:
                # this delivery's own (adopted) run lease and start mark go: it retries
                store.data.pop(run_key, None)
                store.data.pop(started_key, None)
                return AdmitResult(
                    Admission.LOCK_CONTENDED,
                    crashes,
                    lease_remaining=store.ttl(lease, now),
                    holder=holder,
                    lost_predecessor=lost,
                )
            store.set(run_key, owner, lease_ttl, now)
            store.set(started_key, owner, record_ttl, now)
            if lock_key is None:
                return AdmitResult(Admission.ADMITTED, crashes, lost_predecessor=lost)
            store.set(lease, owner, lease_ttl, now)
            token = fence_token(store.get(fence, now) or 0, time.time_ns() // 1000)
            store.set(fence, token, record_ttl, now)
            return AdmitResult(
                Admission.ADMITTED, crashes, fencing_token=token, lost_predecessor=lost
            )

    def finish(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        done_key, run_key, started_key, crashes_key = self._keys(task_id)
        store = self._store
        with store.lock:
            now = time.monotonic()
            if succeeded:
                store.set(done_key, publish or "1", record_ttl, now)
            store.data.pop(crashes_key, None)
            for key in (run_key, started_key):
                if store.get(key, now) == owner:
                    del store.data[key]
            if lock_key is None:
                return False
            lease = self._lock_keys(lock_key)[0]
            if store.get(lease, now) != owner:
                return False
            del store.data[lease]
            return True

    def release(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        store = self._store
        released = False
        with store.lock:
            now = time.monotonic()
            for key in self._leases(task_id, lock_key):
                if store.get(key, now) == owner:
                    del store.data[key]
                    released = True
        return released

    def renew(self, task_id: str, lock_key: str | None, owner: str, lease_ttl: float) -> bool:
        store = self._store
        held = True
        with store.lock:
            now = time.monotonic()
            for key in self._leases(task_id, lock_key):
                if store.get(key, now) == owner:
                    store.set(key, owner, lease_ttl, now)
                else:
                    held = False
        return held

    def holds(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        store = self._store
        with store.lock:
            now = time.monotonic()
            return all(store.get(key, now) == owner for key in self._leases(task_id, lock_key))

    def dedup_claim(
        self, key: str, task_id: str, *, ttl: float, stale: str | None = None
    ) -> str | None:
        store, name = self._store, f"{self._prefix}:dedup:{key}"
        with store.lock:
            now = time.monotonic()
            holder = store.get(name, now)
            if holder is not None and holder not in (task_id, stale):
                return str(holder)
            store.set(name, task_id, ttl, now)
            return None

    def dedup_release(self, key: str, task_id: str) -> bool:
        store, name = self._store, f"{self._prefix}:dedup:{key}"
        with store.lock:
            if store.get(name, time.monotonic()) != task_id:
                return False
            del store.data[name]
            return True

    def held_locks(self, *, limit: int = 1000) -> list[HeldLock]:
        """``LockListing.held_locks``: the lock leases of this prefix, read under the
        store's lock (so one snapshot here)."""
        store, start = self._store, f"{self._prefix}:lock:"
        found = []
        with store.lock:
            now, now_us = time.monotonic(), time.time_ns() // 1000
            for name in sorted(k for k in store.data if k.startswith(start)):
                holder = store.get(name, now)
                if holder is None:
                    continue
                key = name.removeprefix(start)
                token = store.get(self._lock_keys(key)[1], now)
                found.append(
                    HeldLock(key, holder, store.ttl(name, now), token, held_for(token, now_us))
                )
                if len(found) >= limit:
                    break
        return found

    def ping(self) -> None:
        """The in-process store always answers."""

    def close(self) -> None:
        """Nothing to release; the store stays for other backends of this URL."""

    def __repr__(self) -> str:
        return f"<MemoryCoordinationBackend {self.url}>"


@hookimpl(trylast=True)
def resilience_coordination_backend(
    url: str, settings: Settings
) -> MemoryCoordinationBackend | None:
    """Serve ``memory://`` URLs."""
    if not url.lower().startswith("memory://"):
        return None
    return MemoryCoordinationBackend(url, key_prefix=settings.key_prefix)
