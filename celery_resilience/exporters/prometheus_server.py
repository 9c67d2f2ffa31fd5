"""The worker's own ``/metrics``: prometheus_client's multiprocess mode under a prefork pool.

Only the worker's main process uses this module (``celery_resilience.worker.
MetricsBootstep``, with ``resilience_prometheus_port`` set): ``MetricsServer`` puts
every process of the worker in prometheus_client's multiprocess mode (one directory of
memory-mapped files, summed at each scrape), serves them over HTTP and keeps the
directory small as pool children are recycled. The exporter plugin itself is
celery_resilience.exporters.prometheus.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery_resilience.errors import ResilienceError
from celery_resilience.exporters.prometheus import DeadLetterCollector, require_prometheus_client
from celery_resilience.leases import process_exists

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_ADDR = "0.0.0.0"  # all interfaces, as prometheus_client's own server
COMPACT_EVERY_S = 60.0

# Files that MultiProcessCollector sums across processes, as <type>_<pid>.db.
_SUMMED_FILE = re.compile(r"^(counter|histogram|summary)_(\d+)\.db$")
_GAUGE_FILE = re.compile(r"^gauge_[a-z]+_(\d+)\.db$")


class MultiprocessDirectory:
    """prometheus_client's multiprocess directory, summed at each scrape, kept compact.

    Every process writes its own ``<type>_<pid>.db`` files, and a dead process' counts
    must still be summed, so prometheus_client keeps them for ever: with
    ``worker_max_tasks_per_child`` every recycled child leaves files behind. Here the
    counters, histograms and summaries of dead processes are merged into one
    ``<type>_archive.db`` per type (``MultiProcessCollector.merge(accumulate=False)``,
    the form the files themselves use) and their files removed; their live gauges go
    with ``mark_process_dead``. Compaction and collection hold one lock, so a scrape
    never sees a dead process counted twice or not at all.

    (prometheus_client's multiprocess functions have no annotations, hence the
    ``no-untyped-call`` ignores.)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with self._lock:
            self._compact_logged()
            return list(MultiProcessCollector(None, path=self.path).collect())  # type: ignore[no-untyped-call]

    def compact(self, *, log_errors: bool = False) -> int:
        """Merge the files of dead processes into the archives; return how many pids.

        With ``log_errors`` a failure is logged (a scrape still gets the uncompacted
        files), else raised.
        """
        with self._lock:
            return self._compact_logged() if log_errors else self._compact()

    def _compact_logged(self) -> int:
        try:
            return self._compact()
        except Exception:
            logger.exception("celery-resilience: could not compact %s", self.path)
            return 0

    def _compact(self) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        summed: dict[str, dict[int, list[str]]] = {}  # type -> pid -> files
        pids: set[int] = set()
        for name in os.listdir(self.path):
            if match := _SUMMED_FILE.match(name):
                pid = int(match[2])
                summed.setdefault(match[1], {}).setdefault(pid, []).append(name)
            elif match := _GAUGE_FILE.match(name):
                pid = int(match[1])
            else:
                continue
            pids.add(pid)
        dead = {pid for pid in pids if pid != os.getpid() and not process_exists(pid)}
        for kind, by_pid in summed.items():
            # A pid reused by a new process between the check and the removal would
            # lose that process' first counts; pids are not reused that fast.
            gone = [os.path.join(self.path, f) for pid in dead for f in by_pid.get(pid, [])]
            if gone:
                self._merge_into_archive(kind, gone)
        for pid in dead:
            mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
        return len(dead)

    def _merge_into_archive(self, kind: str, files: list[str]) -> None:
        from prometheus_client.mmap_dict import MmapedDict, mmap_key
        from prometheus_client.multiprocess import MultiProcessCollector

        archive = os.path.join(self.path, f"{kind}_archive.db")
        sources = [archive, *files] if os.path.exists(archive) else files
        merged = MultiProcessCollector.merge(sources, accumulate=False)  # type: ignore[no-untyped-call]
        partial = os.path.join(self.path, f".{kind}_archive.partial")  # not *.db: not read
        if os.path.exists(partial):
            os.remove(partial)
        out = MmapedDict(partial)  # type: ignore[no-untyped-call]
        try:
            for metric in merged:
                for sample in metric.samples:
                    labels = sample.labels
                    key = mmap_key(
                        metric.name, sample.name, list(labels), list(labels.values()),
                        metric.documentation,
                    )  # fmt: skip
                    out.write_value(key, sample.value, 0.0)  # type: ignore[no-untyped-call]
        finally:
            out.close()  # type: ignore[no-untyped-call]
        os.replace(partial, archive)
        for file in files:
            os.remove(file)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """wsgiref logs every request to stderr; a scrape every 15 s is no news."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """What the worker's main process does for Prometheus when the port is set.

    ``prepare`` runs before the pool forks a child: it chooses the multiprocess
    directory (``PROMETHEUS_MULTIPROC_DIR`` when set; else a private temporary one,
    removed when the worker exits) and switches prometheus_client to multiprocess
    mode. ``start`` serves ``/metrics`` and compacts the directory every minute.
    """

    def __init__(self, app: Any, port: int, addr: str = DEFAULT_ADDR) -> None:
        self.app = app
        self.port = port
        self.addr = addr
        self.directory: MultiprocessDirectory | None = None
        self.registry: CollectorRegistry | None = None
        self.owns_directory = False
        self._server: WSGIServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def prepare(self) -> None:
        require_prometheus_client(f"resilience_prometheus_port={self.port}")
        path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
        if path:
            os.makedirs(path, exist_ok=True)
        else:
            path = tempfile.mkdtemp(prefix="celery-resilience-prometheus-")
            self.owns_directory = True
            atexit.register(_remove_directory, path, os.getpid())
        os.environ[MULTIPROC_ENV] = path
        _use_multiprocess_values()

        from prometheus_client import CollectorRegistry

        self.directory = MultiprocessDirectory(path)
        self.registry = CollectorRegistry()
        self.registry.register(self.directory)
        self.registry.register(DeadLetterCollector(self.app))

    def start(self) -> None:
        from prometheus_client import make_wsgi_app

        assert self.directory is not None
        assert self.registry is not None
        try:
            family = socket.getaddrinfo(self.addr, self.port, type=socket.SOCK_STREAM)[0][0]

            class Server(_Server):
                address_family = family

            self._server = make_server(
                self.addr,
                self.port,
                make_wsgi_app(self.registry),
                server_class=Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise ResilienceError(
                f"setting resilience_prometheus_port={self.port}: cannot serve metrics on "
                f"{self.addr}:{self.port}: {exc}"
            ) from exc
        self._threads = [
            threading.Thread(
                target=self._server.serve_forever, name="celery-resilience-metrics", daemon=True
            ),
            threading.Thread(
                target=self._compact_periodically, name="celery-resilience-compact", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        logger.info(
            "celery-resilience: Prometheus metrics on http://%s:%d/metrics (multiprocess "
            "directory %s)",
            self.addr,
            self.port,
            self.directory.path,
        )

    def _compact_periodically(self) -> None:
        assert self.directory is not None
        while not self._stopping.wait(COMPACT_EVERY_S):
            self.directory.compact(log_errors=True)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(5)
        self._threads = []


def _use_multiprocess_values() -> None:
    """Make metrics created from now on write to ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus_client picks its value class when it is first imported; if the
    application imported it before the worker set the directory, switch it now (for
    this process and the children it forks).
    """
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def _remove_directory(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child that happens to run atexit
        shutil.rmtree(path, ignore_errors=True)
