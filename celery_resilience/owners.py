"""Lease owners: who holds a lock, and whether that holder is provably dead here.

An owner string names the machine, the process (pid and start time), the delivery
and, when the process keeps one, its presence id (``liveness.holders``). This module
tells a holder *provably dead* on this same machine (same host name) when its process
is gone: no process has its pid, or the process with that pid started at another
time (the pid was reused). A holder on another machine is dead when its presence
expired (``ProcessPresence.gone``); one without a presence id is never presumed dead
there: its lease runs out by itself within one TTL.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket

_SEP = "|"


def _stat(pid: int) -> list[bytes]:
    """Fields 3.. of /proc/<pid>/stat (Linux), or [] if unknown.

    The command name (field 2) may contain spaces, so split after its ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


@functools.lru_cache(maxsize=8)
def _start_time(pid: int) -> str:
    """The process' start time in clock ticks since boot (field 22), or "-" if unknown."""
    fields = _stat(pid)
    return fields[19].decode() if len(fields) > 19 else "-"


def process_exists(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine (a zombie does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def new_owner(nodename: str, task_id: str, presence: str | None = None) -> str:
    """A unique owner string for one delivery of ``task_id`` in this process, which keeps
    the presence id ``presence`` (if any) while it holds the leases."""
    pid = os.getpid()
    host, token = socket.gethostname(), secrets.token_hex(4)
    return _SEP.join((host, str(pid), _start_time(pid), nodename, task_id, token, presence or ""))


def presence_of(owner: str) -> str | None:
    """The presence id ``owner``'s process keeps, or ``None`` (none, or an older owner)."""
    parts = owner.split(_SEP)
    return parts[6] or None if len(parts) == 7 else None


def holder_is_dead(owner: str) -> bool:
    """True only if ``owner`` ran on this machine and its process no longer exists."""
    parts = owner.split(_SEP)
    if len(parts) not in (6, 7) or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    if pid == os.getpid():
        return False
    if not process_exists(pid):
        return True
    fields = _stat(pid)
    if fields[:1] == [b"Z"]:
        return True  # killed, not yet reaped by its parent
    if started == "-" or len(fields) <= 19:
        return False
    return fields[19].decode() != started
