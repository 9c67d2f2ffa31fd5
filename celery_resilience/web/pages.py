"""The HTML of each page, from data already read: the list, an entry, a confirmation,
the login form and the error pages. Nothing here reads or changes the DLQ."""

from __future__ import annotations

from typing import Any

from celery_resilience import describe
from celery_resilience.deadletter import GIVE_UP_REASONS, DeadLetter
from celery_resilience.describe import exception_line, when
from celery_resilience.masking import MASK
from celery_resilience.web.layout import (
    document,
    entry_url,
    esc,
    line,
    link,
    post_form,
    select,
    table,
    url,
)
from celery_resilience.web.listing import Listing


def _counts(listing: Listing) -> str:
    counts = listing.counts

    def cell(n: int, task_name: str | None, reason: str | None) -> str:
        return link(url("/", task=task_name, reason=reason), n) if n else "0"

    rows = [
        [
            link(url("/", task=name), name),
            *(cell(by_reason.get(r, 0), name, r) for r in GIVE_UP_REASONS),
            cell(sum(by_reason.values()), name, None),
        ]
        for name, by_reason in sorted(counts.by_task.items())
    ]
    rows.append(
        [
            "<strong>all tasks</strong>",
            *(cell(counts.by_reason.get(r, 0), None, r) for r in GIVE_UP_REASONS),
            cell(counts.total, None, None),
        ]
    )
    return table(["task", *GIVE_UP_REASONS, "total"], rows, css="counts")


def list_page(
    listing: Listing, *, app_name: str, read_only: bool, message: str | None = None
) -> str:
    """The list: filter form, counts, bulk actions, one page of entries, next-page link."""
    filters = (
        '<form method="get" action="/" class="filters">'
        f"{select('task', 'task', listing.task_names, listing.task_name)}"
        f"{select('reason', 'reason', list(GIVE_UP_REASONS), listing.reason)}"
        '<button type="submit">Filter</button></form>'
    )
    where = {"task": listing.task_name, "reason": listing.reason}
    n = listing.matching
    summary = f'<p class="summary">{n:,} dead letter{"" if n == 1 else "s"} match this filter'
    if n and not read_only:
        replay_all = link(url("/bulk/replay", **where), f"Replay all {n:,} shown by this filter")
        delete_all = link(url("/bulk/delete", **where), f"Delete all {n:,}")
        summary += f" &middot; {replay_all} &middot; {delete_all}"
    summary += "</p>"
    rows = [
        [
            esc(when(e.last_failure_at)),
            esc(line(e.task_name, 120)),
            esc(e.reason),
            f'<span class="exception">{esc(line(exception_line(e)))}</span>',
            esc(e.attempts),
            link(entry_url(e.id), "open"),
        ]
        for e in listing.page.entries
    ]
    entries = (
        table(["when", "task", "reason", "exception", "attempts", ""], rows, css="entries")
        if rows
        else '<p class="empty">no dead letters</p>'
    )
    skipped = "".join(
        f'<p class="warning">skipped {esc(entry_id)}: {esc(line(why))}</p>'
        for entry_id, why in listing.page.skipped
    )
    paging = []
    if listing.cursor:
        paging.append(link(url("/", **where), "first page"))
    if listing.page.cursor:
        paging.append(link(url("/", **where, cursor=listing.page.cursor), "next page"))
    nav = f'<p class="paging">{" &middot; ".join(paging)}</p>' if paging else ""
    body = f"{filters}{_counts(listing)}{summary}{skipped}{entries}{nav}"
    return document("Dead letters", body, app_name=app_name, message=message)


def entry_page(entry: DeadLetter, data: dict[str, Any], *, app_name: str, read_only: bool) -> str:
    """One entry: its fields with arguments masked (``data`` is ``masking.view``'s)."""
    fields = describe.fields(entry, data)
    rows = []
    for label, value in fields:
        shown = esc("-" if value is None or value == "" else value)
        if value == MASK and label.endswith("repr"):
            shown += " (hidden: it cannot be masked)"
        rows.append(f'<tr><th>{esc(label)}</th><td class="value">{shown}</td></tr>')
    actions = ""
    if not read_only:
        actions = (
            '<p class="actions">'
            f"{link(entry_url(entry.id, 'replay'), 'Replay')} &middot; "
            f"{link(entry_url(entry.id, 'delete'), 'Delete')}</p>"
        )
    body = (
        f'{actions}<table class="fields"><tbody>{"".join(rows)}</tbody></table>'
        f"<h2>Traceback</h2><pre>{esc(entry.traceback or '-')}</pre>"
    )
    return document(f"Dead letter {entry.id}", body, app_name=app_name)


def confirm_page(
    question: str,
    action: str,
    button: str,
    csrf: str,
    fields: dict[str, str | None],
    back: str,
    *,
    app_name: str,
) -> str:
    """Asks ``question``; its form POSTs ``fields`` to ``action``."""
    body = (
        f'<p class="question">{esc(question)}</p>'
        f"{post_form(action, button, csrf, fields)} {link(back, 'Cancel')}"
    )
    return document("Confirm", body, app_name=app_name)


def login_page(csrf: str, *, app_name: str, failed: bool = False) -> str:
    """The form that sends ``resilience_web_token``."""
    body = (
        ('<p class="warning">wrong token</p>' if failed else "")
        + '<form method="post" action="/login"><label>token (setting resilience_web_token) '
        '<input type="password" name="token" autocomplete="current-password" autofocus>'
        f'</label><input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit">Sign in</button></form>'
    )
    return document("Sign in", body, app_name=app_name)


def error_page(title: str, message: str, *, app_name: str) -> str:
    body = f'<p class="error">{esc(line(message, 1000))}</p><p>{link("/", "Back to the list")}</p>'
    return document(title, body, app_name=app_name)
