"""``resilience nodes``: what the liveness keys of an app say, read, never written.

Which worker nodes are present in the broker's Redis (``celery_resilience.liveness``),
when each presence expires, how many messages each holds and of which tasks, which
nodes were lost recently and what their recovery put back, and how many lease-holder
processes are present. Every time is the Redis server's (``TIME``). The view is read
with several commands, not as one atomic snapshot: a node renewing, fetching or
being recovered meanwhile may be seen halfway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from celery_resilience import liveness
from celery_resilience.describe import one_line
from celery_resilience.errors import BackendUnavailable, ConfigurationError
from celery_resilience.liveness.keys import Keys, execute, text
from celery_resilience.runtime import runtime
from celery_resilience.settings import broker_url
from celery_resilience.urls import mask_url

SCAN_LIMIT = 1000  # held messages of one node whose task names are counted, at most
UNKNOWN = "?"  # a task, node or host name the keys do not give (not a Celery message)


@dataclass(frozen=True)
class LiveNode:
    """A worker node in the presence set: live, or expired and not yet recovered.

    ``expires_in`` is seconds until its presence expires (negative once it has);
    ``holds`` the messages in its held set, which may still count a message acked
    since the node's last refresh; ``by_task`` counts the held messages that are
    still unacked, by task name, over at most ``scanned`` of them (``capped`` when
    there were more).
    """

    id: str
    nodename: str
    hostname: str
    pid: int | None
    queues: list[str]
    ttl: float | None
    expires_in: float
    expired: bool
    holds: int
    by_task: dict[str, int] = field(default_factory=dict)
    scanned: int = 0
    capped: bool = False


@dataclass(frozen=True)
class LostNode:
    """A node recently presumed dead, and what its recovery put back, per queue."""

    node: str
    nodename: str
    hostname: str
    pid: int | None
    lost_at: float | None
    recovered: dict[str, int]

    @property
    def messages(self) -> int:
        return sum(self.recovered.values())


@dataclass(frozen=True)
class Nodes:
    """The liveness view of one app's broker, at server time ``now`` (s since the epoch).

    ``live`` is sorted by node name; ``lost`` is newest first (at most the 100 kept);
    ``holders`` counts lease-holder processes whose presence has not expired.
    ``sweeping`` says whether a node holds the sweeper lease or a node's presence has not
    expired (it takes the lease at its next renewal): an expired node is then being
    recovered; otherwise it is recovered once a node runs again.
    """

    now: float
    live: list[LiveNode]
    lost: list[LostNode]
    holders: int
    sweeping: bool


def read_nodes(app: Any, *, scan_limit: int = SCAN_LIMIT) -> Nodes:
    """Read ``app``'s liveness keys in its broker's Redis.

    :param scan_limit: count the task names of at most this many held messages per node.
    :raises ConfigurationError: liveness is not on (no Redis broker, or the visibility
        heartbeat off), so there is nothing to read.
    :raises BackendUnavailable: the broker's Redis could not be reached or refused a
        command; the message names its URL with the password masked.
    """
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    conf = app.conf
    settings = runtime(app).settings
    if not liveness.enabled(conf, settings):
        raise ConfigurationError(
            f"liveness needs a Redis broker and the visibility heartbeat on: {_why_off(app)}, "
            "so the workers keep no presence to show"
        )
    keys = liveness.keys_of(conf, settings)
    options = conf.get("broker_transport_options") or {}
    unacked = (options.get("global_keyprefix") or "") + (options.get("unacked_key") or "unacked")
    try:
        with liveness.connected(app) as client:
            return _read(client, keys, unacked, scan_limit)
    except (RedisError, OperationalError, OSError) as exc:
        raise BackendUnavailable(
            f"the broker's Redis at {mask_url(broker_url(conf))} did not answer: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _why_off(app: Any) -> str:
    """Which setting keeps liveness off for ``app``."""
    broker = broker_url(app.conf)
    if not broker:
        return "broker_url is unset (Celery's default amqp://), not Redis"
    if not broker.lower().startswith(liveness.REDIS_BROKERS):
        return f"broker_url is {mask_url(broker)!r}, not Redis"
    return f"{runtime(app).settings.name_of('visibility_heartbeat')} is false"


def _read(client: Any, keys: Keys, unacked: str, scan_limit: int) -> Nodes:
    seconds, micros = execute(client, "TIME")
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    sweeper = execute(client, "GET", keys.sweeper)
    reply = execute(client, "ZRANGE", keys.presence, 0, -1, "WITHSCORES")
    present = {text(member): float(score) for member, score in _pairs(reply)}
    node_ids = sorted(i for i in present if i.startswith("node/"))
    infos = execute(client, "HMGET", keys.info, *node_ids) if node_ids else []
    live = []
    for node_id, raw in zip(node_ids, infos, strict=True):
        info = _json_object(raw)
        expires_in = (present[node_id] - now_ms) / 1000
        holds = int(execute(client, "SCARD", keys.held(node_id)))
        tags = _tags(client, keys.held(node_id), scan_limit) if holds else []
        live.append(
            LiveNode(
                id=node_id,
                nodename=str(info.get("nodename", UNKNOWN)),
                hostname=str(info.get("hostname") or _id_part(node_id, 1)),
                pid=_int(info.get("pid", _id_part(node_id, 2))),
                queues=_strings(info.get("queues")),
                ttl=_float(info.get("ttl")),
                expires_in=expires_in,
                expired=expires_in < 0,
                holds=holds,
                by_task=_by_task(client, unacked, tags),
                scanned=len(tags),
                capped=len(tags) >= scan_limit and holds > len(tags),
            )
        )
    live.sort(key=lambda n: (n.nodename, n.id))
    holders = sum(
        1 for i, deadline in present.items() if i.startswith("proc/") and deadline >= now_ms
    )
    lost = [_lost(_json_object(raw)) for raw in execute(client, "LRANGE", keys.lost, 0, -1)]
    sweeping = sweeper is not None or any(not n.expired for n in live)
    return Nodes(now_ms / 1000, live, lost, holders, sweeping)


def _pairs(reply: list[Any]) -> list[tuple[Any, Any]]:
    """``ZRANGE ... WITHSCORES`` as (member, score): redis-py pairs it or not, by version."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(member, score) for member, score in reply]
    return list(zip(reply[0::2], reply[1::2], strict=True))


