"""The documentation stays in step with the code, without network access.

The settings page lists every setting, every page is reachable from the mkdocs nav,
the README's links resolve, and (when mkdocs is installed, as in the tox ``docs``
environment) the site builds with ``--strict``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from celery_resilience.settings import SETTING_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

# Pages under docs/ deliberately left out of the nav (none today). A page listed here
# is still built, but only reachable through links.
NOT_IN_NAV: frozenset[str] = frozenset()


def nav_pages(nav: Any) -> list[str]:
    """Every page path the mkdocs nav refers to, in order (external links left out)."""
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def mkdocs_config() -> dict[str, Any]:
    config = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def test_every_setting_is_in_the_settings_page() -> None:
    """docs/settings.md has a row for each resilience_* setting the code reads."""
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\|\s*`(resilience_\w+)`", text, flags=re.M))
    missing = [name for name in SETTING_NAMES if name not in rows]
    assert not missing, f"docs/settings.md has no table row for {missing}"
    unknown = rows - set(SETTING_NAMES)
    assert not unknown, f"docs/settings.md documents settings the code does not read: {unknown}"


def test_every_page_is_in_the_nav() -> None:
    """Each Markdown page under docs/ is in mkdocs.yml's nav, or deliberately excluded."""
    config = mkdocs_config()
    assert config.get("docs_dir", "docs") == "docs"
    in_nav = set(nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(pages - in_nav - NOT_IN_NAV)
    assert not missing, f"pages not in the mkdocs.yml nav: {missing}"


def test_every_nav_entry_is_a_page() -> None:
    """The nav names no page that does not exist (mkdocs --strict would stop on it)."""
    absent = [page for page in nav_pages(mkdocs_config()["nav"]) if not (DOCS / page).is_file()]
    assert not absent, f"mkdocs.yml nav entries without a file in docs/: {absent}"


def test_readme_links_resolve() -> None:
    """Every relative link in README.md points to a file of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link]
    assert relative, "README.md links to no documentation page"
    broken = [link for link in relative if not (ROOT / link).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


def test_readme_and_quickstart_show_the_demo_and_test_commands() -> None:
    """The one-line demo and the CI test command are in both, and the CI script exists."""
    demo = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/celery-resilience demo"
    for page in (ROOT / "README.md", DOCS / "quickstart.md"):
        text = page.read_text(encoding="utf-8")
        assert demo in text, f"{page.name} lacks the demo command"
        assert "bash .ci/run" in text, f"{page.name} lacks the test command"
    assert (ROOT / ".ci" / "run").is_file()
