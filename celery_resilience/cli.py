"""``celery -A proj resilience dlq|doctor|nodes|web ...``: the DLQ, the settings check and
the worker nodes from the command line, and the DLQ's web page (``celery_resilience.web``).

Installed as a Celery sub-command through the ``celery.commands`` entry point; the
app comes from Celery's ``-A``. Contracts every command keeps:

- Success prints to stdout and exits 0. Every error the library reports (unknown
  id, unreachable backend, undecodable entry, refused or failed replay, bad setting
  or cursor) prints ONE line ``error: ...`` on stderr and exits 1, never a traceback;
  a ``--json`` stdout carries JSON only.
- Nothing is deserialized beyond JSON: a raw body is shown as ``<N bytes of TYPE>``.
- Values of arguments whose names look like secrets (``password``, ``token``,
  ``api_key``, ... as parts of the name, see ``masking.looks_secret``) or are named in
  ``resilience_dlq_mask_args`` print as ``***`` unless ``--reveal`` is given, at any
  depth of nested dicts; reprs that cannot be masked (raw bodies) are hidden instead
  when they may hold such a value.
- An entry that cannot be decoded is named on stderr (``warning: ...``) and skipped
  by ``ls``; ``show`` of it is an error. ``show`` cuts long values unless ``--full``.
- A closed stdout (``... | head``) ends the command quietly with exit code 141, as
  ``git`` and ``ls`` end (killed by SIGPIPE: the shell sees 128 + 13).
- Text from the store is printed with control characters escaped, so an entry
  cannot drive the terminal; passwords are never printed (backend URLs are masked).
- Options never read environment variables (Celery's ``CELERY_`` auto-envvars would
  collide with the ``CELERY_RESILIENCE_*`` settings and could turn on ``--yes``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from celery.bin.base import handle_preload_options

from celery_resilience import describe
from celery_resilience.deadletter import MalformedEntry
from celery_resilience.describe import age, exception_line, one_line, safe, when
from celery_resilience.dlq import (
    DeadLetterQueue,
    ReplayFailed,
    ReplayNotRemoved,
    ReplayRefused,
    UnknownEntry,
)
from celery_resilience.doctor import diagnose
from celery_resilience.errors import ResilienceError
from celery_resilience.masking import MASK, view
from celery_resilience.nodes import expires_text, holds_text, read_nodes, recovered_text
from celery_resilience.options import options_of
from celery_resilience.runtime import runtime
from celery_resilience.urls import mask_url

_handle_preload_options: Callable[[Callable[..., None]], Callable[..., None]] = (
    handle_preload_options  # delivers Celery's preload options (e.g. --config) to the app
)
_P = ParamSpec("_P")
_R = TypeVar("_R")
_PER_ID_ERRORS = (UnknownEntry, ReplayRefused, ReplayFailed, ReplayNotRemoved, MalformedEntry)
CUT = 1000
"""``show`` cuts a value longer than this many characters (the traceback at 10 times
that) unless ``--full``."""


class Failure(click.ClickException):
    """Ends a command with ``error: <message>`` on one stderr line and exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.message)}", err=True)


def _reports_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn any library error (and any unexpected one) into a one-line ``Failure``."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe fails here, not at interpreter exit
            return result
        except BrokenPipeError:
            _closed_pipe()
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            sys.stdout.flush()
            raise
        except ResilienceError as exc:
            raise Failure(str(exc)) from None
        except Exception as exc:
            raise Failure(f"unexpected {type(exc).__name__}: {_mask_urls(str(exc))}") from None

    return wrapper


def _closed_pipe() -> NoReturn:
    """End quietly because stdout's reader is gone (``| head``), as ``git`` and ``ls``.

    Python ignores SIGPIPE, so a write to a closed pipe raises instead; pointing
    stdout at /dev/null stops the interpreter's last flush from failing again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise click.exceptions.Exit(128 + signal.SIGPIPE)


def _option(*decls: str, **attrs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*decls, allow_from_autoenv=False, **attrs)


def _app() -> Any:
    obj = click.get_current_context().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise Failure("run this as a Celery sub-command: celery -A proj resilience ...")
    return app


def _queue() -> tuple[DeadLetterQueue, frozenset[str]]:
    """The app's DLQ and the argument names to mask; refuses a process-private DLQ."""
    app = _app()
    settings = runtime(app).settings
    if settings.dlq_url.lower().startswith("memory://"):
        raise Failure(
            f"the DLQ backend is {mask_url(settings.dlq_url)}, which lives inside each "
            "process, so this command cannot see the workers' dead letters; pass -A with "
            "your app and set its resilience_url (or resilience_dlq_url) to a shared "
            "backend such as redis://"
        )
    return DeadLetterQueue(app), frozenset(settings.dlq_mask_args)


