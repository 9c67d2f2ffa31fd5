"""resilience doctor: each dangerous setting is one finding with its fix, and the time a
dead node's tasks take to come back."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_resilience import Backoff, resilient
from celery_resilience.doctor import diagnose, recovery
from tests.conftest import _private_redis
from tests.support.acl import acl_user

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("CELERY_RESILIENCE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

SERVED = (
    "(served: memory://, redis://, rediss://, unix://, sentinel://, redis+cluster://, "
    "rediss+cluster://)"
)


def make_app(**conf: object) -> Celery:
    """A Redis-broker app with one resilient task and the given settings."""
    app = Celery(f"doc{uuid.uuid4().hex[:6]}", set_as_current=False)
    defaults: dict[str, object] = {
        "broker_url": "redis://127.0.0.1:6379/0",
        "resilience_url": f"memory://{uuid.uuid4().hex[:6]}",
        "broker_transport_options": {"visibility_timeout": 60},
    }
    # A None value leaves the setting out (``del app.conf[key]`` does not remove a
    # changed key on Celery < 5.7).
    app.conf.update({k: v for k, v in {**defaults, **conf}.items() if v is not None})

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


def test_result_backend_timeout_is_compared_only_when_set() -> None:
    """The docs' fix (broker timeout only) passes; a different result backend timeout
    is reported with the value to set."""
    app = make_app(result_backend="redis://127.0.0.1:6379/1")
    assert diagnose(app) == []
    app.conf.result_backend_transport_options = {"visibility_timeout": 3600}
    (finding,) = diagnose(app)
    assert finding.setting == 'result_backend_transport_options["visibility_timeout"]'
    assert 'Fix: set result_backend_transport_options={"visibility_timeout": 60}' in str(finding)
    app.conf.result_backend_transport_options = {"visibility_timeout": 60}
    assert diagnose(app) == []


def test_default_visibility_timeout_is_no_finding_with_liveness() -> None:
    """With the heartbeat on, kombu's 3600 s is only the backstop: recovery is by liveness."""
    app = make_app(broker_transport_options={})
    assert diagnose(app) == []
    assert recovery(app).within == 8


def test_default_visibility_timeout_without_heartbeat_is_reported_with_the_recovery_time() -> None:
    """Heartbeat off, kombu's 3600 s keeps a dead node's tasks away for an hour: a finding."""
    app = make_app(broker_transport_options={}, resilience_visibility_heartbeat=False)
    (finding,) = [f for f in diagnose(app) if not f.setting.endswith(" backoff")]
    assert finding.setting == 'broker_transport_options["visibility_timeout"]'
    assert "is 3600 s, kombu's default with the visibility heartbeat off" in finding.problem
    assert "~62 min" in finding.problem
    assert "turn resilience_visibility_heartbeat on" in finding.fix
    assert '{"visibility_timeout": 60}' in finding.fix


LIVENESS = (
    "a dead node's tasks return within ~8 s (4-8 s after it dies: its presence lease of 6 s "
    "expires, the next liveness sweep, every 1 s, puts them back, and a free node fetches "
    "them within 1 s; the visibility timeout of {} s is only the backstop)"
)


@pytest.mark.parametrize(
    ("conf", "within", "text"),
    [
        ({}, 8, LIVENESS.format(3600)),
        ({"broker_transport_options": {"visibility_timeout": 60}}, 8, LIVENESS.format(60)),
        (
            {"resilience_node_ttl": 3, "broker_transport_options": {"brpop_timeout": 2}},
            5.5, "within ~6 s (2-5.5 s after it dies: its presence lease of 3 s expires, the "
            "next liveness sweep, every 0.5 s, puts them back, and a free node fetches them "
            "within 2 s;",
        ),
        (
            {"broker_transport_options": {"visibility_timeout": 60},
             "resilience_visibility_heartbeat": False},
            160, "within ~160 s (the visibility timeout of 60 s after delivery",
        ),
    ],
)  # fmt: skip
def test_recovery_time_follows_the_node_ttl_or_without_heartbeat_the_timeout(
    conf: dict[str, object], within: float, text: str
) -> None:
    """Liveness: node TTL + liveness sweep + a fetch, whatever the visibility timeout;
    heartbeat off: timeout + kombu's sweep."""
    found = recovery(make_app(**{"broker_transport_options": {}, **conf}))
    assert found.within == within
    assert text in found.summary


