"""``redis://`` and ``rediss://``: the coordination backend on Redis or Valkey.

Each operation that must be atomic is one Lua script, so a successful delivery costs
two round trips: ``admit`` before the body and ``finish`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_resilience.backends.base import Admission, AdmitResult
from celery_resilience.errors import BackendUnavailable, MissingExtraError
from celery_resilience.hookspecs import hookimpl
from celery_resilience.settings import Settings
from celery_resilience.urls import mask_url

if TYPE_CHECKING:
    import redis

# KEYS: 1 completion record, 2 delivery counter of this attempt, 3 lost deliveries
#       carried from earlier attempts, [4 lease, 5 fencing counter]
# ARGV: 1 owner, 2 lease ttl ms, 3 max crashes, 4 record ttl ms
# Returns {status, deliveries, fencing token, lease ms left, lost, holder}; status 0 admitted,
# 1 duplicate, 2 crash budget spent, 3 lock contended.
ADMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0, 0, 0, 0}
end
local deliveries = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local lost = tonumber(redis.call('GET', KEYS[3]) or '0')
if deliveries - 1 + lost >= tonumber(ARGV[3]) then
  return {2, deliveries, 0, 0, lost}
end
if #KEYS < 4 then
  return {0, deliveries, 0, 0, lost}
end
if not redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- This delivery ends in a retry, not a crash; the lost ones before it are
  -- carried over so a poison task with a lock still spends its budget.
  redis.call('DEL', KEYS[2])
  if deliveries > 1 then
    redis.call('SET', KEYS[3], lost + deliveries - 1, 'PX', ARGV[4])
  end
  return {3, deliveries, 0, redis.call('PTTL', KEYS[4]), lost, redis.call('GET', KEYS[4])}
end
-- token = max(previous + 1, server time in microseconds): increasing even after
-- the counter of a key idle for the record ttl expired.
local now = redis.call('TIME')
local token = math.max(tonumber(redis.call('GET', KEYS[5]) or '0') + 1,
                       tonumber(now[1]) * 1000000 + tonumber(now[2]))
redis.call('SET', KEYS[5], string.format('%.0f', token), 'PX', ARGV[4])
return {0, deliveries, token, 0, lost}
"""

# KEYS: 1 completion record, 2 delivery counter, 3 lost deliveries, [4 lease]
# ARGV: 1 owner, 2 "1" when the body succeeded, 3 record ttl ms
# Returns 1 when this call released the lease, else 0.
FINISH = """
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
end
redis.call('DEL', KEYS[2], KEYS[3])
if #KEYS >= 4 and redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('DEL', KEYS[4])
  return 1
end
return 0
"""

# KEYS: 1 lease. ARGV: 1 owner. Returns 1 if the owner's lease was deleted, else 0.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: 1 lease. ARGV: 1 owner, 2 lease ttl ms. Returns 1 if renewed, 0 if lost.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_STATUS = {
    0: Admission.ADMITTED,
    1: Admission.DUPLICATE,
    2: Admission.CRASH_BUDGET_SPENT,
    3: Admission.LOCK_CONTENDED,
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
    policy = config.get("maxmemory-policy")
    return Storage(
        persistent=config.get("appendonly") == "yes" or bool(config.get("save", "").strip()),
        eviction_policy=policy if policy in EVICTING else None,
    )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisCoordinationBackend:
    """``celery_resilience.backends.base.CoordinationBackend`` on Redis."""

    def __init__(self, url: str, key_prefix: str = "celery_resilience") -> None:
        self.url = mask_url(url)
        self._prefix = key_prefix
        self._client = connect(url, "coordination")
        self._admit = self._client.register_script(ADMIT)
        self._finish = self._client.register_script(FINISH)
        self._renew = self._client.register_script(RENEW)
        self._release = self._client.register_script(RELEASE)

    def _keys(self, task_id: str, attempt: int, lock_key: str | None) -> list[str]:
        p = self._prefix
        keys = [f"{p}:done:{task_id}", f"{p}:deliveries:{task_id}:{attempt}", f"{p}:lost:{task_id}"]
        if lock_key is not None:
            keys += [f"{p}:lock:{lock_key}", f"{p}:fence:{lock_key}"]
        return keys

    def _call(self, what: str, fn: Any, keys: list[str], args: list[Any]) -> Any:
        return call("coordination", self.url, what, fn, keys=keys, args=args)

    def admit(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        lease_ttl: float,
        max_crashes: int,
        record_ttl: float,
    ) -> AdmitResult:
        keys = self._keys(task_id, attempt, lock_key)
        args = [owner, _ms(lease_ttl), max_crashes, _ms(record_ttl)]
        status, deliveries, token, left_ms, lost, *holder = self._call(
            "admit", self._admit, keys, args
        )
        return AdmitResult(
            _STATUS[int(status)],
            int(deliveries),
            fencing_token=int(token) if int(status) == 0 and lock_key is not None else None,
            lease_remaining=max(0, int(left_ms)) / 1000.0,
            lost=int(lost),
            holder=holder[0].decode() if holder and holder[0] else None,
        )

    def finish(
        self,
        task_id: str,
        attempt: int,
        *,
        owner: str,
        lock_key: str | None,
        succeeded: bool,
        record_ttl: float,
    ) -> bool:
        keys = self._keys(task_id, attempt, lock_key)[:4]
        args = [owner, "1" if succeeded else "0", _ms(record_ttl)]
        return bool(self._call("finish", self._finish, keys, args))

    def release(self, lock_key: str, owner: str) -> bool:
        keys = [f"{self._prefix}:lock:{lock_key}"]
        return bool(self._call("release", self._release, keys, [owner]))

    def renew(self, lock_key: str, owner: str, lease_ttl: float) -> bool:
        keys = [f"{self._prefix}:lock:{lock_key}"]
        return bool(self._call("renew", self._renew, keys, [owner, _ms(lease_ttl)]))

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
    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        return None
    return RedisCoordinationBackend(url, key_prefix=settings.key_prefix)
