"""dedup= with real workers on a Redis broker: what runs, what is published, what a kill does.

Bodies record their starts (task id and pid) in Redis and wait for the test's go-ahead,
so a test decides when a task is queued, running or done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from celery import chain, group
from celery.result import AsyncResult

from celery_resilience import dedup
from tests.support import workers

from . import app as app_module
from .harness import Cluster, wait_until
from .heartbeat_cluster import on_host

pytestmark = pytest.mark.integration

TIMEOUT_S = 30


def started_ids(cluster: Cluster, tag: str) -> list[str]:
    """The task id of each body start of test ``tag``, in order."""
    return [start.split()[0] for start in cluster.starts(tag)]


def finish(cluster: Cluster, tag: str, *results: AsyncResult) -> None:
    """Let one body of ``tag`` go per result and wait for each result."""
    for result in results:
        cluster.release(tag)
        assert result.get(timeout=TIMEOUT_S) == result.id


def runs_anew(cluster: Cluster, task: Any, tag: str, previous: AsyncResult, count: int) -> str:
    """A call now publishes a new task, not ``previous``, whose body is the ``count``-th
    start of ``tag``; let it end and return its id."""
    after = task.delay(tag)
    assert after.id != previous.id
    cluster.wait_for_starts(tag, count, after)
    finish(cluster, tag, after)
    return str(after.id)


def test_calls_while_one_is_queued_run_one_body(integration_redis_url: str, tmp_path: Path) -> None:
    """50 identical .delay() calls before any worker runs: 1 message, 1 task id, 1 body."""
    cluster = Cluster(redis_url=integration_redis_url, logdir=tmp_path)
    try:
        tag = cluster.tag()
        task = cluster.app.tasks["crt.dedup_until_start"]
        results = [task.delay(tag) for _ in range(50)]
        assert {r.id for r in results} == {results[0].id}
        assert cluster.redis.llen(cluster.broker_key(cluster.queue)) == 1
        cluster.start("dedup1")
        cluster.release(tag)
        assert [r.get(timeout=TIMEOUT_S) for r in results] == [results[0].id] * 50
        assert started_ids(cluster, tag) == [results[0].id]
    finally:
        cluster.close()


@pytest.mark.parametrize("name", ["crt.dedup_until_start", "crt.dedup_until_finish"])
def test_a_purged_holder_does_not_block(
    integration_redis_url: str, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queued holder's message is purged: a call made a recheck interval later
    publishes at once (not after dedup_ttl), and only that task's body runs."""
    monkeypatch.setattr(dedup, "RECHECK", 1.0)
    cluster = Cluster(redis_url=integration_redis_url, logdir=tmp_path)
    try:
        tag = cluster.tag()
        task = cluster.app.tasks[name]
        first = task.delay(tag)
        assert task.delay(tag).id == first.id  # queued: collapsed, and first seen now
        cluster.redis.delete(cluster.broker_key(cluster.queue))  # what `celery purge` does
        time.sleep(1.2)
        after = task.delay(tag)
        assert after.id != first.id
        assert task.delay(tag).id == after.id  # the new holder is queued: collapsed
        assert cluster.redis.llen(cluster.broker_key(cluster.queue)) == 1
        cluster.start("dedup1")
        finish(cluster, tag, after)
        assert started_ids(cluster, tag) == [after.id]
    finally:
        cluster.close()


