"""Reliable fetch: a Redis-broker message is recorded as unacked in the same step that pops it.

kombu's Redis transport pops a message with ``BRPOP`` and records it as unacked (in the
``unacked`` hash and ``unacked_index``) only after the reply reached the worker. A node
that dies in between — the reply in flight, in the socket buffer, or paused for want of
prefetch credit (kombu >= 5.7) — loses the message: it is in no list and no hash
(celery/celery#7950). Reliable fetch replaces the ``BRPOP`` of the worker's consumer
channel with:

* ``FETCH``, a Lua script that pops the first message of the channel's queue keys (in
  kombu's order: priority, then queue cycle) and records it in ``unacked`` and
  ``unacked_index`` (scored with the server's clock) and in the node's held set, and
  renews the node's presence, atomically: from the moment it leaves the queue it is
  restorable, and it belongs to a node (``celery_resilience.liveness``);
* when every queue was empty, ``BLMOVE key key RIGHT RIGHT timeout`` on the first queue
  key: it blocks until that list has a message and moves it onto itself (a no-op, nothing
  leaves Redis), then the next ``FETCH`` takes it. Messages arriving meanwhile on another
  queue or priority key are fetched when the wait times out (kombu's ``brpop_timeout``,
  1 s by default).

One round trip per message while messages are waiting; two (wait + fetch) after idling.
kombu's own ``QoS.append`` on delivery then only does its in-memory part
(``liveness.node.adopt``).

Whether the server can do all this is found out by trying it, not by asking ``INFO``
(which ACL users often lack, e.g. ``-@dangerous``): :func:`refusal` runs ``BLMOVE``,
``SCRIPT LOAD`` and ``EVALSHA`` once without touching a message. A server without
``BLMOVE`` (Redis < 6.2), or whose ACL refuses one of them, keeps kombu's ``BRPOP``,
with one warning naming the command and the permission to grant. A refusal later on
(the ACL changed, or refuses a command the script runs) turns reliable fetch off for
that channel the same way; it never stops the worker.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery_resilience.liveness.keys import ms

if TYPE_CHECKING:
    from celery_resilience.liveness.node import Node

logger = logging.getLogger(__name__)

# KEYS: unacked hash, unacked index, the node's held set, presence, then the queue keys
# in fetch order.  ARGV: node id, node TTL (ms).
# Returns {index of the queue key (0-based), payload} or nil.  A payload that is not
# kombu's JSON (no delivery tag) is popped and returned unrecorded, as BRPOP would.
# Times are the server's (TIME), never the worker's. Redis >= 7.0 checks each command
# against the user's ACL first, so a refused one fails the script (NOPERM, naming it)
# before it changed anything.
FETCH = """
local function refused(command, ...)
    if redis.acl_check_cmd and not redis.acl_check_cmd(command, ...) then
        return redis.error_reply('NOPERM this user has no permissions to run the ' ..
            "'" .. string.lower(command) .. "' command on these keys")
    end
