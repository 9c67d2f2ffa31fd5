"""Reliable fetch on a real Redis broker: a popped message is always restorable.

The consumer here is a kombu connection consuming with ``no_ack=False`` exactly as a
worker's consumer does; the deaths are real processes SIGKILLed right after their
fetch command ran on the server and before they read its reply, the window in which
kombu's own ``BRPOP`` loses the message (celery/celery#7950).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Consumer, Exchange, Producer, Queue
from kombu.message import Message

from celery_resilience import fetch
from celery_resilience.heartbeat import sweep
from tests.support.acl import acl_user
from tests.support.broker import LONG_AGO, Broker

pytestmark = pytest.mark.kombu


@pytest.fixture
def broker(redis_url: str, key_prefix: str) -> Iterator[Broker]:
    b = Broker(redis_url, key_prefix)
    assert fetch.install(b.channel, b.node)
    yield b
    b.close()


def test_messages_arrive_in_order_and_are_recorded_as_unacked_by_the_fetch(
    broker: Broker,
) -> None:
    broker.publish("a", "b", "c")
    messages = broker.consume(3)
    assert [m.payload for m in messages] == ["a", "b", "c"]
    tags = {m.delivery_tag for m in messages}
    assert set(broker.scores()) == tags
    for tag, raw in broker.raw.hgetall(broker.key("unacked")).items():
        payload, exchange, routing_key = json.loads(raw)  # what kombu's restore reads
        assert payload["properties"]["delivery_tag"] == tag
        assert (exchange, routing_key) == ("hbq", "hbq")
    assert not broker.raw.exists("unacked", "unacked_index", "hbq"), "unprefixed key written"
    for message in messages:
        message.ack()
    assert broker.scores() == {}
    assert broker.raw.hlen(broker.key("unacked")) == 0


def test_install_is_idempotent(broker: Broker) -> None:
    start = broker.channel._brpop_start
    assert fetch.install(broker.channel, broker.node)
    assert broker.channel._brpop_start == start
    broker.publish("once")
    assert [m.payload for m in broker.consume(1)] == ["once"]


def test_a_message_published_while_waiting_wakes_the_consumer(broker: Broker) -> None:
    broker.publish("first")
    broker.consume(1)  # now idle: the next poll waits on the queue
    with pytest.raises(TimeoutError):
        broker.connection.drain_events(timeout=1.5)
    broker.publish("second")
    assert [m.payload for m in broker.consume(2)] == ["first", "second"]


def test_every_queue_of_the_consumer_is_served(broker: Broker) -> None:
    """A second queue gets its messages although the wait blocks on the first one."""
    other = Queue("hbq2", Exchange("hbq2"), routing_key="hbq2")
    got: list[object] = []

    def on_message(body: object, message: Message) -> None:
        got.append(body)
        message.ack()

    consumer = Consumer(broker.channel, [broker.queue, other], callbacks=[on_message], no_ack=False)
    consumer.consume()
    producer = Producer(broker.channel)
    producer.publish("to-2", exchange=other.exchange, routing_key="hbq2", declare=[other])
    producer.publish(
        "to-1", exchange=broker.queue.exchange, routing_key="hbq", declare=[broker.queue]
    )
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            broker.connection.drain_events(timeout=1)
    assert sorted(got) == ["to-1", "to-2"]  # type: ignore[type-var]


def test_a_lost_script_cache_is_reloaded(broker: Broker) -> None:
    broker.publish("before")
    broker.consume(1)
    broker.raw.script_flush()  # as after a Redis restart
    broker.publish("after")
    assert [m.payload for m in broker.consume(2)] == ["before", "after"]


# Consumes with kombu as a worker does, with or without reliable fetch, but dies
# (SIGKILL) right after its fetch command ran on the server, before reading the reply.
_DIES_AFTER_FETCH = """
import os, signal, sys, time
from kombu import Connection, Consumer, Exchange, Queue
from celery_resilience import fetch
from celery_resilience.liveness.keys import Keys
from celery_resilience.liveness.node import Node

url, prefix, reliable = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
connection = Connection(url, transport_options={"global_keyprefix": prefix})
channel = connection.channel()
if reliable:
    assert fetch.install(channel, Node(Keys.of(prefix, "celery_resilience"), 1.0, "dies", []))
queue = Queue("hbq", Exchange("hbq"), routing_key="hbq")
send = channel._brpop_start

def send_then_die(timeout=None):
    send(timeout)
    time.sleep(0.5)  # the server ran the command; its reply sits unread in the socket
    os.kill(os.getpid(), signal.SIGKILL)

channel._brpop_start = send_then_die
with Consumer(channel, [queue], callbacks=[print], no_ack=False):
    connection.drain_events(timeout=5)
