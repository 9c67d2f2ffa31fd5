"""Leases of running bodies: who holds one (owner strings), and keeping them alive.

One renewal thread per process renews every running body's run and lock leases.
An owner string names the machine, the process (pid and start time), the delivery
and, when the process keeps one, its presence id (``liveness.holders``). This module
tells a holder *provably dead* on this same machine (same host name) when its process
is gone: no process has its pid, or the process with that pid started at another
time (the pid was reused). A holder on another machine is dead when its presence
expired (``ProcessPresence.gone``); one without a presence id is never presumed dead
there: its lease runs out by itself within one TTL.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery_resilience.attempt import Attempt
from celery_resilience.backends.base import CoordinationBackend
from celery_resilience.errors import BackendUnavailable

logger = logging.getLogger(__name__)

_SEP = "|"


def _stat(pid: int) -> list[bytes]:
    """Fields 3.. of /proc/<pid>/stat (Linux), or [] if unknown.

    The command name (field 2) may contain spaces, so split after its ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


@functools.lru_cache(maxsize=8)
def _start_time(pid: int) -> str:
    """The process' start time in clock ticks since boot (field 22), or "-" if unknown."""
    fields = _stat(pid)
    return fields[19].decode() if len(fields) > 19 else "-"


def process_exists(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine (a zombie does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def new_owner(nodename: str, task_id: str, presence: str | None = None) -> str:
    """A unique owner string for one delivery of ``task_id`` in this process, which keeps
    the presence id ``presence`` (if any) while it holds the leases."""
    pid = os.getpid()
    host, token = socket.gethostname(), secrets.token_hex(4)
    return _SEP.join((host, str(pid), _start_time(pid), nodename, task_id, token, presence or ""))


@dataclass(frozen=True)
class Owner:
    """What an owner string from ``new_owner`` says: the machine's host name, the
    process id, the worker node name and the task id of the delivery."""

    host: str
    pid: int
    nodename: str
    task_id: str


def parse_owner(owner: str) -> Owner | None:
    """``owner``'s parts, or None when it is not ``new_owner``'s (a custom holder)."""
    parts = owner.split(_SEP)
    if len(parts) not in (6, 7) or not parts[1].isdigit():
        return None
    return Owner(host=parts[0], pid=int(parts[1]), nodename=parts[3], task_id=parts[4])


def presence_of(owner: str) -> str | None:
    """The presence id ``owner``'s process keeps, or ``None`` (none, or an older owner)."""
    parts = owner.split(_SEP)
    return parts[6] or None if len(parts) == 7 else None


def holder_is_dead(owner: str) -> bool:
    """True only if ``owner`` ran on this machine and its process no longer exists."""
    parts = owner.split(_SEP)
    if len(parts) not in (6, 7) or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    if pid == os.getpid():
        return False
    if not process_exists(pid):
        return True
    fields = _stat(pid)
    if fields[:1] == [b"Z"]:
        return True  # killed, not yet reaped by its parent
    if started == "-" or len(fields) <= 19:
        return False
    return fields[19].decode() != started


@dataclass
class _Lease:
    backend: CoordinationBackend
    task_id: str
    lock_key: str | None
    owner: str
    ttl: float
    attempt: Attempt
    due: float


class LeaseKeeper:
    """Renews every running body's leases each ``ttl / 3`` seconds until it finishes.

    One renewal covers the run lease of the task id and the lock lease, if any. A body
    shorter than ``ttl / 3`` costs no round trip. A renewal that finds a lease gone
    marks the attempt ``lease_lost`` and logs a warning (so ``lease_lost`` lags: it
    turns True at the first renewal after the loss, never before); a backend error
    is logged and retried at the next interval, so a holder that keeps failing to
    renew loses its lease after one TTL, as a dead one.
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
        self,
        backend: CoordinationBackend,
        task_id: str,
        lock_key: str | None,
        owner: str,
        ttl: float,
        attempt: Attempt,
    ) -> Iterator[None]:
        """Renew ``owner``'s leases of ``task_id`` (and ``lock_key``) while the block runs."""
        if self._pid != os.getpid():
            self._setup()
        lease_id = next(self._ids)
        due = time.monotonic() + ttl / 3
        with self._cond:
            self._leases[lease_id] = _Lease(backend, task_id, lock_key, owner, ttl, attempt, due)
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
        what = _leases_of(lease)
        try:
            renewed = lease.backend.renew(lease.task_id, lease.lock_key, lease.owner, lease.ttl)
        except BackendUnavailable as exc:
            logger.error("celery-resilience: could not renew %s: %s", what, exc)
            return
        except Exception:
            logger.exception("celery-resilience: could not renew %s", what)
            return
        if not renewed:
            lease.attempt.lease_lost = True
            logger.warning(
                "celery-resilience: task %s[%s] lost %s: another attempt may run",
                lease.attempt.task_name,
                lease.attempt.task_id,
                what,
            )
            with self._cond:
                self._leases.pop(lease_id, None)


def _leases_of(lease: _Lease) -> str:
    run = f"the run lease of {lease.task_id}"
    return run if lease.lock_key is None else f"{run} or the lock lease on {lease.lock_key!r}"


keeper = LeaseKeeper()