def _tags(client: Any, held: str, limit: int) -> list[str]:
    """Up to ``limit`` delivery tags of the set ``held``, in ``SSCAN`` order."""
    tags: list[str] = []
    cursor = "0"
    while len(tags) < limit:
        cursor, batch = execute(client, "SSCAN", held, cursor, "COUNT", limit)
        tags += [text(tag) for tag in batch]
        if text(cursor) == "0":
            break
    return list(dict.fromkeys(tags))[:limit]  # SSCAN may return a member twice


def _by_task(client: Any, unacked: str, tags: list[str]) -> dict[str, int]:
    """Task names of the ``tags`` still in kombu's unacked hash, counted, most first."""
    counts: dict[str, int] = {}
    for raw in execute(client, "HMGET", unacked, *tags) if tags else []:
        if raw is None:  # acked (or restored) since the node's last refresh
            continue
        name = _task_name(raw)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _task_name(raw: Any) -> str:
    """The task name of kombu's unacked entry ``[payload, exchange, routing_key]``."""
    try:
        payload = json.loads(text(raw))[0]
        name = payload["headers"]["task"]
    except (ValueError, LookupError, TypeError):
        return UNKNOWN
    return name if isinstance(name, str) and name else UNKNOWN


def _lost(record: dict[str, Any]) -> LostNode:
    node = str(record.get("node", UNKNOWN))
    recovered = record.get("recovered")
    return LostNode(
        node=node,
        nodename=str(record.get("nodename", UNKNOWN)),
        hostname=str(record.get("hostname") or _id_part(node, 1)),
        pid=_int(record.get("pid", _id_part(node, 2))),
        lost_at=_float(record.get("lost_at")),
        recovered={
            str(queue): n
            for queue, n in (recovered.items() if isinstance(recovered, dict) else [])
            if isinstance(n, int)
        },
    )


def _json_object(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(text(raw)) if raw is not None else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _id_part(presence_id: str, index: int) -> str:
    """Part ``index`` of ``node/host/pid/random`` (host names hold no ``/``)."""
    parts = presence_id.split("/")
    return parts[index] if len(parts) == 4 else UNKNOWN


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- the view as text, for ``resilience nodes`` and the web page alike ------------------

TIMES = "\N{MULTIPLICATION SIGN}"


def expires_text(node: LiveNode, found: Nodes) -> str:
    """When ``node``'s presence expires, or what happens to it once it has."""
    if not node.expired:
        return f"in {node.expires_in:.1f} s"
    if found.sweeping:
        return "expired, being recovered"
    return "expired, recovered once a node sweeps"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{one_line(name)}{TIMES}{n}" for name, n in counts.items())


def holds_text(node: LiveNode) -> str:
    """How many messages ``node`` holds, then how many of each task, most first (over the
    first ``scanned`` only when ``capped``), and how many are no longer unacked."""
    if not node.holds:
        return "0"
    details = []
    if node.by_task:
        first = f" (first {node.scanned})" if node.capped else ""
        details.append(f"by task{first}: {_counts(node.by_task)}")
    gone = node.scanned - sum(node.by_task.values())
    if gone:
        details.append(f"{gone} acked or requeued since its last refresh")
    return f"{node.holds} ({'; '.join(details)})" if details else str(node.holds)


def recovered_text(node: LostNode) -> str:
    """How many messages the recovery of ``node`` put back, then how many to each queue."""
    if not node.recovered:
        return "0"
    return f"{node.messages} ({_counts(node.recovered)})"
