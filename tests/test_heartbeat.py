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
from collections.abc import Iterator

import pytest

from celery_resilience import fetch
from celery_resilience.heartbeat import (
    MAX_SWEEP,
    MAX_TICK,
    sweep,
    sweep_interval,
    tick_interval,
)
from celery_resilience.liveness.node import adopt
from tests.support.broker import LONG_AGO, VISIBILITY_TIMEOUT, Broker

pytestmark = pytest.mark.kombu


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


def _adopted(broker: Broker) -> Broker:
    """``broker``'s channel as a worker's heartbeat leaves it: reliable fetch, held by its
    node, kombu's timing on the server's clock."""
    adopt(broker.channel, broker.node)
    assert fetch.install(broker.channel, broker.node)
    return broker


def _refresh(broker: Broker) -> int:
    return broker.node.refresh(broker.raw, *broker.index())


def _server_now(broker: Broker) -> float:
    seconds, micros = broker.raw.time()
    return seconds + micros / 1e6


def test_refresh_moves_every_held_message_to_half_a_timeout_ago_under_the_global_keyprefix(
    broker: Broker,
) -> None:
    """Held messages get score 'now - timeout/2' (the server's now) in the prefixed
    unacked_index.

    A live worker refreshes every quarter timeout, so its messages never reach the
    timeout; a dead worker's are due half a timeout after its last refresh.
    """
    _adopted(broker).publish(1, 2, 3)
    tags = [m.delivery_tag for m in broker.consume(3)]
    assert broker.raw.smembers(broker.node.held) == set(tags)
    broker.age(*tags)

    half = VISIBILITY_TIMEOUT / 2
    before = _server_now(broker)
    assert _refresh(broker) == 3
    scores = broker.scores()
    assert set(scores) == set(tags)
    assert all(before - half <= s <= _server_now(broker) - half for s in scores.values()), scores
    assert not broker.raw.exists("unacked_index"), "an unprefixed key was written"


def test_a_fetched_message_is_held_before_the_consumer_sees_it(broker: Broker) -> None:
    """A message kombu has not handed to the consumer yet (parked for want of prefetch
    credit) is in the node's held set, so it is refreshed like the others."""
    _adopted(broker).publish(1)
    broker.channel.qos._delivered.clear()  # as if kombu had not delivered it yet
    (message,) = broker.consume(1)
    broker.channel.qos._delivered.clear()
    broker.age(message.delivery_tag)
    assert _refresh(broker) == 1
    assert broker.scores()[message.delivery_tag] > LONG_AGO


def test_refresh_never_resurrects_an_acked_or_restored_message(broker: Broker) -> None:
    """ZADD XX: a tag acked here, or restored by another worker's sweep, stays out, and
    leaves the node's held set."""
    _adopted(broker).publish(1, 2, 3)
    acked, restored, held = broker.consume(3)
    acked.ack()
    broker.raw.zrem(broker.key("unacked_index"), restored.delivery_tag)  # as a sweep does

    assert _refresh(broker) == 1
    assert set(broker.scores()) == {held.delivery_tag}
    assert broker.raw.smembers(broker.node.held) == {held.delivery_tag}


def test_refresh_with_nothing_held_sends_nothing(broker: Broker) -> None:
    assert _refresh(broker) == 0
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
        _adopted(b).publish(1)
        (message,) = b.consume(1)
        assert b.raw.hexists(b.key("my_unacked"), message.delivery_tag)
        b.age(message.delivery_tag, index="my_index")
        assert _refresh(b) == 1
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
    """A plain kombu consumer (no presence) SIGKILLed holding a message: the restore sweep
    requeues it once it is a timeout old, as kombu would."""
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

    _adopted(broker).publish("ours")
    (ours,) = broker.consume(1)
    sweep(broker.channel)  # both younger than the timeout: nothing moves
    assert set(broker.scores()) == {dead_tag, ours.delivery_tag}

    broker.age(dead_tag, ours.delivery_tag)  # a timeout passes ...
    _refresh(broker)  # ... during which this consumer's heartbeat ran
    sweep(broker.channel)
    assert set(broker.scores()) == {ours.delivery_tag}
    broker.consume(2)
    assert [m.payload for m in broker.received] == ["ours", "theirs"]


def test_a_node_whose_clock_is_ahead_restores_nothing_held(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu scores and sweeps with the worker's clock: 40 s ahead under a 30 s timeout,
    its own sweep restores a message another node received a moment ago. Adopted, every
    time is the server's."""
    import kombu.transport.redis as kombu_redis

    broker = Broker(redis_url, key_prefix, visibility_timeout=30)
    try:
        broker.publish("held elsewhere")
        broker.consume(1)  # held by a plain consumer, scored just now
        ahead = time.time() + 40
        monkeypatch.setattr(kombu_redis, "time", lambda: ahead)
        broker.channel.qos.restore_visible(num=10, interval=1)  # kombu's own, 40 s ahead
        assert broker.scores() == {}, "kombu's sweep restored it: the premise of the test"

        (again,) = broker.consume(2)[1:]
        _adopted(broker)
        sweep(broker.channel)  # adopted: on the server's clock nothing is a timeout old
        assert set(broker.scores()) == {again.delivery_tag}
    finally:
        broker.close()