# --- text -------------------------------------------------------------------------


def _mask_urls(text: str) -> str:
    return " ".join(mask_url(word) if "://" in word else word for word in text.split())


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


# --- commands ---------------------------------------------------------------------


@click.group(name="resilience")
@click.pass_context
@_handle_preload_options
def resilience(ctx: click.Context, **preload_options: Any) -> None:
    """celery-resilience tools: see celery -A proj resilience dlq|doctor|nodes|web --help."""


@resilience.group()
def dlq() -> None:
    """The dead-letter queue: list, show, replay and remove entries."""


@dlq.command(name="ls")
@_option("--task", "task_name", metavar="NAME", help="Only entries of this task name.")
@_option("--reason", metavar="R", help="Only entries with this give-up reason.")
@_option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_option("--cursor", metavar="C", help="The cursor an earlier page printed.")
@_option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"entries": [...], "next_cursor": C, "skipped": [{"id", "error"}]}.',
)
@_option("--reveal", is_flag=True, help="Show masked argument values.")
@_reports_errors
def ls(
    task_name: str | None,
    reason: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
    reveal: bool,
) -> None:
    """List entries, newest first: task, reason, age, attempts, exception, id.

    When more entries match than --limit, a last line names the --cursor of the
    next page (next_cursor with --json; null on the last page). Each entry that
    cannot be decoded gets a "warning: ..." line on stderr and is skipped.
    """
    queue, mask = _queue()
    page = queue.list(task_name=task_name, reason=reason, limit=limit, cursor=cursor)
    for entry_id, why in page.skipped:
        click.echo(
            f"warning: {one_line(why)}; skipped (dlq rm {one_line(entry_id)} removes it)", err=True
        )
    if as_json:
        entries = [view(entry, mask, reveal) for entry in page.entries]
        skipped = [{"id": entry_id, "error": why} for entry_id, why in page.skipped]
        document = {"entries": entries, "next_cursor": page.cursor, "skipped": skipped}
        click.echo(json.dumps(document, indent=2))
        return
    if not page.entries:
        click.echo("no dead letters")
    else:
        now = time.time()
        rows = [
            [
                _fit(one_line(e.task_name), 80),
                _fit(one_line(e.reason), 40),
                age(now - e.last_failure_at),
                _fit(one_line(e.attempts), 12),
                one_line(exception_line(e)),
                one_line(e.id),
            ]
            for e in page.entries
        ]
        _table(["TASK", "REASON", "AGE", "ATTEMPTS", "EXCEPTION", "ID"], rows, squeeze=4)
    if page.cursor is not None:
        click.echo(f"more entries: pass --cursor {one_line(page.cursor)} for the next page")


def _table(header: list[str], rows: list[list[str]], squeeze: int) -> None:
    """Print aligned columns; column ``squeeze`` is cut (to 20 at least) to fit the terminal."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    gaps = 2 * (len(header) - 1)
    room = shutil.get_terminal_size((120, 24)).columns - gaps - sum(widths) + widths[squeeze]
    widths[squeeze] = min(widths[squeeze], max(20, room))
    for row in [header, *rows]:
        cells = [_fit(cell, width).ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())


def _cut(text: str, limit: int, full: bool) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters unless ``full``, and whether it was cut."""
    if full or len(text) <= limit:
        return text, False
    return f"{text[:limit]}... [cut: {len(text):,} characters; --full shows all]", True


@dlq.command()
@click.argument("entry_id", metavar="ID")
@_option("--json", "as_json", is_flag=True, help="Print the entry as a JSON object (never cut).")
@_option("--reveal", is_flag=True, help="Show masked argument values.")
@_option("--full", is_flag=True, help=f"Do not cut values longer than {CUT} characters.")
@_reports_errors
def show(entry_id: str, as_json: bool, reveal: bool, full: bool) -> None:
    """Print every field of one entry, traceback included.

    Values longer than 1000 characters (the traceback: 10,000) are cut, saying so,
    unless --full; --json prints every value whole.
    """
    queue, mask = _queue()
    try:
        entry = queue.get(entry_id)
    except MalformedEntry as exc:
        raise Failure(f"{exc} (dlq rm {entry_id} removes it)") from None
    data = view(entry, mask, reveal)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    fields = describe.fields(entry, data)
    for label, value in fields:
        shown, _ = _cut("-" if value is None or value == "" else one_line(value), CUT, full)
        if value == MASK and label.endswith("repr"):
            shown += " (hidden: it cannot be masked; --reveal shows it)"
        click.echo(f"{label + ':':<15}{shown}")
    click.echo("traceback:")
    traceback, _ = _cut(str(entry.traceback or "-"), 10 * CUT, full)
    for text in safe(traceback, keep_newlines=True).splitlines():
        click.echo(f"  {text}")


