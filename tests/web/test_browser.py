"""The web page in a real browser: headless Debian ``chromium`` driven by selenium,
against the page the real ``celery -A ... resilience web`` serves, over a real Redis
DLQ filled by a real worker (``tests.integration.harness.Cluster``).

Each test makes its own dead letters with a fresh tag and checks what a person on
call would: the row is listed and filtered, the entry shows its arguments as text,
Replay runs the task again in the worker, Delete removes it, a filter's bulk replay
runs each of its tasks again, a form posted without its CSRF token is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_resilience import DeadLetter
from tests.integration import app as app_module
from tests.integration.harness import Cluster, wait_until
from tests.integration.heartbeat_cluster import on_host
from tests.support import services, workers

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EVIL = "<script>alert(1)</script>"
TIMES = "\N{MULTIPLICATION SIGN}"
SCREENSHOTS = os.environ.get("CELERY_RESILIENCE_TEST_SCREENSHOTS")


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One real worker node (prefork) on the Redis broker; the DLQ is on the main Redis."""
    cluster = Cluster(redis_url=redis_url, logdir=tmp_path_factory.mktemp("workers"))
    with cluster.running("web1"):
        yield cluster


@contextlib.contextmanager
def serving(cluster: Cluster) -> Iterator[str]:
    """``celery -A tests.integration.app resilience web --port <free>``, as a user runs it."""
    port = workers.free_port()
    with subprocess.Popen(
        workers.celery_command(app_module, "resilience", "web", "--port", str(port)),
        env=workers.command_environment(app_module, cluster.env),
        cwd=workers.import_root(app_module),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert f"http://127.0.0.1:{port}/" in first, first + (
                proc.stderr.read() if proc.stderr else ""
            )
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def page_url(cluster: Cluster) -> Iterator[str]:
    with serving(cluster) as url:
        yield url


def screenshot(browser: Any, tmp_path: Path, name: str) -> None:
    """Save the page as ``name.png`` in the test's directory, and in the directory
    ``CELERY_RESILIENCE_TEST_SCREENSHOTS`` names, if set (how docs/img gets them)."""
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    if SCREENSHOTS:
        browser.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium through chromedriver (Debian's packages); fails under CI without them."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(program) is None:
            services.unavailable(
                f"{program} is not installed (apt-get install chromium chromium-driver)", "browser"
            )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def dead_letter(cluster: Cluster, task_name: str, *args: Any) -> DeadLetter:
    """Run ``task_name(*args)`` in the worker until it is dead-lettered; its entry."""
    result = cluster.send(task_name, *args)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, task_name)
    assert state == "FAILURE", cluster.report()
    entries = wait_until(
        lambda: cluster.dead_letters(result.id), f"the dead letter of {result.id}", cluster.report
    )
    cluster.wait_until_settled(result)
    return entries[0]


def rows(driver: Any) -> list[str]:
    """The entry ids of the list's rows, in order."""
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, "table.entries a")
    return [link.get_attribute("href").rsplit("/", 1)[1] for link in links]


def follow(driver: Any, element: Any) -> None:
    """Click ``element`` (a link or a form's button) and wait for the next page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def replaced(_: Any) -> bool:
        try:
            old.tag_name  # noqa: B018 - asks the browser about the old page's root
        except WebDriverException:
            # Stale, or (chromedriver 156, mid-navigation) "Node with given id does not
            # belong to the document": either way the old page is gone.
            return True
        return False

    WebDriverWait(driver, 10).until(replaced)


def message(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, "p.message").text)


def test_list_filter_and_an_entry_with_a_malicious_argument_shown_as_text(
    cluster: Cluster, page_url: str, browser: Any, tmp_path: Path
) -> None:
    """The list shows the new entries; the task filter keeps only its own; the entry page
    shows the argument ``<script>...`` as text, and the page runs no script."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    tag = cluster.tag()
    evil = dead_letter(cluster, "crt.fails_terminally", f"{EVIL}{tag}")
    other = dead_letter(cluster, "crt.dedup_fails", tag)
    browser.get(page_url + "/")
    assert rows(browser)[:2] == [other.id, evil.id]
    assert "crt.fails_terminally" in browser.find_element(By.CSS_SELECTOR, "table.counts").text
    screenshot(browser, tmp_path, "web-dlq")

    Select(browser.find_element(By.NAME, "task")).select_by_visible_text("crt.fails_terminally")
    Select(browser.find_element(By.NAME, "reason")).select_by_visible_text("error")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert "task=crt.fails_terminally" in browser.current_url
    shown = rows(browser)
    assert evil.id in shown
    assert other.id not in shown

    follow(browser, browser.find_element(By.CSS_SELECTOR, f'a[href="/entries/{evil.id}"]'))
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Dead letter {evil.id}"
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f'["{EVIL}{tag}"]' in body  # the args, as text
    assert f"ValueError: invalid input in {EVIL}{tag}" in body
    assert browser.find_elements(By.TAG_NAME, "script") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018  # reading it is the check
    screenshot(browser, tmp_path, "web-entry")


