"""What every test app whose workers the suites start configures alike."""

from __future__ import annotations

import os
from typing import Any

import redis


class ProcessRedis:
    """A Redis client per process: a forked prefork child makes its own."""

    def __init__(self, url: str, socket_timeout: float) -> None:
        self.url = url
        self.socket_timeout = socket_timeout
        self._clients: dict[int, redis.Redis[str]] = {}

    def __call__(self) -> redis.Redis[str]:
        """This process's client."""
        pid = os.getpid()
        if pid not in self._clients:
            self._clients[pid] = redis.Redis.from_url(
                self.url, decode_responses=True, socket_timeout=self.socket_timeout
            )
        return self._clients[pid]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def worker_settings(prefix: str, queue: str) -> dict[str, Any]:
    """Settings of a test worker: one message at a time, no remote control or events,
    its queue, and every celery-resilience key under ``prefix:res``."""
    return {
        "task_default_queue": queue,
        "worker_prefetch_multiplier": 1,
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "resilience_key_prefix": f"{prefix}:res",
    }
