"""The HTTP server: routes each request to a page or an action, after ``security``.

``http.server.ThreadingHTTPServer``: one thread per request, so a bulk replay that
runs for minutes at the configured rate does not stop the page from being read.
Every response carries ``security.HEADERS``; a GET never changes anything; a POST is
refused (403) in read-only mode or without its session's CSRF token, and changes
nothing then; after a POST that acted, a 303 leads to the list with one line saying
what was done.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from celery_resilience.dlq import DeadLetterQueue, UnknownEntry
from celery_resilience.errors import BackendUnavailable, ConfigurationError, ResilienceError
from celery_resilience.masking import view
from celery_resilience.web import actions, holding, listing, pages
from celery_resilience.web.layout import entry_url, line, url
from celery_resilience.web.nodes_page import nodes_page
from celery_resilience.web.security import (
    AUTH_COOKIE,
    COOKIE_FLAGS,
    HEADERS,
    SESSION_COOKIE,
    Guard,
    cookies_of,
)

logger = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024


class WebServer(ThreadingHTTPServer):
    """Serves the pages of one app: its DLQ, its nodes and the locks held."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        queue: DeadLetterQueue,
        mask: frozenset[str],
        guard: Guard,
        replay_rate: float,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.queue = queue
        self.replay_rate = replay_rate
        self.mask = mask
        self.guard = guard
        self.app_name = str(queue.app.main or "?")
        self.stylesheet = resources.files(__package__).joinpath("style.css").read_bytes()
        self._messages: dict[str, str] = {}
        self._lock = threading.Lock()

    def loaded_app(self) -> Any:
        """The app, with the modules of its ``imports``/``include`` imported (their
        tasks registered), as a worker imports them."""
        self.queue.app.loader.import_default_modules()
        return self.queue.app

    def task_names(self) -> list[str]:
        return listing.task_names(self.loaded_app())

    def leave_message(self, session: str, message: str) -> None:
        """Keep ``message`` for the next page ``session`` reads (the redirect's)."""
        with self._lock:
            self._messages[session] = message

    def take_message(self, session: str | None) -> str | None:
        with self._lock:
            return self._messages.pop(session, None) if session else None


MAX_REFRESH = 3600
"""The longest ``?refresh=`` of the nodes page, in seconds."""


