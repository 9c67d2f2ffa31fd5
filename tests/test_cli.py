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
    """ls --json --reveal: only JSON on stdout, full entries newest first, next_cursor null."""
    older = store(age=600)
    newer = store(age=60, kwargs={"commitid": "abc"})

    result = cli("ls", "--json", "--reveal")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "entries": [asdict(newer), asdict(older)],
        "next_cursor": None,
        "skipped": [],
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
    assert shown["args"] == '[42, "***"]'  # the task's argument is named token
    assert shown["kwargs"] == '{"commitid": "abc"}'
    assert shown["argnames"] == "repoid, token"
    assert shown["lock key"] == "upload:42"
    assert shown["hostname"] == "worker@pod-1"
    assert shown["last failure"].endswith("UTC (1m ago)")
    assert {"attempts", "deliveries", "replays", "queue", "routing key", "body"} <= set(shown)
    assert '  File "tasks.py", line 9\n  ConnectionError: upstream refused' in result.stdout


def test_show_json_prints_the_entry(cli: Run, store: Callable[..., DeadLetter]) -> None:
    """show ID --json --reveal: the entry as one JSON object, every field as stored."""
    entry = store()

    result = cli("show", entry.id, "--json", "--reveal")

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


def _write(redis_url: str, key: str, value: bytes | str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set(key, value)
    client.close()


CORRUPT: dict[str, Callable[[DeadLetter], bytes | str]] = {
    "binary": lambda e: b"\x80\xff\xfe not utf-8",
    "deeply nested": lambda e: e.to_json()[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}",
    "nested past the limit": lambda e: json.dumps(
        {**asdict(e), "args": [json.loads("[" * 150 + "]" * 150)]}
    ),
    "wrong types": lambda e: json.dumps({**asdict(e), "attempts": "eleven", "kwargs": []}),
    "NaN time": lambda e: e.to_json().replace(f"{e.last_failure_at!r}", "NaN"),
    "huge, not an object": lambda e: json.dumps("x" * 5_000_000),
    "an array": lambda e: "[1, 2]",
    "another id": lambda e: json.dumps({**asdict(e), "id": "someone-else"}),
}


def test_ls_names_and_skips_every_entry_that_cannot_be_decoded(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    store: Callable[..., DeadLetter],
    redis_url: str,
    key_prefix: str,
) -> None:
    """ls and ls --json list the good entries and name each undecodable one on stderr."""
    good = [store(age=10), store(age=500)]
    bad = {}
    for i, (kind, corrupt) in enumerate(CORRUPT.items()):
        entry = store(age=20 + i)  # between the good ones
        _write(redis_url, f"{key_prefix}:dlq:e:{entry.id}", corrupt(entry))
        bad[entry.id] = kind

    table, as_json = cli_many(["ls"], ["ls", "--json", "--reveal"])

    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        warnings = result.stderr.splitlines()
        assert len(warnings) == len(bad), result.stderr
        for line, entry_id in zip(warnings, bad, strict=True):  # newest first, like the list
            assert line.startswith(f"warning: dead letter {entry_id} "), (bad[entry_id], line)
            assert line.endswith(f"; skipped (dlq rm {entry_id} removes it)")
    assert [row.split()[-1] for row in table.stdout.splitlines()[1:]] == [e.id for e in good]
    document = json.loads(as_json.stdout)
    assert document["entries"] == [asdict(e) for e in good]
    assert [s["id"] for s in document["skipped"]] == list(bad)
    assert "nested too deeply" in document["skipped"][1]["error"]
    assert "invalid attempts: 'eleven'" in document["skipped"][3]["error"]


@pytest.mark.parametrize("kind", ["binary", "deeply nested", "wrong types", "another id"])
def test_show_of_an_entry_that_cannot_be_decoded_is_one_error_line(
    cli: Run, store: Callable[..., DeadLetter], redis_url: str, key_prefix: str, kind: str
) -> None:
    """show of a corrupt entry: one error line naming it and how to remove it, exit 1."""
    entry = store()
    _write(redis_url, f"{key_prefix}:dlq:e:{entry.id}", CORRUPT[kind](entry))

    line = _error_line(cli("show", entry.id))

    assert line.startswith(f"error: dead letter {entry.id} ")
    assert line.endswith(f"(dlq rm {entry.id} removes it)")


def _index_members(redis_url: str, key_prefix: str, entry_id: str) -> dict[str, bool]:
    """Which of the DLQ's indexes (and its meta hash) still name ``entry_id``."""
    client = redis.Redis.from_url(redis_url)
    p = key_prefix
    indexes = [f"{p}:dlq:all", f"{p}:dlq:t:cli.upload", f"{p}:dlq:r:max_retries"]
    found = {key: client.zscore(key, entry_id) is not None for key in indexes}
    found[f"{p}:dlq:tr:cli.upload:max_retries"] = (
        client.zscore(f"{p}:dlq:tr:cli.upload:max_retries", entry_id) is not None
    )
    found[f"{p}:dlq:meta"] = bool(client.hexists(f"{p}:dlq:meta", entry_id))
    client.close()
    return found


@pytest.mark.parametrize("meta", [b"no separator", b"", b"\xff\xfe\x00\x1f"])
def test_replay_over_a_corrupt_meta_publishes_and_leaves_no_index_member(
    cli: Run,
    store: Callable[..., DeadLetter],
    dlq: DeadLetterQueue,
    redis_url: str,
    key_prefix: str,
    meta: bytes,
) -> None:
    """A corrupt meta value: replay publishes, then the entry is gone from every index."""
    entry, kept = store(), store()
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{key_prefix}:dlq:meta", entry.id, meta)

    result = cli("replay", entry.id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed {entry.id} as task {entry.task_id}\n"
    (message,) = client.lrange(f"{key_prefix}:broker:celery", 0, -1)
    client.close()
    assert json.loads(message)["headers"]["id"] == entry.task_id
    listed = cli("ls", "--json")
    assert [e["id"] for e in json.loads(listed.stdout)["entries"]] == [kept.id]
    assert dlq.count() == dlq.count(task_name="cli.upload") == dlq.count(reason="max_retries") == 1
    assert dlq.count(task_name="cli.upload", reason="max_retries") == 1
    assert not any(_index_members(redis_url, key_prefix, entry.id).values())
    assert all(_index_members(redis_url, key_prefix, kept.id).values())


def test_a_replay_whose_cleanup_fails_says_the_task_was_published_and_rm_removes_it(
    cli: Run, redis_url: str, evicting_redis: str, key_prefix: str, pycache: str
) -> None:
    """The DLQ refuses the delete (an ACL user without scripts): published, said so, exit 1."""
    admin = redis.Redis.from_url(evicting_redis)  # a private server: ACL users are ours
    admin.execute_command(
        "ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@all", "-evalsha", "-eval"
    )
    app = Celery("cli_cleanup", set_as_current=False)
    app.conf.update(resilience_url=evicting_redis, resilience_key_prefix=key_prefix)
    queue = DeadLetterQueue(app)
    now = time.time()
    entry = DeadLetter(
        id=uuid.uuid4().hex, task_id=str(uuid.uuid4()), task_name="cli.upload",
        reason="error", exception_type="builtins.ValueError", exception_message="bad",
        traceback="", attempts=1, deliveries=1, first_failure_at=now, last_failure_at=now,
        args=[1, "t"], kwargs={}, queue="celery", routing_key="celery", exchange="",
    )  # fmt: skip
    queue.backend.store(entry, retention=3600, max_entries=100)
    limited = evicting_redis.replace("redis://", "redis://reader:pw@")

    replayed = cli("replay", entry.id, resilience_url=limited)

    assert replayed.stdout == f"replayed {entry.id} as task {entry.task_id}\n"
    line = _error_line(replayed)
    assert f"dead letter {entry.id} WAS replayed (published as task {entry.task_id})" in line
    assert f"dlq rm {entry.id}" in line
    assert "pw@" not in line
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(f"{key_prefix}:broker:celery") == 1
    broker.close()
    assert [e.id for e in queue.iter()] == [entry.id]  # still findable

    removed = cli("rm", entry.id, resilience_url=evicting_redis)

    assert removed.stdout == f"deleted {entry.id}\n", removed.stderr
    assert queue.count() == 0
    queue.backend.close()
    admin.close()


def test_show_cuts_a_five_megabyte_value_unless_full(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    store: Callable[..., DeadLetter],
) -> None:
    """show cuts long args, reprs and messages, saying so; --full and --json print them whole."""
    blob = "z" * 5_000_000
    entry = store(
        args=[42, "c0ffee"], kwargs={"payload": blob}, kwargs_repr=repr({"payload": blob}),
        exception_message=blob,
    )  # fmt: skip

    cut, full, as_json = cli_many(
        ["show", entry.id], ["show", entry.id, "--full"], ["show", entry.id, "--json"]
    )

    assert [r.returncode for r in (cut, full, as_json)] == [0, 0, 0], cut.stderr
    assert len(cut.stdout) < 20_000
    lines = {line.split(":", 1)[0]: line for line in cut.stdout.splitlines()}
    for label in ("kwargs", "kwargs repr", "message"):
        assert "... [cut: 5,000,0" in lines[label]
        assert lines[label].endswith("characters; --full shows all]")
    assert blob in full.stdout
    assert json.loads(as_json.stdout)["kwargs"]["payload"] == blob


def test_secret_looking_argument_names_are_masked_by_default(
    cli_many: Callable[..., list[subprocess.CompletedProcess[str]]],
    store: Callable[..., DeadLetter],
) -> None:
    """Names like db_password, X-Api-Key, refreshToken are *** in ls/show, nested too."""
    secrets = {
        "db_password": "pw-1",
        "apiKey": "key-2",
        "session_cookie": "cookie-3",
        "refreshToken": "tok-4",
        "config": {"headers": {"X-Api-Key": "key-5", "Authorization": "Bearer 6"}},
        "items": [{"private_key": "pk-7"}],
    }
    harmless = {"tokenizer": "bert", "monkey": "george", "commitid": "abc"}
    entry = store(
        args=[42, "tok-positional"],
        kwargs={**secrets, **harmless},
        args_repr="(42, 'tok-positional')",
        kwargs_repr=repr({**secrets, **harmless}),
    )

    shown, shown_json, listed, revealed, added = cli_many(
        ["show", entry.id],
        ["show", entry.id, "--json"],
        ["ls", "--json"],
        ["show", entry.id, "--reveal"],
        ["show", entry.id, "--json", "--reveal"],
    )

    values = ["pw-1", "key-2", "cookie-3", "tok-4", "key-5", "Bearer 6", "pk-7", "tok-positional"]
    for result in (shown, shown_json, listed):
        assert result.returncode == 0, result.stderr
        assert not [v for v in values if v in result.stdout]
        assert all(v in result.stdout for v in ("bert", "george", "abc"))
    masked = json.loads(shown_json.stdout)
    assert masked["args"] == [42, "***"]
    assert masked["kwargs"]["config"] == {"headers": {"X-Api-Key": "***", "Authorization": "***"}}
    assert masked["kwargs"]["items"] == [{"private_key": "***"}]
    assert "'db_password': ***" in masked["kwargs_repr"]
    assert json.loads(listed.stdout)["entries"] == [masked]
    assert all(v in revealed.stdout for v in values)
    assert json.loads(added.stdout) == asdict(entry)


def test_names_in_the_mask_setting_are_masked_too(
    cli: Run, store: Callable[..., DeadLetter]
) -> None:
    """resilience_dlq_mask_args adds names (here the positional repoid) to the defaults."""
    entry = store(args=[42, "t"], kwargs={"commitid": "abc"})

    result = cli("show", entry.id, "--json", mask="repoid,commitid")

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["args"], shown["kwargs"]) == (["***", "***"], {"commitid": "***"})


def test_a_closed_pipe_ends_the_command_quietly(
    redis_url: str, key_prefix: str, pycache: str, store: Callable[..., DeadLetter]
) -> None:
    """ls | (read one line): no error, no traceback, exit 141 as git and ls (SIGPIPE)."""
    for i in range(1000):  # about 110 kB of table: more than a pipe holds
        store(age=60 + i)
    env = _env(redis_url, key_prefix, pycache)
    lister = subprocess.Popen(
        _command("ls", "--limit", "1000"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert lister.stdout is not None
    reader = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.stdin.readline().strip())"],
        stdin=lister.stdout, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    lister.stdout.close()  # only the reader holds the pipe's read end; it has exited
    _, err = lister.communicate(timeout=30)

    assert reader.stdout.split() == ["TASK", "REASON", "AGE", "ATTEMPTS", "EXCEPTION", "ID"]
    assert err == b""
    assert lister.returncode == 141
