"""``celery -A proj resilience dlq ...``, run as the real ``celery`` program on real Redis.

SPEC "Dead-letter queue" (the CLI), "Bad input" (one error line, exit code 1) and
"Security" (masked arguments, never unpickling, masked passwords). Entries are
stored through the library's own DLQ backend; no worker runs, so a replayed task
stays in the Redis broker's queue where the test can see it.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_resilience import DeadLetter, DeadLetterQueue
from celery_resilience.cli import age
from celery_resilience.deadletter import RawBody
from tests.cli_support import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
PICKLE = "application/x-python-serialize"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def pycache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where the ``celery`` subprocesses keep bytecode (outside the source tree).

    Where ``PYTHONDONTWRITEBYTECODE`` is set, each start would compile Celery anew
    (about 0.8 s instead of 0.3 s).
    """
    cache = getattr(request.config, "cache", None)
    return str(cache.mkdir("cli-pycache") if cache else tmp_path_factory.mktemp("pycache"))


def _env(
    redis_url: str, prefix: str, pycache: str, mask: str = "", resilience_url: str | None = None
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CELERY_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        {
            "PYTHONPYCACHEPREFIX": pycache,
            cli_app.BROKER_URL: redis_url,
            cli_app.RESILIENCE_URL: resilience_url or redis_url,
            cli_app.KEY_PREFIX: prefix,
            cli_app.MASK_ARGS: mask,
            "COLUMNS": "120",
        }
    )
    return env


def _command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.cli_support.app",
        "resilience",
        "dlq",
        *args,
    ]


@pytest.fixture
def cli_many(
    redis_url: str, key_prefix: str, pycache: str
) -> Callable[..., list[subprocess.CompletedProcess[str]]]:
    """Run several ``dlq`` commands at once on this test's keys; results in order.

    Keyword arguments configure the app: ``mask=`` (mask arg names), ``resilience_url=``.
    """

    def run(*commands: Sequence[str], **config: Any) -> list[subprocess.CompletedProcess[str]]:
        env = _env(redis_url, key_prefix, pycache, **config)
        procs = [
            subprocess.Popen(
                _command(*args),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in commands
        ]
        results = []
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=30)
            results.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
        return results

    return run


@pytest.fixture
def cli(cli_many: Callable[..., list[subprocess.CompletedProcess[str]]]) -> Run:
    """Run one ``celery ... resilience dlq ARGS`` (configured as ``cli_many``)."""
    return lambda *args, **config: cli_many(args, **config)[0]


@pytest.fixture
def dlq(redis_url: str, key_prefix: str) -> Iterator[DeadLetterQueue]:
    """The DLQ the CLI sees, opened in the test process."""
    app = Celery("cli_test", set_as_current=False)
    app.conf.update(resilience_url=redis_url, resilience_key_prefix=key_prefix)
    queue = DeadLetterQueue(app)
    yield queue
    queue.backend.close()