def _refresh(query: dict[str, str]) -> int | None:
    """The ``refresh`` seconds asked for, or None; ``ConfigurationError`` if not 1-3600."""
    raw = query.get("refresh")
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_REFRESH:
        raise ConfigurationError(f"refresh={line(raw, 40)!r}: expected whole seconds, 1 to 3600")
    return int(raw)


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "celery-resilience"
    sys_version = ""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    # -- plumbing ----------------------------------------------------------------

    def _handle(self, method: str) -> None:
        guard = self.server.guard
        self.cookies = cookies_of(self.headers.get("Cookie"))
        session = self.cookies.get(SESSION_COOKIE, "")
        self.new_session = None if 20 <= len(session) <= 100 else guard.new_session()
        self.session = self.new_session or session
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            if not guard.host_allowed(self.headers.get("Host")):
                self._error(HTTPStatus.MISDIRECTED_REQUEST, "this page answers to localhost only")
            elif path == "/static/style.css" and method == "GET":
                self._send(HTTPStatus.OK, self.server.stylesheet, "text/css; charset=utf-8")
            elif method == "POST":
                self._post(path, self._form())
            elif not guard.authorized(self.headers.get("Authorization"), self.cookies):
                self._login_page(HTTPStatus.UNAUTHORIZED)
            else:
                self._get(path, query)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client left; nothing to answer
        except UnknownEntry as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc), title="Not found")
        except ConfigurationError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except BackendUnavailable as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except ResilienceError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
        except Exception as exc:
            logger.exception("celery-resilience web: %s %s failed", method, path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"unexpected {type(exc).__name__}")

    def _form(self) -> dict[str, str]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            raise ConfigurationError(f"a form of at most {MAX_FORM_BYTES} bytes is expected")
        body = self.rfile.read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/html; charset=utf-8",
        headers: dict[str, str] | None = None,
        cookies: list[str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in {**HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        if self.new_session:
            self.send_header("Set-Cookie", f"{SESSION_COOKIE}={self.new_session}; {COOKIE_FLAGS}")
        for cookie in cookies or []:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _html(self, status: HTTPStatus, text: str) -> None:
        self._send(status, text.encode("utf-8"))

    def _redirect(self, location: str, cookies: list[str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", headers={"Location": location}, cookies=cookies)

    def _error(self, status: HTTPStatus, message: str, title: str = "") -> None:
        page = pages.error_page(title or status.phrase, message, app_name=self.server.app_name)
        self._html(status, page)

    def _login_page(self, status: HTTPStatus, failed: bool = False) -> None:
        csrf = self.server.guard.csrf_token(self.session)
        self._html(status, pages.login_page(csrf, app_name=self.server.app_name, failed=failed))

    # -- GET ---------------------------------------------------------------------

    def _get(self, path: str, query: dict[str, str]) -> None:
        server = self.server
        if path == "/login":
            self._redirect("/")
            return
        if path == "/":
            found = listing.read(
                server.queue,
                server.task_names(),
                task_name=query.get("task") or None,
                reason=query.get("reason") or None,
                cursor=query.get("cursor") or None,
            )
            message = server.take_message(self.session)
            self._html(
                HTTPStatus.OK,
                pages.list_page(
                    found,
                    app_name=server.app_name,
                    read_only=server.guard.read_only,
                    message=message,
                ),
            )
            return
        if path == "/nodes":
            refresh = _refresh(query)
            held = holding.read(server.loaded_app(), task_name=query.get("task") or None)
            page = nodes_page(held, app_name=server.app_name, refresh=refresh)
            self._html(HTTPStatus.OK, page)
            return
        confirm = self._confirmation(path, query)
        if confirm is not None:
            if server.guard.read_only:
                self._error(HTTPStatus.FORBIDDEN, "this page is read-only (--read-only)")
            else:
                self._html(HTTPStatus.OK, confirm())
            return
        if path.startswith("/entries/") and path.count("/") == 2:
            entry = server.queue.get(path.removeprefix("/entries/"))
            data = view(entry, server.mask, reveal=False)
            page = pages.entry_page(
                entry, data, app_name=server.app_name, read_only=server.guard.read_only
            )
            self._html(HTTPStatus.OK, page)
            return
        self._error(HTTPStatus.NOT_FOUND, f"no page {line(path, 200)}", title="Not found")

    def _confirmation(self, path: str, query: dict[str, str]) -> Callable[[], str] | None:
        """The confirmation page of a form's ``path``, or None if it has none."""
        server = self.server
        csrf = server.guard.csrf_token(self.session)
        task_name, reason = query.get("task") or None, query.get("reason") or None
        where = {"task": task_name, "reason": reason}
        if path in ("/bulk/replay", "/bulk/delete"):
            verb = "Replay" if path == "/bulk/replay" else "Delete"

            def bulk() -> str:
                n = server.queue.count(task_name=task_name, reason=reason)
                pace = f", {server.replay_rate:g} per second" if verb == "Replay" else ""
                question = (
                    f"{verb} all {n:,} dead letters{actions.filtered(task_name, reason)}{pace}?"
                )
                return pages.confirm_page(
                    question,
                    path,
                    f"{verb} {n:,}",
                    csrf,
                    where,
                    url("/", **where),
                    app_name=server.app_name,
                )

            return bulk
        for verb in ("replay", "delete"):
            prefix, suffix = "/entries/", f"/{verb}"
            if path.startswith(prefix) and path.endswith(suffix) and path.count("/") == 3:
                entry_id = path[len(prefix) : -len(suffix)]

                def one(verb: str = verb, entry_id: str = entry_id) -> str:
                    entry = server.queue.get(entry_id)
                    question = (
                        f"{verb.capitalize()} dead letter {entry.id} of task {entry.task_name}?"
                    )
                    return pages.confirm_page(
                        question,
                        entry_url(entry.id, verb),
                        verb.capitalize(),
                        csrf,
                        {},
                        entry_url(entry.id),
                        app_name=server.app_name,
                    )

                return one
        return None

    # -- POST --------------------------------------------------------------------

    def _post(self, path: str, form: dict[str, str]) -> None:
        server, guard = self.server, self.server.guard
        session = None if self.new_session else self.session
        if not guard.csrf_valid(session, form.get("csrf")):
            self._error(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token: reload the page")
            return
        if path == "/login":
            if not guard.needs_token:
                self._redirect("/")
            elif guard.login(form.get("token", "")):
                cookie = f"{AUTH_COOKIE}={guard.login_cookie()}; {COOKIE_FLAGS}"
                self._redirect("/", cookies=[cookie])
            else:
                self._login_page(HTTPStatus.UNAUTHORIZED, failed=True)
            return
        if not guard.authorized(self.headers.get("Authorization"), self.cookies):
            self._login_page(HTTPStatus.UNAUTHORIZED)
            return
        if guard.read_only:
            self._error(HTTPStatus.FORBIDDEN, "this page is read-only (--read-only)")
            return
        task_name, reason = form.get("task") or None, form.get("reason") or None
        back = url("/", task=task_name, reason=reason)
        if path == "/bulk/replay":
            message = actions.replay_all(server.queue, task_name, reason)
        elif path == "/bulk/delete":
            message = actions.delete_all(server.queue, task_name, reason)
        elif path.startswith("/entries/") and path.endswith(("/replay", "/delete")):
            entry_id, _, verb = path.removeprefix("/entries/").rpartition("/")
            act = actions.replay if verb == "replay" else actions.delete
            message, back = act(server.queue, entry_id), "/"
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no form {line(path, 200)}", title="Not found")
            return
        server.leave_message(self.session, message)
        self._redirect(back)