@pytest.mark.parametrize(("ttl", "warned"), [(0.5, True), (0.9, True), (1.0, False), (6, False)])
def test_a_node_ttl_under_a_second_is_a_warning_with_the_fix(ttl: float, warned: bool) -> None:
    """A sub-second presence lease makes a briefly stalled live node look dead."""
    findings = diagnose(make_app(resilience_node_ttl=ttl))
    assert settings_of(findings) == (["resilience_node_ttl"] if warned else [])
    if warned:
        (finding,) = findings
        assert finding.warning
        assert f"a pause of as little as ~{round(ttl * 2 / 3, 2):g} s" in finding.problem
        assert "raise it to 1 s or more" in finding.fix


def test_a_short_node_ttl_is_no_warning_without_liveness() -> None:
    """With the heartbeat off no node keeps a presence: the TTL does not matter."""
    app = make_app(resilience_node_ttl=0.5, resilience_visibility_heartbeat=False)
    assert "resilience_node_ttl" not in settings_of(diagnose(app))


def test_a_node_ttl_that_keeps_dead_tasks_away_for_minutes_is_reported() -> None:
    """With liveness, the slow-recovery finding names the node TTL, not the timeout."""
    (finding,) = diagnose(make_app(resilience_node_ttl=600))
    assert finding.setting == "resilience_node_ttl"
    assert "is 600 s: a dead node's tasks come back only after ~10 min" in finding.problem
    assert not finding.warning


def test_recovery_on_rabbitmq_names_what_bounds_it() -> None:
    """RabbitMQ requeues on connection close; a hung node waits for heartbeat or timeout."""
    found = recovery(make_app(broker_url=AMQP_URL), consumer_timeout=600)
    assert found.within is None
    assert "a killed node's tasks return at once" in found.summary
    assert "broker_heartbeat 120 s" in found.summary
    assert "consumer_timeout (600 s)" in found.summary


def test_rabbitmq_without_resilience_url_is_an_error_with_the_fix() -> None:
    """memory:// by default would guard nothing across processes; explicit memory:// passes."""
    (finding,) = diagnose(make_app(broker_url=AMQP_URL, resilience_url=None))
    assert finding.setting == "resilience_url"
    assert "'amqp://guest:**@127.0.0.1:5672//', not Redis" in finding.problem
    assert "a worker refuses to start" in finding.problem
    assert "set resilience_url to a redis:// URL (or to 'memory://'" in finding.fix
    assert diagnose(make_app(broker_url=AMQP_URL, resilience_url="memory://")) == []


def test_typo_in_the_scheme_is_reported_against_the_setting_the_user_set() -> None:
    """redsi:// names resilience_url (also the DLQ's by default), with the schemes served."""
    (finding,) = diagnose(make_app(resilience_url="redsi://127.0.0.1:6379/15"))
    assert finding.setting == "resilience_url"
    assert "no installed coordination backend serves the scheme redsi://" in finding.problem
    assert SERVED in finding.problem


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
    persistence, eviction = diagnose(app)  # that Redis has no persistence either
    assert persistence.setting == eviction.setting == "resilience_dlq_url"
    assert "a restart loses every dead letter." in persistence.problem
    assert "allkeys-lru" in eviction.problem


