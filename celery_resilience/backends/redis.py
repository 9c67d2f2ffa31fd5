"""``redis://``, ``rediss://`` and ``unix://``: the coordination backend on Redis or Valkey.

Each operation that must be atomic is one Lua script (``lua/*.lua`` beside this
module, each with its KEYS and ARGV in its header), so a successful delivery costs
two round trips: ``admit`` before the body and ``finish`` after it (a body longer than
a third of the lease TTL adds one renewal per third).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from celery_resilience.backends.base import Admission, AdmitResult
from celery_resilience.errors import BackendUnavailable, MissingExtraError
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import REDIS_SCHEMES, mask_url

if TYPE_CHECKING:
    import redis

_STATUS = {
    0: Admission.ADMITTED,
    1: Admission.DUPLICATE,
    2: Admission.CRASH_BUDGET_SPENT,
    3: Admission.LOCK_CONTENDED,
    4: Admission.RUNNING,
}


def connect(url: str, role: str) -> redis.Redis:
    """Return a client for ``url`` (no connection is made until first use).

    ``role`` names the backend role in errors. Timeouts are 5 s so a dead server
    fails an operation instead of hanging the worker.
    """
    try:
        import redis
    except ImportError:
        raise MissingExtraError(
            f"{role} backend {mask_url(url)} needs redis-py: pip install 'celery-resilience[redis]'"
        ) from None
    try:
        return redis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30
        )
    except ValueError as exc:
        from celery_resilience.errors import ConfigurationError

        raise ConfigurationError(f"{role} backend URL {mask_url(url)!r}: {exc}") from None


def call(role: str, url: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one Redis operation; a redis-py error becomes ``BackendUnavailable`` naming
    the backend ``role``, its masked ``url`` and the operation."""
    import redis

    try:
        return fn(*args, **kwargs)
    except redis.RedisError as exc:
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


def storage(url: str, role: str) -> Storage:
    """Ask the Redis at ``url`` how it keeps data (``CONFIG GET``, three round trips).

    Raises ``BackendUnavailable`` naming ``role`` and the masked URL when the server
    cannot be asked: unreachable, or ``CONFIG`` refused by an ACL or a managed service.
    """
    client = connect(url, role)
    try:

        def read() -> dict[Any, Any]:
            return {
                **client.config_get("appendonly"),
                **client.config_get("save"),
                **client.config_get("maxmemory-policy"),
            }

        config: dict[Any, Any] = call(role, mask_url(url), "CONFIG GET", read)
    finally:
        client.close()
    return Storage(
        persistent=config.get("appendonly") == "yes" or bool(config.get("save", "").strip()),
        eviction_policy=evicting(config.get("maxmemory-policy")),
    )


@functools.cache
def lua(name: str) -> str:
    """The text of the script ``lua/{name}.lua`` beside this module, read once per process."""
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisCoordinationBackend:
    """``celery_resilience.backends.base.CoordinationBackend`` on Redis."""

    def __init__(self, url: str, key_prefix: str = "celery_resilience") -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._client = connect(url, "coordination")
        self._admit = self._client.register_script(lua("admit"))
        self._finish = self._client.register_script(lua("finish"))
        self._renew = self._client.register_script(lua("renew"))
        self._release = self._client.register_script(lua("release"))
        self._claim = self._client.register_script(lua("dedup_claim"))

    def _keys(self, task_id: str, lock_key: str | None) -> list[str]:
        p = self._prefix
        keys = [
            f"{p}:done:{task_id}",
            f"{p}:run:{task_id}",
            f"{p}:started:{task_id}",
            f"{p}:crashes:{task_id}",
        ]
        if lock_key is not None:
            keys += [f"{p}:lock:{lock_key}", f"{p}:fence:{lock_key}"]
        return keys

    def _leases(self, task_id: str, lock_key: str | None) -> list[str]:
        keys = [f"{self._prefix}:run:{task_id}"]
        return keys if lock_key is None else [*keys, f"{self._prefix}:lock:{lock_key}"]

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
        status, crashes, token, left_ms, holder, lost = self._call("admit", self._admit, keys, args)
        return AdmitResult(
            _STATUS[int(status)],
            int(crashes),
            fencing_token=int(token) if int(status) == 0 and lock_key is not None else None,
            lease_remaining=max(0, int(left_ms)) / 1000.0,
            holder=holder.decode() if holder else None,
            lost_predecessor=bool(lost),
        )

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

    def ping(self) -> None:
        self._call("ping", lambda keys, args: self._client.ping(), [], [])

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<RedisCoordinationBackend {self.url}>"


@hookimpl(trylast=True)
def resilience_coordination_backend(
    url: str, settings: Settings
) -> RedisCoordinationBackend | None:
    """Serve ``redis://``, ``rediss://`` and ``unix://`` URLs."""
    if not url.lower().startswith(REDIS_SCHEMES):
        return None
    return RedisCoordinationBackend(url, key_prefix=settings.key_prefix)
