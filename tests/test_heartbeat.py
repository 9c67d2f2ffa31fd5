"""The visibility heartbeat's refresh and sweep, on a real Redis broker without a worker.

A kombu connection consumes messages with ``no_ack=False`` exactly as a worker's
consumer does, so they enter kombu's ``unacked`` hash and ``unacked_index``; the tests
then run the heartbeat's functions on that channel and read the keys back. Whole
workers (prefork, solo, SIGKILLed nodes) are in tests/integration/test_heartbeat.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from celery_resilience import Backoff, resilient
from celery_resilience.heartbeat import (
    MAX_SWEEP,
    MAX_TICK,
    held_tags,
    is_redis_channel,
    refresh,
    sweep,
    sweep_interval,
    tick_interval,
)
from celery_resilience.runtime import runtime
from tests.recorder import Recorder, recording
from tests.support.broker import LONG_AGO, VISIBILITY_TIMEOUT, Broker

# kombu < 5.5 polls with redis-py's deprecated get_connection(command_name) under redis 6+.
pytestmark = pytest.mark.filterwarnings("ignore:Call to 'get_connection':DeprecationWarning")


@pytest.fixture
def broker(redis_url: str, key_prefix: str) -> Iterator[Broker]:
    b = Broker(redis_url, key_prefix)
    yield b
    b.close()


def test_tick_is_a_quarter_of_the_visibility_timeout_and_at_most_30_s() -> None:
    assert tick_interval(4) == 1
    assert tick_interval(60) == 15
    assert tick_interval(3600) == MAX_TICK == 30


def test_the_sweep_runs_every_twentieth_of_the_timeout_and_at_least_every_2_s() -> None:
    assert sweep_interval(4) == pytest.approx(0.2)
    assert sweep_interval(30) == 1.5
    assert sweep_interval(3600) == MAX_SWEEP == 2


def test_refresh_moves_every_held_message_to_half_a_timeout_ago_under_the_global_keyprefix(
    broker: Broker,
) -> None:
    """Held messages get score 'now - timeout/2' in the prefixed unacked_index.

    A live worker refreshes every quarter timeout, so its messages never reach the
    timeout; a dead worker's are due half a timeout after its last refresh.
    """
    broker.publish(1, 2, 3)
    messages = broker.consume(3)
    tags = [m.delivery_tag for m in messages]
    assert held_tags(broker.channel.qos) == tags
    broker.age(*tags)

    half = VISIBILITY_TIMEOUT / 2
    before = time.time()
    assert refresh(broker.channel) == 3
    scores = broker.scores()
    assert set(scores) == set(tags)
    assert all(before - half <= s <= time.time() - half for s in scores.values()), scores
    assert not broker.raw.exists("unacked_index"), "an unprefixed key was written"


def test_refresh_never_resurrects_an_acked_or_restored_message(broker: Broker) -> None:
    """ZADD XX: a tag acked here, or restored by another worker's sweep, stays out."""
    broker.publish(1, 2, 3)
    acked, restored, held = broker.consume(3)
    acked.ack()
    broker.raw.zrem(broker.key("unacked_index"), restored.delivery_tag)  # as a sweep does

    assert refresh(broker.channel) == 2  # held and restored: this worker still holds both
    assert set(broker.scores()) == {held.delivery_tag}


def test_refresh_with_nothing_held_sends_nothing(broker: Broker) -> None:
    assert refresh(broker.channel) == 0
    assert broker.scores() == {}


def test_custom_unacked_keys_are_used(redis_url: str, key_prefix: str) -> None:
    """unacked_key / unacked_index_key / unacked_mutex_key transport options are honoured."""
    b = Broker(
        redis_url,
        key_prefix,
        unacked_key="my_unacked",
        unacked_index_key="my_index",
        unacked_mutex_key="my_mutex",
    )
    try:
        b.publish(1)
        (message,) = b.consume(1)
        b.age(message.delivery_tag, index="my_index")
        assert refresh(b.channel) == 1
        assert b.scores("my_index")[message.delivery_tag] > LONG_AGO
        assert not b.raw.exists(b.key("unacked_index"))

        b.age(message.delivery_tag, index="my_index")
        sweep(b.channel)  # the message was not refreshed for a timeout: back to its queue
        assert b.scores("my_index") == {}
        assert b.raw.hlen(b.key("my_unacked")) == 0
        assert b.raw.llen(b.key("hbq")) == 1
    finally:
        b.close()