def test_replay_from_the_entry_page_runs_the_task_again_in_the_worker(
    cluster: Cluster, page_url: str, browser: Any
) -> None:
    """Replay, then the confirmation's button: the list says so, the worker runs it again."""
    from selenium.webdriver.common.by import By

    tag = cluster.tag()
    entry = dead_letter(cluster, "crt.fails_terminally", tag)
    assert len(cluster.starts(tag)) == 1
    browser.get(f"{page_url}/entries/{entry.id}")
    follow(browser, browser.find_element(By.LINK_TEXT, "Replay"))
    assert "Replay dead letter" in browser.find_element(By.CSS_SELECTOR, "p.question").text
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    assert message(browser) == f"replayed {entry.id} as task {entry.task_id}"
    wait_until(lambda: len(cluster.starts(tag)) == 2, "the replayed body", cluster.report)
    # It fails terminally again: a new entry of the same task id, the old one is gone.
    again = wait_until(
        lambda: [e for e in cluster.dead_letters(entry.task_id) if e.id != entry.id],
        "the replay's dead letter",
        cluster.report,
    )
    assert again[0].replays == 1
    assert entry.id not in [e.id for e in cluster.dead_letters(entry.task_id)]


def test_delete_from_the_entry_page_removes_the_entry(
    cluster: Cluster, page_url: str, browser: Any
) -> None:
    """Delete, then the confirmation's button: gone from the DLQ and from the list."""
    from selenium.webdriver.common.by import By

    tag = cluster.tag()
    entry = dead_letter(cluster, "crt.fails_terminally", tag)
    browser.get(f"{page_url}/entries/{entry.id}")
    follow(browser, browser.find_element(By.LINK_TEXT, "Delete"))
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    assert message(browser) == f"deleted {entry.id}"
    assert entry.id not in rows(browser)
    assert cluster.dead_letters(entry.task_id) == []
    assert len(cluster.starts(tag)) == 1


def test_bulk_replay_of_a_filtered_set_runs_each_of_its_tasks_again(
    cluster: Cluster, page_url: str, browser: Any
) -> None:
    """Filter by task, Replay all N, confirm: each entry of that task runs again; the
    entries of other tasks stay."""
    from selenium.webdriver.common.by import By

    tags = [cluster.tag() for _ in range(3)]
    entries = [dead_letter(cluster, "crt.dedup_fails", tag) for tag in tags]
    kept = dead_letter(cluster, "crt.fails_terminally", cluster.tag())
    n = cluster.dlq.count(task_name="crt.dedup_fails")
    browser.get(f"{page_url}/?task=crt.dedup_fails")
    follow(
        browser, browser.find_element(By.PARTIAL_LINK_TEXT, f"Replay all {n} shown by this filter")
    )
    assert f"Replay all {n} dead letters of task crt.dedup_fails" in browser.page_source
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    assert message(browser).startswith(f"replayed {n} dead letters of task crt.dedup_fails")
    assert "refused 0" in message(browser)
    for tag in tags:
        wait_until(lambda tag=tag: len(cluster.starts(tag)) == 2, f"{tag} again", cluster.report)
    assert [e.id for e in cluster.dead_letters(kept.task_id)] == [kept.id]
    for entry in entries:
        assert entry.id not in [e.id for e in cluster.dead_letters(entry.task_id)]


def test_a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing(
    cluster: Cluster, page_url: str, browser: Any
) -> None:
    """The confirmation's form with its CSRF field removed: 403, the entry stays."""
    from selenium.webdriver.common.by import By

    entry = dead_letter(cluster, "crt.fails_terminally", cluster.tag())
    browser.get(f"{page_url}/entries/{entry.id}/delete")
    browser.execute_script("document.querySelector('input[name=csrf]').remove()")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Forbidden"
    assert "CSRF" in browser.find_element(By.CSS_SELECTOR, "p.error").text
    assert [e.id for e in cluster.dead_letters(entry.task_id)] == [entry.id]