@pytest.fixture
def store(dlq: DeadLetterQueue) -> Callable[..., DeadLetter]:
    """Store a dead letter of ``cli.upload`` that failed ``age`` seconds ago."""

    def make(age: float = 60.0, **fields: Any) -> DeadLetter:
        now = time.time()
        values: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "task_id": str(uuid.uuid4()),
            "task_name": "cli.upload",
            "reason": "max_retries",
            "exception_type": "builtins.ConnectionError",
            "exception_message": "upstream refused",
            "traceback": 'Traceback (most recent call last):\n  File "tasks.py", line 9\n'
            "ConnectionError: upstream refused\n",
            "attempts": 11,
            "deliveries": 1,
            "first_failure_at": now - age - 30,
            "last_failure_at": now - age,
            "args": [42, "c0ffee"],
            "kwargs": {},
            "args_repr": "(42, 'c0ffee')",
            "kwargs_repr": "{}",
            "argnames": ["repoid", "token"],
            "queue": "celery",
            "exchange": "",
            "routing_key": "celery",
        }
        values.update(fields)
        entry = DeadLetter(**values)
        dlq.backend.store(entry, retention=7 * 86400, max_entries=10_000)
        return entry

    return make


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_ls_prints_a_table_newest_first(cli: Run, store: Callable[..., DeadLetter]) -> None:
    """ls: a header, one row per entry newest first, humanized ages, cut and escaped text."""
    old = store(age=5 * 86400, reason="worker_lost", attempts=1)
    new = store(age=150, exception_message="x" * 300)
    middle = store(
        age=2 * 3600,
        exception_type="botocore.exceptions.ClientError",
        exception_message="denied\x1b[2J",
    )

    result = cli("ls")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["TASK", "REASON", "AGE", "ATTEMPTS", "EXCEPTION", "ID"]
    assert [row.split()[-1] for row in rows] == [new.id, middle.id, old.id]
    assert rows[0].split()[:4] == ["cli.upload", "max_retries", "2m", "11"]
    assert "ConnectionError: xxx" in rows[0]
    assert rows[0].split()[-2].endswith("...")
    assert rows[1].split()[2:6] == [
        "2h",
        "11",
        "botocore.exceptions.ClientError:",
        "denied\\x1b[2J",
    ]
    assert "\x1b" not in result.stdout  # stored text cannot drive the terminal
    assert rows[2].split()[:4] == ["cli.upload", "worker_lost", "5d", "1"]
    assert all(len(line) <= 120 for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-3, "0s"), (59.9, "59s"), (60, "1m"), (7199, "1h"), (86400 * 5 + 1, "5d")],
)
def test_age_is_humanized_in_whole_units(seconds: float, shown: str) -> None:
    """Ages print as whole seconds, minutes, hours or days, rounded down."""
    assert age(seconds) == shown


def test_ls_json_prints_every_field_of_every_entry(
    cli: Run, store: Callable[..., DeadLetter]
) -> None:
    """ls --json: only JSON on stdout, full entries newest first, next_cursor null."""
    older = store(age=600)
    newer = store(age=60, kwargs={"commitid": "abc"})

    result = cli("ls", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "entries": [asdict(newer), asdict(older)],
        "next_cursor": None,
    }


def test_ls_pages_with_limit_and_the_printed_cursor(
    cli: Run, store: Callable[..., DeadLetter]
) -> None:
    """ls --limit N prints the cursor of the next page; passing it continues there."""
    entries = [store(age=60 * (i + 1)) for i in range(5)]  # newest first

    first = cli("ls", "--limit", "2")

    assert first.returncode == 0, first.stderr
    *table, last = first.stdout.splitlines()
    assert [row.split()[-1] for row in table[1:]] == [e.id for e in entries[:2]]
    assert last.startswith("more entries: pass --cursor ")
    cursor = last.split("--cursor ")[1].split()[0]

    second = cli("ls", "--limit", "3", "--cursor", cursor, "--json")

    assert second.returncode == 0, second.stderr
    page = json.loads(second.stdout)
    assert [e["id"] for e in page["entries"]] == [e.id for e in entries[2:]]
    assert page["next_cursor"] is None


def test_show_prints_every_field_and_the_traceback(
    cli: Run, store: Callable[..., DeadLetter]
) -> None:
    """show ID: one labelled line per field, then the whole traceback."""
    entry = store(lock_key="upload:42", hostname="worker@pod-1", kwargs={"commitid": "abc"})

    result = cli("show", entry.id)

    assert result.returncode == 0, result.stderr
    fields = dict(
        line.split(":", 1) for line in result.stdout.split("\ntraceback:\n")[0].splitlines()
    )
    shown = {label: value.strip() for label, value in fields.items()}
    assert shown["id"] == entry.id
    assert shown["task id"] == entry.task_id
    assert shown["task"] == "cli.upload"
    assert shown["exception"] == "builtins.ConnectionError"
    assert shown["message"] == "upstream refused"
    assert shown["args"] == '[42, "c0ffee"]'
    assert shown["kwargs"] == '{"commitid": "abc"}'
    assert shown["argnames"] == "repoid, token"
    assert shown["lock key"] == "upload:42"
    assert shown["hostname"] == "worker@pod-1"
    assert shown["last failure"].endswith("UTC (1m ago)")
    assert {"attempts", "deliveries", "replays", "queue", "routing key", "body"} <= set(shown)
    assert '  File "tasks.py", line 9\n  ConnectionError: upstream refused' in result.stdout


