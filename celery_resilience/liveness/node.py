"""A worker node's side of liveness, in its main process (where kombu's QoS lives).

:class:`Node` renews the node's presence, keeps what it holds refreshed, sweeps for
dead nodes and recovers their messages. :func:`adopt` makes a consumer channel keep
kombu's timing on the server's clock: kombu scores a delivery with the worker's own
clock (``QoS.append``) and restores what is older than the visibility timeout by that
clock (``QoS.restore_visible``), so a node whose clock is ahead restored live nodes'
messages early and one whose clock is behind had its own restored early. After
:func:`adopt`, a delivery is scored by the fetch (``fetch.py``) or by ``append.lua``,
and the restore sweep's ceiling is the server's ``TIME`` less the timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import types
from collections.abc import Callable
from typing import Any

from celery_resilience.liveness.keys import Keys, execute, ms, new_node_id, script, text
from celery_resilience.liveness.recovery import Recovered, record_lost, recover

logger = logging.getLogger(__name__)

DUE_LIMIT = 16  # dead nodes and holders taken per sweep


class Node:
    """This worker node: its presence id, and what it holds, in the broker's Redis.

    One node of the fleet at a time is the *sweeper* (:attr:`sweeper`): it holds the
    sweeper lease, which every renewal takes when it is free, and it alone runs the
    liveness and restore sweeps, so their cost does not grow with the fleet. The lease
    lasts ``ttl / 3`` and the sweeper renews it at every sweep: when the sweeper dies,
    another node holds the lease within ``2 * ttl / 3``, before the dead one's presence
    can have expired.

    :param ttl: seconds the node's presence outlives its last renewal.
    """

    def __init__(self, keys: Keys, ttl: float, nodename: str, queues: list[str]) -> None:
        self.id = new_node_id()
        self.keys, self.ttl = keys, ttl
        self.info = json.dumps(
            {
                "nodename": nodename,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "queues": queues,
                "ttl": ttl,
            }
        )
        self.held = keys.held(self.id)
        self.sweeper = False
        self._renewals = 0

    @property
    def sweeper_lease(self) -> float:
        """Seconds the sweeper lease lasts after the sweeper's last renewal or sweep."""
        return self.ttl / 3

    def renew(self, client: Any) -> None:
        """Renew the presence, and take or keep the sweeper lease (:attr:`sweeper`); warn
        when the presence had expired (this node was presumed dead)."""
        keys = self.keys
        absent, sweeper = script("renew")(
            client,
            [keys.presence, keys.clock, keys.node(self.id), keys.info, keys.sweeper],
            [self.id, ms(self.ttl), self.info, ms(self.sweeper_lease)],
        )
        self.sweeper = bool(int(sweeper))
        if int(absent) and self._renewals:
            logger.warning(
                "celery-resilience: node %s had not renewed its presence for over %g s (a "
                "stalled main process or an unreachable broker): other nodes took back the "
                "messages it held; a body still running keeps its leases",
                self.id,
                self.ttl,
            )
        self._renewals += 1

    def refresh(self, client: Any, index: str, age: float) -> int:
        """Score every message held as delivered ``age`` seconds ago on the server's
        clock (in kombu's unacked ``index``), forget the acked; return how many are held."""
        return int(script("refresh")(client, [index, self.held], [age]))

    def sweep(self, client: Any, channel: Any) -> list[Recovered]:
        """As the sweeper, recover every node (and lease holder) whose presence expired;
        return what each recovery of a node gave back. Holders hold no messages: they
        are removed. Another node holding the sweeper lease now: nothing, and
        :attr:`sweeper` is false until a renewal finds the lease free."""
        keys = self.keys
        reply = script("due")(
            client,
            [keys.presence, keys.clock, keys.sweeper],
            [ms(self.ttl), DUE_LIMIT, self.id, ms(self.sweeper_lease)],
        )
        self.sweeper = bool(int(reply[0]))
        lost = []
        for dead in map(text, reply[1:]):
            if dead == self.id:  # stalled past its own TTL: it still holds what it holds
                continue
            recovered = recover(channel, client, keys, self.id, dead, self.ttl)
            if recovered.finished and dead.startswith("node/"):
                record_lost(client, keys, recovered, _server_time(client))
                lost.append(recovered)
        return lost

    def leave(self, client: Any, index: str, age: float) -> bool:
        """Withdraw the presence if nothing is held any more (a clean stop), after a
        :meth:`refresh`; return whether it was withdrawn. Otherwise the presence
        expires and other nodes take back what is left."""
        if self.refresh(client, index, age):
            return False
        keys = self.keys
        script("leave")(
            client,
            [keys.presence, keys.node(self.id), self.held, keys.info, keys.sweeper],
            [self.id],
        )
        self.sweeper = False
        return True


