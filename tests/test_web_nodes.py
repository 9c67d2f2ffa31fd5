"""The web page's "Nodes and leases" (``/nodes``) over HTTP: the real server on a free
port, the locks taken in a real Redis through the app's own coordination backend.

Issue 17: locks held now (key, holder, time held, fencing token) for the task names
the app knows, escaped; the nodes part says why when liveness is off, and the rest of
the page still shows. Live and lost nodes from real workers: tests/web/test_browser.py.
"""

from __future__ import annotations

import html
import os
import re
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_resilience import DeadLetterQueue, resilient
from celery_resilience.backends.base import Admission
from celery_resilience.leases import new_owner
from celery_resilience.runtime import runtime
from tests.support.web import Client, servers

EVIL = "<script>alert(1)</script>"


def make_app(resilience_url: str, redis_url: str, key_prefix: str, **conf: Any) -> Celery:
    """An app on this test's keys, with a task locked by a template and one by a callable."""
    app = Celery("webnodes", set_as_current=False)
    app.conf.update(
        broker_url=redis_url,
        broker_transport_options={"global_keyprefix": f"{key_prefix}:broker:"},
        resilience_url=resilience_url,
        resilience_dlq_url=redis_url,
        resilience_key_prefix=key_prefix,
        **conf,
    )

    @resilient(lock="upload:{repoid}")
    @app.task(name="tasks.upload", shared=False)
    def upload(repoid: str) -> None:
        """Never run here: its locks are taken through the backend."""

    @resilient(lock=lambda args, kwargs: f"report:{args[0]}")
    @app.task(name="tasks.report", shared=False)
    def report(day: str) -> None:
        """Never run here."""

    return app


Serve = Callable[[Celery], Client]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Serve an app's page on a free port; a client of it."""
    apps: list[Celery] = []
    with servers() as start:

        def serve(app: Celery) -> Client:
            apps.append(app)
            return start(DeadLetterQueue(app))

        yield serve
    for app in apps:
        runtime(app).backend.close()
        app.close()


@pytest.fixture
def app(redis_url: str, key_prefix: str) -> Celery:
    return make_app(redis_url, redis_url, key_prefix)


def take(app: Celery, lock_key: str, owner: str, task_id: str) -> int:
    """Take ``lock_key`` for ``owner`` as a delivery's admission does; its fencing token."""
    result = runtime(app).backend.admit(
        task_id,
        owner=owner,
        publish="p",
        lock_key=lock_key,
        lease_ttl=60.0,
        max_crashes=3,
        record_ttl=600.0,
    )
    assert result.admission is Admission.ADMITTED
    assert result.fencing_token is not None
    return result.fencing_token


def table(text: str, css: str) -> list[list[str]]:
    """The rows of the page's table ``css``, each cell as the text a person reads."""
    found = re.search(rf'<table class="{css}">.*?<tbody>(.*?)</tbody>', text, re.S)
    assert found, f"no table.{css} on the page"
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)
    ]


HEADER = ["key", "task", "node", "host", "pid", "task id", "held for", "expires in", "token"]


def test_locks_held_are_listed_with_task_holder_time_held_and_token(
    app: Celery, serve: Serve
) -> None:
    """Each lock: its key as rendered, the app's task whose template renders it, the
    holder's node, host, pid and task id, seconds held and left, the fencing token."""
    token = take(app, "upload:42", new_owner("celery@node-a", "tid-42"), "tid-42")
    other = take(app, f"upload:{EVIL}", "a-custom-holder", "tid-evil")
    page = serve(app).get("/nodes")

    assert page.status == 200
    assert re.findall(r"<th>(.*?)</th>", page.text.split('class="locks"')[1])[:9] == HEADER
    rows = {row[0]: row for row in table(page.text, "locks")}
    assert set(rows) == {"upload:42", f"upload:{EVIL}"}
    _, task, node, host, pid, task_id, held, left, shown = rows["upload:42"]
    assert (task, node, host, pid, task_id) == (
        "tasks.upload",
        "celery@node-a",
        socket.gethostname(),
        str(os.getpid()),
        "tid-42",
    )
    assert re.fullmatch(r"\d\.\d s", held), held
    assert re.fullmatch(r"(59|60)\.\d s", left), left
    assert shown == str(token)
    assert rows[f"upload:{EVIL}"][2:6] == ["a-custom-holder", "?", "?", "?"]
    assert rows[f"upload:{EVIL}"][8] == str(other)
    assert EVIL not in page.text  # escaped: shown as text, never markup
    assert "upload:&lt;script&gt;" in page.text


