"""``resilience nodes``: the live nodes, what each holds, the lost nodes and the lease
holders, read from a real Redis broker.

The nodes are real :class:`~celery_resilience.liveness.node.Node` objects on kombu
consumers (``tests.support.broker``), holding real Celery task messages; a node is
lost through a real recovery by another node's sweep. The CLI runs as the real
``celery -A ... resilience nodes`` program, while a thread keeps the live nodes
renewing and sweeping as their workers would.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery

from celery_resilience.errors import BackendUnavailable, ConfigurationError
from celery_resilience.liveness.holders import ProcessPresence
from celery_resilience.liveness.keys import script
from celery_resilience.nodes import Nodes, read_nodes
from tests.cli_support import nodes_app
from tests.support.broker import Broker, adopted_nodes

pytestmark = pytest.mark.kombu

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("CELERY_RESILIENCE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
TTL = 0.5  # seconds of presence of every node here
TIMES = "\N{MULTIPLICATION SIGN}"
NOT_LIVENESS = "liveness needs a Redis broker and the visibility heartbeat on: "


@pytest.fixture
def app(redis_url: str, key_prefix: str) -> Iterator[Celery]:
    """An app whose liveness keys are those of this test's nodes."""
    made = Celery("nodes_test", set_as_current=False)
    made.conf.update(nodes_app.settings(redis_url, key_prefix, TTL))
    yield made
    made.close()


@pytest.fixture
def nodes(redis_url: str, key_prefix: str) -> Iterator[Callable[[], Broker]]:
    """Make nodes (kombu consumers adopted by a Node, fetching reliably) on queue hbq."""
    with adopted_nodes(redis_url, key_prefix, TTL) as make:
        yield make


def send(app: Celery, *names: str) -> None:
    """Publish a Celery task message of each task name to queue hbq."""
    with app.producer_or_acquire() as producer:
        for name in names:
            app.send_task(name, queue="hbq", producer=producer)


