"""Real workers whose Redis broker user is limited by an ACL, on a private redis-server.

Each cluster's broker and coordination backend are one ACL user (``acl_user``); the
results and the test's records use the server's default user. What a user of such a
broker sees: the worker starts, ``@resilient`` tasks run, and reliable fetch is on
unless the ACL refuses a command it needs, which one warning then names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.acl import acl_user

from .harness import Cluster

pytestmark = pytest.mark.integration

# The ACL rules of each cluster's broker user, besides every key and channel.
USERS = {
    "noinfo": ("+@all", "-info"),
    "noblmove": ("+@all", "-blmove"),
    "full": ("+@all",),
}
FETCH_OFF = "reliable fetch off"


@pytest.fixture(scope="module")
def clusters(
    acl_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Cluster]]:
    """One single-node cluster per user of ``USERS``."""
    logdir = tmp_path_factory.mktemp("acl-workers")
    made: dict[str, Cluster] = {}
    try:
        for user, rules in USERS.items():
            url = acl_user(acl_redis, user, "~*", "&*", *rules)
            made[user] = Cluster(
                redis_url=acl_redis, broker_url=url, resilience_url=url, logdir=logdir
            )
            made[user].start(user)
        yield made
    finally:
        for cluster in made.values():
            cluster.close()


def run_resilient_task(cluster: Cluster) -> object:
    """Run one ``@resilient`` task (a lock around its body) to its outcome; its result."""
    result = cluster.send("crt.exclusive", cluster.tag(), "k", 7)
    state = cluster.wait_for_state(result, {"SUCCESS", "FAILURE"}, "the resilient task")
    assert state == "SUCCESS", cluster.report(result)
    return result.result


def fetch_lines(cluster: Cluster, text: str) -> list[str]:
    """The worker log lines containing ``text``."""
    (worker,) = cluster.workers
    return [line for line in worker.text().splitlines() if text in line]


def test_a_broker_user_without_info_runs_resilient_tasks_with_reliable_fetch(
    clusters: dict[str, Cluster],
) -> None:
    """``-info``: no INFO is needed, so the worker starts and fetches reliably, unwarned."""
    cluster = clusters["noinfo"]
    client = redis.Redis.from_url(cluster.broker_url)
    with pytest.raises(redis.exceptions.NoPermissionError, match="'info'"):
        client.info()
    client.close()
    assert run_resilient_task(cluster) == 7
    assert fetch_lines(cluster, "reliable fetch on)"), cluster.report()
    assert fetch_lines(cluster, FETCH_OFF) == [], cluster.report()
    assert fetch_lines(cluster, "NoPermissionError") == [], cluster.report()


def test_a_broker_user_without_blmove_falls_back_to_kombus_fetch_with_one_warning(
    clusters: dict[str, Cluster],
) -> None:
    """``-blmove``: tasks still run, on kombu's BRPOP, and one warning says why."""
    cluster = clusters["noblmove"]
    assert run_resilient_task(cluster) == 7
    warnings = fetch_lines(cluster, "refuses BLMOVE")
    assert len(warnings) == 1, cluster.report()
    assert "WARNING" in warnings[0], warnings
    assert "grant +blmove" in warnings[0], warnings
    assert "the worker fetches with kombu's BRPOP" in warnings[0], warnings
    assert fetch_lines(cluster, f"{FETCH_OFF})"), cluster.report()  # the heartbeat's line


def test_a_full_permission_user_on_the_same_server_fetches_reliably(
    clusters: dict[str, Cluster],
) -> None:
    """The same server with ``+@all``: reliable fetch on, nothing warned."""
    cluster = clusters["full"]
    assert run_resilient_task(cluster) == 7
    assert fetch_lines(cluster, "reliable fetch on)"), cluster.report()
    assert fetch_lines(cluster, FETCH_OFF) == [], cluster.report()
