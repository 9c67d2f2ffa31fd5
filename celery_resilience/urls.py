"""Backend URLs: validation and password masking."""

from __future__ import annotations

from urllib.parse import urlsplit

from kombu.utils.url import maybe_sanitize_url

from celery_resilience.errors import ConfigurationError


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, as Celery prints broker URLs.

    Also masks a password with unescaped ``/``, ``?``, ``#`` or ``@`` that URL parsers
    mistake for the path or port: everything before the last ``@`` is user info.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[:end]:
        try:
            return str(maybe_sanitize_url(url))
        except ValueError:
            pass
    userinfo, _, hostpart = rest.rpartition("@")
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:**@{hostpart}"


def url_scheme(url: str, setting: str) -> str:
    """Return the scheme of ``url``, or raise ``ConfigurationError`` naming ``setting``.

    A URL must have the form ``scheme://...``; the scheme is returned lower-cased.
    The error never repeats the parser's message, which can quote the password.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"setting {setting}={mask_url(str(url))!r}: expected a URL such as "
            "'redis://localhost:6379/1' or 'memory://'"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: malformed URL: expected "
            "scheme://[user:password@]host[:port][/db], with a numeric port and "
            "/ ? # @ in the password percent-encoded"
        ) from None
    if not parts.scheme:
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: expected a URL with a scheme"
        )
    return parts.scheme.lower()


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""URL schemes the built-in Redis backends serve (coordination and DLQ)."""

_DB_IN_PATH = ("redis", "rediss")  # schemes whose URL path is a database number


def validate_url(url: str, setting: str) -> str:
    """Check ``url`` as ``url_scheme`` does, and a Redis URL's database number; return
    the scheme.

    redis-py reads ``redis://host/abc`` as database 0 without a word, so a path that
    is not a database number is a ``ConfigurationError`` naming ``setting``.
    """
    scheme = url_scheme(url, setting)
    if scheme in _DB_IN_PATH:
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"setting {setting}={mask_url(url)!r}: database {db!r} is not a number: "
                "expected redis://host:port/<db> with db a number such as 0 or 1"
            )
    return scheme