def test_show_json_prints_the_entry(cli: Run, store: Callable[..., DeadLetter]) -> None:
    """show ID --json: the entry as one JSON object, every field included."""
    entry = store()

    result = cli("show", entry.id, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == asdict(entry)


def test_masked_arguments_print_as_stars_unless_revealed(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    store: Callable[..., DeadLetter],
) -> None:
    """Args named in resilience_dlq_mask_args are *** in show and --json, unless --reveal."""
    entry = store(
        args=[42, "tok-positional"],
        kwargs={"secret": "kw-hunter2", "commitid": "abc"},
        args_repr="(42, 'tok-positional')",
        kwargs_repr="{'secret': 'kw-hunter2', 'commitid': 'abc'}",
    )

    shown, listed, revealed = cli_many(
        ["show", entry.id],
        ["ls", "--json"],
        ["show", entry.id, "--json", "--reveal"],
        mask="token,secret",
    )

    for result in (shown, listed):
        assert result.returncode == 0, result.stderr
        assert "tok-positional" not in result.stdout
        assert "hunter2" not in result.stdout
    assert '[42, "***"]' in shown.stdout
    assert "(42, ***)" in shown.stdout
    masked = json.loads(listed.stdout)["entries"][0]
    assert masked["args"] == [42, "***"]
    assert masked["kwargs"] == {"secret": "***", "commitid": "abc"}
    assert masked["kwargs_repr"] == "{'commitid': 'abc', 'secret': ***}"  # stored sorted
    assert json.loads(revealed.stdout) == asdict(entry)


def test_raw_body_is_shown_as_bytes_and_never_unpickled(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    store: Callable[..., DeadLetter],
    tmp_path: Path,
) -> None:
    """A pickled body prints as <N bytes of TYPE>; ls/show never unpickle it."""
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps([[Exploit()], {}, {}])
    entry = store(
        args=None,
        kwargs=None,
        body=RawBody(base64.b64encode(payload).decode(), PICKLE, "binary"),
        args_repr="(<Exploit object>,)",
        kwargs_repr="{}",
    )

    shown, listed, table, revealed = cli_many(
        ["show", entry.id], ["ls", "--json"], ["ls"], ["show", entry.id, "--reveal"], mask="token"
    )

    assert [r.returncode for r in (shown, listed, table, revealed)] == [0, 0, 0, 0]
    assert not marker.exists()
    assert f"body:          <{len(payload)} bytes of {PICKLE}>" in shown.stdout
    assert "Exploit" not in shown.stdout
    assert "args repr:     *** (hidden" in shown.stdout
    assert "(<Exploit object>,)" in revealed.stdout
    hidden = json.loads(listed.stdout)["entries"][0]
    assert hidden["body"] == {"data": "***", "content_type": PICKLE, "content_encoding": "binary"}
    assert hidden["args_repr"] == hidden["kwargs_repr"] == "***"


def test_replay_publishes_the_task_and_removes_the_entry(
    cli: Run,
    store: Callable[..., DeadLetter],
    dlq: DeadLetterQueue,
    redis_url: str,
    key_prefix: str,
) -> None:
    """replay ID: the task (same id) lands in the broker's queue; the entry is gone."""
    entry = store()

    result = cli("replay", entry.id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed {entry.id} as task {entry.task_id}\n"
    broker = redis.Redis.from_url(redis_url)
    messages = broker.lrange(f"{key_prefix}:broker:celery", 0, -1)
    broker.close()
    assert len(messages) == 1
    headers = json.loads(messages[0])["headers"]
    assert (headers["id"], headers["task"]) == (entry.task_id, "cli.upload")
    assert dlq.backend.get(entry.id) is None


def test_replay_all_replays_the_matching_entries(
    cli: Run,
    store: Callable[..., DeadLetter],
    dlq: DeadLetterQueue,
    redis_url: str,
    key_prefix: str,
) -> None:
    """replay --all --task NAME: every entry of that task is published, others stay."""
    mine = [store(), store()]
    other = store(task_name="cli.other")

    result = cli("replay", "--all", "--task", "cli.upload", "--rate", "100")

    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()[:-1]) == sorted(
        f"replayed {e.id} as task {e.task_id}" for e in mine
    )
    assert result.stdout.splitlines()[-1] == "replayed 2 of 2"
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(f"{key_prefix}:broker:celery") == 2
    broker.close()
    assert dlq.get(other.id) == other


def test_replay_of_an_unregistered_task_fails_and_keeps_the_entry(
    cli: Run, store: Callable[..., DeadLetter], dlq: DeadLetterQueue
) -> None:
    """replay of a task name the app does not know: one error line, exit 1, entry kept."""
    entry = store(task_name="cli.gone")

    line = _error_line(cli("replay", entry.id))

    assert "'cli.gone' is not registered" in line
    assert dlq.get(entry.id) == entry


def test_unknown_id_is_one_error_line_for_show_rm_and_replay(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
) -> None:
    """show/rm/replay of an id that is not there: one stderr line, exit code 1."""
    results = cli_many(["show", "nope"], ["rm", "nope"], ["replay", "nope"])

    for result in results:
        assert _error_line(result) == "error: no dead letter with id 'nope'"
        assert result.stdout == ""


def test_rm_deletes_the_entries(
    cli: Run, store: Callable[..., DeadLetter], dlq: DeadLetterQueue
) -> None:
    """rm ID ID: both entries are deleted, one line each; the others stay."""
    gone = [store(), store()]
    kept = store()

    result = cli("rm", gone[0].id, gone[1].id)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"deleted {e.id}" for e in gone]
    assert [e.id for e in dlq.iter()] == [kept.id]


