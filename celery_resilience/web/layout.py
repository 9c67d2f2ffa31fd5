"""HTML building blocks: every value from the store goes through ``esc``.

Markup is written by hand with f-strings; each function returns HTML, and each
argument named ``text`` or taken from an entry is escaped here, so a page never puts
stored text into markup unescaped (an argument ``<script>`` shows as text).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlencode

from celery_resilience.describe import one_line

STYLESHEET = "/static/style.css"


def esc(value: object) -> str:
    """``value`` as HTML text, quotes included (safe inside an attribute too)."""
    return html.escape(str(value), quote=True)


def line(value: object, limit: int = 200) -> str:
    """``value`` as one line of at most ``limit`` characters (not yet escaped)."""
    text = one_line(value)
    return text if len(text) <= limit else text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def url(path: str, **query: str | None) -> str:
    """``path`` with the non-empty ``query`` values (not yet escaped for HTML)."""
    params = {name: value for name, value in query.items() if value}
    return f"{path}?{urlencode(params)}" if params else path


def entry_url(entry_id: str, action: str = "") -> str:
    return f"/entries/{quote(entry_id, safe='')}" + (f"/{action}" if action else "")


def link(href: str, text: object) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def table(header: Iterable[str], rows: Iterable[Iterable[str]], css: str = "") -> str:
    """A table; ``header`` is plain text, each cell of ``rows`` is HTML already."""
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    klass = f' class="{esc(css)}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def select(
    name: str,
    label: str,
    options: Iterable[str],
    chosen: str | None,
    texts: Mapping[str, str] | None = None,
) -> str:
    """A labelled drop-down of ``options`` (first *any*, the empty value), ``chosen``
    selected; an option shows as ``texts[option]`` when given (all text, escaped here)."""
    shown = texts or {}
    items = ['<option value="">any</option>'] + [
        f'<option value="{esc(o)}"{" selected" if o == chosen else ""}>'
        f"{esc(shown.get(o, o))}</option>"
        for o in options
    ]
    return f'<label>{esc(label)} <select name="{esc(name)}">{"".join(items)}</select></label>'


def post_form(action: str, button: str, csrf: str, fields: Mapping[str, str | None]) -> str:
    """A form that POSTs ``fields`` and the CSRF token to ``action``."""
    hidden = "".join(
        f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'
        for name, value in {**fields, "csrf": csrf}.items()
        if value is not None
    )
    return (
        f'<form method="post" action="{esc(action)}" class="inline">{hidden}'
        f'<button type="submit">{esc(button)}</button></form>'
    )


def document(
    title: str,
    body: str,
    *,
    app_name: str,
    message: str | None = None,
    refresh: int | None = None,
) -> str:
    """A whole page: ``body`` is HTML, ``title``, ``app_name`` and ``message`` are text;
    with ``refresh`` the browser reloads it every that many seconds (no JavaScript)."""
    notice = f'<p class="message" role="status">{esc(message)}</p>' if message else ""
    reload = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{reload}'
        f"<title>{esc(title)} - celery-resilience</title>"
        f'<link rel="stylesheet" href="{STYLESHEET}"></head><body>'
        '<header><a href="/" class="home">Dead letters</a>'
        '<a href="/nodes" class="nodes">Nodes and leases</a>'
        f'<span class="app">app {esc(app_name)}</span></header>'
        f"<main>{notice}<h1>{esc(title)}</h1>{body}</main></body></html>"
    )
