"""redis-py clients for the built-in backends' URLs: one Redis, Sentinel, or Cluster.

- ``redis://``, ``rediss://``, ``unix://``: one server (``redis.Redis.from_url``).
- ``sentinel://h1:26379;sentinel://h2:26379``: the current primary of
  ``transport_options["master_name"]``, found through the sentinels, as Celery's
  result backend spells it. The first chunk's user, password and database are the
  data nodes'; ``sentinel_kwargs`` (e.g. a sentinel password) are the sentinels';
  ``connection_kwargs`` (e.g. ``{"ssl": True}``) go to the data nodes too.
- ``redis+cluster://h:p[,h:p]`` and ``rediss+cluster://``: Redis Cluster, from those
  startup nodes. Every script then gets keys of one hash slot (the backends tag them).

No connection is made until first use, except by ``RedisCluster`` (see ``_cluster``).
Timeouts are 5 s so that a dead server fails an
operation instead of hanging the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from celery_resilience.errors import BackendUnavailable, ConfigurationError, MissingExtraError
from celery_resilience.urls import (
    CLUSTER_SCHEMES,
    DEFAULT_SENTINEL_PORT,
    SENTINEL_SCHEME,
    cluster_nodes,
    mask_url,
)

TIMEOUTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}

TRANSPORT_OPTIONS = ("master_name", "sentinel_kwargs", "min_other_sentinels", "connection_kwargs")
"""The keys of ``resilience_transport_options`` the clients read."""


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (its scripts' keys must share a slot)."""
    return url.lower().startswith(CLUSTER_SCHEMES)


def connect(url: str, role: str, options: Mapping[str, Any] | None = None) -> Any:
    """Return a redis-py client (``Redis`` or ``RedisCluster``) for ``url``.

    ``role`` names the backend role in errors; ``options`` are the transport options
    (``TRANSPORT_OPTIONS``). Raises ``MissingExtraError`` without redis-py and
    ``ConfigurationError`` for a URL or option redis-py refuses.
    """
    try:
        import redis
    except ImportError:
        raise MissingExtraError(
            f"{role} backend {mask_url(url)} needs redis-py: pip install 'celery-resilience[redis]'"
        ) from None
    options = options or {}
    try:
        if url.lower().startswith(SENTINEL_SCHEME):
            return _sentinel(url, role, options)
        if is_cluster(url):
            return _cluster(url, role, options)
        return redis.Redis.from_url(url, health_check_interval=30, **TIMEOUTS)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{role} backend URL {mask_url(url)!r}: {exc}") from None


def credentials(url: str) -> dict[str, Any]:
    """The user and password of ``url``, percent-decoded, for redis-py keywords."""
    parts = urlsplit(url)
    found: dict[str, Any] = {}
    if parts.username:
        found["username"] = unquote(parts.username)
    if parts.password:
        found["password"] = unquote(parts.password)
    return found


def _sentinel(url: str, role: str, options: Mapping[str, Any]) -> Any:
    import redis.sentinel

    factory: Any = redis.sentinel.Sentinel  # untyped in redis-py
    master = options.get("master_name")
    if not master:
        raise ConfigurationError(
            f"{role} backend URL {mask_url(url)!r} is a Sentinel URL but no master name is "
            "set: expected resilience_transport_options = {'master_name': '<name>'} (or, "
            "for the broker's URL, broker_transport_options)"
        )
    chunks = [chunk.strip() for chunk in url.split(";") if chunk.strip()]
    hosts = []
    for chunk in chunks:
        parts = urlsplit(chunk)
        hosts.append((parts.hostname or "localhost", parts.port or DEFAULT_SENTINEL_PORT))
    first = urlsplit(chunks[0])
    data: dict[str, Any] = {**TIMEOUTS, **credentials(chunks[0])}
    db = first.path.strip("/")
    if db:
        data["db"] = int(db)
    data.update(options.get("connection_kwargs") or {})
    sentinel = factory(
        hosts,
        min_other_sentinels=int(options.get("min_other_sentinels") or 0),
        sentinel_kwargs={**TIMEOUTS, **(options.get("sentinel_kwargs") or {})},
        **data,
    )
    return sentinel.master_for(str(master), health_check_interval=30)


def _cluster(url: str, role: str, options: Mapping[str, Any]) -> Any:
    """A ``RedisCluster``: unlike the other clients it connects at once, to learn the
    slots, so an unreachable cluster is ``BackendUnavailable`` here."""
    import redis.cluster
    from redis.exceptions import RedisClusterException

    node: Any = redis.cluster.ClusterNode  # untyped in redis-py
    nodes = [node(host, port) for host, port in cluster_nodes(url)]
    kwargs: dict[str, Any] = {**TIMEOUTS, **credentials(url.replace("+cluster", "", 1))}
    if url.lower().startswith("rediss+"):
        kwargs["ssl"] = True
    kwargs.update(options.get("connection_kwargs") or {})
    try:
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    except (redis.RedisError, RedisClusterException) as exc:
        raise BackendUnavailable(
            f"{role} backend {mask_url(url)} cannot be reached: {type(exc).__name__}: {exc}"
        ) from exc
