"""The visibility heartbeat and liveness: a worker's messages come back when it dies, and
never while it lives.

kombu's Redis transport records every delivered, unacked message in the sorted set
``unacked_index`` scored with its delivery time, and a restore sweep pushes back to its
queue any entry older than ``visibility_timeout``: a dead worker's messages wait that
long, and a live worker's message held longer is delivered again. This consumer boot
step (in the worker's main process, where kombu's QoS lives) makes the node a
:class:`~celery_resilience.liveness.node.Node` of the broker's Redis and, on the
consumer's timer:

1. every ``node_ttl / 3`` renews the node's presence;
2. every tick (``min(visibility_timeout / 4, 30 s)``) moves every message the node
   holds (reserved, running, waiting for its ETA, or fetched and not yet handed to the
   consumer) to *half a visibility timeout ago* on the server's clock, so kombu's own
   restore never fires on it, and forgets the acked ones;
3. on the one node of the fleet holding the sweeper lease (taken by a renewal when it
   is free), every liveness sweep (``node_ttl / 6``, at most 1 s) recovers the messages
   of every node whose presence expired (``liveness.recovery``), and every restore
   sweep (``timeout / 20``, 0.05-2 s) runs kombu's restore by the visibility timeout,
   on the server's clock, as the backstop for messages no node claims (kombu's own
   poller still runs it on every node, throttled: one call in ten);
4. makes the consumer channel fetch reliably (``celery_resilience.fetch``), so a
   message is recorded as unacked and held by this node by the command that pops it;
   where the server or the broker user's ACL cannot (no ``BLMOVE``, a refused script
   command), the channel keeps kombu's fetch, with one warning, and records the hold
   right after.

These run on the consumer's timer (the event loop of the prefork and threads pools),
except under the solo pool, whose main thread runs the tasks and would starve the
timer: there they run in a daemon thread. When the consumer stops for a warm shutdown,
the resilient messages no pool child started go back on their queues at once (other
nodes run them while this one finishes its running tasks), and a thread keeps the
presence and refresh going until the node holds nothing, then withdraws the presence;
a node SIGKILLed meanwhile is recovered like any dead node. See docs/recovery.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.concurrency.solo import TaskPool as SoloPool

from celery_resilience import fetch, liveness
from celery_resilience.errors import ResilienceError
from celery_resilience.liveness.node import Node, adopt, use_server_clock
from celery_resilience.liveness.recovery import Recovered, hand_back
from celery_resilience.options import options_of
from celery_resilience.plugins import notify
from celery_resilience.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

MAX_TICK = 30.0  # seconds between ticks at most, whatever the visibility timeout
MIN_TICK = 0.05
MAX_SWEEP = 2.0  # seconds between restore sweeps at most
SWEEPER_ONLY = frozenset({"liveness sweep", "restore sweep"})  # steps of the fleet's sweeper


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


def _disconnected(exc: BaseException) -> bool:
    """Whether ``exc`` says the server could not be reached (refused, reset, no primary),
    not that it was slow (a timeout: it may be stalled, and will answer)."""
    import redis

    return isinstance(exc, redis.ConnectionError) and not isinstance(exc, redis.TimeoutError)


def _on_sentinel(channel: Any) -> bool:
    from kombu.transport import redis as kombu_redis

    return isinstance(channel, kombu_redis.SentinelChannel)


def sweep(channel: Any) -> None:
    """Restore every message unrefreshed for ``visibility_timeout``, as kombu does.

    kombu's ``restore_visible`` (on the server's clock once ``adopt``-ed) under its
    ``unacked_mutex``, so sweeps of several workers never restore one message twice;
    ``interval=1`` makes it scan now.
    """
    channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)


def _every(
    seconds: float, tick: Callable[[], None], name: str = "celery-resilience-heartbeat"
) -> Callable[[], None]:
    """Call ``tick`` every ``seconds`` in a daemon thread; return what stops it."""
    stopped = threading.Event()

    def run() -> None:
        while not stopped.wait(seconds):
            tick()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        if thread is not threading.current_thread():
            thread.join(timeout=5.0)

    return stop


class _Warnings:
    """Logs a failing step once per distinct error, and once when it works again."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def failed(self, step: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if self._last.get(step) != text:
            self._last[step] = text
            logger.warning("celery-resilience: %s failed: %s", step, text)

    def worked(self, step: str) -> None:
        if self._last.pop(step, None) is not None:
            logger.warning("celery-resilience: %s works again", step)


