"""Lease owners: who holds a lock, and whether that holder is provably dead.

An owner string names the machine, the process (pid and start time) and the
delivery. A holder is *provably dead* only when it ran on this same machine
(same host name) and its process is gone: no process has its pid, or the process
with that pid started at another time (the pid was reused). A holder on another
machine is never presumed dead: its lease runs out by itself within one TTL.
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


def new_owner(nodename: str, task_id: str) -> str:
    """A unique owner string for one delivery of ``task_id`` in this process."""
    pid = os.getpid()
    return _SEP.join(
        (socket.gethostname(), str(pid), _start_time(pid), nodename, task_id, secrets.token_hex(4))
    )


def holder_is_dead(owner: str) -> bool:
    """True only if ``owner`` ran on this machine and its process no longer exists."""
    parts = owner.split(_SEP)
    if len(parts) != 6 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat(pid)
    if fields[:1] == [b"Z"]:
        return True  # killed, not yet reaped by its parent
    if started == "-" or len(fields) <= 19:
        return False
    return fields[19].decode() != started
