"""The Celery app ``tests/test_nodes.py`` runs ``celery -A tests.cli_support.nodes_app
resilience nodes`` on.

Its keys are laid out as :class:`tests.support.broker.Broker` lays them out (kombu's
``global_keyprefix`` ``{prefix}:``, ours under the default ``celery_resilience``), so
the nodes a test makes there are the nodes the command reads. Configured from the
environment: ``CR_NODES_BROKER_URL``, ``CR_NODES_KEY_PREFIX``, ``CR_NODES_NODE_TTL``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tests.support.services import REDIS_URL as TEST_REDIS_URL

BROKER_URL = "CR_NODES_BROKER_URL"
KEY_PREFIX = "CR_NODES_KEY_PREFIX"
NODE_TTL = "CR_NODES_NODE_TTL"


def settings(broker_url: str, prefix: str, node_ttl: float) -> dict[str, Any]:
    """The configuration of an app whose liveness keys are ``Broker(url, prefix)``'s."""
    return {
        "broker_url": broker_url,
        "broker_transport_options": {"global_keyprefix": f"{prefix}:"},
        "broker_connection_retry_on_startup": False,
        "resilience_node_ttl": node_ttl,
    }


app = Celery("nodes_support", set_as_current=False)
app.conf.update(
    settings(
        os.environ.get(BROKER_URL, TEST_REDIS_URL),
        os.environ.get(KEY_PREFIX, "crtest:nodes-unconfigured"),
        float(os.environ.get(NODE_TTL, "6")),
    )
)