def adopt(channel: Any, node: Node) -> None:
    """Make ``channel``'s QoS record deliveries as held by ``node`` and restore by the
    visibility timeout on the server's clock. Idempotent."""
    qos = channel.qos
    if getattr(qos, "_resilience_node", None) is not node:
        qos._resilience_node = node
        qos.append = types.MethodType(_append, qos)
        qos.restore_visible = types.MethodType(_restore_visible, qos)


def use_server_clock() -> None:
    """Make every kombu Redis restore sweep of this process use the server's clock.

    kombu restores from its poller through whichever polled channel comes first (the
    remote-control channel as often as the task consumer's), and the first time while
    the consumer connects (``MultiChannelPoller.on_poll_init``, kombu 5.3-5.7), before
    any consumer boot step could :func:`adopt` a channel. A worker therefore replaces
    ``QoS.restore_visible`` itself, once, before its consumer connects. Idempotent.
    """
    from kombu.transport import redis as kombu_redis

    if kombu_redis.QoS.restore_visible is not _restore_visible:
        kombu_redis.QoS.restore_visible = _restore_visible  # type: ignore[method-assign]


def _append(qos: Any, message: Any, delivery_tag: str) -> None:
    """kombu's ``QoS.append``, on the server's clock, and recording ``node``'s hold.

    A message the reliable fetch took is recorded already (by the same step that
    popped it): only kombu's in-memory bookkeeping is left to do.
    """
    from kombu.transport import virtual
    from kombu.utils import json as kombu_json

    dumps: Callable[[Any], str] = kombu_json.dumps
    base_append: Callable[..., None] = virtual.QoS.append

    channel = qos.channel
    if getattr(channel, "_resilience_fetch", None) is None:  # kombu's BRPOP took it
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        prefix = channel.global_keyprefix or ""
        keys = [prefix + channel.unacked_key, prefix + channel.unacked_index_key]
        with channel.conn_or_acquire() as client:
            script("append")(client, [*keys, qos._resilience_node.held], [delivery_tag, entry])
    base_append(qos, message, delivery_tag)


def _restore_visible(qos: Any, start: int = 0, num: int = 10, interval: int = 10) -> None:
    """kombu's ``QoS.restore_visible`` (same throttle, mutex and restore), with the
    ceiling taken from the server's clock."""
    from kombu.transport.redis import Mutex, MutexHeld

    qos._vrestore_count = getattr(qos, "_vrestore_count", 0) + 1
    if (qos._vrestore_count - 1) % (interval or 1):
        return
    channel = qos.channel
    index = (channel.global_keyprefix or "") + qos.unacked_index_key
    with channel.conn_or_acquire() as client:
        ceiling = _server_time(client) - float(qos.visibility_timeout)
        limit = ["LIMIT", start, num] if num else []
        try:
            with Mutex(client, qos.unacked_mutex_key, qos.unacked_mutex_expire):
                due = execute(client, "ZRANGEBYSCORE", index, "-inf", ceiling, *limit)
                for tag in due or []:
                    qos.restore_by_tag(text(tag), client)
        except MutexHeld:
            pass


def _server_time(client: Any) -> float:
    """The broker's clock, in seconds since the epoch."""
    seconds, micros = execute(client, "TIME")
    return int(seconds) + int(micros) / 1_000_000
