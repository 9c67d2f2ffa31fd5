"""The dead-letter queue as a user meets it: tasks that give up, ``DeadLetterQueue``, replay.

Tasks run eagerly (Celery's own tracer) against each built-in backend, memory and
real Redis; the DLQ shares the backend URL. Worker processes are in tests/integration.
"""

from __future__ import annotations

import base64
import datetime
import json
import pickle
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task
from kombu.serialization import loads

from celery_resilience import (
    Backoff,
    DeadLetter,
    DeadLetterQueue,
    ReplayFailed,
    ReplayRefused,
    UnknownEntry,
    resilient,
)
from celery_resilience.deadletter import RawBody
from celery_resilience.runtime import runtime
from celery_resilience.testing import HookRecorder, eager_app, record_hooks

FAST = Backoff(base=0.01, factor=2, cap=0.05, jitter="none")


def make_app(backend_url: str, key_prefix: str, **conf: Any) -> Celery:
    """A Celery app whose coordination backend and DLQ are ``backend_url``."""
    app = Celery(f"dlq{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(resilience_url=backend_url, resilience_key_prefix=key_prefix, **conf)
    return app


def close(app: Celery) -> None:
    rt = runtime(app)
    rt.backend.close()
    rt.dlq.close()


@pytest.fixture
def app(backend_url: str, key_prefix: str) -> Iterator[Celery]:
    """An eager app that stores eager results, so a replay's result can be read back."""
    with eager_app(
        resilience_url=backend_url,
        resilience_key_prefix=key_prefix,
        task_store_eager_result=True,
        result_backend="cache+memory://",
    ) as app:
        yield app


@pytest.fixture
def dlq(app: Celery) -> DeadLetterQueue:
    return DeadLetterQueue(app)


@pytest.fixture
def events() -> Iterator[HookRecorder]:
    with record_hooks() as recorder:
        yield recorder


def only_entry(dlq: DeadLetterQueue, task: Task) -> DeadLetter:
    """The one entry ``task`` left in the queue (fails if there are more or none)."""
    (entry,) = dlq.list(task_name=task.name).entries
    return entry


def stored(dlq: DeadLetterQueue, task: Task, **fields: Any) -> DeadLetter:
    """Put an entry of ``task`` in the queue directly, as if it had given up earlier."""
    now = time.time()
    entry = DeadLetter(
        **{
            "id": uuid.uuid4().hex,
            "task_id": str(uuid.uuid4()),
            "task_name": task.name,
            "reason": "error",
            "exception_type": "builtins.ValueError",
            "exception_message": "bad input",
            "traceback": "",
            "attempts": 1,
            "deliveries": 1,
            "first_failure_at": now,
            "last_failure_at": now,
            "args": [0],
            "kwargs": {},
            **fields,
        }
    )
    dlq.backend.store(entry, retention=3600.0, max_entries=100)
    return entry


def test_a_task_out_of_retries_is_one_entry_with_its_arguments_and_error(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """max_retries=2: three runs, then one entry with args, kwargs, error and attempts 3."""
    runs: list[int] = []

    @resilient(max_retries=2, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(shared=False)
    def sync_repo(repoid: int, branch: str, *, force: bool = False) -> None:
        runs.append(repoid)
        raise ConnectionError(f"upstream refused repo {repoid}")

    result = sync_repo.delay(7, "main", force=True)
    assert result.state == "FAILURE"
    assert len(runs) == 3
    assert dlq.count() == 1
    entry = only_entry(dlq, sync_repo)
    assert dlq.get(entry.id) == entry
    assert (entry.task_id, entry.task_name) == (result.id, sync_repo.name)
    assert (entry.args, entry.kwargs) == ([7, "main"], {"force": True})
    assert (entry.args_repr, entry.kwargs_repr) == ("(7, 'main')", "{'force': True}")
    assert entry.reason == "max_retries"
    assert entry.exception_type == "builtins.ConnectionError"
    assert entry.exception_message == "upstream refused repo 7"
    assert "ConnectionError: upstream refused repo 7" in entry.traceback
    assert entry.attempts == 3
    assert entry.replays == 0
    assert entry.body is None
    assert entry.first_failure_at <= entry.last_failure_at


def test_a_terminal_error_is_stored_at_once_with_reason_error(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """An exception outside retry_on ends in one entry with reason error after one attempt."""

    @resilient(max_retries=5, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(shared=False)
    def parse(payload: str) -> None:
        raise ValueError(f"cannot parse {payload!r}")

    parse.delay("{oops")
    entry = only_entry(dlq, parse)
    assert (entry.reason, entry.attempts) == ("error", 1)
    assert entry.exception_type == "builtins.ValueError"
    assert entry.exception_message == "cannot parse '{oops'"
    assert entry.args == ["{oops"]


def test_a_task_with_dlq_false_leaves_no_entry(app: Celery, dlq: DeadLetterQueue) -> None:
    """dlq=False: the task still fails with its error, and the queue stays empty."""

    @resilient(dlq=False, max_retries=1, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(shared=False)
    def best_effort() -> None:
        raise ConnectionError("down")

    result = best_effort.delay()
    assert result.state == "FAILURE"
    assert isinstance(result.result, ConnectionError)
    assert dlq.count() == 0
    assert dlq.list().entries == []


def test_arguments_json_cannot_show_are_kept_raw_and_shown_by_repr(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """A datetime argument of a pickle task is kept as the pickle bytes; args_repr shows it."""
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)

    @resilient
    @app.task(serializer="pickle", shared=False)
    def schedule(at: datetime.datetime, *, note: str) -> None:
        raise ValueError("no slot")

    schedule.delay(when, note="é")
    entry = only_entry(dlq, schedule)
    assert (entry.args, entry.kwargs) == (None, None)
    assert entry.body is not None
    assert entry.body.content_type == "application/x-python-serialize"
    assert entry.args_repr == "(datetime.datetime(2024, 1, 2, 3, 4, 5),)"
    assert entry.kwargs_repr == "{'note': 'é'}"
    # The test may unpickle what it stored itself; the library never does.
    args, kwargs, _embed = loads(
        entry.body.payload(),
        entry.body.content_type,
        entry.body.content_encoding,
        accept=[entry.body.content_type],
    )
    assert (args, kwargs) == ([when], {"note": "é"})


def test_replay_runs_the_task_again_with_the_same_arguments_and_removes_the_entry(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """After the cause is fixed, replay reruns the same task id, args and kwargs to SUCCESS."""
    broken = True
    runs: list[tuple[str, int, tuple[Any, ...], dict[str, Any]]] = []

    @resilient(max_retries=1, retry_on=(ConnectionError,), backoff=FAST)
    @app.task(bind=True, shared=False)
    def upload(self: Task, repoid: int, commitid: str) -> str:
        runs.append((self.request.id, self.request.retries, (repoid,), {"commitid": commitid}))
        if broken:
            raise ConnectionError("storage down")
        return f"{repoid}:{commitid}"

    original = upload.delay(3, commitid="abc")
    entry = only_entry(dlq, upload)
    broken = False
    result = dlq.replay(entry.id)
    assert result.id == original.id
    assert result.get(timeout=5) == "3:abc"
    assert runs[-1] == (original.id, 0, (3,), {"commitid": "abc"})  # a fresh retry budget
    assert len(runs) == 3
    with pytest.raises(UnknownEntry):
        dlq.get(entry.id)
    assert dlq.count() == 0


def test_each_replay_is_counted_in_the_next_entry_which_keeps_the_first_failure_time(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """A replay that fails again is a new entry with replays + 1 and the same first failure."""

    @resilient
    @app.task(shared=False)
    def still_broken(n: int) -> None:
        raise ValueError(f"still broken {n}")

    still_broken.delay(5)
    first = only_entry(dlq, still_broken)
    dlq.replay(first.id)
    second = only_entry(dlq, still_broken)
    dlq.replay(second.id)
    third = only_entry(dlq, still_broken)
    assert [e.replays for e in (first, second, third)] == [0, 1, 2]
    assert {e.task_id for e in (first, second, third)} == {first.task_id}
    assert {e.first_failure_at for e in (second, third)} == {first.first_failure_at}
    assert third.last_failure_at > first.last_failure_at
    assert third.args == [5]


def test_an_entry_replayed_three_times_is_refused_unless_forced(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """replays=3 is refused and kept; replays=2 is replayed; force=True replays the third."""
    ran: list[int] = []

    @resilient
    @app.task(shared=False)
    def record(n: int) -> int:
        ran.append(n)
        return n

    twice = stored(dlq, record, replays=2, args=[2])
    thrice = stored(dlq, record, replays=3, args=[3])
    with pytest.raises(ReplayRefused, match="replayed 3 times"):
        dlq.replay(thrice.id)
    assert dlq.get(thrice.id) == thrice
    assert ran == []
    assert dlq.replay(twice.id).get(timeout=5) == 2
    assert dlq.replay(thrice.id, force=True).get(timeout=5) == 3
    assert ran == [2, 3]
    assert dlq.count() == 0


def test_replay_of_a_task_the_app_does_not_know_is_refused_and_kept(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """An entry whose task name is not registered is refused with the name, and stays."""

    @resilient
    @app.task(shared=False)
    def known() -> None: ...

    entry = stored(dlq, known, task_name="tasks.renamed_since")
    with pytest.raises(ReplayRefused, match=r"'tasks\.renamed_since' is not registered"):
        dlq.replay(entry.id)
    assert dlq.get(entry.id) == entry


def test_an_unknown_entry_id_raises_unknown_entry(dlq: DeadLetterQueue) -> None:
    """get, replay and delete of an id that is not in the queue raise UnknownEntry."""
    missing = uuid.uuid4().hex
    for action in (dlq.get, dlq.replay, dlq.delete):
        with pytest.raises(UnknownEntry, match=missing):
            action(missing)


@pytest.mark.parametrize("arguments", ["json", "raw"])
def test_a_replay_that_cannot_be_published_fails_and_keeps_the_entry(
    backend_url: str, key_prefix: str, events: HookRecorder, arguments: str
) -> None:
    """Broker unreachable: ReplayFailed names the error; the entry and its count stay."""
    app = make_app(
        backend_url,
        key_prefix,
        broker_url="redis://127.0.0.1:1/0",
        broker_connection_timeout=1,
        task_publish_retry_policy={"max_retries": 0},
    )

    @resilient
    @app.task(shared=False)
    def send_mail(to: str) -> None: ...

    dlq = DeadLetterQueue(app)
    if arguments == "json":
        entry = stored(dlq, send_mail, args=["a@example.com"])
    else:
        pickled = base64.b64encode(pickle.dumps([["a@example.com"], {}, {}])).decode()
        body = RawBody(pickled, "application/x-python-serialize", "binary")
        entry = stored(dlq, send_mail, args=None, body=body)
    try:
        with pytest.raises(ReplayFailed, match="could not be published"):
            dlq.replay(entry.id)
        assert dlq.get(entry.id) == entry
        assert dlq.count() == 1
        assert events.calls == []
    finally:
        close(app)


def test_entries_older_than_the_retention_are_not_listed_or_counted(
    backend_url: str, key_prefix: str
) -> None:
    """With resilience_dlq_retention=60, an entry from two minutes ago is no longer shown."""
    app = make_app(backend_url, key_prefix, resilience_dlq_retention=60)

    @resilient
    @app.task(shared=False)
    def report() -> None: ...

    dlq = DeadLetterQueue(app)
    try:
        stored(dlq, report, last_failure_at=time.time() - 120)
        recent = stored(dlq, report)
        assert [e.id for e in dlq.list().entries] == [recent.id]
        assert dlq.count() == 1
        assert list(dlq.iter()) == [recent]
    finally:
        close(app)


def test_replay_all_replays_matching_entries_newest_first_and_reports_refusals(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """replay_all(task_name) replays each match once, newest first; refusals stay, reported."""
    ran: list[int] = []

    @resilient
    @app.task(shared=False)
    def rebuild(n: int) -> None:
        ran.append(n)

    @resilient
    @app.task(shared=False)
    def other(n: int) -> None:
        ran.append(-n)

    now = time.time()
    matching = [stored(dlq, rebuild, args=[n], last_failure_at=now - 10 + n) for n in range(5)]
    too_often = stored(dlq, rebuild, args=[99], replays=3, last_failure_at=now - 5.5)
    untouched = stored(dlq, other, args=[1])

    report = dlq.replay_all(task_name=rebuild.name, rate=1000)
    assert report.replayed == [e.id for e in reversed(matching)]
    assert ran == [4, 3, 2, 1, 0]
    assert list(report.refused) == [too_often.id]
    assert "replayed 3 times" in report.refused[too_often.id]
    assert [e.id for e in dlq.list().entries] == [untouched.id, too_often.id]


def test_dead_letter_events_reach_observer_plugins(
    backend_url: str, key_prefix: str, events: HookRecorder
) -> None:
    """stored (with what the cap trimmed), replayed, deleted and purged each notify plugins."""
    app = make_app(backend_url, key_prefix, task_always_eager=True, resilience_dlq_max_entries=1)
    dlq = DeadLetterQueue(app)

    @resilient
    @app.task(shared=False)
    def fails(n: int) -> None:
        raise ValueError(n)

    try:
        first, second = fails.delay(1), fails.delay(2)
        stores = events.of("dead_letter_stored")
        assert [(kw["entry"].task_id, kw["trimmed"]) for kw in stores] == [
            (first.id, 0),
            (second.id, 1),
        ]
        kept = only_entry(dlq, fails)
        assert stores[-1]["entry"] == kept

        dlq.replay(kept.id)  # fails again: a new entry is stored
        replayed = events.of("dead_letter_replayed")
        assert [(kw["entry"], kw["task_id"]) for kw in replayed] == [(kept, second.id)]
        again = only_entry(dlq, fails)
        dlq.delete(again.id)
        stored(dlq, fails)
        stored(dlq, fails, task_name="tasks.elsewhere")
        assert dlq.purge(task_name=fails.name) == 1
        assert dlq.purge() == 1
        removals = {"dead_letter_deleted", "dead_letters_purged"}
        assert [call for call in events.calls if call.name in removals] == [
            ("dead_letter_deleted", {"entry_id": again.id}),
            ("dead_letters_purged", {"task_name": fails.name, "count": 1}),
            ("dead_letters_purged", {"task_name": None, "count": 1}),
        ]
    finally:
        close(app)


@pytest.mark.parametrize("routed", [True, False], ids=["routed", "unrouted"])
def test_a_raw_body_is_replayed_byte_for_byte_to_the_tasks_queue(
    redis_url: str, backend_url: str, key_prefix: str, routed: bool
) -> None:
    """The replay lands in the task's queue on the real Redis broker with the stored bytes."""
    queue = f"{key_prefix}.q"
    app = make_app(
        backend_url,
        key_prefix,
        broker_url=redis_url,
        broker_transport_options={"global_keyprefix": f"{key_prefix}:broker:"},
        task_default_queue=queue,
    )

    @resilient
    @app.task(serializer="pickle", shared=False)
    def schedule(at: datetime.datetime) -> None:
        raise ValueError("no slot")

    # Run in this process. Routed: delivered as a Redis worker receives it (default
    # exchange, routing key = queue). Unrouted: as eager mode or apply() leave it, with
    # no routing in the entry, so the replay goes where apply_async would send it.
    routing = {"exchange": "", "routing_key": queue} if routed else {}
    failed = schedule.apply((datetime.datetime(2024, 1, 2),), **routing)
    dlq = DeadLetterQueue(app)
    entry = only_entry(dlq, schedule)
    assert entry.body is not None
    client = redis.Redis.from_url(redis_url)
    try:
        dlq.replay(entry.id)
        queued = client.lrange(f"{key_prefix}:broker:{queue}", 0, -1)
        assert len(queued) == 1, f"the replay is not in {queue}; entries left: {dlq.count()}"
        assert dlq.count() == 0
    finally:
        client.close()
        close(app)
    message = json.loads(queued[0])
    assert message["body"] == entry.body.data  # the Redis transport base64-encodes bodies
    assert message["properties"]["body_encoding"] == "base64"
    assert message["content-type"] == "application/x-python-serialize"
    assert message["headers"]["id"] == failed.id
    assert message["headers"]["task"] == schedule.name
    assert message["headers"]["resilience_replays"] == 1


def _corrupt(app: Celery, entry: DeadLetter, value: str) -> None:
    """Overwrite the stored document of ``entry`` in the app's Redis DLQ."""
    settings = runtime(app).settings
    client = redis.Redis.from_url(settings.dlq_url)
    client.set(f"{settings.key_prefix}:dlq:e:{entry.id}", value)
    client.close()


@pytest.mark.parametrize("backend_url", ["redis"], indirect=True)
def test_list_names_undecodable_entries_in_the_page_and_iter_logs_them(
    app: Celery, dlq: DeadLetterQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """list() skips an entry nested too deeply and names it in page.skipped; iter() logs it."""

    @app.task(shared=False)
    def job(n: int) -> None: ...

    now = time.time()
    newer, bad, older = (stored(dlq, job, last_failure_at=now - i) for i in range(3))
    _corrupt(app, bad, '{"args": ' + "[" * 50_000 + "]" * 50_000 + "}")

    page = dlq.list()

    assert [e.id for e in page.entries] == [newer.id, older.id]
    assert page.skipped == [(bad.id, f"dead letter {bad.id} cannot be decoded: nested too deeply")]
    with caplog.at_level("WARNING", logger="celery_resilience.dlq"):
        assert [e.id for e in dlq.iter()] == [newer.id, older.id]
    assert [r.getMessage() for r in caplog.records] == [
        f"celery-resilience: skipped dead letter {bad.id}: {page.skipped[0][1]}"
    ]


@pytest.mark.parametrize("backend_url", ["redis"], indirect=True)
def test_replay_all_reports_an_undecodable_entry_as_refused_and_replays_the_rest(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """replay_all: the entry that cannot be decoded is refused with why; the others run."""
    ran: list[int] = []

    @resilient
    @app.task(shared=False)
    def job(n: int) -> None:
        ran.append(n)

    good = stored(dlq, job, args=[1])
    bad = stored(dlq, job, args=[2])
    _corrupt(app, bad, "[]")

    report = dlq.replay_all(rate=1000)

    assert (report.replayed, ran) == ([good.id], [1])
    assert report.refused == {
        bad.id: f"dead letter {bad.id} cannot be decoded: a JSON list, not an object"
    }


def test_arguments_nested_too_deeply_for_an_entry_are_kept_raw(
    app: Celery, dlq: DeadLetterQueue
) -> None:
    """An argument nested 150 levels deep is kept as the serializer's bytes, and listed."""
    deep: list[Any] = []
    for _ in range(150):
        deep = [deep]

    @resilient(max_retries=0)
    @app.task(shared=False)
    def walk(tree: list[Any]) -> None:
        raise ValueError("no")

    walk.delay(deep)
    entry = only_entry(dlq, walk)
    assert (entry.args, entry.kwargs) == (None, None)
    assert entry.body is not None
    args, _kwargs, _embed = loads(
        entry.body.payload(), entry.body.content_type, entry.body.content_encoding
    )
    assert args == [deep]