def test_purge_refuses_without_yes_and_purges_with_it(
    cli: Run,
    store: Callable[..., DeadLetter],
    dlq: DeadLetterQueue,
) -> None:
    """purge never prompts: without --yes it fails and removes nothing; --yes removes."""
    store(), store()
    other = store(task_name="cli.other")

    refused = cli("purge", "--task", "cli.upload")

    assert "pass --yes" in _error_line(refused)
    assert dlq.count() == 3

    purged = cli("purge", "--task", "cli.upload", "--yes")

    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == "purged 2 dead letters\n"
    assert [e.id for e in dlq.iter()] == [other.id]


def test_unreachable_backend_is_one_error_line_without_the_password(cli: Run) -> None:
    """A DLQ backend that refuses connections: exit 1, one line, password masked."""
    result = cli("ls", resilience_url="redis://admin:s3cret-pw@127.0.0.1:1/0")

    line = _error_line(result)
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "redis://admin:**@127.0.0.1:1/0" in line


def test_bad_input_is_one_error_line(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    cli: Run,
    redis_url: str,
    key_prefix: str,
    store: Callable[..., DeadLetter],
) -> None:
    """A bad cursor, an undecodable entry and a bad setting each give one error line."""
    entry = store()
    client = redis.Redis.from_url(redis_url)
    client.set(f"{key_prefix}:dlq:e:{entry.id}", b"\x80not json")
    client.close()

    cursor, malformed = cli_many(["ls", "--cursor", "bogus"], ["show", entry.id])
    setting = cli("ls", mask="not an identifier")

    assert "cursor 'bogus'" in _error_line(cursor)
    assert f"dead letter {entry.id} cannot be decoded" in _error_line(malformed)
    assert "resilience_dlq_mask_args" in _error_line(setting)
