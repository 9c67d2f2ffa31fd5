"""Whether a task is still pending in a Redis broker: its message queued or unacked.

A resilient task is ``acks_late`` and reliable fetch moves a message from its queue to
kombu's ``unacked`` hash in one step, so from its publish until its outcome is stored a
pending task always has a message in one of the two; a live node's held message stays
there, and a dead node's goes back to its queue. A task id found in neither was
removed without running: ``celery purge``, a deleted queue, lost broker data. The
deduplication of a call asks this before it lets such a holder block it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from celery_resilience import liveness
from celery_resilience.liveness.keys import script
from celery_resilience.settings import broker_url

logger = logging.getLogger(__name__)

MOST_SCANNED = 1_000
"""Most messages (queued and unacked together) one look reads; above it the answer is
"unknown" and the holder keeps its key (``dedup_ttl`` frees it)."""


class Pending:
    """Looks for task ids in one app's Redis broker, over one client for the process."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._client: Any = None
        self._lock = threading.Lock()

    def holds(self, task_id: str, queues: Iterable[str]) -> bool | None:
        """Whether a message of ``task_id`` is in one of ``queues`` (every priority step
        of each) or unacked: True, False, or None when that is not known (not a Redis
        broker, more than ``MOST_SCANNED`` messages, or the broker did not answer).

        One script that only reads: O(messages) on the server, at most
        ``MOST_SCANNED`` of them.
        """
        if not broker_url(self._app.conf).lower().startswith(liveness.REDIS_BROKERS):
            return None
        try:
            client = self._connect()
            channel = client._resilience_connection.default_channel
            prefix = channel.global_keyprefix or ""
            keys = [prefix + channel.unacked_key]
            for queue in dict.fromkeys(queues):
                keys += [prefix + channel._q_for_pri(queue, p) for p in channel.priority_steps]
            found = script("pending")(client, keys, [f'"{task_id}"', MOST_SCANNED])
        except Exception as exc:  # the broker is down: the holder keeps its key
            logger.warning(
                "celery-resilience: could not look for task %s in the broker: %s", task_id, exc
            )
            return None
        return None if int(found) < 0 else bool(int(found))

    def _connect(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = liveness.connect(self._app)
        return self._client
