"""Who may read the page and who may change the DLQ through it.

- Bound to a loopback address without ``resilience_web_token``, anyone on this machine
  may read; the ``Host`` header must then name a loopback host, so a web site whose
  name an attacker points at 127.0.0.1 (DNS rebinding) cannot read the page.
- With a token, every request needs it: ``Authorization: Bearer <token>``, or the
  cookie the login form sets, which holds an HMAC of the token under a per-process
  secret (a restart signs everyone out, the token itself is never stored in a browser).
- Every POST needs the CSRF token of its session: an HMAC of the session cookie under
  the same secret, sent as a hidden form field. The cookies are ``HttpOnly`` and
  ``SameSite=Strict``. Every comparison is ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from http.cookies import CookieError, SimpleCookie

SESSION_COOKIE = "cr_session"
AUTH_COOKIE = "cr_auth"
COOKIE_FLAGS = "HttpOnly; SameSite=Strict; Path=/"

HEADERS = {
    # Only the page's own stylesheet: no script, no frame, no form sent elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
"""Headers of every response."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) can only be reached from this machine."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(bind: str, token: str | None) -> str | None:
    """Why serving on ``bind`` is refused (a public address without a token), or None."""
    if token is None and not is_loopback(bind):
        return (
            f"--bind {bind} is not a loopback address and setting resilience_web_token is "
            "unset: set it (every request must then carry it) or bind to 127.0.0.1"
        )
    return None


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:5566`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def cookies_of(header: str | None) -> dict[str, str]:
    """The cookies of a ``Cookie`` header; none when it cannot be parsed."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header or "")
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


class Guard:
    """The page's access rules for one server process."""

    def __init__(self, token: str | None, *, read_only: bool) -> None:
        self._secret = secrets.token_bytes(32)
        self._token = token
        self.read_only = read_only

    @property
    def needs_token(self) -> bool:
        return self._token is not None

    def _mac(self, purpose: str, value: str) -> str:
        message = f"{purpose}:{value}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token, only a request naming a loopback host is served."""
        return self.needs_token or is_loopback(_host_of(host_header or ""))

    def authorized(self, authorization: str | None, cookies: dict[str, str]) -> bool:
        """Whether the request carries the token (bearer) or the login cookie."""
        if self._token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), self._token):
            return True
        return _same(cookies.get(AUTH_COOKIE, ""), self.login_cookie())

    def login(self, given: str) -> bool:
        """Whether ``given`` (the login form's field) is the token."""
        return self._token is not None and _same(given, self._token)

    def login_cookie(self) -> str:
        """The value of the login cookie: an HMAC of the token, never the token."""
        return self._mac("auth", self._token or "")

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(32)

    def csrf_token(self, session: str) -> str:
        """The CSRF token of the forms of ``session``."""
        return self._mac("csrf", session)

    def csrf_valid(self, session: str | None, given: str | None) -> bool:
        if not session or not given:
            return False
        return _same(given, self.csrf_token(session))
