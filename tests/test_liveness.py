"""Liveness on a real Redis broker, without workers: presence, recovery, lease holders.

Each node is a kombu connection consuming as a worker's consumer does, adopted by a
:class:`~celery_resilience.liveness.node.Node` (reliable fetch, held set, server
clock). A node "dies" by no longer renewing; its presence TTL is short (0.5 s) so the
tests wait little. Whole workers SIGKILLed on other host names are in
tests/integration/test_liveness_recovery.py and the chaos suite.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Consumer, Exchange, Producer, Queue

from celery_resilience.leases import new_owner, presence_of
from celery_resilience.liveness.holders import ProcessPresence
from celery_resilience.liveness.recovery import Recovered, hand_back, recover
from tests.support.broker import Broker, adopted_nodes

pytestmark = pytest.mark.kombu

TTL = 0.5  # seconds of presence of every node here


@pytest.fixture
def nodes(redis_url: str, key_prefix: str) -> Iterator[Callable[[], Broker]]:
    """Make adopted nodes (kombu consumers) on one queue; all closed afterwards."""
    with adopted_nodes(redis_url, key_prefix, TTL) as make:
        yield make


def sweep_for(node: Broker, seconds: float, *alive: Broker) -> list[Recovered]:
    """Every TTL/6 for ``seconds``: renew the presence of ``node`` and of the ``alive``
    nodes, and run the liveness sweep of each (only the one holding the sweeper lease
    sweeps: any of them may have taken it when it came free)."""
    lost: list[Recovered] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for each in (node, *alive):
            each.node.renew(each.raw)
        for each in (node, *alive):
            lost += each.node.sweep(each.raw, each.channel)
        time.sleep(TTL / 6)
    return lost


def queued(broker: Broker) -> list[dict[str, Any]]:
    return [json.loads(m) for m in broker.raw.lrange(broker.key("hbq"), 0, -1)]


def test_a_dead_nodes_messages_go_back_to_their_queue_once(nodes: Callable[[], Broker]) -> None:
    """Once its presence expires, every message the dead node held is queued again,
    marked redelivered, out of kombu's unacked keys, and the node is recorded as lost."""
    dead, live = nodes(), nodes()
    dead.publish(1, 2, 3)
    tags = {m.delivery_tag for m in dead.consume(3)}

    lost = sweep_for(live, 4 * TTL)

    assert [(r.node, dict(r.queues)) for r in lost] == [(dead.node.id, {"hbq": 3})]
    back = queued(live)
    assert {m["properties"]["delivery_tag"] for m in back} == tags
    assert all(m["headers"]["redelivered"] for m in back)
    assert live.raw.hlen(live.key("unacked")) == 0
    assert live.scores() == {}
    assert not live.raw.exists(dead.node.held)
    assert dead.node.id not in live.raw.zrange(live.keys.presence, 0, -1)
    (record,) = [json.loads(r) for r in live.raw.lrange(live.keys.lost, 0, -1)]
    assert record["node"] == dead.node.id
    assert record["nodename"] == json.loads(dead.node.info)["nodename"]
    assert record["recovered"] == {"hbq": 3}


def test_recovery_returns_each_message_to_its_own_queue_and_priority(
    nodes: Callable[[], Broker],
) -> None:
    """A dead node consuming two queues, with messages of several priorities: each one
    goes back to the very list kombu had published it to (queue and priority step)."""
    dead, live = nodes(), nodes()
    second = Queue("hbq2", Exchange("hbq2"), routing_key="hbq2")
    producer = Producer(dead.channel)
    for body, queue, priority in [("low", dead.queue, 0), ("high", dead.queue, 9),
                                  ("mid", second, 5), ("other", second, 0)]:  # fmt: skip
        producer.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key,
            declare=[queue], priority=priority,
        )  # fmt: skip
    published = lists_of(dead)
    assert len(published) == 4  # one list per (queue, priority step)
    dead.consumer = Consumer(
        dead.channel, [dead.queue, second], callbacks=[dead._on_message], no_ack=False
    )
    dead.consumer.consume()
    dead.consume(4)
    assert lists_of(dead) == {}

    (recovered,) = sweep_for(live, 4 * TTL)

    assert dict(recovered.queues) == {"hbq": 2, "hbq2": 2}
    assert lists_of(live) == published


def lists_of(broker: Broker) -> dict[str, list[str]]:
    """Every queue list of ``broker``'s two queues: key -> the bodies in it."""
    lists = {}
    for key in broker.raw.scan_iter(f"{broker.prefix}hbq*"):
        if broker.raw.type(key) == "list":
            lists[key] = [json.loads(m)["body"] for m in broker.raw.lrange(key, 0, -1)]
    return lists


