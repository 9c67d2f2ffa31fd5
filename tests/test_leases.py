"""Lease owners: a holder is presumed dead only when that is provable."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_resilience.leases import holder_is_dead, new_owner

MAKE_OWNER = (
    "from celery_resilience.leases import new_owner; print(new_owner('n', 't'), flush=True)"
)


def _owner_of_exited_process() -> str:
    done = subprocess.run(
        [sys.executable, "-c", MAKE_OWNER], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def live_owner() -> Iterator[str]:
    """The owner string of a process that is still running."""
    code = MAKE_OWNER + "; import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with proc:
        try:
            yield proc.stdout.readline().strip()
        finally:
            proc.kill()


def test_holder_in_this_process_is_alive() -> None:
    """This process' own owner string is never presumed dead."""
    assert not holder_is_dead(new_owner("node", "task"))


def test_holder_whose_process_exited_is_dead() -> None:
    """An owner from a process that has exited, on this machine, is provably dead."""
    assert holder_is_dead(_owner_of_exited_process())


def test_holder_on_another_machine_is_never_presumed_dead() -> None:
    """Another host's process cannot be checked from here, so it is not dead."""
    owner = _owner_of_exited_process().replace(socket.gethostname(), "elsewhere", 1)
    assert not holder_is_dead(owner)


def test_running_holder_is_alive(live_owner: str) -> None:
    """A holder whose process still runs is alive."""
    assert not holder_is_dead(live_owner)


def test_reused_pid_with_another_start_time_is_dead(live_owner: str) -> None:
    """A pid now used by a process started at another time means the holder is gone."""
    host, pid, started, *rest = live_owner.split("|")
    assert started != "-", "this test needs /proc"
    reused = "|".join([host, pid, str(int(started) - 1), *rest])
    assert holder_is_dead(reused)


def test_malformed_owner_is_not_dead() -> None:
    """An owner string from another library or version is left alone."""
    assert not holder_is_dead("somebody-else")


def test_killed_but_unreaped_holder_is_dead() -> None:
    """A holder killed but not yet reaped by its parent (a zombie) is dead."""
    code = MAKE_OWNER + "; import time; time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        owner = proc.stdout.readline().strip()
        proc.kill()
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{proc.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.01)
        assert holder_is_dead(owner)
