"""Keeps the leases of running bodies alive: one renewal thread per process."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery_resilience.attempt import Attempt
from celery_resilience.backends.base import CoordinationBackend
from celery_resilience.errors import BackendUnavailable

logger = logging.getLogger(__name__)


@dataclass
class _Lease:
    backend: CoordinationBackend
    key: str
    owner: str
    ttl: float
    attempt: Attempt
    due: float


class LeaseKeeper:
    """Renews every held lease each ``ttl / 3`` seconds until its body finishes.

    A renewal that finds the lease gone marks the attempt ``lease_lost`` and logs a
    warning; a backend error is logged and retried at the next interval, so a
    holder that keeps failing to renew loses its lease after one TTL, as a dead one.
    The thread starts on first use and again in a forked child (prefork pool).
    """

    def __init__(self) -> None:
        self._setup()

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        # When the renewal thread wakes next (None: it sleeps until notified).
        self._wakes_at: float | None = None

    @contextmanager
    def hold(
        self, backend: CoordinationBackend, key: str, owner: str, ttl: float, attempt: Attempt
    ) -> Iterator[None]:
        """Renew the lease on ``key`` held by ``owner`` while the ``with`` block runs."""
        if self._pid != os.getpid():
            self._setup()
        lease_id = next(self._ids)
        due = time.monotonic() + ttl / 3
        with self._cond:
            self._leases[lease_id] = _Lease(backend, key, owner, ttl, attempt, due)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celery-resilience-leases", daemon=True
                )
                self._thread.start()
            # Wake the thread only if it would sleep past this lease's first
            # renewal: a wake-up per delivery costs more than the gate's own Python.
            if self._wakes_at is None or due < self._wakes_at:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._leases.pop(lease_id, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [(i, lease) for i, lease in self._leases.items() if lease.due <= now]
                if not due:
                    nxt = min((lease.due for lease in self._leases.values()), default=None)
                    self._wakes_at = nxt
                    self._cond.wait(None if nxt is None else nxt - now)
                    self._wakes_at = None
                    continue
            for lease_id, lease in due:
                self._renew(lease_id, lease)

    def _renew(self, lease_id: int, lease: _Lease) -> None:
        lease.due = time.monotonic() + lease.ttl / 3
        try:
            renewed = lease.backend.renew(lease.key, lease.owner, lease.ttl)
        except BackendUnavailable as exc:
            logger.error("celery-resilience: could not renew lease %r: %s", lease.key, exc)
            return
        except Exception:
            logger.exception("celery-resilience: could not renew lease %r", lease.key)
            return
        if not renewed:
            lease.attempt.lease_lost = True
            logger.warning(
                "celery-resilience: task %s[%s] lost its lease on %r: another attempt may run",
                lease.attempt.task_name,
                lease.attempt.task_id,
                lease.key,
            )
            with self._cond:
                self._leases.pop(lease_id, None)


keeper = LeaseKeeper()