def test_a_running_holder_keeps_its_key_past_the_recheck(
    redis_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "finish": a running task's message is unacked, not queued: calls made after
    several recheck intervals still collapse into it."""
    monkeypatch.setattr(dedup, "RECHECK", 0.3)
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_until_finish"]
    first = task.delay(tag)
    redis_cluster.wait_for_starts(tag, 1, first)
    calls = set()
    for _ in range(5):
        calls |= {task.delay(tag).id for _ in range(3)}
        time.sleep(0.35)
    assert calls == {first.id}
    finish(redis_cluster, tag, first)
    assert started_ids(redis_cluster, tag) == [first.id]


def test_start_mode_calls_while_it_runs_make_one_more_run(redis_cluster: Cluster) -> None:
    """ "start": once the queued task runs, the next call publishes; with lock= on the
    same key that one waits queued, so 20 calls during the run make exactly one more."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.coalesces"]
    first = task.delay(tag)
    redis_cluster.wait_for_starts(tag, 1, first)
    during = {task.delay(tag).id for _ in range(20)}
    assert len(during) == 1
    assert first.id not in during
    finish(redis_cluster, tag, first)
    (second,) = [redis_cluster.result(tid) for tid in during]
    redis_cluster.wait_for_starts(tag, 2, second)
    finish(redis_cluster, tag, second)
    assert started_ids(redis_cluster, tag) == [first.id, second.id]


def test_finish_mode_publishes_nothing_until_the_task_is_done(redis_cluster: Cluster) -> None:
    """ "finish": calls while the task runs return it; once it succeeded, a call runs anew."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_until_finish"]
    first = task.delay(tag)
    redis_cluster.wait_for_starts(tag, 1, first)
    assert {task.delay(tag).id for _ in range(20)} == {first.id}
    finish(redis_cluster, tag, first)
    after = runs_anew(redis_cluster, task, tag, first, 2)
    assert started_ids(redis_cluster, tag) == [first.id, after]


def test_killed_worker_keeps_the_key_for_the_redelivery(redis_cluster: Cluster) -> None:
    """A pool child SIGKILLed while its "finish" task runs: the redelivery of the same
    task id keeps the key, and once it is done a new call publishes at once."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_until_finish"]
    first = task.delay(tag)
    (start,) = redis_cluster.wait_for_starts(tag, 1, first)
    os.kill(int(start.split()[1]), signal.SIGKILL)
    redis_cluster.wait_for_starts(tag, 2, first)
    assert {task.delay(tag).id for _ in range(10)} == {first.id}
    finish(redis_cluster, tag, first)
    after = runs_anew(redis_cluster, task, tag, first, 3)
    assert started_ids(redis_cluster, tag) == [first.id, first.id, after]


def test_killed_node_on_another_host_keeps_the_key_for_the_redelivery(
    integration_redis_url: str, tmp_path: Path
) -> None:
    """A whole node SIGKILLed under its own host name while its "finish" task runs: the
    task comes back on another node by liveness with the same task id, calls made
    meanwhile collapse into it, and once it is done a call publishes at once."""
    cluster = Cluster(redis_url=integration_redis_url, logdir=tmp_path)
    try:
        tag = cluster.tag()
        task = cluster.app.tasks["crt.dedup_until_finish"]
        (victim,) = cluster.start("victim", wrap=on_host("pod-dedup-victim"))
        first = task.delay(tag)
        cluster.wait_for_starts(tag, 1, first)
        victim.kill()
        assert {task.delay(tag).id for _ in range(10)} == {first.id}
        cluster.start("rescuer")
        cluster.wait_for_starts(tag, 2, first)
        assert {task.delay(tag).id for _ in range(10)} == {first.id}
        finish(cluster, tag, first)
        after = runs_anew(cluster, task, tag, first, 3)
        assert started_ids(cluster, tag) == [first.id, first.id, after]
    finally:
        cluster.close()


