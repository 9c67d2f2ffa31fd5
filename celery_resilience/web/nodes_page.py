"""The HTML of the nodes-and-leases page, from ``holding.Holding`` already read: live
nodes and what each holds, nodes lost recently and what came back, the locks held now.
The texts are ``resilience nodes``' (``celery_resilience.nodes``)."""

from __future__ import annotations

from celery_resilience.describe import age, when
from celery_resilience.nodes import Nodes, expires_text, holds_text, recovered_text
from celery_resilience.web.holding import Holding, LockRow
from celery_resilience.web.layout import document, esc, line, link, select, table, url

REFRESH_CHOICES = (5, 30)
"""Seconds between reloads the page offers (``?refresh=``)."""


def seconds(value: float | None) -> str:
    """A duration as ``12.3 s`` under a minute, else ``age``'s ``4m``; ``?`` for None."""
    if value is None:
        return "?"
    return f"{value:.1f} s" if value < 60 else age(value)


def _nodes(nodes: Nodes) -> str:
    rows = [
        [
            esc(line(n.nodename, 120)),
            esc(line(n.hostname, 120)),
            esc(n.pid if n.pid is not None else "?"),
            esc(line(",".join(n.queues) or "-", 120)),
            esc(expires_text(n, nodes)),
            esc(line(holds_text(n), 400)),
        ]
        for n in nodes.live
    ]
    live = (
        table(["node", "host", "pid", "queues", "presence expires", "holds"], rows, css="nodes")
        if rows
        else '<p class="empty">no live nodes</p>'
    )
    plural = "process" if nodes.holders == 1 else "processes"
    live += f'<p class="summary">{nodes.holders} lease holder {plural} present</p>'
    lost_rows = [
        [
            esc(when(n.lost_at, nodes.now) if n.lost_at is not None else "?"),
            esc(line(n.nodename, 120)),
            esc(line(n.hostname, 120)),
            esc(line(recovered_text(n), 400)),
        ]
        for n in nodes.lost
    ]
    lost = (
        table(["lost", "node", "host", "messages recovered"], lost_rows, css="lost")
        if lost_rows
        else '<p class="empty">no node lost recently</p>'
    )
    return f"{live}<h2>Nodes lost recently, newest first</h2>{lost}"


def _lock_row(row: LockRow) -> list[str]:
    lock, owner = row.lock, row.owner
    holder = (
        [esc(line(owner.nodename, 120)), esc(line(owner.host, 120)), esc(owner.pid)]
        if owner is not None
        else [esc(line(lock.holder, 200)), "?", "?"]
    )
    return [
        f'<span class="key">{esc(line(lock.key, 200))}</span>',
        esc(", ".join(row.tasks) or "-"),
        *holder,
        esc(line(owner.task_id, 120)) if owner is not None else "?",
        esc(seconds(lock.held_for)),
        esc(seconds(lock.expires_in)),
        esc(lock.fencing_token if lock.fencing_token is not None else "?"),
    ]


def _locks(holding: Holding, refresh: int | None) -> str:
    texts = {
        name: f"{name} ({line(template, 80)})" for name, template in holding.locked_tasks.items()
    }
    tasks = select("task", "task", holding.locked_tasks, holding.task_name, texts)
    refresh_field = f'<input type="hidden" name="refresh" value="{refresh}">' if refresh else ""
    filters = (
        f'<form method="get" action="/nodes" class="filters">{tasks}{refresh_field}'
        '<button type="submit">Filter</button></form>'
    )
    if holding.locks_error is not None:
        return f'{filters}<p class="warning">{esc(line(holding.locks_error, 1000))}</p>'
    if not holding.locks:
        return f'{filters}<p class="empty">no locks held</p>'
    header = ["key", "task", "node", "host", "pid", "task id", "held for", "expires in", "token"]
    rows = [_lock_row(row) for row in holding.locks]
    more = (
        f'<p class="summary">the first {len(rows):,} locks shown: more are held</p>'
        if holding.more_locks
        else ""
    )
    return f"{filters}{table(header, rows, css='locks')}{more}"


def nodes_page(holding: Holding, *, app_name: str, refresh: int | None = None) -> str:
    """The page: refresh choices, the nodes (or why not), the locks (or why not)."""
    choices = [
        link(url("/nodes", task=holding.task_name), "off") if refresh else "off",
        *(
            f"every {n} s"
            if n == refresh
            else link(url("/nodes", task=holding.task_name, refresh=str(n)), f"every {n} s")
            for n in REFRESH_CHOICES
        ),
    ]
    top = f'<p class="paging">reload: {" &middot; ".join(choices)}</p>'
    if holding.nodes is None:
        nodes = f'<p class="warning">{esc(line(holding.nodes_error or "?", 1000))}</p>'
    else:
        read_at = esc(when(holding.nodes.now, holding.nodes.now).split(" (")[0])
        nodes = (
            f'<p class="summary">read at {read_at}, every time by the broker Redis clock</p>'
            + _nodes(holding.nodes)
        )
    body = (
        f"{top}<h2>Live worker nodes</h2>{nodes}<h2>Locks held now</h2>{_locks(holding, refresh)}"
    )
    return document("Nodes and leases", body, app_name=app_name, refresh=refresh)
