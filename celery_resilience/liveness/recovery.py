"""Recovery: a live node returns every message a dead node held to its queue, once.

For each dead node (its presence expired on the server's clock), in batches:
``claim.lua`` moves up to ``BATCH`` of its delivery tags into the claimer's own held
set and returns their unacked entries; the claimer routes each as kombu's own restore
would (kombu's exchange lookup and priority key, the message marked redelivered); and
``restore.lua`` pushes each one back and removes it from kombu's unacked keys, only if
it is still there. A claimer that dies between the two is a dead node in turn: the
tags are in its held set. A recovery lease (one node TTL, renewed by each claim) keeps
two live nodes from recovering one dead node at once.

:func:`hand_back` is the same restore for a live node's own messages that no pool
child started, at warm shutdown (``start.lua`` is the child's side).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_resilience.liveness.keys import MAX_LOST, Keys, execute, ms, script, text

logger = logging.getLogger(__name__)

BATCH = 500  # messages per claim
BACK_TTL = 86_400.0  # seconds a hand-back's marker waits for the child that would run it
_LIVE, _MORE, _DONE = 0, 1, 2  # claim.lua's states


@dataclass
class Recovered:
    """What one recovery of a dead node (or lease holder) returned."""

    node: str
    info: dict[str, Any]
    queues: Counter[str] = field(default_factory=Counter)
    finished: bool = False  # this recovery removed the node: the others found it gone

    @property
    def messages(self) -> int:
        return sum(self.queues.values())


def recover(
    channel: Any, client: Any, keys: Keys, claimer: str, dead: str, ttl: float
) -> Recovered:
    """Restore what ``dead`` held; ``claimer`` is this node's id.

    Stops early, having restored nothing more, when ``dead`` renewed meanwhile or
    another node recovers it. ``client`` is a client of the broker's Redis.
    """
    info = _info(client, keys, dead)
    result = Recovered(dead, info)
    claim = script("claim")
    unacked = _unacked_keys(channel)
    while True:
        reply = claim(
            client,
            [
                keys.presence,
                keys.held(dead),
                keys.held(claimer),
                unacked[0],
                keys.recovering(dead),
                keys.info,
            ],
            [dead, claimer, ms(ttl), BATCH],
        )
        state, flat = int(reply[0]), reply[1:]
        if flat:
            _restore(channel, client, keys, claimer, unacked, flat, result.queues)
        if state == _DONE:
            result.finished = True
        if state != _MORE:
            return result


def _restore(
    channel: Any,
    client: Any,
    keys: Keys,
    claimer: str,
    unacked: list[str],
    flat: list[Any],
    counts: Counter[str],
    handing_back: bool = False,
) -> None:
    """Push the claimed ``(tag, entry)`` pairs of ``flat`` back to their queues.

    ``handing_back``: each only if no pool child marked it started, under a new delivery
    tag (the old one's marker tells its child not to run it).
    """
    from kombu.utils import json as kombu_json

    dumps: Callable[[Any], str] = kombu_json.dumps
    loads: Callable[[str], Any] = kombu_json.loads

    prefix = channel.global_keyprefix or ""
    targets: dict[str, int] = {}  # queue key -> index into KEYS
    args: list[Any] = []
    queues_of: list[list[str]] = []
    unroutable: list[str] = []
    routes: dict[tuple[str, str], list[str]] = {}  # kombu reads the bindings from Redis
    for tag, entry in zip(flat[0::2], flat[1::2], strict=True):
        tag = text(tag)
        try:
            payload, exchange, routing_key = loads(text(entry))
            _mark_redelivered(payload)
            route = (exchange, routing_key)
            if route not in routes:
                routes[route] = list(channel._lookup(exchange, routing_key))
            queues = routes[route]
            priority = channel._get_message_priority(payload, reverse=False)
        except Exception as exc:  # not kombu's entry: leave it to the visibility timeout
            logger.warning("celery-resilience: cannot restore message %s: %s", tag, exc)
            unroutable.append(tag)
            continue
        if not queues:
            unroutable.append(tag)
            continue
        indexes = []
        for queue in queues:
            key = prefix + channel._q_for_pri(queue, priority)
            indexes.append(targets.setdefault(key, len(targets) + 4))
        guard = 0
        if handing_back:
            guard = targets.setdefault(keys.start(tag), len(targets) + 4)
            payload.setdefault("properties", {})["delivery_tag"] = str(uuid.uuid4())
        args += [tag, dumps(payload), guard, len(indexes), *indexes]
        queues_of.append(queues)
    if unroutable:  # kept in kombu's unacked keys, so kombu's own sweep still restores it
        execute(client, "SREM", keys.held(claimer), *unroutable)
    if not args:
        return
    flags = script("restore")(
        client, [*unacked, keys.held(claimer), *targets], [ms(BACK_TTL), *args]
    )
    for flag, queues in zip(flags, queues_of, strict=True):
        if int(flag):
            counts.update(queues)


def hand_back(channel: Any, client: Any, keys: Keys, node: str, tags: list[str]) -> Counter[str]:
    """Put the messages ``tags`` that ``node`` (this node) holds back on their queues,
    except those a pool child has started meanwhile; return how many went to each queue.
    """
    unacked = _unacked_keys(channel)
    entries = execute(client, "HMGET", unacked[0], *tags) if tags else []
    flat = [x for pair in zip(tags, entries, strict=True) if pair[1] is not None for x in pair]
    counts: Counter[str] = Counter()
    if flat:
        _restore(channel, client, keys, node, unacked, flat, counts, handing_back=True)
    return counts


def _unacked_keys(channel: Any) -> list[str]:
    """kombu's unacked hash and unacked index of ``channel``, with ``global_keyprefix``."""
    prefix = channel.global_keyprefix or ""
    return [prefix + channel.unacked_key, prefix + channel.unacked_index_key]


def _mark_redelivered(payload: dict[str, Any]) -> None:
    """As kombu's ``Channel._do_restore_message`` does."""
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass


def _info(client: Any, keys: Keys, node: str) -> dict[str, Any]:
    raw = execute(client, "HGET", keys.info, node)
    try:
        info = json.loads(text(raw)) if raw is not None else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def record_lost(client: Any, keys: Keys, recovered: Recovered, at: float) -> None:
    """Remember ``recovered`` among the most recent lost nodes (``resilience nodes``)."""
    record = {
        "node": recovered.node,
        **{k: v for k, v in recovered.info.items() if k in ("nodename", "hostname", "pid")},
        "lost_at": at,
        "recovered": dict(recovered.queues),
    }
    execute(client, "LPUSH", keys.lost, json.dumps(record))
    execute(client, "LTRIM", keys.lost, 0, MAX_LOST - 1)
