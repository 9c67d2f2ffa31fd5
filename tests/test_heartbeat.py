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
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from celery_resilience import Backoff, resilient
from celery_resilience.heartbeat import (
    MAX_TICK,
    held_tags,
    is_redis_channel,
    refresh,
    sweep,
    tick_interval,
)
from celery_resilience.runtime import runtime
from tests.recorder import Recorder, recording

# kombu < 5.5 polls with redis-py's deprecated get_connection(command_name) under redis 6+.
pytestmark = pytest.mark.filterwarnings("ignore:Call to 'get_connection':DeprecationWarning")

VISIBILITY_TIMEOUT = 60
LONG_AGO = 1_000.0  # a score older than any visibility timeout


class Broker:
    """A kombu connection to the real Redis, every key under one ``global_keyprefix``."""

    def __init__(self, url: str, prefix: str, **options: Any) -> None:
        self.url = url
        self.options = {
            "global_keyprefix": f"{prefix}:",
            "visibility_timeout": VISIBILITY_TIMEOUT,
            **options,
        }
        self.prefix = f"{prefix}:"
        self.connection = Connection(url, transport_options=self.options)
        self.channel: Any = self.connection.channel()
        self.queue = Queue("hbq", Exchange("hbq"), routing_key="hbq")
        self.received: list[Message] = []
        self.consumer: Consumer | None = None
        self.raw: redis.Redis[str] = redis.Redis.from_url(url, decode_responses=True)

    def publish(self, *bodies: object) -> None:
        producer = Producer(self.channel)
        for body in bodies:
            producer.publish(
                body, exchange=self.queue.exchange, routing_key="hbq", declare=[self.queue]
            )

    def consume(self, count: int) -> list[Message]:
        """Receive ``count`` messages, unacked, as a worker's consumer does."""
        if self.consumer is None:
            self.consumer = Consumer(
                self.channel, [self.queue], callbacks=[self._on_message], no_ack=False
            )
            self.consumer.consume()
        while len(self.received) < count:
            self.connection.drain_events(timeout=5)
        return self.received

    def _on_message(self, body: object, message: Message) -> None:
        self.received.append(message)

    def key(self, name: str) -> str:
        """The real Redis key of kombu's key ``name``."""
        return self.prefix + name

    def scores(self, index: str = "unacked_index") -> dict[str, float]:
        return dict(self.raw.zrange(self.key(index), 0, -1, withscores=True))

    def age(self, *tags: str, index: str = "unacked_index") -> None:
        """Make ``tags`` look delivered long ago (as a restore sweep sees them)."""
        self.raw.zadd(self.key(index), dict.fromkeys(tags, LONG_AGO), xx=True)

    def close(self) -> None:
        self.channel.qos._delivered.clear()  # do not restore at close: the test decides
        self.connection.release()
        self.raw.close()


@pytest.fixture
def broker(redis_url: str, key_prefix: str) -> Iterator[Broker]:
    b = Broker(redis_url, key_prefix)
    yield b
    b.close()


def test_tick_is_a_quarter_of_the_visibility_timeout_and_at_most_30_s() -> None:
    assert tick_interval(4) == 1
    assert tick_interval(60) == 15
    assert tick_interval(3600) == MAX_TICK == 30


def test_refresh_moves_every_held_message_to_now_under_the_global_keyprefix(
    broker: Broker,
) -> None:
    """Held (delivered, unacked) messages get score 'now' in the prefixed unacked_index."""
    broker.publish(1, 2, 3)
    messages = broker.consume(3)
    tags = [m.delivery_tag for m in messages]
    assert held_tags(broker.channel.qos) == tags
    broker.age(*tags)

    before = time.time()
    assert refresh(broker.channel) == 3
    scores = broker.scores()
    assert set(scores) == set(tags)
    assert all(before <= s <= time.time() for s in scores.values()), scores
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
