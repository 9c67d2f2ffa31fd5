"""Installing a module as a ``celery_resilience`` entry-point plugin, as pip would."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery_resilience.plugins import get_plugin_manager


@contextmanager
def entry_point(tmp_path: Path, name: str, module: str) -> Iterator[None]:
    """Install ``module`` as plugin ``name`` of the celery_resilience group, as pip would."""
    dist = tmp_path / f"celery_resilience_{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: celery-resilience-{name}\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[celery_resilience]\n{name} = {module}\n")
    sys.path.insert(0, str(tmp_path))
    get_plugin_manager.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        get_plugin_manager.cache_clear()