end
local ttl = tonumber(ARGV[2])
if not ttl then return redis.error_reply('ERR node TTL must be a number of ms') end
for i = 5, #KEYS do
    local err = refused('LINDEX', KEYS[i], '-1')
    if err then return err end
    local item = redis.call('LINDEX', KEYS[i], -1)
    if item then
        err = refused('RPOP', KEYS[i]) or refused('ZADD', KEYS[2], '0', 'tag')
            or refused('HSET', KEYS[1], 'tag', 'payload') or refused('SADD', KEYS[3], 'tag')
            or refused('ZADD', KEYS[4], '0', 'node')
        if err then return err end
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
            local t = redis.call('TIME')
            redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, tag)
            redis.call('HSET', KEYS[1], tag,
                '[' .. item .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
            redis.call('SADD', KEYS[3], tag)
            local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
            redis.call('ZADD', KEYS[4], 'GT', now + ttl, ARGV[1])
        end
        return {i - 5, item}
    end
end
return nil
"""

_PROBE_WAIT = 0.01  # seconds the BLMOVE probe blocks on a missing key at most
_OFF = (
    "reliable fetch off, the worker fetches with kombu's BRPOP: a node that dies "
    "while a message is in flight to it can lose that message"
)

# Each reason is logged once per process: a reconnected consumer probes its new channel.
_warned: set[str] = set()


def refusal(channel: Any, node: Node) -> str | None:
    """Why ``channel``'s Redis cannot fetch reliably, or ``None`` when it can.

    Runs once each command reliable fetch needs that kombu's own fetch does not:
    ``BLMOVE``, ``SCRIPT LOAD`` and ``EVALSHA``, on kombu's unacked keys (so an ACL key
    pattern that lets kombu work lets the probe through) and without touching a
    message: ``BLMOVE`` of the ``unacked_index`` sorted set onto itself fails with
    ``WRONGTYPE`` (or blocks 10 ms if the key is missing); the script, given no queue
    key, reads nothing. The reason names the refused command and the ACL rule that
    grants it. No ``INFO``: ACL users often lack it (it is in ``@dangerous``), and an
    unknown ``BLMOVE`` tells Redis < 6.2 apart as well. Connection errors propagate.
    """
    from redis import Redis
    from redis.exceptions import NoPermissionError, ResponseError

    prefix = channel.global_keyprefix or ""
    keys = [prefix + channel.unacked_key, prefix + channel.unacked_index_key]
    ours = [node.held, node.keys.presence]
    command, grant = "BLMOVE", "+blmove"
    # Redis's own execute_command: kombu's client would add global_keyprefix to some keys.
    execute: Callable[..., Any] = Redis.execute_command
    with channel.conn_or_acquire() as client:
        try:
            try:
                execute(client, "BLMOVE", keys[1], keys[1], "RIGHT", "RIGHT", _PROBE_WAIT)
            except ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):  # WRONGTYPE: it exists and may run
                    raise
            command, grant = "SCRIPT LOAD", "+script|load"
            sha = execute(client, "SCRIPT", "LOAD", FETCH)
            command, grant = "EVALSHA", "+evalsha"
            # No queue key: reads and writes nothing, but the ACL sees every key.
            execute(client, "EVALSHA", sha, 4, *keys, *ours, node.id, ms(node.ttl))
        except NoPermissionError as exc:
            return f"the broker's ACL refuses {command} ({exc}; grant {grant})"
        except ResponseError as exc:
            if "unknown command" in str(exc).lower():
                return f"the broker's Redis has no {command} (Redis < 6.2, or renamed)"
            return f"{command} failed on the broker's Redis: {exc}"
    return None


def install(channel: Any, node: Node) -> bool:
    """Make ``channel`` (a kombu Redis channel) fetch reliably, recording each message as
    held by ``node``; return whether it does.

    Idempotent. Replaces the channel's ``_brpop_start``/``_brpop_read`` (and the
    ``BRPOP`` handler the poller calls) on this instance only; producers and other
    channels keep kombu's behaviour. Returns ``False``, changing nothing and warning
    once why, when :func:`refusal` gives a reason (a server older than Redis 6.2, or an
    ACL refusing a command reliable fetch needs); never raises for that.
    """
    if getattr(channel, "_resilience_fetch", None) is not None:
        return True
    if getattr(channel, "_resilience_fetch_off", None) is not None:
        return False  # refused on this channel already: do not probe again
    reason = refusal(channel, node)
    if reason is not None:
        _turn_off(channel, reason)
        return False
    channel._resilience_fetch = _Fetcher(channel, node)
    channel._brpop_start = types.MethodType(_brpop_start, channel)
    channel._brpop_read = types.MethodType(_brpop_read, channel)
    channel.handlers["BRPOP"] = channel._brpop_read
    return True


def _turn_off(channel: Any, reason: str) -> None:
    """Give ``channel`` kombu's own fetch back and warn (once per ``reason``) why."""
    for name in ("_brpop_start", "_brpop_read"):
        channel.__dict__.pop(name, None)  # the class's (kombu's) methods show again
    channel.handlers["BRPOP"] = channel._brpop_read
    channel._resilience_fetch = None
    channel._resilience_fetch_off = reason
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("celery-resilience: %s: %s", reason, _OFF)


class _Fetcher:
    """Per-channel fetch state: the script's SHA, the keys in flight, wait or fetch next."""

    def __init__(self, channel: Any, node: Node) -> None:
        self.node = node
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
        from redis.exceptions import NoPermissionError

        try:
            sha = fetcher.script(self)
        except NoPermissionError as exc:  # the ACL changed since install (a reload)
            _turn_off(self, f"the broker's ACL refuses SCRIPT LOAD ({exc}; grant +script|load)")
            self._brpop_start(timeout)
            return
        node = fetcher.node
        held = [
            fetcher.prefix + self.unacked_key,
            fetcher.prefix + self.unacked_index_key,
            node.held,
            node.keys.presence,
        ]
        args: list[Any] = ["EVALSHA", sha, len(keys) + 4, *held, *keys, node.id, ms(node.ttl)]
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
    from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

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
        except ResponseError as exc:
            # Redis < 7.0 has no acl_check_cmd: a command refused inside the script
            # fails it with a plain error (LINDEX, RPOP: before it changed anything).
            if not isinstance(exc, NoPermissionError) and "can't run this command" not in str(exc):
                raise
            _turn_off(self, f"the broker's ACL refused a command of a fetch ({command}: {exc})")
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
