"""Ask a Sentinel or Cluster URL's servers what a client cannot say: which sentinels
answer and which masters they know, and how many hash slots a cluster covers.

For ``resilience doctor``: redis-py's own errors for these ("No master found",
"cannot be connected") do not say which part of the setting is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery_resilience.backends.clients import TIMEOUTS, credentials, is_cluster
from celery_resilience.urls import DEFAULT_SENTINEL_PORT, SENTINEL_SCHEME, cluster_nodes

SLOTS = 16384
"""Hash slots of a Redis Cluster."""

_PROBE_TIMEOUTS: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}


def problem_of(url: str, options: Mapping[str, Any], setting: str) -> tuple[str, str] | None:
    """``(problem, fix)`` for a Sentinel or Cluster ``url`` that cannot serve, else None
    (also for any other URL). ``setting`` names where ``options`` come from, for the fix.
    Makes one connection per sentinel or startup node, 2 s timeouts."""
    if url.lower().startswith(SENTINEL_SCHEME):
        return _sentinel(url, options, setting)
    if is_cluster(url):
        return _cluster(url)
    return None


def _sentinel(url: str, options: Mapping[str, Any], setting: str) -> tuple[str, str] | None:
    import redis

    master = str(options.get("master_name") or "")
    known: set[str] = set()
    failures = []
    for chunk in url.split(";"):
        parts = urlsplit(chunk.strip())
        host, port = parts.hostname or "localhost", parts.port or DEFAULT_SENTINEL_PORT
        kwargs = {**TIMEOUTS, **_PROBE_TIMEOUTS, **(options.get("sentinel_kwargs") or {})}
        client = redis.Redis(host=host, port=port, **kwargs)
        try:
            masters = client.sentinel_masters()
        except redis.RedisError as exc:
            failures.append(f"{host}:{port} ({type(exc).__name__}: {exc})")
            continue
        finally:
            client.close()
        if master in masters:
            return None
        known.update(str(name) for name in masters)
    if not known and failures:
        return (
            f"no sentinel of the URL answers: {'; '.join(failures)}.",
            "correct the sentinels' host names and ports in the URL (sentinel://host:26379;"
            "sentinel://host2:26379), or start them.",
        )
    monitored = ", ".join(sorted(known)) or "none"
    return (
        f"no sentinel knows the master name {master!r} (they monitor: {monitored}).",
        f"set master_name in {setting} to the name in the sentinels' 'sentinel monitor' "
        "line (SENTINEL MASTERS lists them).",
    )


def _cluster(url: str) -> tuple[str, str] | None:
    import redis

    failures = []
    auth = credentials(url.replace("+cluster", "", 1))
    tls = url.lower().startswith("rediss+")
    for host, port in cluster_nodes(url):
        client = redis.Redis(host=host, port=port, ssl=tls, **auth, **_PROBE_TIMEOUTS)
        try:
            info = client.cluster("INFO")
        except redis.RedisError as exc:
            failures.append(f"{host}:{port} ({type(exc).__name__}: {exc})")
            continue
        finally:
            client.close()
        info = _parse(info)
        assigned = int(info.get("cluster_slots_assigned", 0))
        if assigned < SLOTS or info.get("cluster_state") != "ok":
            return (
                f"the cluster of {host}:{port} covers {assigned} of {SLOTS} hash slots "
                f"(cluster_state {info.get('cluster_state', '?')}): keys of the others can "
                "be neither read nor written.",
                f"assign the missing slots, e.g. redis-cli --cluster fix {host}:{port}, or "
                "wait for a failover to finish.",
            )
        return None
    return (
        f"no startup node of the URL answers: {'; '.join(failures)}.",
        "correct the nodes' host names and ports in the URL (redis+cluster://host:port,"
        "host2:port), or start them.",
    )


def _parse(info: Any) -> dict[str, str]:
    """``CLUSTER INFO``'s reply, as redis-py returns it (a dict, or the raw text)."""
    if isinstance(info, Mapping):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}