_DIES_HOLDING = """
import os, signal, sys
from kombu import Connection, Consumer, Exchange, Queue
url, prefix, timeout = sys.argv[1:]
options = {"global_keyprefix": prefix, "visibility_timeout": int(timeout)}
with Connection(url, transport_options=options) as connection:
    queue = Queue("hbq", Exchange("hbq"), routing_key="hbq")
    def on_message(body, message):
        print(message.delivery_tag, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    with Consumer(connection, [queue], callbacks=[on_message], no_ack=False):
        connection.drain_events(timeout=5)
"""


def test_sweep_restores_a_dead_consumers_message_and_keeps_the_held_ones(broker: Broker) -> None:
    """A process SIGKILLed holding a message: the sweep requeues it once it is a timeout old."""
    broker.publish("theirs")
    dead = subprocess.run(
        [sys.executable, "-c", _DIES_HOLDING, broker.url, broker.prefix, str(VISIBILITY_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dead.returncode == -9, dead.stderr
    dead_tag = dead.stdout.strip()
    assert set(broker.scores()) == {dead_tag}

    broker.publish("ours")
    (ours,) = broker.consume(1)
    sweep(broker.channel)  # both younger than the timeout: nothing moves
    assert set(broker.scores()) == {dead_tag, ours.delivery_tag}

    broker.age(dead_tag, ours.delivery_tag)  # a timeout passes ...
    refresh(broker.channel)  # ... during which this consumer's heartbeat ran
    sweep(broker.channel)
    assert set(broker.scores()) == {ours.delivery_tag}
    broker.consume(2)
    assert [m.payload for m in broker.received] == ["ours", "theirs"]


def test_only_a_redis_channel_with_ack_emulation_has_a_heartbeat(
    redis_url: str, key_prefix: str
) -> None:
    with Connection("memory://") as memory:
        assert not is_redis_channel(memory.default_channel)
    without_acks = Broker(redis_url, key_prefix, ack_emulation=False)
    try:
        assert not is_redis_channel(without_acks.channel)
    finally:
        without_acks.close()
    with_acks = Broker(redis_url, key_prefix)
    try:
        assert is_redis_channel(with_acks.channel)
    finally:
        with_acks.close()


def _app(**conf: Any) -> Celery:
    app = Celery(f"t{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        broker_transport_options={"visibility_timeout": 10},
        resilience_url="memory://",
        **conf,
    )
    return app


@pytest.mark.parametrize(
    ("conf", "cap"),
    [
        ({"broker_url": "redis://h/0"}, None),  # heartbeat on by default: no cap
        ({"broker_url": "redis://h/0", "resilience_visibility_heartbeat": True}, None),
        ({"broker_url": "redis://h/0", "resilience_visibility_heartbeat": False}, 5.0),
        ({"broker_url": "sentinel://h:26379", "resilience_visibility_heartbeat": False}, 5.0),
        ({"broker_url": "amqp://h//", "resilience_visibility_heartbeat": False}, None),
    ],
)
def test_countdowns_are_capped_only_with_a_redis_broker_and_the_heartbeat_off(
    conf: dict[str, Any], cap: float | None
) -> None:
    rt = runtime(_app(**conf))
    assert rt.countdown_cap == cap
    assert rt.cap_countdown(600) == (600 if cap is None else cap)


@pytest.mark.parametrize(("heartbeat", "countdown"), [(None, 60.0), (False, 5.0)])
def test_a_retry_waits_its_whole_backoff_unless_the_heartbeat_is_off(
    heartbeat: bool | None, countdown: float
) -> None:
    """Through the gate: a 60 s backoff under a 10 s visibility timeout."""
    app = _app(
        task_always_eager=True,
        broker_url="redis://127.0.0.1:6379/0",
        resilience_visibility_heartbeat=heartbeat,
    )

    @resilient(max_retries=1, retry_on=(ValueError,), backoff=Backoff(base=60, jitter="none"))
    @app.task(shared=False)
    def slow_retry() -> None:
        raise ValueError("again")

    recorder: Recorder
    with recording() as recorder, pytest.raises(ValueError, match="again"):
        slow_retry.delay().get()
    assert [r["countdown"] for r in recorder.of("retry_scheduled")] == [countdown]
