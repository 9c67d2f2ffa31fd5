"""``resilience doctor``: find settings that make tasks run twice, wait long, or vanish.

Each check reads the app's configuration (and, for the DLQ, asks its backend) and
returns findings: what is dangerous and how to fix it. No finding means the
configuration is safe for what the checks know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery_resilience.errors import ResilienceError
from celery_resilience.runtime import runtime

_REDIS = ("redis://", "rediss://", "sentinel://", "redis+socket://")
_AMQP = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")
DEFAULT_VISIBILITY_TIMEOUT = 3600.0  # kombu's Redis transport, seconds
DEFAULT_CONSUMER_TIMEOUT = 1800.0  # RabbitMQ >= 3.8.15, seconds
REQUEUE_MARGIN = 10.0  # seconds a worker needs after soft shutdown to requeue


@dataclass(frozen=True)
class Finding:
    """One dangerous setting: which, what goes wrong, and the fix."""

    setting: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.problem} Fix: {self.fix}"


def _broker(conf: Any) -> str:
    url = conf.get("broker_url") or ""
    return url.split(";")[0].strip().lower() if isinstance(url, str) else ""


def _resilient_tasks(app: Any) -> list[Any]:
    return [t for t in app.tasks.values() if getattr(type(t), "__resilience__", None)]


def diagnose(
    app: Any,
    *,
    grace_period: float | None = None,
    longest_task: float | None = None,
    consumer_timeout: float | None = None,
) -> list[Finding]:
    """Return the findings for ``app``.

    :param grace_period: the pod's termination grace period in seconds, if known.
    :param longest_task: the longest a task may run or wait for its ETA, in seconds.
    :param consumer_timeout: RabbitMQ's ``consumer_timeout`` in seconds (default 1800).
    """
    conf = app.conf
    findings: list[Finding] = []
    settings = runtime(app).settings
    tasks = _resilient_tasks(app)
    broker = _broker(conf)
    for task in tasks:
        if not task.acks_late:
            findings.append(Finding(
                f"{task.name}.acks_late",
                "a resilient task acks before it runs, so a lost worker loses the task.",
                "leave acks_late to @resilient (do not set acks_late=False on the task).",
            ))  # fmt: skip
    if broker.startswith(_REDIS):
        findings += _visibility(conf, settings.visibility_heartbeat, tasks)
    if broker.startswith(_AMQP) and longest_task is not None:
        timeout = consumer_timeout or DEFAULT_CONSUMER_TIMEOUT
        if longest_task >= timeout:
            findings.append(Finding(
                "RabbitMQ consumer_timeout",
                f"tasks that run or wait up to {longest_task:g} s outlive consumer_timeout "
                f"({timeout:g} s): RabbitMQ closes the channel and redelivers them.",
                f"raise consumer_timeout in rabbitmq.conf above {longest_task:g} s "
                "(in milliseconds), or shorten the tasks and their countdowns.",
            ))  # fmt: skip
    if grace_period is not None:
        findings += _shutdown(conf, grace_period)
    findings += _dlq(app)
    return findings


def _visibility(conf: Any, heartbeat: bool | None, tasks: list[Any]) -> list[Finding]:
    findings = []
    broker_vt = (conf.get("broker_transport_options") or {}).get("visibility_timeout")
    backend = str(conf.get("result_backend") or "").lower()
    result_vt = (conf.get("result_backend_transport_options") or {}).get("visibility_timeout")
    if backend.startswith(_REDIS) and broker_vt != result_vt:
        findings.append(Finding(
            "visibility_timeout",
            f"broker_transport_options has {broker_vt!r} but "
            f"result_backend_transport_options has {result_vt!r}.",
            "set the same visibility_timeout in both.",
        ))  # fmt: skip
    timeout = float(broker_vt or DEFAULT_VISIBILITY_TIMEOUT)
    if heartbeat is False:
        for task in tasks:
            cap = type(task).__resilience__.backoff.cap
            if cap > timeout / 2:
                findings.append(Finding(
                    f"{task.name} backoff",
                    f"its backoff reaches {cap:g} s, more than half the visibility timeout "
                    f"({timeout:g} s) with the visibility heartbeat off: a retry waiting that "
                    "long is delivered twice (celery-resilience caps it at half).",
                    "turn resilience_visibility_heartbeat on, or lower Backoff(cap=...).",
                ))  # fmt: skip
    return findings


def _shutdown(conf: Any, grace: float) -> list[Finding]:
    soft = float(conf.get("worker_soft_shutdown_timeout") or 0.0)
    if 0 < soft <= grace - REQUEUE_MARGIN:
        return []
    return [Finding(
        "worker_soft_shutdown_timeout",
        f"is {soft:g} s against a pod grace period of {grace:g} s: tasks still running "
        "when the pod is killed are not requeued and wait for redelivery.",
        f"set worker_soft_shutdown_timeout between 1 and {max(grace - REQUEUE_MARGIN, 1):g} s "
        "(Celery >= 5.5), or lengthen terminationGracePeriodSeconds.",
    )]  # fmt: skip


def _dlq(app: Any) -> list[Finding]:
    try:
        policy = runtime(app).dlq.eviction_policy()
    except ResilienceError as exc:
        return [Finding("resilience_dlq_url", f"cannot be checked: {exc}.", "make it reachable.")]
    if policy is None:
        return []
    return [Finding(
        "resilience_dlq_url",
        f"the DLQ's Redis has maxmemory-policy {policy}, which evicts dead letters "
        "without trace.",
        "put the DLQ on a Redis with maxmemory-policy noeviction (resilience_dlq_url).",
    )]  # fmt: skip
