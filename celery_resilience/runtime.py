"""Per-app state: validated settings, the plugin manager and the coordination backend.

Built lazily and once per process (a forked prefork child builds its own, so no
connection crosses a fork). What a worker adds to an app (``install()``, the boot
steps) is in celery_resilience.worker, which imports this module, never the reverse.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import pluggy

from celery_resilience import liveness
from celery_resilience.backends.base import CoordinationBackend, DeadLetterBackend
from celery_resilience.errors import ConfigurationError
from celery_resilience.liveness.holders import ProcessPresence
from celery_resilience.liveness.pending import Pending
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.settings import Settings, load_settings
from celery_resilience.urls import mask_url

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a resilient task needs at delivery time, for one app in one process."""

    app: Any
    settings: Settings
    plugins: pluggy.PluginManager
    countdown_cap: float | None
    pid: int = field(default_factory=os.getpid)
    _backend: CoordinationBackend | None = None
    _dlq: DeadLetterBackend | None = None
    _presence: ProcessPresence | None = None
    _pending: Pending | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backend(self) -> CoordinationBackend:
        """The coordination backend, built on first use by the first plugin serving its URL."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = build_backend(self.plugins, self.settings)
        return self._backend

    @property
    def dlq(self) -> DeadLetterBackend:
        """The dead-letter queue backend, built on first use."""
        if self._dlq is None:
            with self._lock:
                if self._dlq is None:
                    self._dlq = build_dlq_backend(self.plugins, self.settings)
        return self._dlq

    @property
    def presence(self) -> ProcessPresence | None:
        """This process's presence as a lease holder, or ``None`` when the app's workers
        keep no presence (not a Redis broker, or the heartbeat is off)."""
        if self._presence is None and liveness.enabled(self.app.conf, self.settings):
            with self._lock:
                if self._presence is None:
                    app, settings = self.app, self.settings
                    self._presence = ProcessPresence(
                        lambda: liveness.connect(app),
                        liveness.keys_of(app.conf, settings),
                        settings.node_ttl,
                    )
        return self._presence

    @property
    def pending(self) -> Pending:
        """Looks for task ids in the app's broker (Redis only), built on first use."""
        if self._pending is None:
            with self._lock:
                if self._pending is None:
                    self._pending = Pending(self.app)
        return self._pending

    def cap_countdown(self, seconds: float) -> float:
        """Clamp a retry countdown so the broker does not deliver the task twice.

        With a Redis broker and the visibility heartbeat off, a message waiting longer
        than the visibility timeout is delivered again, so countdowns are kept to half
        of it. With the heartbeat on (the default) the worker holding the message keeps
        it from being redelivered while it waits, and countdowns are not capped.
        """
        if self.countdown_cap is not None:
            return min(seconds, self.countdown_cap)
        return seconds


_BUILT_IN_SCHEMES = (
    "memory://, redis://, rediss://, unix://, sentinel://, redis+cluster://, rediss+cluster://"
)
_BUILT_IN_PLUGINS = {
    "celery_resilience.backends.memory",
    "celery_resilience.backends.memory_dlq",
    "celery_resilience.backends.redis",
    "celery_resilience.backends.redis_dlq",
}


def _build(hook: Any, setting: str, url: str, settings: Settings, role: str) -> Any:
    backend = hook(url=url, settings=settings)
    if backend is None:
        plugins = sorted(
            impl.plugin_name
            for impl in hook.get_hookimpls()
            if impl.plugin_name not in _BUILT_IN_PLUGINS
        )
        others = (
            f"; installed plugins that may serve others: {', '.join(plugins)}" if plugins else ""
        )
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: no installed {role} backend serves the "
            f"scheme {url.partition('://')[0]}:// (served: {_BUILT_IN_SCHEMES}{others})"
        )
    return backend


def build_backend(plugins: pluggy.PluginManager, settings: Settings) -> CoordinationBackend:
    """Ask the plugins for the coordination backend of ``settings.url``."""
    hook = plugins.hook.resilience_coordination_backend
    setting = settings.name_of("url")
    return _build(hook, setting, settings.url, settings, "coordination")  # type: ignore[no-any-return]


def build_dlq_backend(plugins: pluggy.PluginManager, settings: Settings) -> DeadLetterBackend:
    """Ask the plugins for the dead-letter queue backend of ``settings.dlq_url``."""
    hook = plugins.hook.resilience_dlq_backend
    setting = settings.name_of("dlq_url")
    return _build(hook, setting, settings.dlq_url, settings, "DLQ")  # type: ignore[no-any-return]


def _countdown_cap(conf: Any, settings: Settings) -> float | None:
    """Half the visibility timeout of a Redis broker without the heartbeat, else no cap."""
    if settings.visibility_heartbeat is not False:
        return None
    broker = conf.get("broker_url") or ""
    if not isinstance(broker, str) or not broker.lower().startswith(liveness.REDIS_BROKERS):
        return None
    options = conf.get("broker_transport_options") or {}
    timeout = options.get("visibility_timeout", liveness.DEFAULT_VISIBILITY_TIMEOUT)
    return float(timeout) / 2


_runtimes: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()
_runtimes_lock = threading.Lock()


def runtime(app: Any) -> Runtime:
    """Return the runtime of ``app`` in this process, loading settings on first call.

    Raises ``ConfigurationError`` when a setting is invalid.
    """
    rt = _runtimes.get(app)
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtimes_lock:
        rt = _runtimes.get(app)
        if rt is None or rt.pid != os.getpid():
            settings = load_settings(app.conf)
            rt = Runtime(
                app=app,
                settings=settings,
                plugins=get_plugin_manager(),
                countdown_cap=_countdown_cap(app.conf, settings),
            )
            _runtimes[app] = rt
        return rt
