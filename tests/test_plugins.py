"""The plugin manager: specs, built-in plugins and entry-point plugins."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest
from celery import Celery

from celery_resilience import ConfigurationError, get_plugin_manager, hookspecs, resilient
from celery_resilience.runtime import runtime


@pytest.fixture
def entry_point_plugin(tmp_path: Path) -> Iterator[None]:
    """Install tests.plugins.custom_backend through a real entry point, as pip would."""
    dist = tmp_path / "celery_resilience_custom-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: celery-resilience-custom\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[celery_resilience]\ncustom = tests.plugins.custom_backend\n"
    )
    sys.path.insert(0, str(tmp_path))
    get_plugin_manager.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        get_plugin_manager.cache_clear()


def test_every_hook_is_prefixed_and_documented() -> None:
    """Each hook spec starts with resilience_ and has a docstring."""
    specs = [name for name in dir(hookspecs) if name.startswith("resilience_")]
    assert specs
    for name in specs:
        assert getattr(hookspecs, name).__doc__, name
    pm = get_plugin_manager()
    assert {h for h in dir(pm.hook) if not h.startswith("_")} == set(specs)


def test_builtin_backends_are_ordinary_plugins() -> None:
    """memory:// and redis:// come from plugins registered like anyone else's."""
    pm = get_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"celery_resilience.backends.memory", "celery_resilience.backends.redis"} <= names
    assert isinstance(pm, pluggy.PluginManager)


def test_entry_point_plugin_provides_a_backend_for_its_scheme(entry_point_plugin: None) -> None:
    """A plugin in the celery_resilience entry-point group serves its URL scheme."""
    from tests.plugins import custom_backend

    app = Celery(f"p{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(task_always_eager=True, resilience_url="custom://one")

    @resilient()
    @app.task
    def hello() -> str:
        return "hi"

    assert hello.delay().get() == "hi"
    assert isinstance(runtime(app).backend, custom_backend.CustomBackend)
    assert custom_backend.built[-1] == "custom://one"


def test_unknown_scheme_is_a_configuration_error_naming_the_setting() -> None:
    """A URL no plugin serves fails with the setting and the masked URL."""
    app = Celery(f"p{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(task_always_eager=True, resilience_url="nosuch://u:pw@host/0")

    @resilient()
    @app.task
    def hello() -> None: ...

    with pytest.raises(ConfigurationError, match=r"resilience_url='nosuch://u:\*\*@host/0'"):
        hello.delay().get()
