"""A private ``redis-server`` a test starts on a free loopback port and may fault.

Fault tests pause it (SIGSTOP: connections stay open, commands wait in the socket
buffers and run on SIGCONT), kill it (SIGKILL: connections refused) and restart it on
the same port and data directory, all by the pid of the process the test started, so
the machine's shared Redis is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from tests.support import workers
from tests.support.services import unavailable

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class RedisServer:
    """One ``redis-server`` of this test alone, without persistence unless ``options``
    say otherwise; its URL is db 0 of the full-permission default user."""

    def __init__(
        self,
        directory: Path,
        executable: str | None = None,
        *,
        options: Sequence[str] = (),
        suite: str = "the test",
    ) -> None:
        if executable is None:
            executable = shutil.which("redis-server")
            if executable is None:
                unavailable("redis-server is not on PATH", suite)
        assert executable is not None
        self.executable = executable
        self.directory = directory
        self.options = tuple(options)
        self.port = workers.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The pid of the running server (fails if it is not running)."""
        assert self.process is not None, f"redis-server :{self.port} is not running"
        return self.process.pid

    def start(self) -> None:
        """Start the server (again, on the same port and directory) and wait until it answers."""
        assert self.process is None, f"redis-server :{self.port} is already running"
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", str(self.log), *self.options],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        workers.wait_until(
            self.answers, f"redis-server on port {self.port}", self.report, READY_TIMEOUT_S
        )

    def answers(self) -> bool:
        """Whether the server answers a PING within a second."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[RedisServer]:
        """Start the server; stop it when the block ends (also if it is paused)."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def pause(self) -> None:
        """SIGSTOP the server: it accepts nothing and answers nothing until :meth:`resume`."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server: it runs the commands that waited, in order."""
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (its data without persistence is gone) and reap it."""
        process = self.process
        assert process is not None, f"redis-server :{self.port} is not running"
        process.kill()
        process.wait(STOP_TIMEOUT_S)
        self.process = None

    def restart(self) -> None:
        """Start a killed or stopped server again on the same port and directory."""
        self.start()

    def stop(self) -> None:
        """Terminate the server (resumed first if paused); SIGKILL it if it lingers."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self.process = None

    def report(self) -> str:
        return f"--- redis-server :{self.port} log ---\n{workers.tail(self.log, 30)}"