def test_a_live_node_keeps_what_it_holds(nodes: Callable[[], Broker]) -> None:
    """A node that keeps renewing is never recovered, however long it holds a message."""
    holder, sweeper = nodes(), nodes()
    holder.publish("mine")
    holder.consume(1)
    assert sweep_for(sweeper, 6 * TTL, holder) == []
    assert queued(sweeper) == []
    assert len(sweeper.scores()) == 1


def test_a_warm_shutdown_hands_back_what_no_pool_child_started(
    nodes: Callable[[], Broker],
) -> None:
    """The hand-back queues the unstarted messages again at once, under new delivery
    tags, and leaves the one a child marked started; a child that gets a handed-back
    delivery later does not run it, and the copies run wherever they are fetched."""
    node, other = nodes(), nodes()
    node.publish(1, 2, 3)
    running, *unstarted = [m.delivery_tag for m in node.consume(3)]
    child = ProcessPresence(lambda: node.raw, node.keys, TTL)
    assert child.starts(running)

    queues = hand_back(node.channel, node.raw, node.keys, node.node.id, [running, *unstarted])

    assert queues == {"hbq": 2}
    copies = {m["properties"]["delivery_tag"] for m in queued(node)}
    assert len(copies) == 2
    assert copies.isdisjoint([running, *unstarted])
    assert set(node.raw.hkeys(node.key("unacked"))) == {running}
    assert node.raw.smembers(node.node.held) == {running}
    assert [child.starts(tag) for tag in unstarted] == [False, False]
    assert child.starts(running)
    assert hand_back(node.channel, node.raw, node.keys, node.node.id, unstarted) == {}
    assert {m.delivery_tag for m in other.consume(2)} == copies
    assert all(child.starts(tag) for tag in copies)


def test_one_node_sweeps_for_the_fleet_and_another_takes_over_when_it_dies(
    nodes: Callable[[], Broker],
) -> None:
    """Of three live nodes only the one holding the sweeper lease sweeps; the others'
    sweeps do nothing. When the sweeper dies, a renewal of another node takes the lease
    and that node recovers the dead sweeper's messages."""
    fleet = [nodes() for _ in range(3)]
    for each in fleet:  # within the lease's TTL (TTL / 3): one of them holds it
        each.node.renew(each.raw)
    (sweeper,) = [b for b in fleet if b.node.sweeper]
    second, third = [b for b in fleet if b is not sweeper]
    assert sweeper.raw.get(sweeper.keys.sweeper) == sweeper.node.id
    sweeper.publish("held by the sweeper")
    sweeper.consume(1)
    sweeper.node.renew(sweeper.raw)
    for other in (second, third):
        assert other.node.sweep(other.raw, other.channel) == []
        assert not other.node.sweeper

    lost = sweep_for(second, 5 * TTL, third)  # the sweeper stops renewing and sweeping

    assert [r.node for r in lost] == [sweeper.node.id]
    assert second.node.sweeper != third.node.sweeper  # one of them took the lease
    assert [_body(m) for m in queued(second)] == ["held by the sweeper"]


def test_a_sweeper_that_leaves_frees_the_lease_for_the_next_renewal(
    nodes: Callable[[], Broker],
) -> None:
    sweeper, other = nodes(), nodes()
    assert sweeper.node.leave(sweeper.raw, *sweeper.index())
    assert not sweeper.raw.exists(sweeper.keys.sweeper)
    other.node.renew(other.raw)
    assert other.node.sweeper


def test_no_node_is_presumed_dead_after_a_quiet_server_when_a_renewal_comes_first(
    nodes: Callable[[], Broker],
) -> None:
    """The first call after the server was away may be any node's renewal: it gives every
    lease one more TTL too, so the sweep after it presumes nobody dead."""
    paused, live = nodes(), nodes()
    paused.publish("kept")
    paused.consume(1)
    live.raw.set(live.keys.clock, 0)
    time.sleep(TTL * 1.5)
    live.node.renew(live.raw)
    assert live.node.sweep(live.raw, live.channel) == []
    assert sweep_for(live, 4 * TTL, paused) == []
    assert queued(live) == []


def test_a_consumer_without_presence_is_left_to_kombu(
    redis_url: str, key_prefix: str, nodes: Callable[[], Broker]
) -> None:
    """Mixed fleet: a plain kombu consumer's message is never recovered by liveness."""
    plain = Broker(redis_url, key_prefix)
    try:
        plain.publish("plain")
        (message,) = plain.consume(1)
        assert sweep_for(nodes(), 6 * TTL) == []
        assert set(plain.scores()) == {message.delivery_tag}
        assert plain.raw.llen(plain.key("hbq")) == 0
    finally:
        plain.close()


