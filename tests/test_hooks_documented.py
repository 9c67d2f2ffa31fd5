"""Every hook spec has a documented section in docs/hooks.md and a test that calls it.

The conventions this checks (datasette's ``test_plugin_hooks_are_documented``):

- docs/hooks.md has one ``## `` heading per hook, written as its signature:
  ``## resilience_<name>(arg, ...)`` with the spec's arguments in order. The section
  under it has a ``python`` example and says what the return value means.
- tests/test_plugins.py or tests/test_hook_calls.py has a test function whose name
  contains the hook's full name (``test_resilience_<name>_...``), is not skipped or
  xfailed, and asserts something. Such a test triggers the hook through the
  library's own code paths (a task run, a ``DeadLetterQueue`` call, an entry-point
  plugin) and asserts on the call; a name alone cannot satisfy this check, the
  review of that test does.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_resilience import get_plugin_manager, hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_DOC = ROOT / "docs" / "hooks.md"
HOOK_TEST_FILES = (ROOT / "tests" / "test_plugins.py", ROOT / "tests" / "test_hook_calls.py")


def hook_specs() -> dict[str, Callable[..., Any]]:
    """Every function of celery_resilience.hookspecs marked as a hook spec."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and getattr(fn, marker, None) is not None
    }


HOOKS = sorted(hook_specs())


def doc_sections() -> dict[str, tuple[str, str]]:
    """``## `` headings of docs/hooks.md: hook name -> (heading, section body)."""
    sections: dict[str, tuple[str, str]] = {}
    parts = re.split(r"^## +(.+?)\s*$", HOOKS_DOC.read_text(encoding="utf-8"), flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        match = re.search(r"\b(resilience_\w+)\b", heading)
        if match:
            sections[match.group(1)] = (heading, body)
    return sections


def _skipped(fn: ast.FunctionDef) -> bool:
    for decorator in fn.decorator_list:
        text = ast.unparse(decorator)
        if re.search(r"\b(skip|skipif|xfail)\b", text):
            return True
    return False


def _asserts(fn: ast.FunctionDef) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.raises":
            return True
    return False


def hook_tests() -> dict[str, list[str]]:
    """Test functions in HOOK_TEST_FILES that may stand for a hook: name -> [where]."""
    found: dict[str, list[str]] = {}
    for path in HOOK_TEST_FILES:
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.startswith("test_")
                and not _skipped(node)
                and _asserts(node)
            ):
                found.setdefault(node.name, []).append(path.name)
    return found


def test_the_hook_list_is_the_plugin_managers() -> None:
    """The specs found here are exactly the hooks the plugin manager knows."""
    assert HOOKS
    hooks = {name for name in dir(get_plugin_manager().hook) if not name.startswith("_")}
    assert set(HOOKS) == hooks


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_documented_section(hook: str) -> None:
    """docs/hooks.md documents the hook under its signature, with an example and return."""
    sections = doc_sections()
    assert hook in sections, f"docs/hooks.md has no '## {hook}(...)' section"
    heading, body = sections[hook]
    params = list(inspect.signature(hook_specs()[hook]).parameters)
    expected = f"{hook}({', '.join(params)})"
    assert expected in heading.replace("`", ""), (
        f"docs/hooks.md heading {heading!r} should show the signature {expected}"
    )
    assert "```python" in body, f"the {hook} section has no python example"
    assert re.search(r"\breturn", body, re.I), f"the {hook} section does not say what it returns"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    """A test named after the hook, which asserts something, exists in the hook test files."""
    names = [name for name in hook_tests() if hook in name]
    files = ", ".join(p.name for p in HOOK_TEST_FILES)
    assert names, f"no test function named test_*{hook}* with an assert in {files}"


def test_no_section_documents_a_hook_that_does_not_exist() -> None:
    """Every hook section in docs/hooks.md names an existing hook spec."""
    assert set(doc_sections()) <= set(HOOKS)
