"""The visibility heartbeat: keeps the messages a worker holds from being redelivered.

kombu's Redis transport records every delivered, unacked message in the sorted set
``unacked_index`` scored with its delivery time, and a restore sweep pushes back to its
queue any entry older than ``visibility_timeout``: a dead worker's messages wait that
long, and a live worker's message held longer is delivered again. This consumer boot
step (in the worker's main process, where kombu's QoS lives):

1. every tick, refreshes the score of every message it holds (reserved, running,
   waiting for its ETA: kombu's ``QoS._delivered``, less the acked) with one
   ``ZADD ... XX`` to *half a visibility timeout ago*. A held message so never looks
   older than ``timeout / 2 + tick`` (``3/4`` of the timeout: a quarter to spare), an
   acked one is never resurrected, and a dead worker's refreshed messages are due
   ``timeout / 2`` after its last tick instead of a whole timeout;
2. every sweep interval (``timeout / 20``, 0.05-2 s), refreshes the messages received
   since, and runs kombu's own restore sweep (``QoS.restore_visible`` under kombu's
   mutex), so a due message returns within that interval, also on kombu versions whose
   own sweep scans only every ~100 s;
3. makes the consumer channel fetch reliably (``celery_resilience.fetch``), so a
   message is recorded as unacked by the command that pops it; where the server or
   the broker user's ACL cannot (no ``BLMOVE``, a refused script command), the channel
   keeps kombu's fetch, with one warning, and the heartbeat runs all the same.

A tick is ``min(visibility_timeout / 4, 30 s)``. Both run on the consumer's timer (the
event loop of the prefork and threads pools), except under the solo pool, whose main
thread runs the tasks and would starve the timer: there they run in a daemon thread.
A worker SIGKILLed mid-task therefore has its task back on the queue after
``timeout / 2 - tick`` to ``timeout / 2`` plus one sweep interval (it last refreshed
up to a tick before dying), and a message received
less than a sweep interval before the kill after one timeout at most. See
docs/recovery.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.concurrency.solo import TaskPool as SoloPool

from celery_resilience import fetch
from celery_resilience.runtime import runtime

logger = logging.getLogger(__name__)

MAX_TICK = 30.0  # seconds between ticks at most, whatever the visibility timeout
MIN_TICK = 0.05
MAX_SWEEP = 2.0  # seconds between restore sweeps at most
_CHUNK = 1000  # tags per ZADD


def tick_interval(visibility_timeout: float) -> float:
    """Seconds between two heartbeats of a worker under ``visibility_timeout``."""
    return max(MIN_TICK, min(visibility_timeout / 4, MAX_TICK))


def sweep_interval(visibility_timeout: float) -> float:
    """Seconds between two restore sweeps of a worker under ``visibility_timeout``."""
    return max(MIN_TICK, min(visibility_timeout / 20, MAX_SWEEP))


def is_redis_channel(channel: Any) -> bool:
    """Whether ``channel`` is a kombu Redis channel with ack emulation (an unacked index)."""
    from kombu.transport import redis as kombu_redis  # here: imports redis-py

    return isinstance(channel, kombu_redis.Channel) and bool(channel.ack_emulation)


def held_tags(qos: Any) -> list[str]:
    """Delivery tags of the messages delivered to ``qos`` and not acked yet."""
    for _ in range(100):  # the consumer's thread may change them meanwhile (solo pool)
        try:
            delivered, acked = list(qos._delivered), set(qos._dirty)
        except RuntimeError:  # changed size during the copy: copy again
            continue
        return [tag for tag in delivered if tag not in acked]
    return []  # never settled: refresh nothing this tick rather than fail


def refresh(channel: Any, tags: list[str] | None = None) -> int:
    """Mark ``tags`` (default: every message ``channel`` holds) as delivered half a
    timeout ago; return how many.

    ``ZADD XX`` only updates entries still in the index: a message acked or restored
    meanwhile stays gone. The channel's client applies ``global_keyprefix``.
    """
    if tags is None:
        tags = held_tags(channel.qos)
    if not tags:
        return 0
    now = time.time() - float(channel.visibility_timeout) / 2
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline()
        for start in range(0, len(tags), _CHUNK):
            chunk = tags[start : start + _CHUNK]
            pipe.zadd(channel.unacked_index_key, dict.fromkeys(chunk, now), xx=True)
        pipe.execute()
    return len(tags)


def sweep(channel: Any) -> None:
    """Restore every message unrefreshed for ``visibility_timeout``, as kombu does.

    kombu's own ``restore_visible`` under its ``unacked_mutex``, so sweeps of several
    workers never restore one message twice; ``interval=1`` makes it scan now.
    """
    channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)


def _every(seconds: float, tick: Callable[[], None]) -> Callable[[], None]:
    """Call ``tick`` every ``seconds`` in a daemon thread; return what stops it."""
    stopped = threading.Event()

    def run() -> None:
        while not stopped.wait(seconds):
            tick()

    thread = threading.Thread(target=run, name="celery-resilience-heartbeat", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        if thread is not threading.current_thread():
            thread.join(timeout=5.0)

    return stop


class VisibilityHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer boot step running the heartbeat while the consumer is connected.

    Does nothing unless the broker is Redis (kombu's ``redis`` driver, with ack
    emulation) and ``resilience_visibility_heartbeat`` is not false.
    """

    label = "celery-resilience visibility heartbeat"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop: Callable[[], None] | None = None

    def start(self, c: Any) -> None:
        self.stop(c)
        if runtime(c.app).settings.visibility_heartbeat is False:
            logger.info("celery-resilience: visibility heartbeat off (setting is false)")
            return
        channel = c.task_consumer.channel
        if c.connection.transport.driver_type != "redis" or not is_redis_channel(channel):
            logger.debug("celery-resilience: no visibility heartbeat: the broker is not Redis")
            return
        reliable = fetch.install(channel)
        timeout = float(channel.visibility_timeout)
        interval, every = tick_interval(timeout), sweep_interval(timeout)
        next_refresh, refreshed = 0.0, set[str]()

        def tick() -> None:
            nonlocal next_refresh, refreshed
            try:
                current = c.task_consumer.channel
                if current is not channel:  # reconnected: a new channel to fetch reliably
                    fetch.install(current)
                held = held_tags(current.qos)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + interval
                    count = refresh(current, held)
                    logger.debug("celery-resilience: heartbeat refreshed %d message(s)", count)
                else:  # messages received since the last tick: at once, not a tick later
                    refresh(current, [tag for tag in held if tag not in refreshed])
                refreshed = set(held)
                sweep(current)
            except Exception as exc:
                logger.warning(
                    "celery-resilience: visibility heartbeat failed: %s: %s",
                    type(exc).__name__,
                    exc,
                )

        if isinstance(c.pool, SoloPool):  # its tasks run in this thread: no timer tick then
            self._stop = _every(every, tick)
            where = "a thread"
        else:
            entry = c.timer.call_repeatedly(every, tick)
            self._stop = lambda: c.timer.cancel(entry)
            where = "the event loop" if c.hub is not None else "the consumer's timer"
        logger.info(
            "celery-resilience: visibility heartbeat every %g s, restore sweep every %g s in "
            "%s (visibility timeout %g s, reliable fetch %s)",
            interval,
            every,
            where,
            timeout,
            "on" if reliable else "off",
        )

    def stop(self, c: Any) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
