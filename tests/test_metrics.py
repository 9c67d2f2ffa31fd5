"""Prometheus and OpenTelemetry metrics of eager tasks, through the real plugin manager.

Each test registers an exporter of its own (a fresh ``CollectorRegistry``, or a
MeterProvider with an in-memory reader) next to the built-in ones and runs real eager
tasks on a ``memory://`` backend. The prefork worker, its ``/metrics`` and recycled
children are in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from celery_resilience import (
    Backoff,
    DeadLetterQueue,
    MissingExtraError,
    get_plugin_manager,
    install,
    resilient,
)
from celery_resilience.exporters import DeadLetterCounts
from celery_resilience.exporters import otel as otel_exporter
from celery_resilience.exporters import prometheus as prom_exporter
from celery_resilience.exporters.otel import OtelExporter
from celery_resilience.exporters.prometheus import (
    DeadLetterCollector,
    PrometheusExporter,
    require_prometheus_client,
)
from celery_resilience.exporters.prometheus_server import MultiprocessDirectory
from celery_resilience.testing import eager_app, record_hooks
from celery_resilience.worker import MetricsBootstep
from tests.support.admissions import hold, lost_deliveries

# tests/test_gate.py registers shared tasks with one name from several test functions;
# every app finalized after it (app.tasks, as the DLQ gauge and replay use) warns.

ROOT = Path(__file__).resolve().parents[1]
FAST = Backoff(base=0.01, factor=2, cap=0.05, jitter="none")
# Deterministic waits: a lock held for 30 s makes each countdown the backoff's delay.
LOCK_BACKOFF = Backoff(base=0.5, factor=2, cap=10, jitter="none")
ELSEWHERE = "another-host|1|-|node|holder|00000000"  # a lease owner never presumed dead


@pytest.fixture
def app() -> Iterator[Celery]:
    """An eager app on a fresh memory:// backend (the DLQ shares it)."""
    with eager_app() as app:
        yield app


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A fresh registry that a PrometheusExporter counts into for this test."""
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry)
    pm = get_plugin_manager()
    pm.register(exporter)
    yield registry
    pm.unregister(exporter)


class OtelCapture:
    """An OtelExporter on its own MeterProvider, and a tracer whose spans are kept.

    Span events come from the built-in exporter, which adds them to the current span.
    """

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = OtelExporter(self.provider)
        self.spans = InMemorySpanExporter()
        tracers = TracerProvider()
        tracers.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer = tracers.get_tracer("tests")

    def points(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
        """Every data point collected now, by (instrument name, attributes)."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        found[(metric.name, frozenset(point.attributes.items()))] = point
        return found

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (event.name, dict(event.attributes or {}))
            for span in self.spans.get_finished_spans()
            for event in span.events
        ]


@pytest.fixture
def otel() -> Iterator[OtelCapture]:
    capture = OtelCapture()
    pm = get_plugin_manager()
    pm.register(capture.exporter)
    yield capture
    pm.unregister(capture.exporter)
    capture.provider.shutdown()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when the series does not exist."""
    return registry.get_sample_value(name, labels) or 0.0


def flaky_task(app: Celery, fails: int) -> Any:
    """A task whose first ``fails`` attempts raise ValueError, the last one by self.retry."""

    @resilient(max_retries=5, retry_on=ValueError, backoff=FAST)
    @app.task(bind=True, shared=False, name="m.flaky")
    def flaky(self: Any) -> int:
        if self.request.retries < fails - 1:
            raise ValueError("retried by the gate")
        if self.request.retries == fails - 1:
            raise self.retry(countdown=0.01)
        return int(self.request.retries)

    return flaky


def hold_lock(app: Celery, key: str) -> None:
    """Take the lease on ``key`` as another worker would, for 30 s."""
    held = hold(app, uuid.uuid4().hex, ELSEWHERE, key)
    assert held.fencing_token, "the lease was not taken"


def lose_delivery(app: Celery, task_id: str, times: int = 1) -> None:
    """Leave what a worker killed mid-task leaves: a delivery started and never closed."""
    lost_deliveries(app, task_id, times)


# -- the built-in plugins -------------------------------------------------------


def test_exporters_are_builtin_plugins() -> None:
    """Both exporters are registered like any other plugin, under their module names."""
    pm = get_plugin_manager()
    assert pm.get_plugin("celery_resilience.exporters.prometheus") is prom_exporter.exporter
    assert pm.get_plugin("celery_resilience.exporters.otel") is otel_exporter.exporter


def test_install_adds_the_metrics_boot_step() -> None:
    """install() puts the step that serves /metrics into the worker's blueprint."""
    app = Celery(f"m{uuid.uuid4().hex[:6]}", set_as_current=False)
    install(app, validate=False)
    steps = {
        s if isinstance(s, str) else f"{s.__module__}:{s.__name__}" for s in app.steps["worker"]
    }
    assert f"{MetricsBootstep.__module__}:{MetricsBootstep.__name__}" in steps