@dlq.command()
@click.argument("entry_ids", metavar="[ID]...", nargs=-1)
@_option("--all", "replay_all", is_flag=True, help="Replay every matching entry.")
@_option("--task", "task_name", metavar="NAME", help="With --all: only this task name.")
@_option("--reason", metavar="R", help="With --all: only this give-up reason.")
@_option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="With --all: entries per second (default: setting resilience_dlq_replay_rate).",
)
@_option("--force", is_flag=True, help="Also replay entries replayed 3 times already.")
@_reports_errors
def replay(
    entry_ids: tuple[str, ...],
    replay_all: bool,
    task_name: str | None,
    reason: str | None,
    rate: float | None,
    force: bool,
) -> None:
    """Publish entries' tasks again (same task id and routing), then remove them.

    Prints "replayed ID as task TASK_ID" per published entry; each entry that
    cannot be replayed, or was published but could not be removed, gets an
    "error: ..." line on stderr (it stays) and the exit code is 1.
    """
    if replay_all == bool(entry_ids):
        raise Failure("pass entry ids or --all (not both)")
    if not replay_all and (task_name or reason or rate):
        raise Failure("--task, --reason and --rate go with --all")
    queue, _ = _queue()
    queue.app.loader.import_default_modules()  # register the tasks, as a worker does
    if not replay_all:

        def replay_one(entry_id: str) -> None:
            try:
                task_id = queue.replay(entry_id, force=force).id
            except ReplayNotRemoved as exc:
                _replayed(entry_id, exc.task_id)
                raise
            _replayed(entry_id, task_id)

        _each(entry_ids, replay_one)
        return
    task_ids = {
        e.id: e.task_id
        for page in queue.pages(task_name=task_name, reason=reason)
        for e in page.entries
    }
    report = queue.replay_all(task_name=task_name, reason=reason, rate=rate, force=force)
    for entry_id in report.replayed:
        _replayed(entry_id, task_ids.get(entry_id, "?"))
    for message in [*report.not_removed.values(), *report.refused.values()]:
        click.echo(f"error: {one_line(message)}", err=True)
    click.echo(f"replayed {len(report.replayed)} of {len(report.replayed) + len(report.refused)}")
    if report.refused or report.not_removed:
        raise click.exceptions.Exit(1)


def _replayed(entry_id: str, task_id: str) -> None:
    click.echo(f"replayed {one_line(entry_id)} as task {one_line(task_id)}")


def _each(entry_ids: Iterable[str], action: Callable[[str], None]) -> None:
    """Run ``action`` on each distinct id; per-id errors print a line, then exit 1."""
    failed = False
    for entry_id in dict.fromkeys(entry_ids):
        try:
            action(entry_id)
        except _PER_ID_ERRORS as exc:
            click.echo(f"error: {one_line(exc)}", err=True)
            failed = True
    if failed:
        raise click.exceptions.Exit(1)


@dlq.command()
@click.argument("entry_ids", metavar="ID...", nargs=-1, required=True)
@_reports_errors
def rm(entry_ids: tuple[str, ...]) -> None:
    """Delete entries without replaying them; prints "deleted ID" per entry."""
    queue, _ = _queue()

    def delete(entry_id: str) -> None:
        queue.delete(entry_id)
        click.echo(f"deleted {one_line(entry_id)}")

    _each(entry_ids, delete)


@dlq.command()
@_option("--task", "task_name", metavar="NAME", help="Only entries of this task name.")
@_option("--yes", is_flag=True, help="Confirm; without it nothing is removed (exit 1).")
@_reports_errors
def purge(task_name: str | None, yes: bool) -> None:
    """Delete every entry (of --task only). Never prompts: needs --yes."""
    what = f"every dead letter of task {task_name!r}" if task_name else "every dead letter"
    if not yes:
        raise Failure(f"purge deletes {what}; pass --yes to confirm")
    queue, _ = _queue()
    click.echo(f"purged {queue.purge(task_name=task_name)} dead letters")