def test_concurrent_sweepers_restore_each_message_once(nodes: Callable[[], Broker]) -> None:
    """Three live nodes recover a dead one holding 1,200 messages at the same moment (as
    two sweepers do when one stalled past its sweeper lease and another took it), while
    kombu's own restore sweep runs on the same messages: each is queued once."""
    dead = nodes()
    sweepers = [nodes() for _ in range(3)]
    dead.publish(*range(1200))
    dead.consume(1200)
    deadline = time.monotonic() + TTL * 1.5
    while time.monotonic() < deadline:  # the dead node expires while the others renew
        for s in sweepers:
            s.node.renew(s.raw)
        time.sleep(TTL / 6)
    dead.age(*dead.scores())  # kombu's visibility sweep finds them all due, too
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(target: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                results.append(target())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=body)
        thread.start()
        return thread

    def recovery(s: Broker) -> Recovered:
        return recover(s.channel, s.raw, s.keys, s.node.id, dead.node.id, TTL)

    threads = [run(lambda s=s: recovery(s)) for s in sweepers]
    threads.append(run(lambda: [dead.channel.qos.restore_visible(num=2000, interval=1)]))
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    sweep_for(sweepers[0], 2 * TTL)  # whatever the first pass left

    bodies = sorted(json.loads(_body(m)) for m in queued(dead))
    assert bodies == list(range(1200))
    assert dead.raw.hlen(dead.key("unacked")) == 0


def _body(message: dict[str, Any]) -> str:
    import base64

    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        return base64.b64decode(body).decode()
    return str(body)


def test_no_node_is_presumed_dead_after_the_server_was_away(nodes: Callable[[], Broker]) -> None:
    """When no node swept for longer than a TTL (the server was stopped or unreachable),
    nobody could renew: the next sweep gives every node one more TTL instead."""
    paused, live = nodes(), nodes()
    paused.publish("kept")
    paused.consume(1)
    live.raw.set(live.keys.clock, 0)  # the last sweep was long ago
    time.sleep(TTL * 1.5)  # ... and every presence expired meanwhile
    assert live.node.sweep(live.raw, live.channel) == []
    assert sweep_for(live, 4 * TTL, paused) == []  # back within the TTL it was given
    assert queued(live) == []


def test_a_node_presumed_dead_says_so_when_it_renews(
    nodes: Callable[[], Broker], caplog: pytest.LogCaptureFixture
) -> None:
    stalled, live = nodes(), nodes()
    stalled.publish("taken")
    stalled.consume(1)
    assert len(sweep_for(live, 4 * TTL)) == 1
    stalled.node.renew(stalled.raw)
    assert "other nodes took back the messages it held" in caplog.text


def test_a_lease_holder_is_gone_once_its_presence_expired(
    nodes: Callable[[], Broker], key_prefix: str
) -> None:
    """While a process holds leases it is present; after it stops, its presence lapses
    and a live node's sweeps make that provable."""
    live = nodes()
    holder = ProcessPresence(lambda: live.raw, live.keys, TTL)
    checker = ProcessPresence(lambda: live.raw, live.keys, TTL)
    with holder.hold() as presence_id:
        assert presence_id == holder.id
        sweep_for(live, 3 * TTL)  # the holder's thread renews meanwhile
        assert not checker.gone(holder.id)
    sweep_for(live, 3 * TTL)
    assert checker.gone(holder.id)


def test_a_holder_is_not_presumed_gone_without_recent_sweeps(nodes: Callable[[], Broker]) -> None:
    live = nodes()
    holder = ProcessPresence(lambda: live.raw, live.keys, TTL)
    with holder.hold():
        pass
    time.sleep(TTL * 1.5)
    live.raw.set(live.keys.clock, 0)  # nobody swept for long: the server may have been away
    assert not holder.gone(holder.id)


def test_an_unreachable_broker_never_makes_a_holder_gone(key_prefix: str) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from celery_resilience.liveness.keys import Keys

    client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    presence = ProcessPresence(lambda: client, Keys.of(None, key_prefix), TTL)
    with presence.hold() as presence_id:
        assert presence_id is None  # not written: owners carry no presence id
    assert not presence.gone("proc/elsewhere/1/abcd")


def test_owners_carry_the_presence_of_their_process() -> None:
    owner = new_owner("celery@a", "task-1", "proc/a/12/beef")
    assert presence_of(owner) == "proc/a/12/beef"
    assert presence_of(new_owner("celery@a", "task-1")) is None
    assert presence_of("host|1|2|celery@a|task-1|beef") is None  # an older owner
