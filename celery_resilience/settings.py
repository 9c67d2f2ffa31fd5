"""Settings: ``app.conf`` keys ``resilience_*`` with ``CELERY_RESILIENCE_*`` overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_resilience.backends.clients import TRANSPORT_OPTIONS
from celery_resilience.errors import ConfigurationError
from celery_resilience.urls import REDIS_SCHEMES, SENTINEL_SCHEME, mask_url, validate_url

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Validated settings of one app. Durations are in seconds."""

    url: str
    dlq_url: str
    key_prefix: str = "celery_resilience"
    max_retries: int = 10
    max_crashes: int = 3
    lock_ttl: float = 30.0
    lock_timeout: float = 3600.0
    completion_ttl: float = 3600.0
    dedup_ttl: float = 3600.0
    node_ttl: float = 6.0
    dlq_retention: float = 7 * 86400.0
    dlq_max_entries: int = 10_000
    visibility_heartbeat: bool | None = None
    prometheus_port: int | None = None
    prometheus_addr: str = "0.0.0.0"
    dlq_mask_args: tuple[str, ...] = ()
    dlq_replay_rate: float = 50.0
    transport_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    lock_replicas: int = 0
    web_token: str | None = field(default=None, repr=False)  # a secret: never in a repr
    url_is_default: bool = False
    names: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def name_of(self, name: str) -> str:
        """How errors name setting ``name`` (``url``, ``dlq_url``, ...): as the user wrote
        it, e.g. ``CELERY_RESILIENCE_URL`` in a namespaced Django settings module, the
        environment variable it came from, or ``broker_url`` when the URL is the broker's."""
        return self.names.get(name, f"resilience_{name}")


def _as_int(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, str):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError
        return value

    convert.__doc__ = f"an integer >= {minimum}"
    return convert


def _as_seconds(value: Any) -> float:
    """a number of seconds > 0"""
    if isinstance(value, str):
        value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError
    return float(value)


def _as_node_ttl(value: Any) -> float:
    """a number of seconds >= 0.5"""
    seconds = _as_seconds(value)
    if seconds < 0.5:
        raise ValueError
    return seconds


def _as_rate(value: Any) -> float:
    """a number per second > 0"""
    return _as_seconds(value)


def _as_bool(value: Any) -> bool:
    """true or false (1/0, yes/no, on/off)"""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError


def _as_text(value: Any) -> str:
    """a non-empty string"""
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    return value.strip()


def _as_port(value: Any) -> int:
    """a TCP port number (1-65535)"""
    port = _as_int(1)(value)
    if port > 65535:
        raise ValueError
    return port


def _as_names(value: Any) -> tuple[str, ...]:
    """argument names, as a list or a comma-separated string"""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) and v.isidentifier() for v in value
    ):
        raise ValueError
    return tuple(value)


def _as_options(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping) or not set(value) <= set(TRANSPORT_OPTIONS):
        raise ValueError
    for key in ("sentinel_kwargs", "connection_kwargs"):
        if not isinstance(value.get(key) or {}, Mapping):
            raise ValueError
    return dict(value)


_as_options.__doc__ = (
    f"a dict (or its JSON) with only the keys {', '.join(TRANSPORT_OPTIONS)}; "
    "sentinel_kwargs and connection_kwargs dicts"
)

# setting name (without the resilience_ prefix) -> converter; the converter's
# docstring says what was expected.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "url": _as_text,
    "dlq_url": _as_text,
    "key_prefix": _as_text,
    "max_retries": _as_int(0),
    "max_crashes": _as_int(1),
    "lock_ttl": _as_seconds,
    "lock_timeout": _as_seconds,
    "completion_ttl": _as_seconds,
    "dedup_ttl": _as_seconds,
    "node_ttl": _as_node_ttl,
    "dlq_retention": _as_seconds,
    "dlq_max_entries": _as_int(1),
    "visibility_heartbeat": _as_bool,
    "prometheus_port": _as_port,
    "prometheus_addr": _as_text,
    "dlq_mask_args": _as_names,
    "dlq_replay_rate": _as_rate,
    "transport_options": _as_options,
    "lock_replicas": _as_int(0),
    "web_token": _as_text,
}

SECRET_SETTINGS = frozenset({"web_token"})
"""Settings whose values no error message shows."""

SETTING_NAMES = tuple(f"resilience_{name}" for name in _CONVERTERS)


def _conf_key(conf: Mapping[str, Any], key: str) -> str:
    """The key under which ``conf`` holds ``key``, as the user wrote it.

    Celery 5's ``app.conf`` (a ``ConfigurationView``) with a namespace, as in
    ``app.config_from_object("django.conf:settings", namespace="CELERY")``, has
    ``prefix = "CELERY_"`` and looks ``key`` up as ``CELERY_KEY`` (upper-cased when the
    prefix is) and then as ``key`` itself, in each of its maps in turn.
    """
    conf.get(key)  # a pending app.conf gets its prefix only when a first lookup loads it
    prefix = getattr(conf, "prefix", None)
    if not isinstance(prefix, str) or not prefix:
        return key
    prefixed = prefix + key
    prefixed = prefixed.upper() if prefix.isupper() else prefixed.lower()
    for mapping in getattr(conf, "maps", [conf]):
        for candidate in (prefixed, key):
            if candidate in mapping:
                return candidate
    return prefixed


