"""The web page (``resilience web``) over HTTP: the real server on a free port, a real
Redis DLQ filled through its backend, requests made with ``http.client``.

SPEC "Security" and issue 17: output escaped, arguments masked as the CLI masks them,
every change a POST with its session's CSRF token, read-only mode, a token on a public
bind. The CLI is run as the real ``celery`` program for the bind rules.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_resilience import DeadLetter, DeadLetterQueue
from celery_resilience.runtime import runtime
from celery_resilience.testing.dlq import _NOW, _letter
from celery_resilience.web.security import refusal
from tests.cli_support import app as cli_app
from tests.support.web import Client, servers
from tests.support.workers import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-web-token"


@pytest.fixture
def app(redis_url: str, key_prefix: str) -> Iterator[Celery]:
    """An app whose DLQ and broker are this test's keys of the test Redis."""
    app = Celery("webtest", set_as_current=False)
    app.conf.update(
        broker_url=redis_url,
        broker_transport_options={"global_keyprefix": f"{key_prefix}:broker:"},
        resilience_url=redis_url,
        resilience_key_prefix=key_prefix,
        resilience_dlq_replay_rate=1000,
    )

    @app.task(name="tasks.upload", shared=False)
    def upload(*args: Any, **kwargs: Any) -> None:
        """Never run: no worker runs here, a replay stays in the broker's queue."""

    yield app
    runtime(app).dlq.close()
    app.close()


@pytest.fixture
def dlq(app: Celery) -> DeadLetterQueue:
    return DeadLetterQueue(app)


def store(dlq: DeadLetterQueue, *entries: DeadLetter) -> None:
    for entry in entries:
        dlq.backend.store(entry, retention=7 * 86400.0, max_entries=10_000)


Serve = Callable[..., Client]


@pytest.fixture
def serve(dlq: DeadLetterQueue) -> Iterator[Serve]:
    """Start the page's server on a free port (``token``, ``read_only``); a client of it."""
    with servers() as start:

        def serve(token: str | None = None, read_only: bool = False, mask: str = "") -> Client:
            names = frozenset(n for n in mask.split(",") if n)
            return start(dlq, token, read_only, names)

        yield serve


def row_ids(text: str) -> list[str]:
    return re.findall(r'href="/entries/([0-9a-f]+)"', text)