class Ticker:
    """What the heartbeat runs on each tick of the timer for ``node``: every step that is
    due, each on its own schedule; a failing step is logged and never stops the others.

    Steps, and the seconds between two runs of each: presence renewal (``ttl / 3``),
    visibility refresh (``tick_interval``), and, on the fleet's one sweeper node only
    (``Node.sweeper``), liveness sweep (``liveness.sweep_interval``; a lost node is
    logged and reported to the ``resilience_node_lost`` hook) and restore sweep
    (``sweep_interval``).
    """

    def __init__(self, rt: Runtime, node: Node, visibility_timeout: float) -> None:
        self.rt, self.node = rt, node
        self.plan = {
            "presence renewal": node.ttl / 3,
            "visibility refresh": tick_interval(visibility_timeout),
            "liveness sweep": liveness.sweep_interval(node.ttl),
            "restore sweep": sweep_interval(visibility_timeout),
        }
        self.every = min(self.plan["liveness sweep"], self.plan["restore sweep"])
        self.warnings = _Warnings()
        self._due = dict.fromkeys(self.plan, 0.0)
        self.lost: BaseException | None = None
        """The connection error of the last presence renewal that could not connect."""

    def __call__(self, channel: Any) -> None:
        """Run the due steps on ``channel`` (the consumer's, adopted by ``node``)."""
        node = self.node
        steps: dict[str, Callable[[Any], Any]] = {
            "presence renewal": node.renew,
            "visibility refresh": lambda client: node.refresh(client, *_index_of(channel)),
            "liveness sweep": lambda client: self._report(node.sweep(client, channel)),
            "restore sweep": lambda client: sweep(channel),
        }
        now = time.monotonic()
        for step, run in steps.items():
            if now < self._due[step] or (step in SWEEPER_ONLY and not node.sweeper):
                continue
            self._due[step] = now + self.plan[step]
            try:
                with channel.conn_or_acquire() as client:
                    run(client)
            except Exception as exc:
                self.warnings.failed(step, exc)
                if step == "presence renewal" and _disconnected(exc):
                    self.lost = exc
            else:
                self.warnings.worked(step)

    def _report(self, lost: list[Recovered]) -> None:
        for node in lost:
            logger.warning(
                "celery-resilience: node %s (%s) is gone (no presence for %s s): put %d "
                "message(s) it held back on their queues %s",
                node.node,
                node.info.get("nodename", "?"),
                node.info.get("ttl", "?"),
                node.messages,
                dict(node.queues),
            )
            notify(
                self.rt.plugins,
                "resilience_node_lost",
                node=node.node,
                nodename=str(node.info.get("nodename", "")),
                recovered=dict(node.queues),
            )


class VisibilityHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer boot step running the heartbeat and liveness while the consumer runs.

    Does nothing unless the broker is Redis (kombu's ``redis`` driver, with ack
    emulation) and ``resilience_visibility_heartbeat`` is not false. One node (one
    presence id) per worker process, kept across consumer restarts.
    """

    label = "celery-resilience visibility heartbeat"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop: Callable[[], None] | None = None
        self._node: Node | None = None
        self._drain: Callable[[], None] | None = None
        self._warnings = _Warnings()
        # Here, while the consumer is built: kombu's first restore sweep runs as it
        # connects, before any consumer step starts.
        with contextlib.suppress(ResilienceError):  # the worker step reports it
            if liveness.enabled(parent.app.conf, runtime(parent.app).settings):
                use_server_clock()

    def start(self, c: Any) -> None:
        self._cancel()
        rt = runtime(c.app)
        if rt.settings.visibility_heartbeat is False:
            logger.info("celery-resilience: visibility heartbeat off (setting is false)")
            return
        channel = c.task_consumer.channel
        if c.connection.transport.driver_type != "redis" or not is_redis_channel(channel):
            logger.debug("celery-resilience: no visibility heartbeat: the broker is not Redis")
            return
        if self._node is None:
            queues = sorted(q.name for q in c.task_consumer.queues)
            keys = liveness.keys_of(c.app.conf, rt.settings)
            self._node = Node(keys, rt.settings.node_ttl, c.hostname, queues)
        node = self._node
        adopt(channel, node)
        reliable = fetch.install(channel, node)
        timeout = float(channel.visibility_timeout)
        ticker = Ticker(rt, node, timeout)
        ticker.warnings = self._warnings

        def tick() -> None:
            current = c.task_consumer.channel
            if current is not None and current.qos is not None:
                adopt(current, node)  # reconnected: a new channel to adopt and fetch on
                fetch.install(current, node)
                ticker(current)
                lost, ticker.lost = ticker.lost, None
                if lost is not None and c.hub is not None and _on_sentinel(current):
                    # kombu 5.3-5.7's Sentinel channel may never notice that its primary
                    # died (celery/celery#6348, #10096): the worker would consume nothing
                    # after a failover. Raised in the event loop, a connection error
                    # restarts the consumer, which asks the sentinels for the new primary.
                    logger.warning(
                        "celery-resilience: the broker's Sentinel primary is unreachable "
                        "(%s); reconnecting the consumer",
                        lost,
                    )
                    raise lost

        tick()  # register the presence before the first fetch
        if isinstance(c.pool, SoloPool):  # its tasks run in this thread: no timer tick then
            self._stop = _every(ticker.every, tick)
            where = "a thread"
        else:
            entry = c.timer.call_repeatedly(ticker.every, tick)
            self._stop = lambda: c.timer.cancel(entry)
            where = "the event loop" if c.hub is not None else "the consumer's timer"
        logger.info(
            "celery-resilience: node %s: presence TTL %g s, liveness sweep every %g s, "
            "visibility refresh every %g s in %s (visibility timeout %g s, reliable fetch %s)",
            node.id,
            node.ttl,
            ticker.plan["liveness sweep"],
            ticker.plan["visibility refresh"],
            where,
            timeout,
            "on" if reliable else "off",
        )

    def _cancel(self) -> None:
        for stop in (self._stop, self._drain):
            if stop is not None:
                stop()
        self._stop = self._drain = None

    def stop(self, c: Any) -> None:
        """Stop the timer; at a warm shutdown, hand back the unstarted messages; keep the
        presence from a thread until nothing is held."""
        self._cancel()
        node, channel = self._node, getattr(c.task_consumer, "channel", None)
        if node is None or channel is None:
            return
        if c.blueprint.state == bootsteps.CLOSE:  # not a reconnection's restart
            self._hand_back(c.app, node, channel)
        index = _index_of(channel)
        connect = channel.conn_or_acquire

        def drain() -> None:
            try:
                with connect() as client:
                    node.renew(client)
                    if node.leave(client, *index):
                        stop_drain()
            except Exception as exc:
                self._warnings.failed("presence renewal", exc)

        stop_drain = _every(node.ttl / 3, drain, name="celery-resilience-drain")
        self._drain = stop_drain
        drain()

    def _hand_back(self, app: Any, node: Node, channel: Any) -> None:
        """Put back on their queues the messages of resilient tasks this node holds that no
        pool child started. Celery's consumer has dropped them as it closed (the pool's
        unsent jobs, the ETA timers), and kombu would restore them only when the channel
        closes, after the running tasks end. A child that still gets one of them (its job
        was being written) does not run it (``ProcessPresence.starts``)."""
        from celery.worker import state as worker_state

        qos = channel.qos
        running = {r.message.delivery_tag for r in list(worker_state.active_requests)}
        tags = [
            str(tag)
            for tag, message in list(qos._delivered.items())  # kombu 5.3-5.7: unacked
            if tag not in running
            and tag not in qos._dirty  # acked, not flushed yet
            and options_of(app.tasks.get((message.headers or {}).get("task"))) is not None
        ]
        if not tags:
            return
        try:
            with channel.conn_or_acquire() as client:
                queues = hand_back(channel, client, node.keys, node.id, tags)
        except Exception as exc:
            self._warnings.failed("hand-back at warm shutdown", exc)
            return
        logger.warning(
            "celery-resilience: warm shutdown: put %d unstarted message(s) back on their "
            "queues %s; the running tasks finish here",
            sum(queues.values()),
            dict(queues),
        )

    def shutdown(self, c: Any) -> None:
        """The timer stops; a drain thread still running ends with the process."""
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()
        if self._drain is not None:  # one more try: kombu may have restored the rest now
            channel = getattr(c.task_consumer, "channel", None)
            node = self._node
            if channel is not None and node is not None:
                with contextlib.suppress(Exception), channel.conn_or_acquire() as client:
                    if node.leave(client, *_index_of(channel)):
                        drain, self._drain = self._drain, None
                        drain()


def _index_of(channel: Any) -> tuple[str, float]:
    """``channel``'s unacked index key (with ``global_keyprefix``) and half its timeout."""
    index = (channel.global_keyprefix or "") + channel.unacked_index_key
    return index, float(channel.visibility_timeout) / 2
