"""``celery_resilience.testing``: the docs' contract example runs, the recorder and the
eager app work as documented, and none of it needs pytest but the contract suites."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from celery import Celery

from celery_resilience import get_plugin_manager, hookspecs, resilient
from celery_resilience.runtime import runtime
from celery_resilience.testing import HookRecorder, eager_app, record_hooks

ROOT = Path(__file__).resolve().parents[1]


def docs_example(page_name: str = "plugins.md", marker: str = "contract-example") -> str:
    """The example block under ``<!-- marker ... -->`` of a docs page, as the page shows it."""
    page = (ROOT / "docs" / page_name).read_text()
    block = re.search(rf"<!-- {marker}[^>]*-->\n\n```python\n(.*?)```", page, re.S)
    assert block is not None, f"docs/{page_name} lost its {marker}"
    return block.group(1)


def run_as_test_module(directory: Path, name: str, source: str) -> str:
    """Run ``source`` as the test module ``name`` of a project in ``directory``, as its
    author would (``pytest -q``); fail unless every test passed. Returns pytest's output."""
    (directory / name).write_text(source)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_docs_contract_example_passes_against_the_memory_backend(tmp_path: Path) -> None:
    """The example module of under 20 lines runs both suites, every test passing."""
    example = docs_example()
    assert len(example.splitlines()) < 20
    output = run_as_test_module(tmp_path, "test_my_backend.py", example)
    assert re.search(r"\b71 passed\b", output), output


def test_the_docs_hook_testing_example_passes(tmp_path: Path) -> None:
    """The plugin-testing example of docs/hooks.md runs as shown and its test passes."""
    example = docs_example("hooks.md", "hooks-example")
    output = run_as_test_module(tmp_path, "test_my_plugin.py", example)
    assert re.search(r"\b1 passed\b", output), output


def test_the_recorder_and_the_demo_import_without_pytest() -> None:
    """Only the contract suites need pytest: the package, the recorder, the eager app and
    the demo import with pytest unavailable, and ``import celery_resilience`` does not
    import the testing module."""
    code = textwrap.dedent(
        """
        import sys

        class NoPytest:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pytest", "_pytest"):
                    raise ImportError(name)

        sys.meta_path.insert(0, NoPytest())
        import celery_resilience
        assert "celery_resilience.testing" not in sys.modules
        from celery_resilience.testing import HookRecorder, eager_app, record_hooks
        import celery_resilience.demo.inprocess
        with eager_app() as app, record_hooks() as recorder:
            pass
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, run.stdout.strip()) == (0, "ok"), run.stderr


def test_the_recorder_implements_every_observer_hook() -> None:
    """HookRecorder records each hook that is not a provider (first result) hook."""
    observers = {
        name
        for name in dir(hookspecs)
        if name.startswith("resilience_")
        and not getattr(getattr(hookspecs, name), "celery_resilience_spec", {}).get("firstresult")
    }
    recorded = {name for name in dir(HookRecorder) if name.startswith("resilience_")}
    assert len(observers) == 12
    assert recorded == observers


def test_the_recorder_keeps_each_call_with_its_arguments_in_order() -> None:
    """Each observer call is kept as (name, arguments); of() and names() read them."""
    with record_hooks() as recorder:
        hook = get_plugin_manager().hook
        hook.resilience_duplicate_suppressed(task_name="t", task_id="1")
        hook.resilience_dead_letter_deleted(entry_id="e")
    assert recorder.calls == [
        ("duplicate_suppressed", {"task_name": "t", "task_id": "1"}),
        ("dead_letter_deleted", {"entry_id": "e"}),
    ]
    assert recorder.names() == ["duplicate_suppressed", "dead_letter_deleted"]
    assert recorder.of("resilience_dead_letter_deleted") == [{"entry_id": "e"}]
    assert not get_plugin_manager().is_registered(recorder)


def test_a_listener_gets_each_call_as_it_is_recorded() -> None:
    """HookRecorder(listener) passes every call on, after keeping it."""
    seen: list[str] = []
    recorder = HookRecorder(lambda call: seen.append(call.name))
    recorder.resilience_node_lost(node="n", nodename="w@h", recovered={"q": 1})
    assert seen == ["node_lost"]
    assert recorder.of("node_lost") == [{"node": "n", "nodename": "w@h", "recovered": {"q": 1}}]


def test_eager_app_runs_resilient_tasks_on_a_store_of_its_own() -> None:
    """Two eager apps do not share leases or records; the plugins given are registered
    only inside the block."""
    recorder = HookRecorder()
    with eager_app(recorder) as first, eager_app() as second:
        assert get_plugin_manager().is_registered(recorder)
        assert first.conf.task_always_eager
        assert runtime(first).settings.url != runtime(second).settings.url
        assert first.conf.broker_url.startswith("memory://")

        @resilient(max_retries=0)
        @first.task(shared=False)
        def fails() -> None:
            raise ValueError("no")

        assert fails.apply().state == "FAILURE"
        assert recorder.names() == ["dead_letter_stored", "task_gave_up"]
        assert runtime(second).dlq.count() == 0
        assert runtime(first).dlq.count() == 1
    assert not get_plugin_manager().is_registered(recorder)


def test_eager_app_leaves_an_app_with_invalid_settings_to_the_test() -> None:
    """A test that sets an invalid setting on purpose gets its error, not one at exit."""
    with eager_app(resilience_url="nosuch://x") as app:
        assert isinstance(app, Celery)
