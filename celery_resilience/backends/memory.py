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

from celery_resilience.backends.base import Admission, AdmitResult
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

    def _keys(self, task_id: str, attempt: int) -> tuple[str, str, str]:
        p = self._prefix
        return f"{p}:done:{task_id}", f"{p}:deliveries:{task_id}:{attempt}", f"{p}:lost:{task_id}"

    def _lock_keys(self, lock_key: str) -> tuple[str, str]:
        return f"{self._prefix}:lock:{lock_key}", f"{self._prefix}:fence:{lock_key}"

    def admit(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
    ) -> AdmitResult:
        done, deliveries_key, lost_key = self._keys(task_id, attempt)
        store = self._store
        with store.lock:
            now = time.monotonic()
            if store.get(done, now) is not None:
                return AdmitResult(Admission.DUPLICATE)
            deliveries = (store.get(deliveries_key, now) or 0) + 1
            store.set(deliveries_key, deliveries, record_ttl, now)
            lost = store.get(lost_key, now) or 0
            if deliveries - 1 + lost >= max_crashes:
                return AdmitResult(Admission.CRASH_BUDGET_SPENT, deliveries, lost=lost)
            if lock_key is None:
                return AdmitResult(Admission.ADMITTED, deliveries, lost=lost)
            lease, fence = self._lock_keys(lock_key)
            if store.get(lease, now) is not None:
                del store.data[deliveries_key]
                if deliveries > 1:
                    store.set(lost_key, lost + deliveries - 1, record_ttl, now)
                return AdmitResult(
                    Admission.LOCK_CONTENDED,
                    deliveries,
                    lease_remaining=store.ttl(lease, now),
                    lost=lost,
                    holder=store.get(lease, now),
                )
            store.set(lease, owner, lease_ttl, now)
            token = fence_token(store.get(fence, now) or 0, time.time_ns() // 1000)
            store.set(fence, token, record_ttl, now)
            return AdmitResult(Admission.ADMITTED, deliveries, fencing_token=token, lost=lost)

    def finish(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        done, deliveries_key, lost_key = self._keys(task_id, attempt)
        store = self._store
        with store.lock:
            now = time.monotonic()
            if succeeded:
                store.set(done, 1, record_ttl, now)
            store.data.pop(deliveries_key, None)
            store.data.pop(lost_key, None)
            if lock_key is None:
                return False
            lease = self._lock_keys(lock_key)[0]
            if store.get(lease, now) != owner:
                return False
            del store.data[lease]
            return True

    def release(self, lock_key: str, owner: str) -> bool:
        lease = self._lock_keys(lock_key)[0]
        store = self._store
        with store.lock:
            if store.get(lease, time.monotonic()) != owner:
                return False
            del store.data[lease]
            return True

    def renew(self, lock_key: str, owner: str, lease_ttl: float) -> bool:
        lease = self._lock_keys(lock_key)[0]
        store = self._store
        with store.lock:
            now = time.monotonic()
            if store.get(lease, now) != owner:
                return False
            store.set(lease, owner, lease_ttl, now)
            return True

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
