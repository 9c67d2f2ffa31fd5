"""Backend URLs: validation and password masking."""

from __future__ import annotations

from urllib.parse import urlsplit

from kombu.utils.url import maybe_sanitize_url

from celery_resilience.errors import ConfigurationError


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, as Celery prints broker URLs.

    Also masks a password with unescaped ``/``, ``?``, ``#`` or ``@`` that URL parsers
    mistake for the path or port: everything before the last ``@`` is user info. A
    Sentinel URL (``sentinel://a;sentinel://b``) is masked chunk by chunk.
    """
    if ";" in url:
        return ";".join(_mask_one(chunk) for chunk in url.split(";"))
    return _mask_one(url)


def _mask_one(url: str) -> str:
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


SENTINEL_SCHEME = "sentinel://"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, *CLUSTER_SCHEMES)
"""URL schemes the built-in Redis backends serve (coordination and DLQ)."""

DEFAULT_SENTINEL_PORT = 26379

_DB_IN_PATH = ("redis", "rediss")  # schemes whose URL path is a database number


def validate_url(url: str, setting: str) -> str:
    """Check ``url`` as ``url_scheme`` does, and a Redis URL's database number; return
    the scheme.

    redis-py reads ``redis://host/abc`` as database 0 without a word, so a path that
    is not a database number is a ``ConfigurationError`` naming ``setting``.
    """
    if url.lower().startswith(SENTINEL_SCHEME):
        return _validate_sentinel(url, setting)
    if url.lower().startswith(CLUSTER_SCHEMES):
        return _validate_cluster(url, setting)
    scheme = url_scheme(url, setting)
    if scheme in _DB_IN_PATH:
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"setting {setting}={mask_url(url)!r}: database {db!r} is not a number: "
                "expected redis://host:port/<db> with db a number such as 0 or 1"
            )
    return scheme


def _validate_sentinel(url: str, setting: str) -> str:
    """Each ``;``-separated chunk must be a ``sentinel://`` URL with a numeric port."""
    for chunk in url.split(";"):
        if not chunk.strip().lower().startswith(SENTINEL_SCHEME):
            raise ConfigurationError(
                f"setting {setting}={mask_url(url)!r}: {mask_url(chunk.strip())!r} is not a "
                "sentinel:// URL: expected sentinel://host:26379;sentinel://host2:26379"
            )
        validate_url(chunk.strip().replace("sentinel://", "redis://", 1), setting)
    return "sentinel"


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` startup nodes of a ``redis+cluster://`` URL (port 6379 when
    not given); raises ``ValueError`` on a malformed one."""
    hosts = url.partition("://")[2].rpartition("@")[2]
    hosts = hosts.split("/", 1)[0].split("?", 1)[0]
    nodes = []
    for node in hosts.split(","):
        host, _, port = node.strip().rpartition(":") if ":" in node else (node.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise ValueError(node)
        nodes.append((host, int(port or 6379)))
    return nodes


def _validate_cluster(url: str, setting: str) -> str:
    try:
        cluster_nodes(url)
    except ValueError as exc:
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: startup node {str(exc)!r} is malformed: "
            "expected redis+cluster://[user:password@]host:port[,host:port...]"
        ) from None
    return url.partition("://")[0].lower()
