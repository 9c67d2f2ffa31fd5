"""Redis ACL users on a private redis-server, as an operator would create them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis


def acl_user(url: str, name: str, *rules: str) -> str:
    """Create (or reset) user ``name`` with password ``pw`` and ``rules`` on the server
    of ``url`` (a full-permission user's URL); return ``url`` as that user."""
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    finally:
        client.close()
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{name}:pw@{parts.hostname}:{parts.port}"))
