"""Presence of the processes that hold run and lock leases, so a dead holder frees them.

A lease's holder is the process running the body (a prefork child, or the worker's
own process under the threads and solo pools). While it holds leases it renews its
own presence id (``proc/host/pid/random``) every ``ttl / 3`` seconds from a daemon
thread, and before its first admission after a pause, so the presence exists before
the lease does. Its owner strings carry that id (``owners.new_owner``); an owner
without one (presence could not be written, or an older version) is never presumed
dead this way.

A holder is gone when its presence expired, on the server's clock, while nodes were
sweeping (``gone.lua``): wherever it ran, its leases are free at once. The presence is
the holder's, not its node's: a node whose main process stalls loses its messages
to other nodes, but a body still running in its child keeps its leases, so the copy
does not run a second body.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery_resilience.liveness.keys import Keys, ms, process_id, script

logger = logging.getLogger(__name__)

STARTED_TTL = 60.0  # seconds a delivery's 'run' marker lasts: its node learns of the start
# from the pool long before (a hand-back leaves the tasks its node knows are running)


class ProcessPresence:
    """This process's presence as a lease holder, in the broker's Redis.

    :param connect: returns a Redis client of the broker (called once, on first use).
    :param ttl: seconds the presence outlives its last renewal.
    """

    def __init__(self, connect: Callable[[], Any], keys: Keys, ttl: float) -> None:
        self.id = process_id()
        self.keys, self.ttl = keys, ttl
        self._connect = connect
        self._client: Any = None
        self._cond = threading.Condition()
        self._holds = 0
        self._renewed = -float("inf")  # time.monotonic() of the last renewal
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._connect()
        return self._client

    @contextmanager
    def hold(self) -> Iterator[str | None]:
        """Keep this process present while the block runs; yield its presence id, or
        ``None`` when the presence could not be written (the holder is then never
        presumed dead by presence, only by its leases' TTL)."""
        with self._cond:
            self._holds += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celery-resilience-presence", daemon=True
                )
                self._thread.start()
        try:
            fresh = time.monotonic() - self._renewed < self.ttl / 3
            yield self.id if fresh or self._renew() else None
        finally:
            with self._cond:
                self._holds -= 1

    def starts(self, delivery_tag: str) -> bool:
        """Mark the delivery ``delivery_tag`` started in this process; ``False`` when its
        node handed the message back at warm shutdown (another copy runs the task), so
        this one must not run. ``True`` when unknown (the broker did not answer)."""
        try:
            return bool(
                script("start")(self.client, [self.keys.start(delivery_tag)], [ms(STARTED_TTL)])
            )
        except Exception as exc:
            logger.warning(
                "celery-resilience: could not mark delivery %s started: %s: %s",
                delivery_tag,
                type(exc).__name__,
                exc,
            )
            return True

    def gone(self, presence_id: str) -> bool:
        """Whether the holder ``presence_id`` provably stopped (its presence expired while
        nodes were sweeping). ``False`` when unknown (the broker did not answer)."""
        try:
            return bool(
                script("gone")(
                    self.client, [self.keys.presence, self.keys.clock], [presence_id, ms(self.ttl)]
                )
            )
        except Exception as exc:
            logger.warning(
                "celery-resilience: could not check whether lease holder %s is alive: %s: %s",
                presence_id,
                type(exc).__name__,
                exc,
            )
            return False

    def _renew(self) -> bool:
        started = time.monotonic()
        try:
            keys = self.keys
            script("renew")(self.client, [keys.presence, keys.clock], [self.id, ms(self.ttl)])
        except Exception as exc:
            logger.warning(
                "celery-resilience: could not renew the presence of lease holder %s: %s: %s",
                self.id,
                type(exc).__name__,
                exc,
            )
            return False
        self._renewed = started
        return True

    def _run(self) -> None:
        while True:
            time.sleep(self.ttl / 3)
            with self._cond:
                holding = self._holds > 0
            if holding:
                self._renew()