def test_the_task_filter_keeps_its_locks_and_a_freed_lock_is_gone(
    app: Celery, serve: Serve
) -> None:
    """``?task=`` lists the locks its template renders; a lock released is not listed."""
    owner = new_owner("celery@node-a", "t1")
    take(app, "upload:1", owner, "t1")
    take(app, "report:monday", new_owner("celery@node-b", "t2"), "t2")
    client = serve(app)

    everything = [row[0] for row in table(client.get("/nodes").text, "locks")]
    assert everything == ["report:monday", "upload:1"]
    filtered = client.get("/nodes?task=tasks.upload").text
    assert [row[0] for row in table(filtered, "locks")] == ["upload:1"]
    assert '<option value="tasks.upload" selected>' in filtered
    # A callable lock: its keys match no template, and its filter says why it cannot be.
    assert table(client.get("/nodes").text, "locks")[0][1] == "-"
    callable_page = client.get("/nodes?task=tasks.report").text
    assert "renders its lock with a callable: its keys cannot be told apart" in callable_page

    assert runtime(app).backend.release("t1", "upload:1", owner) is True
    assert [row[0] for row in table(client.get("/nodes").text, "locks")] == ["report:monday"]


def test_tasks_of_the_modules_the_app_imports_name_their_locks(
    redis_url: str, key_prefix: str, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task in a module of the app's ``imports`` (not yet imported, as with
    ``celery -A proj``) names its locks, as a worker would register it."""
    module = f"webnodes_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from celery import shared_task\n"
        "from celery_resilience import resilient\n\n"
        '@resilient(lock="sync:{account}")\n'
        f'@shared_task(name="{module}.sync")\n'
        "def sync(account):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app(redis_url, redis_url, key_prefix, imports=[module])
    take(app, "sync:acme", new_owner("celery@node-a", "t9"), "t9")
    assert module not in sys.modules
    rows = table(serve(app).get("/nodes").text, "locks")
    assert [row[:2] for row in rows] == [["sync:acme", f"{module}.sync"]]


def test_without_liveness_the_nodes_part_says_why_and_the_locks_still_show(
    redis_url: str, key_prefix: str, serve: Serve
) -> None:
    """The visibility heartbeat off: no presence to read, said in the nodes part."""
    app = make_app(redis_url, redis_url, key_prefix, resilience_visibility_heartbeat=False)
    take(app, "upload:7", new_owner("celery@node-a", "t7"), "t7")
    page = serve(app).get("/nodes")

    assert page.status == 200
    assert "liveness needs a Redis broker and the visibility heartbeat on" in page.text
    assert "resilience_visibility_heartbeat is false" in page.text
    assert [row[0] for row in table(page.text, "locks")] == ["upload:7"]


def test_with_live_liveness_and_no_worker_the_page_says_no_live_nodes(
    app: Celery, serve: Serve
) -> None:
    """Liveness on, nobody present: the tables say so, with the broker clock's time."""
    page = serve(app).get("/nodes").text
    assert '<p class="empty">no live nodes</p>' in page
    assert "0 lease holder processes present" in page
    assert '<p class="empty">no node lost recently</p>' in page
    assert re.search(r"read at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)
    assert '<p class="empty">no locks held</p>' in page


def test_a_process_private_coordination_backend_is_said_not_listed(
    redis_url: str, key_prefix: str, serve: Serve
) -> None:
    """memory:// is this process's own: the page cannot see the workers' locks."""
    app = make_app("memory://webnodes", redis_url, key_prefix)
    page = serve(app).get("/nodes").text
    assert "the coordination backend memory://webnodes is this process&#x27;s own" in page


def test_auto_refresh_is_a_meta_refresh_and_a_bad_value_is_a_400(app: Celery, serve: Serve) -> None:
    """``?refresh=5`` reloads the page every 5 s without JavaScript; anything but whole
    seconds 1-3600 is refused with one line naming the value."""
    client = serve(app)
    page = client.get("/nodes?refresh=5").text
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page
    assert '<meta http-equiv="refresh"' not in client.get("/nodes").text
    bad = client.get("/nodes?refresh=0.5")
    assert bad.status == 400
    assert "refresh=&#x27;0.5&#x27;: expected whole seconds, 1 to 3600" in bad.text
