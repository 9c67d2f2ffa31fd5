"""An HTTP client of the web page (``resilience web``): one browser session, its cookies
kept, requests made with ``http.client``."""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlencode

from celery_resilience.dlq import DeadLetterQueue


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    text: str


@dataclass
class Client:
    """An HTTP client of one browser session: it keeps the cookies it is given."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    set_cookies: list[str] = field(default_factory=list)

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = urlencode(form).encode() if form is not None else None
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body is not None:
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=all_headers)
        reply = conn.getresponse()
        text = reply.read().decode()
        conn.close()
        for cookie in reply.headers.get_all("Set-Cookie") or []:
            self.set_cookies.append(cookie)
            name, _, value = cookie.split(";")[0].partition("=")
            self.cookies[name] = value
        return Response(reply.status, reply.headers, text)

    def get(self, path: str, **headers: str) -> Response:
        return self.request("GET", path, **headers)

    def post(self, path: str, form: dict[str, str], **headers: str) -> Response:
        return self.request("POST", path, form, **headers)

    def csrf(self, path: str = "/bulk/delete") -> str:
        """The CSRF token of this session, from the form of the confirmation at ``path``."""
        found = re.search(r'name="csrf" value="([^"]+)"', self.get(path).text)
        assert found, f"no CSRF field on {path}"
        return found.group(1)


@contextlib.contextmanager
def servers() -> Iterator[Callable[..., Client]]:
    """Start ``WebServer``s in this process, each on a free port in a thread of its own,
    with ``start(queue, token=None, read_only=False, mask=frozenset())``, a client of
    each; all shut down when the block ends."""
    from celery_resilience.web.security import Guard
    from celery_resilience.web.server import WebServer

    started: list[WebServer] = []

    def start(
        queue: DeadLetterQueue,
        token: str | None = None,
        read_only: bool = False,
        mask: frozenset[str] = frozenset(),
    ) -> Client:
        guard = Guard(token, read_only=read_only)
        server = WebServer(("127.0.0.1", 0), queue, mask, guard, replay_rate=1000)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return Client(server.server_address[1])

    try:
        yield start
    finally:
        for server in started:
            server.shutdown()
            server.server_close()