"""


@pytest.mark.parametrize(("reliable", "recovered"), [(False, 0), (True, 1)])
def test_a_consumer_killed_between_pop_and_reply(
    redis_url: str, key_prefix: str, reliable: bool, recovered: int
) -> None:
    """kombu's BRPOP loses the message; reliable fetch leaves it restorable: held by the
    dead node (recovered once its presence expires) and in the unacked index."""
    survivor = Broker(redis_url, key_prefix)
    try:
        fetch.install(survivor.channel, survivor.node)
        survivor.publish("in-flight")
        dead = subprocess.run(
            [
                sys.executable,
                "-c",
                _DIES_AFTER_FETCH,
                redis_url,
                survivor.prefix,
                str(int(reliable)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert dead.returncode == -9, dead.stderr
        assert survivor.raw.llen(survivor.key("hbq")) == 0  # the dead consumer popped it
        assert len(survivor.scores()) == recovered
        if not recovered:
            return  # lost: no queue, no unacked entry, nothing any sweep can restore
        (tag,) = survivor.scores()
        assert survivor.raw.smembers(survivor.keys.prefix + "held:" + dead_node(survivor)) == {tag}
        survivor.age(*survivor.scores())  # a visibility timeout passes
        sweep(survivor.channel)
        assert [m.payload for m in survivor.consume(1)] == ["in-flight"]
    finally:
        survivor.close()


def dead_node(broker: Broker) -> str:
    """The id of the one node other than ``broker``'s that registered presence."""
    (node,) = set(broker.raw.zrange(broker.keys.presence, 0, -1)) - {broker.node.id}
    return node


# -- ACL users on a private redis-server ------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which fallback reasons this process already warned about."""
    monkeypatch.setattr(fetch, "_warned", set())


def _acl_broker(acl_redis: str, key_prefix: str, user: str, *rules: str) -> Broker:
    return Broker(acl_user(acl_redis, user, "~*", "&*", *rules), key_prefix)


def test_a_user_without_info_fetches_reliably(
    acl_redis: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server check needs no INFO: ``-info`` (or ``-@dangerous``) changes nothing."""
    broker = _acl_broker(acl_redis, key_prefix, "noinfo", "+@all", "-@dangerous")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            broker.channel.client.info()
        assert fetch.install(broker.channel, broker.node)
        broker.publish("a")
        (message,) = broker.consume(1)
        assert set(broker.scores()) == {message.delivery_tag}  # recorded by the fetch
    finally:
        broker.close()
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


@pytest.mark.parametrize(
    ("refused", "command", "grant"),
    [
        ("-blmove", "BLMOVE", "+blmove"),
        ("-script|load", "SCRIPT LOAD", "+script|load"),
        ("-evalsha", "EVALSHA", "+evalsha"),
    ],
)
@pytest.mark.usefixtures("fresh_warnings")
def test_a_refused_command_leaves_kombus_fetch_with_one_warning_naming_it(
    acl_redis: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    refused: str,
    command: str,
    grant: str,
) -> None:
    """Install returns False, the channel keeps kombu's BRPOP and still gets its
    messages; one warning (also for a second channel) names the command and the grant."""
    broker = _acl_broker(acl_redis, key_prefix, "limited", "+@all", refused)
    try:
        assert fetch.install(broker.channel, broker.node) is False
        assert fetch.install(broker.connection.channel(), broker.node) is False
        assert "_brpop_start" not in vars(broker.channel)
        broker.publish("a", "b")
        assert [m.payload for m in broker.consume(2)] == ["a", "b"]
    finally:
        broker.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"the broker's ACL refuses {command} (" in warnings[0]
    assert f"grant {grant})" in warnings[0]
    assert "the worker fetches with kombu's BRPOP" in warnings[0]


@pytest.mark.usefixtures("fresh_warnings")
def test_a_command_refused_after_install_falls_back_without_losing_the_message(
    acl_redis: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL reload that takes away RPOP (run inside the fetch script) turns reliable
    fetch off on the next fetch; the message stays queued and kombu's BRPOP gets it."""
    url = acl_user(acl_redis, "changed", "~*", "&*", "+@all")
    broker = Broker(url, key_prefix)
    try:
        assert fetch.install(broker.channel, broker.node)
        acl_user(acl_redis, "changed", "~*", "&*", "+@all", "-rpop")
        broker.publish("kept")
        assert [m.payload for m in broker.consume(1)] == ["kept"]
        assert "_brpop_start" not in vars(broker.channel)
    finally:
        broker.close()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "the broker's ACL refused a command of a fetch (EVALSHA: " in warning
    assert "'rpop' command" in warning


def test_the_server_check_leaves_an_existing_unacked_index_as_it_was(
    redis_url: str, key_prefix: str
) -> None:
    """A worker restarting over unacked messages: the probe's BLMOVE on the sorted set
    fails as WRONGTYPE (so BLMOVE exists), reliable fetch is on, the index unchanged."""
    broker = Broker(redis_url, key_prefix)
    try:
        broker.raw.zadd(broker.key("unacked_index"), {"tag-of-a-dead-worker": LONG_AGO})
        assert fetch.refusal(broker.channel, broker.node) is None
        assert fetch.install(broker.channel, broker.node)
        assert broker.scores() == {"tag-of-a-dead-worker": LONG_AGO}
    finally:
        broker.close()