def test_a_public_bind_without_a_token_is_refused(cluster: Cluster) -> None:
    """resilience web --bind 0.0.0.0 without resilience_web_token: one error line, exit 1."""
    done = cluster.celery("resilience", "web", "--bind", "0.0.0.0")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: --bind 0.0.0.0 is not a loopback address")


def table_rows(browser: Any, css: str) -> list[list[str]]:
    """The text of each cell of each body row of the table ``css``."""
    from selenium.webdriver.common.by import By

    return [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in browser.find_elements(By.CSS_SELECTOR, f"table.{css} tbody tr")
    ]


def reload_until(browser: Any, url: str, check: Any, what: str, report: Any) -> Any:
    """Load ``url`` until ``check()`` answers something true (the page then shows it)."""

    def shown() -> Any:
        browser.get(url)
        return check()

    return wait_until(shown, what, report, timeout=60)


def test_nodes_page_shows_the_nodes_the_lock_held_and_a_killed_node_as_lost(
    redis_url: str, browser: Any, tmp_path: Path
) -> None:
    """Two real nodes, the victim under its own host name running a locked task: the page
    lists both nodes, what the victim holds and the lock it holds (its node, host, task
    id, token). SIGKILL the victim: once the survivor recovered it, the page lists it
    among the lost with its message back, and the lock held by the survivor under a
    greater token."""
    host = f"pod-{uuid.uuid4().hex[:6]}"
    logdir = tmp_path / "workers"
    logdir.mkdir()
    cluster = Cluster(redis_url=redis_url, logdir=logdir)
    try:
        (victim,) = cluster.start("victim", wrap=on_host(host))
        tag = cluster.tag()
        result = cluster.send("crt.blocks_until_released", tag)
        wait_until(lambda: cluster.starts(tag), "the first start", cluster.report)
        (survivor,) = cluster.start("survivor")
        victim_name, survivor_name = (
            f"{victim.name}@{host}",
            f"{survivor.name}@{socket.gethostname()}",
        )
        with serving(cluster) as url:
            page = f"{url}/nodes"

            def victim_holds() -> list[str] | None:
                rows = {row[0]: row for row in table_rows(browser, "nodes")}
                row = rows.get(victim_name)
                held = f"1 (by task: crt.blocks_until_released{TIMES}1)"
                return row if row and row[5] == held and survivor_name in rows else None

            row = reload_until(
                browser, page, victim_holds, "the victim holding its task", cluster.report
            )
            assert row[1:4] == [host, row[2], cluster.queue]
            assert row[4].startswith("in ")
            (lock,) = table_rows(browser, "locks")
            key, tasks, node, lock_host, _, task_id, _, _, token = lock
            assert (key, node, lock_host, task_id) == (f"held:{tag}", victim_name, host, result.id)
            assert tasks == "crt.blocks_until_released, crt.contends"
            screenshot(browser, tmp_path, "web-nodes")

            killed_at = victim.kill()

            def lost_and_taken_over() -> list[list[str]] | None:
                lost = [row for row in table_rows(browser, "lost") if row[1] == victim_name]
                locks = table_rows(browser, "locks")
                taken = locks and locks[0][2] == survivor_name
                return lost if lost and taken else None

            (lost,) = reload_until(
                browser,
                page,
                lost_and_taken_over,
                "the victim lost, its lock taken over",
                cluster.report,
            )
            print(f"\nthe page showed the victim lost and its lock taken over "
                  f"{time.time() - killed_at:.1f} s after SIGKILL")  # fmt: skip
            assert lost[2:] == [host, f"1 ({cluster.queue}{TIMES}1)"]
            assert victim_name not in [row[0] for row in table_rows(browser, "nodes")]
            (after,) = table_rows(browser, "locks")
            assert (after[0], after[3], after[5]) == (
                f"held:{tag}",
                socket.gethostname(),
                result.id,
            )
            assert int(after[8]) > int(token)
            screenshot(browser, tmp_path, "web-nodes-lost")
        cluster.release(tag)
        cluster.wait_until_settled(result, tag)
    finally:
        cluster.close()