def test_group_and_chain_members_follow_the_running_task(redis_cluster: Cluster) -> None:
    """A group of 3 identical calls and a chain ending in one, while a "finish" task
    runs: no body of theirs runs, and their results are the running task's value."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_until_finish"]
    first = task.delay(tag)
    redis_cluster.wait_for_starts(tag, 1, first)
    members = group(task.s(tag) for _ in range(3)).apply_async()
    before = redis_cluster.app.tasks["crt.records_its_body"].si(redis_cluster.tag(), 0)
    steps = chain(before, task.si(tag)).apply_async()  # the worker publishes the 2nd step
    steps.parent.get(timeout=TIMEOUT_S)
    wait_until(
        lambda: redis_cluster.received("crt.dedup_until_finish", steps.id),
        "the chain's second step, published while the first task runs",
        redis_cluster.report,
        TIMEOUT_S,
    )
    finish(redis_cluster, tag, first)
    assert members.get(timeout=TIMEOUT_S) == [first.id] * 3
    assert steps.get(timeout=TIMEOUT_S) == first.id
    assert started_ids(redis_cluster, tag) == [first.id]


def test_dead_lettered_task_frees_its_key(redis_cluster: Cluster) -> None:
    """A "finish" task that gives up is kept in the DLQ and, once it has failed (a call
    made before then shares its outcome), its key is free again."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_fails"]
    first = task.delay(tag)
    with pytest.raises(ValueError, match="invalid input"):
        first.get(timeout=TIMEOUT_S)
    assert [entry.reason for entry in redis_cluster.dead_letters(first.id)] == ["error"]
    second = task.delay(tag)
    assert second.id != first.id
    redis_cluster.wait_for_starts(tag, 2, second)


def test_expired_task_frees_its_key(redis_cluster: Cluster) -> None:
    """A task that expired before its countdown ran out is discarded by the worker
    (revoked, expired), which frees its key: the next call publishes at once."""
    tag = redis_cluster.tag()
    task = redis_cluster.app.tasks["crt.dedup_until_finish"]
    first = task.apply_async((tag,), countdown=2, expires=1)
    assert task.delay(tag).id == first.id
    wait_until(
        lambda: first.state == "REVOKED",
        "the expired task to be discarded",
        redis_cluster.report,
        TIMEOUT_S,
    )
    after = runs_anew(redis_cluster, task, tag, first, 1)
    assert started_ids(redis_cluster, tag) == [after]


PRODUCER = textwrap.dedent(
    """
    import json, os, sys, time
    import redis
    from tests.integration.app import RECORD_URL, app
    tag, queue, go = sys.argv[1], sys.argv[2], sys.argv[3]
    task = app.tasks["crt.dedup_until_start"]
    client = redis.Redis.from_url(os.environ[RECORD_URL])
    while not client.exists(go):
        time.sleep(0.001)
    ids = [(n % 10, task.apply_async((tag, n % 10), queue=queue).id) for n in range(500)]
    print(json.dumps(ids))
    """
)


def test_racing_producers_publish_one_message_per_key(redis_cluster: Cluster) -> None:
    """2 producer processes x 500 calls on 10 keys, to a queue no worker reads: exactly one
    message per key, and every call of a key got that message's id."""
    tag = redis_cluster.tag()
    queue, go = f"{redis_cluster.queue}.race.{tag}", redis_cluster.records.key(tag, "go")
    env = workers.command_environment(app_module, redis_cluster.env)
    producers = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, tag, queue, go],
            env=env,
            cwd=workers.import_root(app_module),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        redis_cluster.redis.set(go, "1")
        outputs = [p.communicate(timeout=120)[0] for p in producers]
    finally:
        for p in producers:
            p.kill()
    assert [p.returncode for p in producers] == [0, 0]
    calls = [call for out in outputs for call in json.loads(out)]
    ids_by_key: dict[int, set[str]] = {}
    for key, task_id in calls:
        ids_by_key.setdefault(key, set()).add(task_id)
    assert len(calls) == 1000
    assert {key: len(ids) for key, ids in ids_by_key.items()} == dict.fromkeys(range(10), 1)
    messages = redis_cluster.redis.lrange(redis_cluster.broker_key(queue), 0, -1)
    published = sorted(json.loads(m)["headers"]["id"] for m in messages)
    assert published == sorted(ids.pop() for ids in ids_by_key.values())
