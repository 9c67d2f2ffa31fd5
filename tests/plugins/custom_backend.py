"""An example third-party plugin: a coordination backend for ``custom://`` URLs.

It is loaded through the ``celery_resilience`` entry-point group in
tests/test_plugins.py, as a package installed with pip would be.
"""

from __future__ import annotations

from celery_resilience import hookimpl
from celery_resilience.backends.memory import MemoryCoordinationBackend
from celery_resilience.settings import Settings

built: list[str] = []


class CustomBackend(MemoryCoordinationBackend):
    """Behaves as memory://, under its own scheme."""


@hookimpl
def resilience_coordination_backend(url: str, settings: Settings) -> CustomBackend | None:
    if not url.startswith("custom://"):
        return None
    built.append(url)
    return CustomBackend(url, key_prefix=settings.key_prefix)
