"""Worker-death recovery by liveness, on a Redis broker.

Each worker node keeps a presence lease in the broker's Redis (``resilience_node_ttl``,
default 6 s, on the server's clock), renewed every ``ttl / 3`` by its main process and
by every fetch. The fetch that pops a message records, in the same step, that this
node holds it (``held:{node}``). The one node holding the sweeper lease (taken by any
node's renewal when it is free) sweeps every ``ttl / 6`` (at most 1 s) for the fleet:
a node whose presence expired has every message it held put back on its queue, once
(``recovery``), and a process holding run or lock leases keeps a presence of its own,
so its leases are free at once when it dies, on any host (``holders``).

Only nodes that register presence are ever recovered this way: a worker without
celery-resilience on the same Redis keeps kombu's visibility timeout. Every timing
decision uses the server's ``TIME`` or TTLs, never a worker's clock, and the first
renewal or sweep after the server heard from nobody for half a TTL (it was stopped)
extends every lease instead of letting the sweep declare every node dead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from celery_resilience.liveness.keys import Keys
from celery_resilience.settings import Settings, broker_url

REDIS_BROKERS = ("redis://", "rediss://", "sentinel://", "redis+socket://")
"""Broker URL schemes served by kombu's Redis transport, whose workers keep presence."""

DEFAULT_VISIBILITY_TIMEOUT = 3600.0
"""kombu's Redis transport's visibility timeout, in seconds, when
``broker_transport_options`` sets none."""


def enabled(conf: Mapping[str, Any], settings: Settings) -> bool:
    """Whether this app's workers keep presence: a Redis broker, heartbeat not off."""
    return settings.visibility_heartbeat is not False and broker_url(conf).lower().startswith(
        REDIS_BROKERS
    )


def keys_of(conf: Mapping[str, Any], settings: Settings) -> Keys:
    """The liveness keys of this app (under the broker's ``global_keyprefix``)."""
    options = conf.get("broker_transport_options") or {}
    return Keys.of(options.get("global_keyprefix"), settings.key_prefix)


def sweep_interval(node_ttl: float) -> float:
    """Seconds between two liveness sweeps of a node: ``ttl / 6``, at most 1 s."""
    return min(node_ttl / 6, 1.0)


def connect(app: Any) -> Any:
    """A client of ``app``'s broker Redis, from kombu (so every broker URL form, transport
    option and TLS setting kombu accepts applies), for the life of the process. Commands
    go through redis-py's own ``execute_command``: kombu's client prefixes only some keys.
    """
    connection = app.connection_for_write()
    channel = connection.default_channel
    client = channel._create_client()  # kombu >= 5.3: a sync client on the channel's pool
    client._resilience_connection = connection  # keeps the pool's owner alive
    return client


@contextlib.contextmanager
def connected(app: Any) -> Iterator[Any]:
    """:func:`connect` for one block (a CLI command): the connection is released after."""
    connection = app.connection_for_write()
    try:
        yield connection.default_channel._create_client()
    finally:
        connection.release()