def test_importing_the_package_imports_neither_exporter_library() -> None:
    """prometheus_client and opentelemetry are imported on the first event, not before."""
    code = textwrap.dedent(
        """
        import sys
        from celery import Celery
        import celery_resilience
        from celery_resilience import get_plugin_manager, install, resilient
        get_plugin_manager()
        app = Celery("x", set_as_current=False)
        app.conf.update(task_always_eager=True, resilience_url="memory://x")
        install(app)
        @resilient()
        @app.task
        def ok():
            return 1
        assert ok.delay().get() == 1
        print(sorted(m for m in sys.modules if m.split(".")[0] in
                     ("prometheus_client", "opentelemetry")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- Prometheus -----------------------------------------------------------------


def test_retries_are_counted_by_task_and_reason(app: Celery, registry: CollectorRegistry) -> None:
    """Two gate retries and one self.retry() count as reasons exception and requested."""
    flaky = flaky_task(app, fails=3)
    assert flaky.delay().get() == 3
    assert (
        value(registry, "celery_resilience_retries_total", task="m.flaky", reason="exception") == 2
    )
    assert (
        value(registry, "celery_resilience_retries_total", task="m.flaky", reason="requested") == 1
    )


def test_lock_contention_counts_attempts_and_observes_each_wait(
    app: Celery, registry: CollectorRegistry
) -> None:
    """Each contended delivery counts; each lock_contended wait's countdown is observed."""
    hold_lock(app, "res:1")

    # waits 0.5 s, then 1 s; found held 1.5 s after the first try, past lock_timeout
    @resilient(max_retries=0, lock="res:{n}", lock_timeout=1.2, backoff=LOCK_BACKOFF)
    @app.task(shared=False, name="m.locked")
    def locked(n: int) -> None: ...

    with record_hooks() as recorder:
        result = locked.apply((1,))
    assert result.state == "FAILURE"
    waits = [e["countdown"] for e in recorder.of("retry_scheduled")]
    assert waits == [0.5, 1.0]
    assert value(registry, "celery_resilience_lock_contended_total", task="m.locked") == 3
    assert (
        value(registry, "celery_resilience_retries_total", task="m.locked", reason="lock_contended")
        == 2
    )
    assert value(registry, "celery_resilience_lock_wait_seconds_count", task="m.locked") == 2
    assert value(registry, "celery_resilience_lock_wait_seconds_sum", task="m.locked") == 1.5
    bucket = "celery_resilience_lock_wait_seconds_bucket"
    assert value(registry, bucket, task="m.locked", le="0.25") == 0
    assert value(registry, bucket, task="m.locked", le="0.5") == 1
    assert value(registry, bucket, task="m.locked", le="1.0") == 2
    assert (
        value(
            registry,
            "celery_resilience_dead_letters_total",
            task="m.locked",
            reason="lock_contended",
        )
        == 1
    )


def test_every_give_up_counts_as_a_dead_letter_by_reason(
    app: Celery, registry: CollectorRegistry
) -> None:
    """A terminal error and spent retries count, with dlq=True and with dlq=False."""

    @resilient(max_retries=1, retry_on=ValueError, backoff=FAST)
    @app.task(shared=False, name="m.spent")
    def spent() -> None:
        raise ValueError("always")

    @resilient(dlq=False)
    @app.task(shared=False, name="m.error")
    def error() -> None:
        raise RuntimeError("terminal")

    assert spent.apply().state == "FAILURE"
    assert error.apply().state == "FAILURE"
    assert error.apply().state == "FAILURE"
    dead = "celery_resilience_dead_letters_total"
    assert value(registry, dead, task="m.spent", reason="max_retries") == 1
    assert value(registry, dead, task="m.error", reason="error") == 2
    assert DeadLetterQueue(app).count() == 1  # only the dlq=True one is kept


def test_redelivery_and_crash_budget_quarantine_are_counted(
    app: Celery, registry: CollectorRegistry
) -> None:
    """A lost delivery counts a redelivery; a spent crash budget is a worker_lost dead letter."""
    runs: list[int] = []

    @resilient(max_crashes=2)
    @app.task(shared=False, name="m.fragile")
    def fragile() -> None:
        runs.append(1)

    redelivered, poison = uuid.uuid4().hex, uuid.uuid4().hex
    lose_delivery(app, redelivered)
    assert fragile.apply(task_id=redelivered).state == "SUCCESS"
    lose_delivery(app, poison, times=2)
    assert fragile.apply(task_id=poison).state == "FAILURE"
    assert runs == [1]
    assert value(registry, "celery_resilience_redeliveries_total", task="m.fragile") == 2
    assert (
        value(
            registry, "celery_resilience_dead_letters_total", task="m.fragile", reason="worker_lost"
        )
        == 1
    )


def test_a_suppressed_duplicate_is_counted(app: Celery, registry: CollectorRegistry) -> None:
    """A task id that already succeeded is not run again and counts as a duplicate."""
    runs: list[int] = []

    @resilient()
    @app.task(shared=False, name="m.once")
    def once() -> None:
        runs.append(1)

    task_id = uuid.uuid4().hex
    assert once.apply(task_id=task_id).state == "SUCCESS"
    assert once.apply(task_id=task_id).state == "IGNORED"
    assert runs == [1]
    assert value(registry, "celery_resilience_duplicates_suppressed_total", task="m.once") == 1


def test_dlq_trims_replays_and_entries_are_reported(
    app: Celery, registry: CollectorRegistry
) -> None:
    """Entries dropped by the per-task cap and replays count; the gauge reads the DLQ."""
    app.conf.resilience_dlq_max_entries = 2

    @resilient()
    @app.task(shared=False, name="m.broken")
    def broken(n: int) -> None:
        raise RuntimeError(f"broken {n}")

    @resilient()
    @app.task(shared=False, name="m.quiet")
    def quiet() -> None: ...

    for n in range(3):
        assert broken.apply((n,)).state == "FAILURE"
    trimmed = "celery_resilience_dlq_trimmed_total"
    assert value(registry, trimmed, task="m.broken") == 1
    dlq = DeadLetterQueue(app)
    dlq.replay(dlq.list().entries[0].id)  # gives up again, trimming one more, then goes
    assert value(registry, "celery_resilience_dlq_replays_total", task="m.broken") == 1
    assert value(registry, trimmed, task="m.broken") == 2

    registry.register(DeadLetterCollector(app))  # type: ignore[arg-type]
    assert dlq.count(task_name="m.broken") == 1
    assert value(registry, "celery_resilience_dlq_entries", task="m.broken") == 1
    assert value(registry, "celery_resilience_dlq_entries", task="m.quiet") == 0
    assert registry.get_sample_value("celery_resilience_dlq_entries", {"task": "other"}) is None


def test_dead_letter_counts_are_read_at_most_once_per_period(app: Celery) -> None:
    """The DLQ backend is asked again only after the refresh period, however often scraped."""

    @resilient()
    @app.task(shared=False, name="m.broken")
    def broken() -> None:
        raise RuntimeError("broken")

    counts = DeadLetterCounts(app, refresh=0.5)

    def broken_count() -> int:
        read = counts.get()
        assert read is not None
        return read["m.broken"]

    assert broken_count() == 0
    broken.apply()
    assert broken_count() == 0  # cached
    time.sleep(0.55)
    assert broken_count() == 1


def test_without_prometheus_client_the_exporter_does_nothing(
    app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No prometheus_client, no port: events pass without error; requiring it names the extra."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # `import` raises ImportError
    exporter = PrometheusExporter()
    pm = get_plugin_manager()
    pm.register(exporter)
    try:
        assert flaky_task(app, fails=2).delay().get() == 2
    finally:
        pm.unregister(exporter)
    assert exporter.metrics() is None
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    with pytest.raises(MissingExtraError, match=r"pip install 'celery-resilience\[prometheus\]'"):
        require_prometheus_client("resilience_prometheus_port=9808")


def test_a_broken_multiprocess_directory_never_fails_a_task(tmp_path: Path) -> None:
    """Metrics that cannot be written are logged; the task's retries and result are unchanged."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    code = textwrap.dedent(
        """
        import uuid
        from celery import Celery
        from celery_resilience import Backoff, resilient
        app = Celery("x", set_as_current=False)
        app.conf.update(task_always_eager=True, resilience_url="memory://x")
        @resilient(max_retries=3, retry_on=ValueError,
                   backoff=Backoff(base=0.01, jitter="none"))
        @app.task(bind=True)
        def flaky(self):
            if self.request.retries < 2:
                raise ValueError("again")
            return self.request.retries
        print("result", flaky.delay().get())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(blocker / "metrics")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "result 2"
    failures = [
        line
        for line in out.stderr.splitlines()
        if "plugin celery_resilience.exporters.prometheus failed in resilience_retry_scheduled"
        in line
    ]
    assert len(failures) == 2, out.stderr
    assert "NotADirectoryError" in out.stderr


# -- the multiprocess directory ---------------------------------------------------

_CHILD = """
import sys
from prometheus_client import Counter, Histogram
retries = Counter("celery_resilience_retries_total", "r", ("task", "reason"))
wait = Histogram("celery_resilience_lock_wait_seconds", "w", ("task",), buckets=(1, 10))
retries.labels("t", "exception").inc(int(sys.argv[1]))
wait.labels("t").observe(float(sys.argv[2]))
print("written", flush=True)
if sys.argv[3] == "stay":
    sys.stdin.read()
"""


def _write_as_child(path: Path, retries: int, wait: float, stay: bool = False) -> Any:
    """Run a process that counts into ``path``; with ``stay`` it lives until its stdin closes."""
    command = [sys.executable, "-c", _CHILD, str(retries), str(wait), "stay" if stay else "exit"]
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    if not stay:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "written", done.stderr
        return done
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "written"
    return process


def _totals(
    directory: MultiprocessDirectory,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in directory.collect()
        for s in metric.samples
    }


def test_dead_children_are_merged_into_one_archive_and_still_counted(tmp_path: Path) -> None:
    """Files of exited processes become one archive per type; live ones stay; sums are kept."""
    directory = MultiprocessDirectory(str(tmp_path))
    _write_as_child(tmp_path, 2, 0.5)
    _write_as_child(tmp_path, 3, 5.0)
    live = _write_as_child(tmp_path, 4, 50.0, stay=True)
    try:
        before = set(os.listdir(tmp_path))
        assert len(before) == 6  # counter and histogram of each of the three
        assert directory.compact() == 2
        after = sorted(os.listdir(tmp_path))
        assert after == sorted(
            ["counter_archive.db", "histogram_archive.db",
             f"counter_{live.pid}.db", f"histogram_{live.pid}.db"]
        )  # fmt: skip
        totals = _totals(directory)
        assert (
            totals[("celery_resilience_retries_total", (("reason", "exception"), ("task", "t")))]
            == 9
        )
        buckets = {
            labels: v for (name, labels), v in totals.items()
            if name == "celery_resilience_lock_wait_seconds_bucket"
        }  # fmt: skip
        assert buckets == {
            (("le", "1.0"), ("task", "t")): 1,
            (("le", "10.0"), ("task", "t")): 2,
            (("le", "+Inf"), ("task", "t")): 3,
        }
        assert totals[("celery_resilience_lock_wait_seconds_sum", (("task", "t"),))] == 55.5
        assert totals[("celery_resilience_lock_wait_seconds_count", (("task", "t"),))] == 3
    finally:
        live.communicate("")
    _write_as_child(tmp_path, 1, 0.1)
    assert (
        _totals(directory)[
            ("celery_resilience_retries_total", (("reason", "exception"), ("task", "t")))
        ]
        == 10
    )  # collect() compacts the new dead ones, archive included
    assert sorted(os.listdir(tmp_path)) == ["counter_archive.db", "histogram_archive.db"]


# -- OpenTelemetry ----------------------------------------------------------------


def test_otel_instruments_count_the_same_events(app: Celery, otel: OtelCapture) -> None:
    """Retries, lock contention and its wait, dead letters: dotted names, same attributes."""
    assert flaky_task(app, fails=2).delay().get() == 2
    hold_lock(app, "res:1")

    @resilient(max_retries=0, lock="res:{n}", lock_timeout=1.2, backoff=LOCK_BACKOFF)
    @app.task(shared=False, name="m.locked")
    def locked(n: int) -> None: ...

    assert locked.apply((1,)).state == "FAILURE"
    points = otel.points()

    def point(name: str, **attributes: str) -> Any:
        return points[(name, frozenset(attributes.items()))]

    assert point("celery_resilience.retries", task="m.flaky", reason="exception").value == 1
    assert point("celery_resilience.retries", task="m.flaky", reason="requested").value == 1
    assert point("celery_resilience.retries", task="m.locked", reason="lock_contended").value == 2
    assert point("celery_resilience.lock.contended", task="m.locked").value == 3
    wait = point("celery_resilience.lock.wait", task="m.locked")
    assert (wait.count, wait.sum) == (2, 1.5)
    assert list(wait.explicit_bounds)[:4] == [0.05, 0.1, 0.25, 0.5]
    dead = point("celery_resilience.dead_letters", task="m.locked", reason="lock_contended")
    assert dead.value == 1


def test_otel_dlq_instruments(app: Celery, otel: OtelCapture) -> None:
    """Trims, replays, duplicates and redeliveries are recorded; the gauge reads the DLQ."""
    app.conf.resilience_dlq_max_entries = 1

    @resilient()
    @app.task(shared=False, name="m.broken")
    def broken(n: int) -> None:
        raise RuntimeError(f"broken {n}")

    broken.apply((1,))
    broken.apply((2,))
    dlq = DeadLetterQueue(app)
    dlq.replay(dlq.list().entries[0].id)
    task_id = uuid.uuid4().hex
    lose_delivery(app, task_id)

    @resilient()
    @app.task(shared=False, name="m.once")
    def once() -> None: ...

    once.apply(task_id=task_id)
    once.apply(task_id=task_id)
    gauge = otel_exporter.DeadLetterGauge(app, otel.provider)
    points = otel.points()
    gauge.close()
    assert points[("celery_resilience.dlq.trimmed", frozenset({("task", "m.broken")}))].value == 2
    assert points[("celery_resilience.dlq.replays", frozenset({("task", "m.broken")}))].value == 1
    assert points[("celery_resilience.redeliveries", frozenset({("task", "m.once")}))].value == 1
    duplicates = ("celery_resilience.duplicates_suppressed", frozenset({("task", "m.once")}))
    assert points[duplicates].value == 1
    entries = points[("celery_resilience.dlq.entries", frozenset({("task", "m.broken")}))]
    assert entries.value == dlq.count(task_name="m.broken") == 1
    assert ("celery_resilience.dlq.entries", frozenset({("task", "m.once")})) in points
    assert ("celery_resilience.dlq.entries", frozenset({("task", "m.broken")})) not in otel.points()


def test_span_events_tell_the_task_span_what_happened(app: Celery, otel: OtelCapture) -> None:
    """Retry scheduled, lock contended, redelivery seen and dead-lettered are span events."""
    hold_lock(app, "res:1")

    @resilient(max_retries=0, lock="res:{n}", lock_timeout=0.4, backoff=LOCK_BACKOFF)
    @app.task(shared=False, name="m.locked")
    def locked(n: int) -> None: ...

    task_id = uuid.uuid4().hex
    lose_delivery(app, task_id)
    with otel.tracer.start_as_current_span("run m.locked"):
        assert locked.apply((1,), task_id=task_id).state == "FAILURE"
    assert otel.events() == [
        ("celery_resilience.redelivery_seen",
         {"celery_resilience.attempt": 0, "celery_resilience.deliveries": 2}),
        ("celery_resilience.lock_contended",
         {"celery_resilience.lock_key": "res:1",
          "celery_resilience.lease_remaining": pytest.approx(30, abs=1)}),
        ("celery_resilience.retry_scheduled",
         {"celery_resilience.reason": "lock_contended", "celery_resilience.countdown": 0.5,
          "celery_resilience.attempt": 0}),
        ("celery_resilience.lock_contended",
         {"celery_resilience.lock_key": "res:1",
          "celery_resilience.lease_remaining": pytest.approx(30, abs=1)}),
        ("celery_resilience.dead_lettered",
         {"celery_resilience.reason": "lock_contended", "celery_resilience.attempts": 1,
          "celery_resilience.deliveries": 2,
          "celery_resilience.exception_type": "celery_resilience.errors.LockContended"}),
    ]  # fmt: skip


def test_a_broken_meter_provider_never_fails_a_task(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """A MeterProvider that raises is logged per event; the task retries and succeeds as before."""

    class BrokenProvider(MeterProvider):
        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("meter provider is broken")

    provider = BrokenProvider()
    exporter = OtelExporter(provider)
    pm = get_plugin_manager()
    pm.register(exporter)
    try:
        assert flaky_task(app, fails=3).delay().get() == 3
    finally:
        pm.unregister(exporter)
        provider.shutdown()
    failures = [r for r in caplog.records if "failed in resilience_retry_scheduled" in r.message]
    assert len(failures) == 3
    assert all(r.exc_info and "meter provider is broken" in str(r.exc_info[1]) for r in failures)


def test_without_opentelemetry_the_exporter_does_nothing(
    app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No opentelemetry-api: events pass without error; requiring it names the extra."""
    for name in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    exporter = OtelExporter()
    pm = get_plugin_manager()
    # The built-in one imported the library before it "disappeared"; use a fresh one.
    builtin = pm.unregister(name="celery_resilience.exporters.otel")
    pm.register(exporter)
    try:
        assert flaky_task(app, fails=2).delay().get() == 2
    finally:
        pm.unregister(exporter)
        pm.register(builtin, name="celery_resilience.exporters.otel")
    assert exporter.instruments() is None
    assert otel_exporter.observe_dead_letters(app) is None
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    with pytest.raises(MissingExtraError, match=r"pip install 'celery-resilience\[otel\]'"):
        otel_exporter.require_opentelemetry("OtelExporter")


def test_builtin_otel_exporter_uses_the_provider_the_application_sets() -> None:
    """With no provider nothing is recorded; a global provider set later gets every event."""
    code = textwrap.dedent(
        """
        from celery import Celery
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from celery_resilience import Backoff, resilient
        app = Celery("x", set_as_current=False)
        app.conf.update(task_always_eager=True, resilience_url="memory://x")
        @resilient(max_retries=3, retry_on=ValueError,
                   backoff=Backoff(base=0.01, jitter="none"))
        @app.task(bind=True, name="g.flaky")
        def flaky(self):
            if self.request.retries < 1:
                raise ValueError("again")
        flaky.delay().get()  # no provider yet: the API's no-op
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        flaky.delay().get()
        flaky.delay().get()
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        print(sm.scope.name, m.name, dict(p.attributes), p.value)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "celery_resilience celery_resilience.retries {'task': 'g.flaky', 'reason': 'exception'} 2"
    ]
