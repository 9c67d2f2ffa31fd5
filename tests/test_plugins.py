"""The plugin manager: specs, built-in plugins and entry-point plugins."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pluggy
import pytest
from celery import Celery

from celery_resilience import (
    ConfigurationError,
    DeadLetterQueue,
    get_plugin_manager,
    hookspecs,
    resilient,
)
from celery_resilience.runtime import runtime
from tests.support.entry_points import entry_point


@pytest.fixture
def entry_point_plugin(tmp_path: Path) -> Iterator[None]:
    """Install tests.plugins.custom_backend through a real entry point."""
    with entry_point(tmp_path, "custom", "tests.plugins.custom_backend"):
        yield


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


def test_resilience_coordination_backend_of_an_entry_point_plugin_serves_its_scheme(
    entry_point_plugin: None,
) -> None:
    """A plugin in the celery_resilience entry-point group serves its URL scheme."""
    from tests.plugins import custom_backend

    app = Celery(f"p{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(task_always_eager=True, resilience_url="custom://one")

    @resilient()
    @app.task(shared=False)
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
    @app.task(shared=False)
    def hello() -> None: ...

    with pytest.raises(ConfigurationError, match=r"resilience_url='nosuch://u:\*\*@host/0'"):
        hello.delay().get()


def test_resilience_dlq_backend_of_an_entry_point_plugin_keeps_the_dead_letters(
    tmp_path: Path,
) -> None:
    """The example SQLite plugin, installed by entry point, stores what a task gave up."""
    from tests.plugins import sqlite_dlq

    db = tmp_path / "dlq.db"
    app = Celery(f"p{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        resilience_url=f"memory://p{uuid.uuid4().hex[:6]}",
        resilience_dlq_url=f"sqlite:///{db}",
    )

    @resilient
    @app.task(shared=False)
    def fails(n: int) -> None:
        raise ValueError(f"bad {n}")

    with entry_point(tmp_path, "sqlite_dlq", "tests.plugins.sqlite_dlq"):
        result = fails.delay(3)
        with pytest.raises(ValueError, match="bad 3"):
            result.get()
        rt = runtime(app)
        assert isinstance(rt.dlq, sqlite_dlq.SQLiteDeadLetterBackend)
        (entry,) = DeadLetterQueue(app).list().entries
        assert (entry.task_id, entry.reason, entry.args) == (result.id, "error", [3])
        rt.dlq.close()
        rt.backend.close()
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, task_name FROM dead_letters").fetchall()
    assert rows == [(entry.id, fails.name)]