def test_coordination_on_an_evicting_redis_is_reported_naming_what_is_lost(
    evicting_redis: str,
) -> None:
    """A coordination Redis that may evict keys drops leases: a second holder, a rerun."""
    findings = diagnose(make_app(resilience_url=evicting_redis))
    evicts = [f for f in findings if "maxmemory-policy allkeys-lru" in f.problem]
    assert [f.setting for f in evicts] == ["resilience_url"]
    assert "evicts, without trace, every lease, crash count and completion record" in (
        evicts[0].problem
    )
    assert "Fix: set maxmemory-policy noeviction on that Redis" in str(evicts[0])
    assert not evicts[0].warning


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server with appendonly yes and noeviction."""
    with _private_redis(tmp_path, "--appendonly", "yes") as url:
        yield url


def test_redis_without_persistence_is_reported_naming_what_is_lost(
    redis_url: str, persistent_redis: str
) -> None:
    """The shared test Redis runs with --save "" --appendonly no: a restart loses state."""
    (finding,) = diagnose(make_app(resilience_url=redis_url))
    assert finding.setting == "resilience_url"
    assert "has no persistence (appendonly no, no RDB save points)" in finding.problem
    assert "every lease, crash count and completion record" in finding.problem
    assert "and every dead letter" in finding.problem
    assert "Fix: turn on appendonly yes" in str(finding)
    assert diagnose(make_app(resilience_url=persistent_redis)) == []


def test_persistence_unreadable_under_an_acl_is_a_warning(acl_redis: str) -> None:
    """An ACL user without CONFIG: "could not check", a warning, not a failure."""
    url = acl_user(acl_redis, "noconfig", "+@all", "-config", "~*", "&*")
    (finding,) = diagnose(make_app(resilience_url=url))  # one server, one warning
    assert finding.warning
    assert (
        "could not check that its Redis keeps data over a restart and does not evict keys"
        in finding.problem
    )
    assert "NoPermissionError" in finding.problem
    assert str(finding).startswith("warning: resilience_url: ")


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A doctor_app resilience doctor`` as a user runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "CR_DOCTOR_"))}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "support"),
                                                        clean.get("PYTHONPATH")]))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "doctor_app", "resilience", "doctor", *args],
        cwd=ROOT, env={**clean, "COLUMNS": "200", **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_doctor_on_a_safe_configuration_says_the_recovery_time_and_exits_zero(
    persistent_redis: str,
) -> None:
    """A persistent Redis and kombu's default timeout: the liveness recovery line, ok, exit 0."""
    result = _doctor({"CR_DOCTOR_BROKER_URL": persistent_redis})
    assert result.returncode == 0, result.stdout + result.stderr
    recovered, ok = result.stdout.splitlines()
    assert recovered == "recovery: " + LIVENESS.format(3600)
    assert ok.startswith("ok: no dangerous settings found (")


def test_doctor_exits_one_with_a_line_per_finding_and_its_fix(persistent_redis: str) -> None:
    """No soft shutdown against a 30 s grace period is one finding line with the fix."""
    env = {"CR_DOCTOR_BROKER_URL": persistent_redis, "CR_DOCTOR_VISIBILITY_TIMEOUT": "60"}
    result = _doctor(env, "--grace-period", "30")
    assert result.returncode == 1, result.stdout + result.stderr
    line, recovered = result.stdout.splitlines()
    assert line.startswith("worker_soft_shutdown_timeout: ")
    assert "Fix: set worker_soft_shutdown_timeout between 1 and 20 s" in line
    assert recovered.startswith("recovery: ")
    assert "Traceback" not in result.stderr


def test_doctor_warnings_alone_exit_zero(acl_redis: str) -> None:
    """Checks the server refused are warning lines; the configuration still passes."""
    url = acl_user(acl_redis, "noconfig", "+@all", "-config", "~*", "&*")
    result = _doctor({"CR_DOCTOR_BROKER_URL": url, "CR_DOCTOR_VISIBILITY_TIMEOUT": "60"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["warning", "recovery", "ok"]
    assert lines[0].startswith("warning: broker_url: could not check")
    assert "pw" not in result.stdout.replace("noconfig:**", "")


def test_doctor_names_the_environment_variable_of_a_typod_scheme(redis_url: str) -> None:
    """CELERY_RESILIENCE_URL=redsi://... is reported against that variable."""
    typo = "redsi://127.0.0.1:6379/15"
    env = {"CR_DOCTOR_VISIBILITY_TIMEOUT": "60", "CELERY_RESILIENCE_URL": typo}
    result = _doctor({"CR_DOCTOR_BROKER_URL": redis_url, **env})
    assert result.returncode == 1, result.stdout + result.stderr
    finding, _ = result.stdout.splitlines()
    assert finding.startswith(
        f"resilience_url (from environment variable CELERY_RESILIENCE_URL): '{typo}': no "
        "installed coordination backend serves the scheme redsi:// (served: memory://, "
    )
    assert "resilience_dlq_url" not in result.stdout


def test_doctor_on_rabbitmq_without_resilience_url_exits_one() -> None:
    """The refusal a worker would give, as a doctor finding, and RabbitMQ's recovery."""
    result = _doctor({"CR_DOCTOR_BROKER_URL": AMQP_URL})
    assert result.returncode == 1, result.stdout + result.stderr
    finding, recovered = result.stdout.splitlines()
    assert finding.startswith("resilience_url: is unset and broker_url is 'amqp://")
    assert recovered.startswith("recovery: a killed node's tasks return at once")
