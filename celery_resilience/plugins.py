"""The plugin manager: hook specs, built-in plugins and ``celery_resilience`` entry points."""

from __future__ import annotations

import functools
import logging
from typing import Any

import pluggy

from celery_resilience import hookspecs

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """Return this process' plugin manager, built on first call.

    Built-in backends and metrics exporters are registered as ordinary plugins, then
    every plugin of the ``celery_resilience`` entry-point group is loaded.
    """
    from celery_resilience.backends import memory, memory_dlq, redis, redis_dlq
    from celery_resilience.exporters import otel, prometheus

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in (memory, redis, memory_dlq, redis_dlq):
        pm.register(plugin, name=plugin.__name__)
    for exporter in (prometheus, otel):
        pm.register(exporter.exporter, name=exporter.__name__)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of observer hook ``hook_name``, isolating failures.

    Unlike ``pm.hook.<name>(...)``, an implementation that raises is logged with its
    traceback and the others still run; the caller never sees the exception.
    """
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception:
            logger.exception(
                "celery-resilience: plugin %s failed in %s", impl.plugin_name, hook_name
            )
