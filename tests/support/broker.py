"""A kombu connection to the real Redis broker, consuming as a worker's consumer does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from celery_resilience.liveness.keys import Keys
from celery_resilience.liveness.node import Node

VISIBILITY_TIMEOUT = 60
LONG_AGO = 1_000.0  # a score older than any visibility timeout


class Broker:
    """A kombu connection to the real Redis, every key under one ``global_keyprefix``."""

    def __init__(self, url: str, prefix: str, *, node_ttl: float = 6.0, **options: Any) -> None:
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
        self.keys = Keys.of(self.prefix, "celery_resilience")
        # The node this consumer would be in a worker (fetch.install and adopt take it).
        self.node = Node(self.keys, node_ttl, f"test@{prefix}", ["hbq"])

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

    def index(self) -> tuple[str, float]:
        """The real unacked index key and half the visibility timeout (for ``refresh``)."""
        return self.key(self.options.get("unacked_index_key", "unacked_index")), float(
            self.options["visibility_timeout"]
        ) / 2

    def close(self) -> None:
        self.channel.qos._delivered.clear()  # do not restore at close: the test decides
        self.connection.release()
        self.raw.close()


@contextmanager
def adopted_nodes(url: str, prefix: str, ttl: float) -> Iterator[Callable[[], Broker]]:
    """Make nodes as a worker's heartbeat leaves its consumer (adopted by a ``Node``,
    fetching reliably, presence registered) on queue ``hbq``; all closed afterwards."""
    from celery_resilience import fetch
    from celery_resilience.liveness.node import adopt

    made: list[Broker] = []

    def make() -> Broker:
        broker = Broker(url, prefix, node_ttl=ttl)
        adopt(broker.channel, broker.node)
        assert fetch.install(broker.channel, broker.node)
        broker.node.renew(broker.raw)
        made.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in made:
            broker.close()
