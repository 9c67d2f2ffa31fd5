"""The coordination backend on Redis or Valkey: one server, Sentinel or Cluster.

Each operation that must be atomic is one Lua script (``lua/*.lua`` beside this
module, each with its KEYS and ARGV in its header), so a successful delivery costs
two round trips: ``admit`` before the body and ``finish`` after it (a body longer than
a third of the lease TTL adds one renewal per third).

Every key a script touches is in its KEYS. On Redis Cluster a delivery's keys carry
one hash tag, so that they share a slot: its lock key when the task has a lock (the
lock and fencing counter are one per key, and every task id under that lock meets
them in one slot), else its task id. On one server and on Sentinel the names carry no
tag and are those of earlier releases, so that a rolling upgrade shares its leases.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from celery_resilience.backends.base import Admission, AdmitResult, HeldLock, held_for
from celery_resilience.backends.clients import connect, is_cluster
from celery_resilience.errors import BackendUnavailable
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import REDIS_SCHEMES, mask_url

_STATUS = {
    0: Admission.ADMITTED,
    1: Admission.DUPLICATE,
    2: Admission.CRASH_BUDGET_SPENT,
    3: Admission.LOCK_CONTENDED,
    4: Admission.RUNNING,
}


def call(role: str, url: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one Redis operation; a redis-py error becomes ``BackendUnavailable`` naming
    the backend ``role``, its masked ``url`` and the operation."""
    import redis
    from redis.exceptions import RedisClusterException  # not a RedisError (redis-py 4.5-8)

    try:
        return fn(*args, **kwargs)
    except (redis.RedisError, RedisClusterException) as exc:
        raise BackendUnavailable(
            f"{role} backend {url} failed during {what}: {type(exc).__name__}: {exc}"
        ) from exc


EVICTING = frozenset({
    "allkeys-lru", "allkeys-lfu", "allkeys-random",
    "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
})  # fmt: skip
"""``maxmemory-policy`` values under which Redis deletes keys to make room."""


def evicting(policy: str | bytes | None) -> str | None:
    """``policy`` (a ``maxmemory-policy`` reply) if Redis deletes keys under it, else None."""
    policy = policy.decode() if isinstance(policy, bytes) else policy
    return policy if policy in EVICTING else None


@dataclass(frozen=True)
class Storage:
    """What the Redis at a URL does with its data: keeps it over a restart (AOF on, or
    RDB save points set), and evicts keys under memory pressure (the policy, or None
    for ``noeviction``)."""

    persistent: bool
    eviction_policy: str | None


def storage(url: str, role: str, options: Mapping[str, Any] | None = None) -> Storage:
    """Ask the Redis at ``url`` how it keeps data (``CONFIG GET``, three round trips; on
    a Cluster, of every primary, and the least durable answer counts).

    Raises ``BackendUnavailable`` naming ``role`` and the masked URL when the server
    cannot be asked: unreachable, or ``CONFIG`` refused by an ACL or a managed service.
    """
    client = connect(url, role, options)
    try:
        configs: list[dict[Any, Any]] = call(role, mask_url(url), "CONFIG GET", _configs, client)
    finally:
        client.close()
    kept = [c.get("appendonly") == "yes" or bool(c.get("save", "").strip()) for c in configs]
    policies = [evicting(c.get("maxmemory-policy")) for c in configs]
    return Storage(persistent=all(kept), eviction_policy=next((p for p in policies if p), None))


def servers(client: Any) -> list[Any]:
    """A client of each server whose data ``client`` reaches: itself, or on a Cluster a
    plain client of each primary (for commands that must ask every node)."""
    if hasattr(client, "get_primaries"):  # RedisCluster
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def _configs(client: Any) -> list[dict[Any, Any]]:
    """The persistence and eviction settings of each server behind ``client``."""
    return [
        {
            **target.config_get("appendonly"),
            **target.config_get("save"),
            **target.config_get("maxmemory-policy"),
        }
        for target in servers(client)
    ]


