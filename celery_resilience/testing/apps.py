"""An eager app on a private ``memory://`` store, and backends built as an app builds them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery import Celery

from celery_resilience.backends.base import (
    CoordinationBackend,
    DeadLetterBackend,
)
from celery_resilience.errors import ConfigurationError
from celery_resilience.plugins import get_plugin_manager
from celery_resilience.runtime import build_backend, build_dlq_backend, runtime
from celery_resilience.settings import Settings, load_settings

if TYPE_CHECKING:
    pass


@contextmanager
def eager_app(*plugins: object, **conf: Any) -> Iterator[Celery]:
    """A Celery app that runs tasks eagerly, on a ``memory://`` URL of its own.

    The broker and the resilience backends (coordination and DLQ) are
    ``memory://<unique>``, so nothing is shared with another app or test; ``conf``
    overrides or adds settings (``resilience_url=...`` for another backend). The
    ``plugins`` are registered with the plugin manager for the block. On exit the
    backends the app built are closed, the app is closed and the plugins unregistered.
    """
    url = f"memory://eager-{uuid.uuid4().hex[:12]}"
    app = Celery(f"eager-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update({"broker_url": url, "task_always_eager": True, "resilience_url": url, **conf})
    manager = get_plugin_manager()
    for plugin in plugins:
        manager.register(plugin)
    try:
        yield app
    finally:
        for plugin in plugins:
            manager.unregister(plugin)
        _close_backends(app)
        app.close()


def _close_backends(app: Celery) -> None:
    """Close the backends ``app``'s runtime built in this process, building none."""
    try:
        rt = runtime(app)
    except ConfigurationError:  # settings a test made invalid on purpose: nothing built
        return
    for backend in (rt._backend, rt._dlq):
        if backend is not None:
            backend.close()


# -- building backends as the library does -----------------------------------------------


def _settings(url: str, key_prefix: str, more: dict[str, Any]) -> Settings:
    conf = {"resilience_url": url, "resilience_key_prefix": key_prefix}
    conf.update({f"resilience_{name}": value for name, value in more.items()})
    return load_settings(conf, environ={})


def backend_for(
    url: str, key_prefix: str = "celery_resilience", **settings: Any
) -> CoordinationBackend:
    """The coordination backend of ``url``, built as an app builds it: through the plugins.

    The plugin serving ``url`` must be registered (installed with its entry point, or
    registered with ``celery_resilience.get_plugin_manager``). ``settings`` are other
    ``resilience_*`` settings, named without the prefix (``transport_options={...}``).
    """
    return build_backend(get_plugin_manager(), _settings(url, key_prefix, settings))


def dlq_backend_for(
    url: str, key_prefix: str = "celery_resilience", **settings: Any
) -> DeadLetterBackend:
    """The dead-letter queue backend of ``url``, built through the plugins like an app's."""
    return build_dlq_backend(get_plugin_manager(), _settings(url, key_prefix, settings))