def sweep_for(node: Broker, seconds: float) -> None:
    """Renew ``node`` and run its liveness sweep every TTL/6 for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        node.node.renew(node.raw)
        node.node.sweep(node.raw, node.channel)
        time.sleep(TTL / 6)


def fresh(app: Celery, *alive: Broker) -> Nodes:
    """``read_nodes(app)`` right after the ``alive`` nodes renewed."""
    for each in alive:
        each.node.renew(each.raw)
    return read_nodes(app)


def test_each_live_node_is_listed_with_what_it_holds_by_task(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """Node name, host, pid, queues, TTL, expiry on the server's clock, and the count of
    held messages by task name."""
    busy, idle = nodes(), nodes()
    send(app, "proj.a", "proj.b", "proj.a", "proj.a")
    busy.consume(4)

    found = fresh(app, busy, idle)

    by_id = {n.id: n for n in found.live}
    assert set(by_id) == {busy.node.id, idle.node.id}
    node = by_id[busy.node.id]
    assert (node.nodename, node.hostname, node.pid) == (
        f"test@{busy.prefix[:-1]}",
        socket.gethostname(),
        os.getpid(),
    )
    assert (node.queues, node.ttl) == (["hbq"], TTL)
    assert 0 < node.expires_in <= TTL
    assert not node.expired
    assert (node.holds, node.by_task, node.capped) == (4, {"proj.a": 3, "proj.b": 1}, False)
    assert (by_id[idle.node.id].holds, by_id[idle.node.id].by_task) == (0, {})
    assert abs(found.now - float(busy.raw.time()[0])) < 2  # the server's clock
    assert (found.lost, found.holders) == ([], 0)


def test_task_names_are_counted_over_the_first_tags_only_past_the_limit(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """A node holding more than the scan limit: all are counted, the first are named."""
    node = nodes()
    send(app, *["proj.a"] * 8)
    node.consume(8)

    (shown,) = fresh(app, node).live
    assert (shown.holds, shown.scanned, shown.capped) == (8, 8, False)
    (capped,) = read_nodes(app, scan_limit=5).live
    assert (capped.holds, capped.scanned, capped.capped) == (8, 5, True)
    assert capped.by_task == {"proj.a": 5}


def test_a_message_acked_since_the_last_refresh_is_held_but_not_named(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """The held set forgets an acked message at the node's next refresh; until then it
    counts, without a task name."""
    node = nodes()
    send(app, "proj.a", "proj.b")
    first, _ = node.consume(2)
    first.ack()

    (shown,) = fresh(app, node).live
    assert (shown.holds, shown.scanned, sum(shown.by_task.values())) == (2, 2, 1)
    node.node.refresh(node.raw, *node.index())
    (shown,) = fresh(app, node).live
    assert (shown.holds, sum(shown.by_task.values())) == (1, 1)


def test_a_lost_node_is_listed_with_what_its_recovery_put_back(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """After a live node's sweep recovered it, a dead node is no longer live: it is lost,
    with its name, host, pid, when, and the messages put back per queue."""
    dead, live = nodes(), nodes()
    send(app, "proj.a", "proj.a", "proj.b")
    dead.consume(3)

    sweep_for(live, 4 * TTL)
    found = fresh(app, live)

    assert [n.id for n in found.live] == [live.node.id]
    (lost,) = found.lost
    assert (lost.node, lost.hostname, lost.pid) == (dead.node.id, socket.gethostname(), os.getpid())
    assert lost.nodename == f"test@{dead.prefix[:-1]}"
    assert lost.recovered == {"hbq": 3}
    assert lost.lost_at is not None
    assert found.now - 4 * TTL - 1 < lost.lost_at <= found.now


def test_an_expired_node_not_yet_recovered_is_still_listed_as_expired(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """Its presence lapsed and nodes sweep, but none has recovered it yet: listed, expired."""
    stopped, live = nodes(), nodes()
    deadline = time.monotonic() + 2 * TTL
    while time.monotonic() < deadline:  # sweeps that find it due, before any recovery
        live.node.renew(live.raw)
        keys = live.keys
        due = [keys.presence, keys.clock, keys.sweeper]
        script("due")(live.raw, due, [500, 16, live.node.id, 500])  # lists, recovers none
        time.sleep(TTL / 6)

    found = fresh(app, live)

    by_id = {n.id: n for n in found.live}
    assert by_id[stopped.node.id].expired
    assert by_id[stopped.node.id].expires_in < 0
    assert not by_id[live.node.id].expired
    assert found.sweeping


def test_an_expired_node_with_no_node_sweeping_is_not_said_to_be_recovered(
    app: Celery, nodes: Callable[[], Broker]
) -> None:
    """Every worker is down: nobody sweeps, so nobody recovers the expired node yet."""
    stopped = nodes()
    time.sleep(1.5 * TTL)

    found = read_nodes(app)

    assert [(n.id, n.expired) for n in found.live] == [(stopped.node.id, True)]
    assert not found.sweeping


def test_lease_holders_are_counted_while_present(app: Celery, nodes: Callable[[], Broker]) -> None:
    """A process holding leases keeps a presence: counted, not listed as a node."""
    node = nodes()
    holder = ProcessPresence(lambda: node.raw, node.keys, TTL)
    with holder.hold():
        found = fresh(app, node)
        assert found.holders == 1
        assert [n.id for n in found.live] == [node.node.id]
    sweep_for(node, 1.5 * TTL)
    assert fresh(app, node).holders == 0


@pytest.mark.parametrize(
    ("conf", "why"),
    [
        ({"broker_url": AMQP_URL}, "broker_url is 'amqp://guest:**@127.0.0.1:5672//', not Redis"),
        ({"resilience_visibility_heartbeat": False}, "resilience_visibility_heartbeat is false"),
    ],
)
def test_without_liveness_reading_is_a_configuration_error_naming_why(
    app: Celery, conf: dict[str, object], why: str
) -> None:
    app.conf.update(conf)
    with pytest.raises(ConfigurationError) as raised:
        read_nodes(app)
    assert str(raised.value).startswith(NOT_LIVENESS + why)


def test_an_unreachable_broker_is_named_without_its_password(app: Celery) -> None:
    app.conf.broker_url = "redis://:hunter2@127.0.0.1:1/0"
    app.conf.broker_transport_options = {"max_retries": 0}
    with pytest.raises(BackendUnavailable) as raised:
        read_nodes(app)
    assert str(raised.value).startswith("the broker's Redis at redis://:**@127.0.0.1:1/0 did not")
    assert "hunter2" not in str(raised.value)


# --- the command ------------------------------------------------------------------


@pytest.fixture
def cli(redis_url: str, key_prefix: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``celery -A tests.cli_support.nodes_app resilience nodes ARGS`` as a user does."""

    def run(*args: str, broker_url: str = redis_url) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "CR_"))}
        env.update(
            {
                nodes_app.BROKER_URL: broker_url,
                nodes_app.KEY_PREFIX: key_prefix,
                nodes_app.NODE_TTL: str(TTL),
                "COLUMNS": "200",
            }
        )
        command = ["-m", "celery", "-A", "tests.cli_support.nodes_app", "resilience", "nodes"]
        return subprocess.run(
            [sys.executable, *command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@contextmanager
def running(*alive: Broker) -> Iterator[None]:
    """Keep the ``alive`` nodes renewing, and the first sweeping, as their workers do."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(TTL / 6):
            for each in alive:
                each.node.renew(each.raw)
            alive[0].node.sweep(alive[0].raw, alive[0].channel)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_nodes_prints_live_nodes_lost_nodes_and_lease_holders(
    app: Celery, nodes: Callable[[], Broker], cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """A table of live nodes, one of lost nodes, then the lease holders present."""
    dead, busy = nodes(), nodes()
    send(app, "proj.c", "proj.c")
    dead.consume(2)
    sweep_for(busy, 4 * TTL)  # puts them back on hbq
    send(app, "proj.a", "proj.b", "proj.a", "proj.a")
    busy.consume(6)
    holder = ProcessPresence(lambda: busy.raw, busy.keys, TTL)

    with running(busy), holder.hold():
        result = cli()

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    nodename, host, pid = f"test@{busy.prefix[:-1]}", socket.gethostname(), os.getpid()
    header, row, blank, title, lost_header, lost_row, blank2, holders = result.stdout.splitlines()
    assert header.split() == ["NODE", "HOST", "PID", "QUEUES", "EXPIRES", "HOLDS"]
    assert re.fullmatch(
        rf"{re.escape(nodename)} +{re.escape(host)} +{pid} +hbq +in 0\.\d s +"
        rf"6 \(by task: proj\.a{TIMES}3, proj\.c{TIMES}2, proj\.b{TIMES}1\)",
        row,
    ), row
    assert (blank, title, blank2) == ("", "lost nodes, newest first:", "")
    assert lost_header.split() == ["LOST", "NODE", "HOST", "RECOVERED"]
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\) +{re.escape(nodename)} +"
        rf"{re.escape(host)} +2 \(hbq{TIMES}2\)",
        lost_row,
    ), lost_row
    assert holders == "1 lease holder process present"


def test_nodes_says_first_1000_when_a_node_holds_more(
    app: Celery, nodes: Callable[[], Broker], cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    node = nodes()
    send(app, *["proj.a"] * 1001)
    node.consume(1001)

    with running(node):
        result = cli()

    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = [line for line in result.stdout.splitlines() if "hbq" in line]
    assert row.endswith(f" 1001 (by task (first 1000): proj.a{TIMES}1000)")


def test_nodes_json_prints_every_field(
    app: Celery, nodes: Callable[[], Broker], cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    node = nodes()
    send(app, "proj.a")
    node.consume(1)

    with running(node):
        result = cli("--json")

    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"now", "live", "lost", "holders", "sweeping"}
    (shown,) = document["live"]
    assert 0 < shown.pop("expires_in") <= TTL
    assert shown == {
        "id": node.node.id,
        "nodename": f"test@{node.prefix[:-1]}",
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "queues": ["hbq"],
        "ttl": TTL,
        "expired": False,
        "holds": 1,
        "by_task": {"proj.a": 1},
        "scanned": 1,
        "capped": False,
    }
    assert (document["lost"], document["holders"], document["sweeping"]) == ([], 0, True)


def test_nodes_without_a_redis_broker_is_one_error_line(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = cli(broker_url=AMQP_URL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {NOT_LIVENESS}broker_url is 'amqp://guest:**@127.0.0.1:5672//', not Redis, "
        "so the workers keep no presence to show"
    ]