def _source(conf: Mapping[str, Any], environ: Mapping[str, str], name: str) -> str:
    """How an error names setting ``name``: with its environment variable when set there."""
    env_name = f"CELERY_RESILIENCE_{name.upper()}"
    key = _conf_key(conf, f"resilience_{name}")
    if env_name in environ:
        return f"{key} (from environment variable {env_name})"
    return key


def _lookup(conf: Mapping[str, Any], environ: Mapping[str, str], name: str) -> Any:
    """Return the converted value of setting ``name``: environment first, then ``conf``."""
    env_name = f"CELERY_RESILIENCE_{name.upper()}"
    if env_name in environ:
        raw: Any = environ[env_name]
    else:
        raw = conf.get(f"resilience_{name}")
        if raw is None:
            return None
    convert = _CONVERTERS[name]
    try:
        return convert(raw)
    except (ValueError, TypeError):
        shown = mask_url(raw) if name.endswith("url") and isinstance(raw, str) else raw
        if name in SECRET_SETTINGS:
            shown = "***"
        raise ConfigurationError(
            f"setting {_source(conf, environ, name)}={shown!r}: expected {convert.__doc__}"
        ) from None


def broker_url(conf: Mapping[str, Any]) -> str:
    """The app's first broker URL, or ``""``: Celery's ``app.conf.broker_url`` also
    reads the environment variable ``CELERY_BROKER_URL``, which a plain key lookup misses.
    A Sentinel URL is returned whole: its ``;``-separated chunks are its sentinels."""
    url = getattr(conf, "broker_url", None) or conf.get("broker_url") or ""
    if not isinstance(url, str):
        return ""
    if url.strip().lower().startswith(SENTINEL_SCHEME):  # its ;-list is the sentinels
        return url.strip()
    return url.split(";")[0].strip()


def load_settings(conf: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every ``resilience_*`` setting from ``conf`` and ``environ``.

    ``environ`` defaults to ``os.environ``; an environment variable wins over the
    ``app.conf`` key. Raises ``ConfigurationError`` naming the first bad setting.
    When ``resilience_url`` is unset a ``redis://``/``rediss://`` broker URL is used,
    else ``memory://`` (``url_is_default``: a worker then refuses to start, see
    ``require_shared_backend``). Errors name each setting as the user wrote it.
    """
    env = os.environ if environ is None else environ
    values = {name: _lookup(conf, env, name) for name in _CONVERTERS}
    values = {name: value for name, value in values.items() if value is not None}
    names = {name: _source(conf, env, name) for name in _CONVERTERS}
    url_is_default = "url" not in values
    if url_is_default:
        broker = broker_url(conf)
        if broker.lower().startswith(REDIS_SCHEMES):
            values["url"], names["url"] = broker, "broker_url"
        else:
            values["url"] = "memory://"
    if "dlq_url" not in values:
        values["dlq_url"], names["dlq_url"] = values["url"], names["url"]
    validate_url(values["url"], names["url"])
    validate_url(values["dlq_url"], names["dlq_url"])
    if url_is_default and "transport_options" not in values and names["url"] == "broker_url":
        values["transport_options"] = _broker_options(conf)
        names["transport_options"] = "broker_transport_options"
    _require_master_name(values, names)
    return Settings(url_is_default=url_is_default, names=names, **values)


def _broker_options(conf: Mapping[str, Any]) -> dict[str, Any]:
    """What of ``broker_transport_options`` the backends' clients read (Sentinel's)."""
    options = conf.get("broker_transport_options") or {}
    return {key: options[key] for key in TRANSPORT_OPTIONS if key in options}


def _require_master_name(values: Mapping[str, Any], names: Mapping[str, str]) -> None:
    """A Sentinel URL needs ``master_name``: say so at load, naming the settings."""
    options = values.get("transport_options") or {}
    for name in ("url", "dlq_url"):
        url = values[name]
        if url.lower().startswith(SENTINEL_SCHEME) and not options.get("master_name"):
            where = names.get("transport_options", "resilience_transport_options")
            raise ConfigurationError(
                f"setting {names[name]}={mask_url(url)!r} is a Sentinel URL, but {where} "
                "sets no master_name: expected {'master_name': '<the name the sentinels "
                "monitor>'}"
            )


def unshared_backend(settings: Settings, conf: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(problem, fix)`` when the coordination backend fell back to ``memory://``, else None.

    That happens with a non-Redis broker and no ``resilience_url``: leases, crash
    budgets, completion records and the DLQ would then live in each worker process
    and guard nothing across them. An explicit ``resilience_url = "memory://"`` passes.
    """
    if not (settings.url_is_default and settings.url.lower().startswith("memory://")):
        return None
    broker = broker_url(conf)
    shown = repr(mask_url(broker)) if broker else "unset (Celery's default amqp://)"
    name = settings.name_of("url")
    return (
        f"is unset and broker_url is {shown}, not Redis: leases, crash budgets, completion "
        "records and dead letters would live in each worker process only and guard nothing "
        "across processes or nodes, so a worker refuses to start.",
        f"set {name} to a redis:// URL (or to 'memory://' to run one process on purpose).",
    )


def require_shared_backend(settings: Settings, conf: Mapping[str, Any]) -> None:
    """Raise ``ConfigurationError`` when ``unshared_backend`` finds a problem."""
    found = unshared_backend(settings, conf)
    if found is not None:
        problem, fix = found
        raise ConfigurationError(f"{settings.name_of('url')} {problem} Fix: {fix}")
