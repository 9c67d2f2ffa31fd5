"""Settings: ``app.conf`` keys ``resilience_*`` with ``CELERY_RESILIENCE_*`` overrides."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_resilience.errors import ConfigurationError
from celery_resilience.urls import mask_url, url_scheme

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
    completion_ttl: float = 3600.0
    dlq_retention: float = 7 * 86400.0
    dlq_max_entries: int = 10_000
    visibility_heartbeat: bool | None = None
    prometheus_port: int | None = None
    prometheus_addr: str = "0.0.0.0"
    dlq_mask_args: tuple[str, ...] = ()
    dlq_replay_rate: float = 50.0
    url_is_default: bool = False


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


# setting name (without the resilience_ prefix) -> converter; the converter's
# docstring says what was expected.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "url": _as_text,
    "dlq_url": _as_text,
    "key_prefix": _as_text,
    "max_retries": _as_int(0),
    "max_crashes": _as_int(1),
    "lock_ttl": _as_seconds,
    "completion_ttl": _as_seconds,
    "dlq_retention": _as_seconds,
    "dlq_max_entries": _as_int(1),
    "visibility_heartbeat": _as_bool,
    "prometheus_port": _as_port,
    "prometheus_addr": _as_text,
    "dlq_mask_args": _as_names,
    "dlq_replay_rate": _as_rate,
}

SETTING_NAMES = tuple(f"resilience_{name}" for name in _CONVERTERS)


def _source(environ: Mapping[str, str], name: str) -> str:
    """How an error names setting ``name``: with its environment variable when set there."""
    env_name = f"CELERY_RESILIENCE_{name.upper()}"
    if env_name in environ:
        return f"resilience_{name} (from environment variable {env_name})"
    return f"resilience_{name}"


def _lookup(conf: Mapping[str, Any], environ: Mapping[str, str], name: str) -> Any:
    """Return the converted value of setting ``name``: environment first, then ``conf``."""
    env_name = f"CELERY_RESILIENCE_{name.upper()}"
    source = _source(environ, name)
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
        raise ConfigurationError(
            f"setting {source}={shown!r}: expected {convert.__doc__}"
        ) from None


def load_settings(conf: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every ``resilience_*`` setting from ``conf`` and ``environ``.

    ``environ`` defaults to ``os.environ``; an environment variable wins over the
    ``app.conf`` key. Raises ``ConfigurationError`` naming the first bad setting.
    When ``resilience_url`` is unset a ``redis://``/``rediss://`` broker URL is used,
    else ``memory://`` (``url_is_default`` tells the worker to warn about it).
    """
    env = os.environ if environ is None else environ
    values = {name: _lookup(conf, env, name) for name in _CONVERTERS}
    values = {name: value for name, value in values.items() if value is not None}
    url_is_default = "url" not in values
    if url_is_default:
        broker = conf.get("broker_url") or ""
        broker = broker if isinstance(broker, str) else ""
        first = broker.split(";")[0].strip()
        values["url"] = (
            first if first.lower().startswith(("redis://", "rediss://")) else "memory://"
        )
    url_scheme(values["url"], _source(env, "url"))
    values.setdefault("dlq_url", values["url"])
    url_scheme(values["dlq_url"], _source(env, "dlq_url"))
    return Settings(url_is_default=url_is_default, **values)
