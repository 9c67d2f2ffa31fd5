"""Real workers on a RabbitMQ broker, with Redis for results and coordination."""

from __future__ import annotations

import pytest

from .harness import Cluster, check_lock_exclusion

pytestmark = pytest.mark.integration


def test_tasks_on_the_same_lock_key_never_overlap_with_a_rabbitmq_broker(
    amqp_cluster: Cluster,
) -> None:
    """24 tasks over 3 lock keys on 2 RabbitMQ-fed nodes all succeed, never overlapping."""
    check_lock_exclusion(amqp_cluster, tasks=24, keys=3)
