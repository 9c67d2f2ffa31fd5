"""``/metrics`` of a real prefork worker (concurrency 2) with ``resilience_prometheus_port``.

Each test starts its own ``celery -A tests.integration.metrics_app worker`` on a free
port and queue, publishes tasks, waits for their bodies to record that they finished,
and scrapes once over HTTP, as Prometheus would.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from celery_resilience import DeadLetterQueue
from celery_resilience.leases import process_exists
from tests.support.workers import WorkerNode, delete_keys, free_port, inherited_environment

from . import metrics_app as mt
from .harness import wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class MetricsWorker:
    """One prefork worker node (concurrency 2) of ``metrics_app`` in its own process group."""

    def __init__(self, redis_url: str, logdir: Path, **env: str) -> None:
        self.run_id = uuid.uuid4().hex[:12]
        self.prefix = f"mttest:{self.run_id}"
        self.port = free_port()
        self.env = {
            **inherited_environment(),
            mt.PREFIX: self.prefix,
            mt.REDIS_URL: redis_url,
            mt.QUEUE: f"mttest.{self.run_id}",
            mt.PORT: str(self.port),
            **env,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker manages its own
        self.logdir = logdir
        self.app = mt.create_app(self.env)
        self.redis: redis.Redis[str] = redis.Redis.from_url(redis_url, decode_responses=True)
        self.node: WorkerNode | None = None
        self.dlq = DeadLetterQueue(self.app)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return None if self.node is None else self.node.process

    def start(self, *, preamble: str = "") -> subprocess.Popen[bytes]:
        """Start ``celery worker``; ``preamble`` is Python run in the worker process first."""
        self.node = WorkerNode(
            mt,
            f"mt-{self.run_id}",
            self.env,
            self.logdir,
            queue=self.env[mt.QUEUE],
            stop_timeout=STOP_TIMEOUT_S,
            preamble=preamble,
        )
        return self.node.process

    def wait_ready(self) -> None:
        assert self.node is not None
        self.node.wait_ready(READY_TIMEOUT_S)

    def text(self) -> str:
        return "" if self.node is None else self.node.text()

    def records(self, tag: str, what: str) -> list[str]:
        return self.redis.lrange(mt.record_key(self.prefix, tag, what), 0, -1)

    def wait_done(self, tag: str, count: int) -> None:
        wait_until(
            lambda: len(self.records(tag, "done")) >= count,
            f"{count} task(s) of {tag} to finish",
            self.report,
        )

    def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """One GET /metrics: sample name -> sorted labels -> value."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def multiprocess_directory(self) -> Path:
        found = re.search(r"multiprocess directory (\S+)\)", self.text())
        assert found, self.report()
        return Path(found[1])

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        delete_keys(self.redis, f"{self.prefix}:*")
        self.dlq.backend.close()
        self.redis.close()
        self.app.close()

    def report(self) -> str:
        return "(not started)" if self.node is None else self.node.report(60)


MakeWorker = Callable[..., MetricsWorker]


@pytest.fixture
def make_worker(integration_redis_url: str, tmp_path: Path) -> Iterator[MakeWorker]:
    """Builds workers (environment overrides as keywords); stops them all afterwards."""
    workers: list[MetricsWorker] = []

    def make(**env: str) -> MetricsWorker:
        worker = MetricsWorker(integration_redis_url, tmp_path, **env)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def _retries(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], task: str) -> float:
    series = samples.get("celery_resilience_retries_total", {})
    return series.get((("reason", "exception"), ("task", task)), 0.0)


def test_one_scrape_counts_every_retry_made_in_both_children(make_worker: MakeWorker) -> None:
    """Retries made in two pool children add up exactly in one scrape of the main process."""
    worker = make_worker()
    worker.start()
    worker.wait_ready()
    tag, tasks, fails = uuid.uuid4().hex[:8], 6, 2
    for _ in range(tasks):
        worker.app.tasks["mt.flaky"].delay(tag, fails)
    worker.app.tasks["mt.broken"].delay(tag)
    worker.wait_done(tag, tasks)
    wait_until(lambda: worker.dlq.count() == 1, "mt.broken's dead letter", worker.report)

    samples = worker.scrape()
    runs = worker.records(tag, "runs")
    assert len(runs) == tasks * (fails + 1)
    assert len(set(runs)) == 2, f"expected both children to run tasks: {runs}"
    assert _retries(samples, "mt.flaky") == tasks * fails, worker.report()
    dead = samples["celery_resilience_dead_letters_total"]
    assert dead == {(("reason", "error"), ("task", "mt.broken")): 1.0}
    entries = samples["celery_resilience_dlq_entries"]
    assert entries == {(("task", "mt.broken"),): 1.0, (("task", "mt.flaky"),): 0.0}
    # Only this library's metrics: no process or platform collectors, nothing Celery
    # events already give.
    assert {name.split("_")[0] for name in samples} == {"celery"}


def test_recycled_children_keep_their_counts_and_leave_no_files(make_worker: MakeWorker) -> None:
    """With worker_max_tasks_per_child=1 every attempt runs in a new child; none is lost."""
    worker = make_worker(**{mt.MAX_TASKS_PER_CHILD: "1"})
    worker.start()
    worker.wait_ready()
    tag, tasks, fails = uuid.uuid4().hex[:8], 2, 2
    for _ in range(tasks):
        worker.app.tasks["mt.flaky"].delay(tag, fails)
    worker.wait_done(tag, tasks)

    samples = worker.scrape()
    runs = worker.records(tag, "runs")
    assert len(runs) == len(set(runs)) == tasks * (fails + 1), "each attempt in a new child"
    assert _retries(samples, "mt.flaky") == tasks * fails, worker.report()
    # The scrape merged the files of every exited child into the archive.
    directory = worker.multiprocess_directory()
    leftovers = [
        name
        for name in os.listdir(directory)
        if (pid := re.search(r"_(\d+)\.db$", name)) and not process_exists(int(pid[1]))
    ]
    assert leftovers == [], sorted(os.listdir(directory))
    assert "counter_archive.db" in os.listdir(directory)

    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(STOP_TIMEOUT_S)
    assert not directory.exists(), "the private directory outlived the worker"


def test_worker_without_prometheus_client_fails_start_naming_the_extra(
    make_worker: MakeWorker,
) -> None:
    """The port set but prometheus_client missing: exit 1 with the pip install to run."""
    worker = make_worker()
    process = worker.start(preamble="import sys; sys.modules['prometheus_client'] = None")
    assert process.wait(READY_TIMEOUT_S) == 1, worker.report()
    assert "pip install 'celery-resilience[prometheus]'" in worker.text(), worker.report()
    assert " ready." not in worker.text()


def test_worker_fails_start_when_the_port_is_taken(make_worker: MakeWorker) -> None:
    """A port another process listens on stops the worker with one line naming it."""
    worker = make_worker(CELERY_RESILIENCE_PROMETHEUS_ADDR="127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", worker.port))
        taken.listen()
        process = worker.start()
        assert process.wait(READY_TIMEOUT_S) == 1, worker.report()
    line = f"cannot serve metrics on 127.0.0.1:{worker.port}"
    assert line in worker.text(), worker.report()
