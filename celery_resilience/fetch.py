"""Reliable fetch: a Redis-broker message is recorded as unacked in the same step that pops it.

kombu's Redis transport pops a message with ``BRPOP`` and records it as unacked (in the
``unacked`` hash and ``unacked_index``) only after the reply reached the worker. A node
that dies in between — the reply in flight, in the socket buffer, or paused for want of
prefetch credit (kombu >= 5.7) — loses the message: it is in no list and no hash
(celery/celery#7950). Reliable fetch replaces the ``BRPOP`` of the worker's consumer
channel with:

* ``FETCH``, a Lua script that pops the first message of the channel's queue keys (in
  kombu's order: priority, then queue cycle) and records it in ``unacked`` and
  ``unacked_index`` atomically, so from the moment it leaves the queue it is restorable;
* when every queue was empty, ``BLMOVE key key RIGHT RIGHT timeout`` on the first queue
  key: it blocks until that list has a message and moves it onto itself (a no-op, nothing
  leaves Redis), then the next ``FETCH`` takes it. Messages arriving meanwhile on another
  queue or priority key are fetched when the wait times out (kombu's ``brpop_timeout``,
  1 s by default).

One round trip per message while messages are waiting; two (wait + fetch) after idling.
kombu still runs its own ``QoS.append`` on delivery, which rewrites the same two
entries. Needs Redis >= 6.2 (``BLMOVE``); older servers keep kombu's ``BRPOP``.
"""

from __future__ import annotations

import logging
import time
import types
from typing import Any

logger = logging.getLogger(__name__)

# KEYS: unacked hash, unacked index, queue keys in fetch order.  ARGV: now (s).
# Returns {index of the queue key (0-based), payload} or nil.  A payload that is not
# kombu's JSON (no delivery tag) is popped and returned unrecorded, as BRPOP would.
FETCH = """
for i = 3, #KEYS do
    local item = redis.call('LINDEX', KEYS[i], -1)
    if item then
        local ok, msg = pcall(cjson.decode, item)
        local tag, info
        if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
            tag = msg['properties']['delivery_tag']
            info = msg['properties']['delivery_info']
        end
        redis.call('RPOP', KEYS[i])
        if type(tag) == 'string' then
            if type(info) ~= 'table' then info = {} end
            local ex, rk = info['exchange'] or '', info['routing_key'] or ''
            redis.call('ZADD', KEYS[2], ARGV[1], tag)
            redis.call('HSET', KEYS[1], tag,
                '[' .. item .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
        end
        return {i - 3, item}
    end
end
return nil
"""

_MIN_SERVER = (6, 2)


def server_supports(client: Any) -> bool:
    """Whether the Redis server behind ``client`` has ``BLMOVE`` (Redis >= 6.2)."""
    version = str(client.info("server").get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return parts >= _MIN_SERVER


def install(channel: Any) -> bool:
    """Make ``channel`` (a kombu Redis channel) fetch reliably; return whether it does.

    Idempotent. Replaces the channel's ``_brpop_start``/``_brpop_read`` (and the
    ``BRPOP`` handler the poller calls) on this instance only; producers and other
    channels keep kombu's behaviour. Returns ``False``, changing nothing, when the
    server is older than Redis 6.2.
    """
    if getattr(channel, "_resilience_fetch", None) is not None:
        return True
    with channel.conn_or_acquire() as client:
        if not server_supports(client):
            logger.warning(
                "celery-resilience: Redis < 6.2 has no BLMOVE: reliable fetch off, a node "
                "that dies while a message is in flight to it can lose that message"
            )
            return False
    channel._resilience_fetch = _Fetcher(channel)
    channel._brpop_start = types.MethodType(_brpop_start, channel)
    channel._brpop_read = types.MethodType(_brpop_read, channel)
    channel.handlers["BRPOP"] = channel._brpop_read
    return True


class _Fetcher:
    """Per-channel fetch state: the script's SHA, the keys in flight, wait or fetch next."""

    def __init__(self, channel: Any) -> None:
        self.sha: str | None = None
        self.prefix: str = channel.global_keyprefix or ""
        self.queues: list[str] = []  # queue name per key of the command in flight
        self.waiting = False  # the command in flight is the BLMOVE wait
        self.fetch_next = True  # last fetch found a message (or none tried yet)

    def script(self, channel: Any) -> str:
        if self.sha is None:
            self.sha = str(channel.client.script_load(FETCH))
        return self.sha


def _brpop_start(self: Any, timeout: float | None = None) -> None:
    """Send a ``FETCH`` (or, after an empty one, the ``BLMOVE`` wait) on the poll connection."""
    fetcher: _Fetcher = self._resilience_fetch
    if timeout is None:
        timeout = getattr(self, "brpop_timeout", 1)  # kombu < 5.6: fixed 1 s
    queues = self._queue_cycle.consume(len(self.active_queues))
    if not queues:
        return
    pairs = [
        (queue, self._q_for_pri(queue, pri)) for pri in self.priority_steps for queue in queues
    ]
    keys = [fetcher.prefix + key for _, key in pairs]
    fetcher.queues = [queue for queue, _ in pairs]
    if fetcher.fetch_next:
        sha = fetcher.script(self)
        unacked = [fetcher.prefix + self.unacked_key, fetcher.prefix + self.unacked_index_key]
        args: list[Any] = ["EVALSHA", sha, len(keys) + 2, *unacked, *keys, time.time()]
        fetcher.waiting = False
    else:
        args = ["BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", timeout or 0]
        fetcher.waiting = True
    self._in_poll = self.client.connection
    self._brpop_sent_at = time.monotonic()  # kombu >= 5.7 drops a silent connection
    self.client.connection.send_command(*args)


def _brpop_read(self: Any, **options: Any) -> bool:
    """Read the reply of ``_brpop_start``; deliver a fetched message, else ``Empty``."""
    from kombu.transport.virtual import Empty
    from kombu.utils import json as kombu_json
    from kombu.utils.encoding import bytes_to_str
    from redis.exceptions import NoScriptError

    fetcher: _Fetcher = self._resilience_fetch
    try:
        command = "BLMOVE" if fetcher.waiting else "EVALSHA"
        try:
            reply = self.client.parse_response(self.client.connection, command, **options)
        except self.connection_errors:
            self.client.connection.disconnect()  # as kombu: the next poll reconnects
            raise
        except NoScriptError:
            fetcher.sha = None  # the server lost its script cache (restart, SCRIPT FLUSH)
            fetcher.fetch_next = True
            raise Empty() from None
        if fetcher.waiting:
            fetcher.fetch_next = True  # woken (or timed out): fetch from every key now
            raise Empty()
        if not reply:
            fetcher.fetch_next = False
            raise Empty()
        fetcher.fetch_next = True
        index, item = reply
        queue = fetcher.queues[int(index)]
        self._queue_cycle.rotate(queue)
        self.connection._deliver(kombu_json.loads(bytes_to_str(item)), queue)  # type: ignore[no-untyped-call]
        return True
    finally:
        self._in_poll = None
        flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
        if flush is not None:
            flush()