def test_list_shows_entries_newest_first_with_counts_per_task_and_reason(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """/ lists every entry newest first and counts them per task and reason."""
    old = _letter(at=_NOW - 30)
    new = _letter(at=_NOW - 10, reason="error", exception_message="bad <input>")
    other = _letter(task_name="tasks.sync", at=_NOW - 20, reason="worker_lost")
    store(dlq, old, new, other)
    page = serve().get("/")
    assert page.status == 200
    assert row_ids(page.text) == [new.id, other.id, old.id]
    assert "ConnectionError: bad &lt;input&gt;" in page.text
    assert "3 dead letters match this filter" in page.text
    counts = page.text.split('class="counts"')[1].split("</table>")[0]
    assert re.search(r"tasks\.upload</a></td><td><a [^>]+>1</a></td><td><a [^>]+>1</a>", counts)
    assert 'href="/?task=tasks.sync&amp;reason=worker_lost">1</a>' in counts
    assert 'href="/">3</a>' in counts


def test_list_filters_by_task_and_reason(dlq: DeadLetterQueue, serve: Serve) -> None:
    """?task= and ?reason= show only matching entries, and select them in the form."""
    upload_error = _letter(reason="error", at=_NOW - 1)
    upload_retries = _letter(at=_NOW - 2)
    sync_error = _letter(task_name="tasks.sync", reason="error", at=_NOW - 3)
    store(dlq, upload_error, upload_retries, sync_error)
    client = serve()
    assert row_ids(client.get("/?task=tasks.upload").text) == [upload_error.id, upload_retries.id]
    assert row_ids(client.get("/?reason=error").text) == [upload_error.id, sync_error.id]
    both = client.get("/?task=tasks.upload&reason=error").text
    assert row_ids(both) == [upload_error.id]
    assert '<option value="tasks.upload" selected>' in both
    assert '<option value="error" selected>' in both
    assert "1 dead letter match this filter" in both


def test_pages_follow_the_dlq_cursor_without_repeating_or_skipping(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """55 entries: 50 on the first page, a next-page link to the last 5, none twice."""
    entries = [_letter(at=_NOW - i) for i in range(55)]
    store(dlq, *entries)
    client = serve()
    first = client.get("/").text
    assert len(row_ids(first)) == 50
    link = re.search(r'href="(/\?cursor=[^"]+)">next page', first)
    assert link, first
    second = client.get(link.group(1).replace("&amp;", "&")).text
    assert "next page" not in second
    assert row_ids(first) + row_ids(second) == [e.id for e in entries]


def test_an_entry_page_shows_its_fields_masked_and_escaped(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """Arguments masked as dlq show masks them, HTML in them shown as text, traceback in <pre>."""
    entry = _letter(
        args=["<script>alert(1)</script>", "tok-123"],
        kwargs={"password": "hunter2", "note": "<b>bold</b>"},
        argnames=["payload", "api_key"],
        traceback="Traceback:\n  File <x>\nValueError: <boom>\n",
        attempts=4,
        deliveries=2,
        replays=1,
    )
    store(dlq, entry)
    page = serve().get(f"/entries/{entry.id}")
    assert page.status == 200
    text = page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script" not in text
    assert "<b>bold" not in text
    assert "hunter2" not in text
    assert "tok-123" not in text
    assert "&quot;password&quot;: &quot;***&quot;" in text
    assert "<pre>Traceback:\n  File &lt;x&gt;\nValueError: &lt;boom&gt;\n</pre>" in text
    for label, value in (("attempts", 4), ("deliveries", 2), ("replays", 1)):
        assert f'<th>{label}</th><td class="value">{value}</td>' in text


def test_masking_follows_the_dlq_mask_args_setting(dlq: DeadLetterQueue, serve: Serve) -> None:
    """A name listed in resilience_dlq_mask_args is masked too."""
    entry = _letter(args=["acme-42"], argnames=["customer"])
    store(dlq, entry)
    text = serve(mask="customer").get(f"/entries/{entry.id}").text
    assert "acme-42" not in text
    assert "***" in text


def test_an_unknown_entry_and_an_unknown_page_are_404(serve: Serve) -> None:
    """An id with no entry, and a path that is no page, answer 404 with a page."""
    client = serve()
    missing = client.get("/entries/0123456789abcdef")
    assert missing.status == 404
    assert "no dead letter with id" in missing.text
    assert client.get("/entries/0123456789abcdef/replay").status == 404
    assert client.get("/nowhere").status == 404


def test_a_cursor_the_dlq_did_not_give_is_a_400_page(serve: Serve) -> None:
    """A made-up ?cursor= answers 400 with the DLQ's one-line reason, escaped."""
    reply = serve().get("/?cursor=%3Cb%3Enope")
    assert reply.status == 400
    assert "cursor &#x27;&lt;b&gt;nope&#x27; is not one returned by list()" in reply.text


def test_every_response_carries_the_security_headers(dlq: DeadLetterQueue, serve: Serve) -> None:
    """CSP without scripts, no framing, no referrer, on pages, errors and the stylesheet."""
    client = serve()
    for path in ("/", "/nowhere", "/static/style.css"):
        reply = client.get(path)
        assert reply.headers["Content-Security-Policy"].startswith(
            "default-src 'none'; style-src 'self'"
        )
        assert "script-src" not in reply.headers["Content-Security-Policy"]
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert client.get("/static/style.css").headers["Content-Type"].startswith("text/css")


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused_and_changes_nothing(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """403 for a delete without the token, with another session's token, or a forged one."""
    entry = _letter()
    store(dlq, entry)
    client, other = serve(), None
    client.get("/")
    assert client.post(f"/entries/{entry.id}/delete", {}).status == 403
    assert client.post(f"/entries/{entry.id}/delete", {"csrf": "0" * 64}).status == 403
    other = Client(client.port)
    stolen = other.csrf()
    assert client.post(f"/entries/{entry.id}/delete", {"csrf": stolen}).status == 403
    assert client.post("/bulk/delete", {}).status == 403
    assert dlq.get(entry.id).id == entry.id
    assert dlq.count() == 1


def test_deleting_an_entry_asks_for_confirmation_then_redirects_with_a_message(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """GET .../delete only asks; its form's POST deletes and 303s to the list, which says so."""
    entry, kept = _letter(at=_NOW - 1), _letter(at=_NOW - 2)
    store(dlq, entry, kept)
    client = serve()
    assert f'href="/entries/{entry.id}/delete"' in client.get(f"/entries/{entry.id}").text
    ask = client.get(f"/entries/{entry.id}/delete")
    assert ask.status == 200
    assert f"Delete dead letter {entry.id} of task tasks.upload?" in ask.text
    assert dlq.count() == 2
    csrf = re.search(r'name="csrf" value="([^"]+)"', ask.text)
    assert csrf
    done = client.post(f"/entries/{entry.id}/delete", {"csrf": csrf.group(1)})
    assert done.status == 303
    assert done.headers["Location"] == "/"
    listed = client.get("/")
    assert f"deleted {entry.id}" in listed.text
    assert row_ids(listed.text) == [kept.id]
    assert f"deleted {entry.id}" not in client.get("/").text  # said once


def test_replaying_an_entry_publishes_its_task_and_removes_it(
    dlq: DeadLetterQueue, serve: Serve, redis_url: str, key_prefix: str
) -> None:
    """The replay POST publishes the task (same task id) to its queue and removes the entry."""
    import redis

    entry = _letter(args=[7], queue="celery", routing_key="celery")
    store(dlq, entry)
    client = serve()
    done = client.post(f"/entries/{entry.id}/replay", {"csrf": client.csrf()})
    assert done.status == 303
    assert f"replayed {entry.id} as task {entry.task_id}" in client.get("/").text
    assert dlq.count() == 0
    queued = redis.Redis.from_url(redis_url).lrange(f"{key_prefix}:broker:celery", 0, -1)
    assert len(queued) == 1
    assert entry.task_id.encode() in queued[0]


def test_bulk_replay_of_a_filtered_set_reports_replayed_and_refused(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """Replay all of a filter: matching entries of known tasks go, an unknown task is refused,
    entries outside the filter stay."""
    matching = [_letter(reason="error", at=_NOW - i, queue="celery") for i in range(3)]
    unknown = _letter(task_name="tasks.gone", reason="error", at=_NOW - 5)
    outside = _letter(reason="max_retries", at=_NOW - 6)
    store(dlq, *matching, unknown, outside)
    client = serve()
    listed = client.get("/?reason=error").text
    assert 'href="/bulk/replay?reason=error">Replay all 4 shown by this filter' in listed
    ask = client.get("/bulk/replay?reason=error")
    assert "Replay all 4 dead letters of reason error, 1000 per second?" in ask.text
    done = client.post("/bulk/replay", {"csrf": client.csrf(), "reason": "error"})
    assert done.status == 303
    assert done.headers["Location"] == "/?reason=error"
    text = client.get("/").text
    assert "replayed 3 dead letters of reason error, refused 1" in text
    assert "tasks.gone" in text
    assert sorted(e.id for e in dlq.iter()) == sorted([unknown.id, outside.id])


def test_bulk_delete_of_a_filtered_set_deletes_only_it(dlq: DeadLetterQueue, serve: Serve) -> None:
    """Delete all of task and reason: those go, the others stay."""
    gone = [_letter(task_name="tasks.sync", reason="worker_lost", at=_NOW - i) for i in range(4)]
    kept = [_letter(task_name="tasks.sync", at=_NOW - 9), _letter(reason="worker_lost")]
    store(dlq, *gone, *kept)
    client = serve()
    form = {"csrf": client.csrf(), "task": "tasks.sync", "reason": "worker_lost"}
    assert client.post("/bulk/delete", form).status == 303
    assert "deleted 4 dead letters of task tasks.sync and reason worker_lost" in (
        client.get("/").text
    )
    assert sorted(e.id for e in dlq.iter()) == sorted(e.id for e in kept)


def test_read_only_shows_no_forms_and_refuses_every_post(
    dlq: DeadLetterQueue, serve: Serve
) -> None:
    """--read-only: no replay/delete links or confirmation pages; a POST with CSRF is 403."""
    entry = _letter()
    store(dlq, entry)
    client = serve(read_only=True)
    listed = client.get("/").text
    assert "/bulk/" not in listed
    assert 'method="post"' not in listed
    assert "/replay" not in client.get(f"/entries/{entry.id}").text
    assert client.get(f"/entries/{entry.id}/delete").status == 403
    assert client.get("/bulk/replay").status == 403
    for path in (f"/entries/{entry.id}/delete", f"/entries/{entry.id}/replay", "/bulk/delete"):
        assert client.post(path, {"csrf": "x"}).status == 403
    assert dlq.count() == 1


def test_read_only_with_a_token_still_lets_one_sign_in(dlq: DeadLetterQueue, serve: Serve) -> None:
    """Signing in changes no dead letter, so a read-only page takes the login form."""
    entry = _letter()
    store(dlq, entry)
    client = serve(token=TOKEN, read_only=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
    assert csrf
    assert client.post("/login", {"csrf": csrf.group(1), "token": TOKEN}).status == 303
    assert row_ids(client.get("/").text) == [entry.id]
    assert client.post(f"/entries/{entry.id}/delete", {"csrf": csrf.group(1)}).status == 403
    assert dlq.count() == 1


def test_with_a_token_every_request_needs_it(dlq: DeadLetterQueue, serve: Serve) -> None:
    """401 and a login form without it; a bearer token or the login cookie lets one in."""
    entry = _letter()
    store(dlq, entry)
    client = serve(token=TOKEN)
    denied = client.get("/")
    assert denied.status == 401
    assert 'action="/login"' in denied.text
    assert entry.id not in denied.text
    assert client.get(f"/entries/{entry.id}").status == 401
    nodes = client.get("/nodes")
    assert nodes.status == 401
    assert "Locks held" not in nodes.text
    assert client.get("/", Authorization="Bearer wrong").status == 401
    assert client.get("/", Authorization=f"Bearer {TOKEN}").status == 200

    csrf = re.search(r'name="csrf" value="([^"]+)"', denied.text)
    assert csrf
    assert client.post("/login", {"csrf": csrf.group(1), "token": "wrong"}).status == 401
    signed_in = client.post("/login", {"csrf": csrf.group(1), "token": TOKEN})
    assert signed_in.status == 303
    cookie = [c for c in client.set_cookies if c.startswith("cr_auth=")][-1]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    assert row_ids(client.get("/").text) == [entry.id]
    assert client.get("/nodes").status == 200
    # Without the CSRF token a signed-in POST is still refused.
    assert client.post(f"/entries/{entry.id}/delete", {}).status == 403
    assert dlq.count() == 1


def test_without_a_token_only_a_loopback_host_header_is_served(serve: Serve) -> None:
    """A page reached through another host name (DNS rebinding) is refused."""
    client = serve()
    assert client.get("/", Host="evil.example:5566").status == 421
    assert client.get("/", Host="localhost:5566").status == 200
    assert (
        serve(token=TOKEN).get("/", Host="evil.example", Authorization=f"Bearer {TOKEN}").status
        == 200
    )


# --- the command ------------------------------------------------------------------


def _cli_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env.update(
        {
            cli_app.BROKER_URL: redis_url,
            cli_app.RESILIENCE_URL: redis_url,
            cli_app.KEY_PREFIX: prefix,
            **extra,
        }
    )
    return env


def _web(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.cli_support.app",
        "resilience",
        "web",
        *args,
    ]


@pytest.mark.parametrize(
    ("bind", "refused"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.0.2.1", True),
        ("web.example", True),
    ],
)
def test_only_a_loopback_bind_may_go_without_a_token(bind: str, refused: bool) -> None:
    """Anything but a loopback address (or localhost) needs resilience_web_token."""
    assert (refusal(bind, None) is not None) is refused
    assert refusal(bind, TOKEN) is None


def test_a_public_bind_without_a_token_is_refused_with_one_line(
    redis_url: str, key_prefix: str
) -> None:
    """resilience web --bind 0.0.0.0, no resilience_web_token: one error line, exit 1."""
    done = subprocess.run(
        _web("--bind", "0.0.0.0", "--port", str(free_port())),
        cwd=ROOT,
        env=_cli_env(redis_url, key_prefix),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: --bind ")
    assert "resilience_web_token" in lines[0]


def test_the_command_serves_the_page_and_a_public_bind_needs_the_token(
    redis_url: str, key_prefix: str, dlq: DeadLetterQueue
) -> None:
    """With CELERY_RESILIENCE_WEB_TOKEN set, --bind 0.0.0.0 serves, to the token only."""
    entry = _letter()
    store(dlq, entry)
    port = free_port()
    env = _cli_env(redis_url, key_prefix, CELERY_RESILIENCE_WEB_TOKEN=TOKEN)
    with subprocess.Popen(
        _web("--bind", "0.0.0.0", "--port", str(port)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert f"on http://0.0.0.0:{port}/" in first
            client = Client(port)
            assert client.get("/").status == 401
            page = client.get("/", Authorization=f"Bearer {TOKEN}")
            assert page.status == 200
            assert row_ids(page.text) == [entry.id]
        finally:
            proc.terminate()
            proc.communicate(timeout=10)


def test_the_command_refuses_a_process_private_dlq(redis_url: str, key_prefix: str) -> None:
    """A memory:// DLQ would show nothing the workers stored: one error line, exit 1."""
    done = subprocess.run(
        _web("--port", str(free_port())),
        cwd=ROOT,
        env=_cli_env(redis_url, key_prefix, **{cli_app.RESILIENCE_URL: "memory://"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: the DLQ backend is memory://"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_the_command_says_when_the_port_is_taken(redis_url: str, key_prefix: str) -> None:
    """A port already in use: one error line naming the address, exit 1."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            _web("--port", str(port)),
            cwd=ROOT,
            env=_cli_env(redis_url, key_prefix),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}:"), done.stderr


def test_a_bad_web_token_setting_is_named_without_its_value() -> None:
    """resilience_web_token of the wrong type: the error names the setting, not the value."""
    from celery_resilience.errors import ConfigurationError
    from celery_resilience.settings import load_settings

    with pytest.raises(ConfigurationError, match="resilience_web_token") as raised:
        load_settings({"resilience_url": "memory://", "resilience_web_token": 987654}, environ={})
    assert "987654" not in str(raised.value)
    settings = load_settings({"resilience_url": "memory://", "resilience_web_token": TOKEN}, {})
    assert settings.web_token == TOKEN
    assert TOKEN not in repr(settings)
