"""resilience doctor: each dangerous setting is one finding with its fix."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery

from celery_resilience import Backoff, resilient
from celery_resilience.doctor import diagnose


def make_app(**conf: object) -> Celery:
    """A Redis-broker app with one resilient task and the given settings."""
    app = Celery(f"doc{uuid.uuid4().hex[:6]}", set_as_current=False)
    defaults: dict[str, object] = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "resilience_url": f"memory://{uuid.uuid4().hex[:6]}",
        "broker_transport_options": {"visibility_timeout": 60},
    }
    app.conf.update({**defaults, **conf})

    @resilient(lock="k:{x}", backoff=Backoff(cap=600))
    @app.task(shared=False)
    def job(x: int) -> None: ...

    return app


def settings_of(findings: list[object]) -> list[str]:
    return [f.setting for f in findings]  # type: ignore[attr-defined]


def test_safe_configuration_has_no_findings() -> None:
    """A Redis broker with the heartbeat on (auto) and no grace period given is safe."""
    assert diagnose(make_app()) == []


def test_resilient_task_with_acks_late_off_is_reported() -> None:
    """Someone turned acks_late off on a resilient task afterwards."""
    app = make_app()
    task = next(t for t in app.tasks.values() if t.name.endswith(".job"))
    type(task).acks_late = False
    (finding,) = diagnose(app)
    assert finding.setting.endswith(".job.acks_late")
    assert "Fix:" in str(finding)


def test_visibility_timeout_set_for_broker_only_is_reported() -> None:
    """With a Redis result backend the timeout must be the same in both places."""
    app = make_app(result_backend="redis://127.0.0.1:6379/1")
    assert settings_of(diagnose(app)) == ["visibility_timeout"]
    app.conf.result_backend_transport_options = {"visibility_timeout": 60}
    assert diagnose(app) == []


def test_long_backoff_without_heartbeat_is_reported() -> None:
    """Heartbeat off and a backoff cap over half the timeout: retries run twice."""
    app = make_app(resilience_visibility_heartbeat=False)
    # Shared resilient tasks of other test modules join every app: look at ours.
    (finding,) = [f for f in diagnose(app) if f.setting.endswith(".job backoff")]
    assert "600 s" in finding.problem


@pytest.mark.parametrize(("soft", "bad"), [(0.0, True), (25.0, True), (15.0, False)])
def test_soft_shutdown_must_leave_time_to_requeue(soft: float, bad: bool) -> None:
    """Against a 30 s grace period, soft shutdown must be on and end 10 s before."""
    app = make_app(worker_soft_shutdown_timeout=soft)
    findings = diagnose(app, grace_period=30)
    assert settings_of(findings) == (["worker_soft_shutdown_timeout"] if bad else [])


def test_rabbitmq_consumer_timeout_shorter_than_longest_task_is_reported() -> None:
    """On RabbitMQ a task outliving consumer_timeout is redelivered."""
    app = make_app(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert diagnose(app, longest_task=600) == []
    (finding,) = diagnose(app, longest_task=3600)
    assert finding.setting == "RabbitMQ consumer_timeout"
    assert diagnose(app, longest_task=3600, consumer_timeout=7200) == []


def test_dlq_on_an_evicting_redis_is_reported(evicting_redis: str) -> None:
    """A DLQ whose Redis may evict keys loses dead letters silently."""
    app = make_app(resilience_dlq_url=evicting_redis)
    (finding,) = diagnose(app)
    assert finding.setting == "resilience_dlq_url"
    assert "allkeys-lru" in finding.problem
