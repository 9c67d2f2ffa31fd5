"""Where liveness lives in the broker's Redis, and how its scripts are run.

Every key is named here once: ``{global_keyprefix}{key_prefix}:`` then

* ``presence``: sorted set, presence id -> deadline (ms of the server's clock). A
  worker node's id starts ``node/``, a process holding leases ``proc/``;
* ``clock``: the server time (ms) of the last renewal or sweep of any node or holder;
* ``sweeper``: which node sweeps for the whole fleet (a lease, its presence id);
* ``node:{id}``: a node's presence key (its info, JSON), expiring with its presence;
* ``info``: hash, node id -> info (JSON), until the node leaves or is recovered;
* ``held:{id}``: delivery tags of the messages the node holds;
* ``recovering:{id}``: which live node is restoring a dead node's messages (a lease);
* ``start:{tag}``: whether a delivery started in a pool child (``run``) or its node
  handed the message back at warm shutdown (``back``), expiring;
* ``lost``: the most recently lost nodes (JSON, newest first).

Scripts are the ``.lua`` files of this package, each loaded once per client and run
with ``EVALSHA`` through redis-py's own ``execute_command``: kombu's client would add
``global_keyprefix`` to some of the keys only. The scripts that judge presence start
with ``clock.lua`` (the server's clock, and whether the server was serving all along).
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

MAX_LOST = 100  # lost-node records kept
ON_THE_CLOCK = frozenset({"renew", "due", "gone", "claim"})  # the scripts after clock.lua


@dataclass(frozen=True)
class Keys:
    """The liveness keys under one prefix (kombu's ``global_keyprefix`` + ours)."""

    prefix: str

    @classmethod
    def of(cls, global_keyprefix: str | None, key_prefix: str) -> Keys:
        return cls(f"{global_keyprefix or ''}{key_prefix}:")

    @property
    def presence(self) -> str:
        return self.prefix + "presence"

    @property
    def clock(self) -> str:
        return self.prefix + "clock"

    @property
    def sweeper(self) -> str:
        return self.prefix + "sweeper"

    @property
    def info(self) -> str:
        return self.prefix + "info"

    @property
    def lost(self) -> str:
        return self.prefix + "lost"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def held(self, node_id: str) -> str:
        return f"{self.prefix}held:{node_id}"

    def recovering(self, node_id: str) -> str:
        return f"{self.prefix}recovering:{node_id}"

    def start(self, delivery_tag: str) -> str:
        return f"{self.prefix}start:{delivery_tag}"


def new_node_id() -> str:
    """A presence id for a worker node, unique per process start: ``node/host/pid/random``."""
    return f"node/{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def process_id() -> str:
    """The presence id of this process as a lease holder: ``proc/host/pid/random``.

    Computed once per process (a forked child gets its own), so it is unique per
    process start.
    """
    return _process_id(os.getpid())


@functools.lru_cache(maxsize=4)
def _process_id(pid: int) -> str:
    return f"proc/{socket.gethostname()}/{pid}/{secrets.token_hex(4)}"


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


class Script:
    """One ``.lua`` file of this package, run with ``EVALSHA`` (loaded on first use)."""

    def __init__(self, name: str) -> None:
        self.name = name
        here = resources.files(__package__)
        self.source = here.joinpath(f"{name}.lua").read_text()
        if name in ON_THE_CLOCK:
            self.source = here.joinpath("clock.lua").read_text() + "\n" + self.source
        self._sha: str | None = None

    def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """Run on ``client`` (redis-py's or kombu's); reload once if the server lost it."""
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = text(execute(client, "SCRIPT", "LOAD", self.source))
        try:
            return execute(client, "EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:  # the server restarted, or SCRIPT FLUSH: load it again
            self._sha = text(execute(client, "SCRIPT", "LOAD", self.source))
            return execute(client, "EVALSHA", self._sha, len(keys), *keys, *args)


def execute(client: Any, *args: Any) -> Any:
    """redis-py's own ``execute_command`` on ``client``: keys exactly as given, where
    kombu's client would add ``global_keyprefix`` to some."""
    from redis import Redis

    run: Callable[..., Any] = Redis.execute_command
    return run(client, *args)


def text(value: Any) -> str:
    """A reply as ``str`` (kombu's client does not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@functools.cache
def script(name: str) -> Script:
    """The script ``name`` (``renew``, ``due``, ``claim``, ...), read once per process."""
    return Script(name)
