"""Backend URLs: validation and password masking."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from kombu.utils.url import maybe_sanitize_url

from celery_resilience.errors import ConfigurationError

_USERINFO = re.compile(r"(?P<head>://[^:/@]*):[^@/]*@")


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, as Celery prints broker URLs.

    A URL too malformed for kombu to parse is masked by pattern instead.
    """
    try:
        return str(maybe_sanitize_url(url))
    except ValueError:
        return _USERINFO.sub(r"\g<head>:**@", url)


def url_scheme(url: str, setting: str) -> str:
    """Return the scheme of ``url``, or raise :class:`ConfigurationError` naming ``setting``.

    A URL must have the form ``scheme://...``; the scheme is returned lower-cased.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"setting {setting}={mask_url(str(url))!r}: expected a URL such as "
            "'redis://localhost:6379/1' or 'memory://'"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: malformed URL ({exc})"
        ) from None
    if not parts.scheme:
        raise ConfigurationError(
            f"setting {setting}={mask_url(url)!r}: expected a URL with a scheme"
        )
    return parts.scheme.lower()