@resilience.command()
@_option("--grace-period", type=float, metavar="S", help="The pod's termination grace period.")
@_option("--longest-task", type=float, metavar="S", help="Longest run or ETA wait of a task.")
@_option("--consumer-timeout", type=float, metavar="S", help="RabbitMQ's consumer_timeout.")
@_reports_errors
def doctor(
    grace_period: float | None, longest_task: float | None, consumer_timeout: float | None
) -> None:
    """Check the settings that make tasks run twice, wait long or vanish; exit 1 on any.

    Prints a line per finding (warnings too), then how long a dead node's tasks take to
    come back, then ``ok: ...`` when nothing but warnings was found.
    """
    from celery_resilience.doctor import recovery

    app = _app()
    app.loader.import_default_modules()
    findings = diagnose(
        app,
        grace_period=grace_period,
        longest_task=longest_task,
        consumer_timeout=consumer_timeout,
    )
    for finding in findings:
        click.echo(one_line(str(finding)))
    click.echo(one_line(f"recovery: {recovery(app, consumer_timeout=consumer_timeout).summary}"))
    if any(not finding.warning for finding in findings):
        raise click.exceptions.Exit(1)
    tasks = sum(1 for t in app.tasks.values() if options_of(t))
    click.echo(f"ok: no dangerous settings found ({tasks} resilient tasks checked)")


LOST_SHOWN = 10  # lost nodes the table shows (--json gives every one kept)


@resilience.command()
@_option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"now", "live": [...], "lost": [...], "holders": N, "sweeping": B}.',
)
@_reports_errors
def nodes(as_json: bool) -> None:
    """List the worker nodes present in the broker's Redis and what each holds, then
    the nodes lost recently and what their recovery put back, then how many processes
    holding run or lock leases are present. Every time is the Redis server's.

    Needs a Redis broker and the visibility heartbeat on (liveness).
    """
    found = read_nodes(_app())
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(found), indent=2))
        return
    if found.live:
        rows = [
            [
                _fit(one_line(n.nodename), 60),
                _fit(one_line(n.hostname), 60),
                one_line(n.pid if n.pid is not None else "?"),
                _fit(one_line(",".join(n.queues) or "-"), 60),
                expires_text(n, found),
                holds_text(n),
            ]
            for n in found.live
        ]
        _table(["NODE", "HOST", "PID", "QUEUES", "EXPIRES", "HOLDS"], rows, squeeze=5)
    else:
        click.echo("no live nodes")
    if found.lost:
        click.echo("")
        click.echo("lost nodes, newest first:")
        rows = [
            [
                when(n.lost_at, found.now) if n.lost_at is not None else "?",
                _fit(one_line(n.nodename), 60),
                _fit(one_line(n.hostname), 60),
                recovered_text(n),
            ]
            for n in found.lost[:LOST_SHOWN]
        ]
        _table(["LOST", "NODE", "HOST", "RECOVERED"], rows, squeeze=3)
        if len(found.lost) > LOST_SHOWN:
            click.echo(f"... and {len(found.lost) - LOST_SHOWN} earlier (--json lists them)")
    click.echo("")
    plural = "process" if found.holders == 1 else "processes"
    click.echo(f"{found.holders} lease holder {plural} present")


@resilience.command()
@_option("--bind", default="127.0.0.1", show_default=True, metavar="ADDR", help="Listen here.")
@_option("--port", type=click.IntRange(1, 65535), default=5566, show_default=True)
@_option("--read-only", is_flag=True, help="Show no forms; refuse every POST (403).")
@_reports_errors
def web(bind: str, port: int, read_only: bool) -> None:
    """Serve a page of the dead letters (list, filter, an entry, replay and delete), and
    one of the worker nodes, the nodes lost recently and the locks held now.

    Binds to 127.0.0.1 unless --bind says otherwise; any other address needs the setting
    resilience_web_token, which every request must then carry. Runs until interrupted.
    """
    from celery_resilience.web.security import Guard, refusal
    from celery_resilience.web.server import WebServer

    queue, mask = _queue()
    settings = runtime(queue.app).settings
    problem = refusal(bind, settings.web_token)
    if problem is not None:
        raise Failure(problem)
    guard = Guard(settings.web_token, read_only=read_only)
    try:
        server = WebServer((bind, port), queue, mask, guard, settings.dlq_replay_rate)
    except OSError as exc:
        raise Failure(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
    host = f"[{bind}]" if ":" in bind else bind
    mode = " (read-only)" if read_only else ""
    click.echo(f"serving the pages of app {queue.app.main} on http://{host}:{port}/{mode}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