def glob_escape(text: str) -> str:
    """``text`` matched literally by a ``SCAN MATCH`` pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@functools.cache
def lua(name: str) -> str:
    """The text of the script ``lua/{name}.lua`` beside this module, read once per process."""
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


SCAN_COUNT = 1000
"""Keys one ``SCAN`` call of ``held_locks`` walks. The walk costs the server about 0.5 µs
per key whatever the count (measured: 114 ms for 200,000 keys); 1,000 keeps each call
near half a millisecond, so the workers' lease commands never wait longer behind it
(10,000 saved 10% of the page's time)."""

WAIT_TIMEOUT_MS = 1000
"""How long an acquisition waits for ``resilience_lock_replicas`` replicas to confirm it."""


class RedisCoordinationBackend:
    """``celery_resilience.backends.base.CoordinationBackend`` on Redis.

    ``options`` are the transport options (Sentinel's master name, ...); ``cluster``
    forces the Cluster key names (hash-tagged) on or off, by default on for a Cluster
    URL. With
    ``replicas`` > 0 every admission is followed, on the same connection, by ``WAIT
    replicas WAIT_TIMEOUT_MS``; an acquisition fewer replicas confirmed is released
    and raises ``BackendUnavailable`` (the gate retries, then requeues: not acquired).
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = "celery_resilience",
        *,
        options: Mapping[str, Any] | None = None,
        replicas: int = 0,
        cluster: bool | None = None,
    ) -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._cluster = is_cluster(url) if cluster is None else cluster
        self._replicas = replicas
        self._client = connect(url, "coordination", options)
        self._admit = self._client.register_script(lua("admit"))
        self._finish = self._client.register_script(lua("finish"))
        self._renew = self._client.register_script(lua("renew"))
        self._release = self._client.register_script(lua("release"))
        self._claim = self._client.register_script(lua("dedup_claim"))

    def _base(self, task_id: str, lock_key: str | None) -> str:
        """The start of a delivery's key names: the prefix, and on Cluster its hash tag."""
        if not self._cluster:
            return self._prefix
        tag = f"lock:{lock_key}" if lock_key is not None else f"task:{task_id}"
        return f"{self._prefix}:{{{tag}}}"

    def _keys(self, task_id: str, lock_key: str | None) -> list[str]:
        b = self._base(task_id, lock_key)
        keys = [f"{b}:done:{task_id}", f"{b}:run:{task_id}", f"{b}:started:{task_id}"]
        keys.append(f"{b}:crashes:{task_id}")
        if lock_key is not None:
            keys += [f"{b}:lock:{lock_key}", f"{b}:fence:{lock_key}"]
        return keys

    def _leases(self, task_id: str, lock_key: str | None) -> list[str]:
        keys = self._keys(task_id, lock_key)
        return [keys[1]] if lock_key is None else [keys[1], keys[4]]

    def _call(self, what: str, fn: Any, keys: list[str], args: list[Any]) -> Any:
        return call("coordination", self.url, what, fn, keys=keys, args=args)

    def admit(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
        adoptable: tuple[str, ...] = (),
    ) -> AdmitResult:
        keys = self._keys(task_id, lock_key)
        args = [owner, publish, _ms(lease_ttl), max_crashes, _ms(record_ttl), *adoptable]
        if self._replicas:
            reply = self._call("admit", self._confirmed, keys, args)
        else:
            reply = self._call("admit", self._admit, keys, args)
        status, crashes, token, left_ms, holder, lost = reply[:6]
        if self._replicas and int(status) == 0 and int(reply[6]) < self._replicas:
            self.release(task_id, lock_key, owner)
            raise BackendUnavailable(
                f"coordination backend {self.url}: the leases of task {task_id} were "
                f"confirmed by {int(reply[6])} of {self._replicas} replicas within "
                f"{WAIT_TIMEOUT_MS} ms (resilience_lock_replicas); not acquired"
            )
        return AdmitResult(
            _STATUS[int(status)],
            int(crashes),
            fencing_token=int(token) if int(status) == 0 and lock_key is not None else None,
            lease_remaining=max(0, int(left_ms)) / 1000.0,
            holder=holder.decode() if holder else None,
            lost_predecessor=bool(lost),
        )

    def _confirmed(self, keys: list[str], args: list[Any]) -> list[Any]:
        """Run ``admit`` and ``WAIT`` on one connection (WAIT counts the replicas that
        have this connection's writes); its reply gets the count appended."""
        import redis
        from redis.exceptions import MovedError

        client = self._client
        if self._cluster:  # WAIT has no key: send both to the node of the delivery's slot
            client = client.get_redis_connection(client.get_node_from_key(keys[0]))
        pipe = client.pipeline(transaction=False)
        self._admit(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", self._replicas, WAIT_TIMEOUT_MS)
        try:
            reply, acked = pipe.execute()
        except (MovedError, redis.ConnectionError):
            if self._cluster:  # a failover moved the slot: learn where, for the retry
                self._client.nodes_manager.initialize()  # as RedisCluster does (4.5-8)
            raise
        return [*reply, acked]

    def finish(
        self,
        task_id: str,
        *,
        owner: str,
        publish: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        keys = self._keys(task_id, lock_key)[:5]
        args = [owner, "1" if succeeded else "0", _ms(record_ttl), publish]
        return bool(self._call("finish", self._finish, keys, args))

    def release(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        keys = self._leases(task_id, lock_key)
        return bool(self._call("release", self._release, keys, [owner]))

    def renew(self, task_id: str, lock_key: str | None, owner: str, lease_ttl: float) -> bool:
        keys = self._leases(task_id, lock_key)
        return bool(self._call("renew", self._renew, keys, [owner, _ms(lease_ttl)]))

    def holds(self, task_id: str, lock_key: str | None, owner: str) -> bool:
        keys = self._leases(task_id, lock_key)

        def read(keys: list[str], args: list[Any]) -> list[Any]:
            pipe = self._client.pipeline(transaction=False)  # GETs: MGET needs its own ACL
            for key in keys:
                pipe.get(key)
            return list(pipe.execute())

        values = self._call("holds", read, keys, [])
        return all(value is not None and value.decode() == owner for value in values)

    def dedup_claim(
        self, key: str, task_id: str, *, ttl: float, stale: str | None = None
    ) -> str | None:
        keys = [f"{self._prefix}:dedup:{key}"]
        holder = self._call("dedup claim", self._claim, keys, [task_id, _ms(ttl), stale or ""])
        return holder.decode() if holder else None

    def dedup_release(self, key: str, task_id: str) -> bool:
        keys = [f"{self._prefix}:dedup:{key}"]
        return bool(self._call("dedup release", self._release, keys, [task_id]))

    def held_locks(self, *, limit: int = 1000) -> list[HeldLock]:
        """``LockListing.held_locks``: a ``SCAN`` of each server for lock lease names,
        then, on that server, its ``TIME`` and each lease's holder, TTL and token."""
        found: list[HeldLock] = call(
            "coordination", self.url, "held locks", self._held_locks, limit
        )
        return found

    def _held_locks(self, limit: int) -> list[HeldLock]:
        prefix = self._prefix.encode()
        pattern = glob_escape(self._prefix) + (":{lock:*}:lock:*" if self._cluster else ":lock:*")
        found: list[HeldLock] = []
        for server in servers(self._client):
            names: dict[bytes, bytes] = {}  # lease name -> lock key (SCAN may repeat a name)
            for name in server.scan_iter(match=pattern, count=SCAN_COUNT):
                key = _lock_key(name, prefix, self._cluster)
                if key is not None:
                    names[name] = key
                if len(found) + len(names) >= limit:
                    break
            pipe = server.pipeline(transaction=False)
            pipe.time()
            for name, key in names.items():
                pipe.get(name).pttl(name).get(_fence_name(key, prefix, self._cluster))
            reply = pipe.execute()
            seconds, micros = reply[0]
            now_us = int(seconds) * 1_000_000 + int(micros)
            for i, key in enumerate(names.values()):
                holder, left_ms, raw_token = reply[1 + 3 * i : 4 + 3 * i]
                if holder is None or left_ms < 0:  # freed since the scan (or never expires)
                    continue
                token = int(raw_token) if raw_token is not None else None
                found.append(
                    HeldLock(
                        key.decode("utf-8", "replace"),
                        holder.decode("utf-8", "replace"),
                        left_ms / 1000,
                        token,
                        held_for(token, now_us),
                    )
                )
            if len(found) >= limit:
                break
        return sorted(found, key=lambda lock: lock.key)[:limit]

    def ping(self) -> None:
        self._call("ping", lambda keys, args: self._client.ping(), [], [])

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<RedisCoordinationBackend {self.url}>"


def _lock_key(name: bytes, prefix: bytes, cluster: bool) -> bytes | None:
    """The lock key of the lease named ``name`` (``_keys``' fifth name), or None if
    ``name`` only looks like one (a ``SCAN MATCH`` cannot say where the key ends)."""
    if not cluster:
        return name[len(prefix) + 6 :]  # <prefix>:lock:<key>
    rest = name[len(prefix) + 7 :]  # <prefix>:{lock:<key>}:lock:<key>
    key = rest[: (len(rest) - 7) // 2]
    return key if rest == key + b"}:lock:" + key else None


def _fence_name(key: bytes, prefix: bytes, cluster: bool) -> bytes:
    """The fencing counter's name of lock ``key`` (``_keys``' sixth name)."""
    if not cluster:
        return prefix + b":fence:" + key
    return prefix + b":{lock:" + key + b"}:fence:" + key


@hookimpl(trylast=True)
def resilience_coordination_backend(
    url: str, settings: Settings
) -> RedisCoordinationBackend | None:
    """Serve ``redis://``, ``rediss://``, ``unix://``, ``sentinel://`` and
    ``redis+cluster://`` URLs."""
    if not url.lower().startswith(REDIS_SCHEMES):
        return None
    return RedisCoordinationBackend(
        url,
        key_prefix=settings.key_prefix,
        options=settings.transport_options,
        replicas=settings.lock_replicas,
    )
