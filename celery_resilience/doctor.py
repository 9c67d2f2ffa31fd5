"""``resilience doctor``: find settings that make tasks run twice, wait long, or vanish.

Each check reads the app's configuration (and asks the coordination and DLQ backends)
and returns findings: what is dangerous and how to fix it. No finding (but warnings)
means the configuration is safe for what the checks know. ``recovery`` says how long
a dead node's tasks take to come back with the settings read: by liveness (the node
TTL) on a Redis broker with the visibility heartbeat on, by the visibility timeout
with it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kombu

from celery_resilience import liveness
from celery_resilience.backends.base import CoordinationBackend, DeadLetterBackend
from celery_resilience.backends.probe import problem_of
from celery_resilience.backends.redis import storage
from celery_resilience.errors import BackendUnavailable, ConfigurationError, ResilienceError
from celery_resilience.liveness import DEFAULT_VISIBILITY_TIMEOUT, REDIS_BROKERS
from celery_resilience.options import options_of
from celery_resilience.runtime import runtime
from celery_resilience.settings import Settings, broker_url, unshared_backend
from celery_resilience.urls import REDIS_SCHEMES, mask_url

_AMQP = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")
DEFAULT_CONSUMER_TIMEOUT = 1800.0  # RabbitMQ >= 3.8.15, seconds
REQUEUE_MARGIN = 10.0  # seconds a worker needs after soft shutdown to requeue
DEFAULT_AMQP_HEARTBEAT = 60.0  # RabbitMQ's server-side heartbeat timeout, seconds
KOMBU_RESTORE_SWEEP = 100.0  # kombu's own sweep without the heartbeat: 10 s x 10, seconds
MAX_RECOVERY = 300.0  # a dead node's tasks waiting longer than this is a finding, seconds
DEFAULT_BRPOP_TIMEOUT = 1.0  # kombu's Redis transport: an idle consumer's wait, seconds
MIN_NODE_TTL = 1.0  # a shorter presence lease is a warning, seconds


@dataclass(frozen=True)
class Finding:
    """One dangerous setting: which, what goes wrong, and the fix.

    A ``warning`` (e.g. a check that could not be made) is reported but does not make
    ``doctor`` fail.
    """

    setting: str
    problem: str
    fix: str
    warning: bool = False

    def __str__(self) -> str:
        text = f"{self.setting}: {self.problem} Fix: {self.fix}"
        return f"warning: {text}" if self.warning else text


@dataclass(frozen=True)
class Recovery:
    """How long a dead node's tasks take to come back, for the settings read.

    ``within`` is the bound in seconds when the settings fix one, else None;
    ``summary`` says it in one sentence.
    """

    within: float | None
    summary: str


def _broker(conf: Any) -> str:
    return broker_url(conf).lower()


def _resilient_tasks(app: Any) -> list[Any]:
    return [t for t in app.tasks.values() if options_of(t)]


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
    if broker.startswith(REDIS_BROKERS):
        findings += _visibility(conf, settings.visibility_heartbeat, tasks)
        findings += _recovery_time(app, conf, settings)
        if liveness.enabled(conf, settings):
            findings += _node_ttl(settings)
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
    findings += _backends(app, settings)
    return findings


def _visibility_timeout(conf: Any) -> float:
    """The Redis broker's visibility timeout in seconds (kombu's default when unset)."""
    options = conf.get("broker_transport_options") or {}
    return float(options.get("visibility_timeout") or DEFAULT_VISIBILITY_TIMEOUT)


def _about(seconds: float) -> str:
    """``seconds`` rounded for a reader: "12 s", "5 min", "1.5 h"."""
    if seconds < 300:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _seconds(value: float) -> str:
    """``value`` in seconds to about three digits: "8", "0.58", "16.5", "267"."""
    return f"{round(value, 2 if value < 10 else 1 if value < 100 else 0):g}"


def recovery(app: Any, *, consumer_timeout: float | None = None) -> Recovery:
    """How long a dead node's tasks take to come back with ``app``'s settings.

    Redis broker, visibility heartbeat on (liveness): the node renewed its presence up
    to ``node_ttl / 3`` before it died, its presence expires ``node_ttl`` after that
    renewal, the next liveness sweep of a live node (``liveness.sweep_interval``) puts
    its messages back, and a live node waiting on the queue fetches them at once, or
    after its ``brpop_timeout`` when it waits on another queue. The visibility timeout
    plays no part (it is the backstop for messages no node holds). Heartbeat off:
    kombu restores a message one timeout after its delivery, at its own sweep.
    RabbitMQ requeues a connection's unacked messages when it closes.

    :param consumer_timeout: RabbitMQ's ``consumer_timeout`` in seconds (default 1800).
    """
    conf = app.conf
    broker = _broker(conf)
    if broker.startswith(REDIS_BROKERS):
        timeout = _visibility_timeout(conf)
        options = conf.get("broker_transport_options") or {}
        settings = runtime(app).settings
        if liveness.enabled(conf, settings):
            ttl = settings.node_ttl
            sweep = liveness.sweep_interval(ttl)
            fetch = float(options.get("brpop_timeout") or DEFAULT_BRPOP_TIMEOUT)
            earliest, latest = ttl * 2 / 3, ttl + sweep + fetch
            return Recovery(latest, (
                f"a dead node's tasks return within ~{_about(latest)} ({_seconds(earliest)}-"
                f"{_seconds(latest)} s after it dies: its presence lease of {_seconds(ttl)} s "
                f"expires, the next liveness sweep, every {_seconds(sweep)} s, puts them "
                f"back, and a free node fetches them within {_seconds(fetch)} s; the "
                f"visibility timeout of {timeout:g} s is only the backstop)"
            ))  # fmt: skip
        restore = float(options.get("unacked_restore_interval") or 10) * float(
            options.get("unacked_restore_throttle") or 10
        )
        if kombu.VERSION[:2] < (5, 7):  # its sweep scans about every 100 s, not configurable
            restore = KOMBU_RESTORE_SWEEP
        latest = timeout + restore
        return Recovery(latest, (
            f"a dead node's tasks return within ~{_about(latest)} (the visibility timeout of "
            f"{timeout:g} s after delivery, plus up to {restore:g} s for kombu's restore "
            "sweep; visibility heartbeat off)"
        ))  # fmt: skip
    if broker.startswith(_AMQP) or not broker:
        beat = float(conf.get("broker_heartbeat") or 0)
        hung = (
            f"after its AMQP heartbeat lapses (broker_heartbeat {beat:g} s, or RabbitMQ's "
            f"own if lower: {DEFAULT_AMQP_HEARTBEAT:g} s by default)"
            if beat
            else "only when TCP gives up (broker_heartbeat is 0)"
        )
        stuck = consumer_timeout or DEFAULT_CONSUMER_TIMEOUT
        return Recovery(None, (
            "a killed node's tasks return at once (RabbitMQ requeues the unacked messages "
            f"of a closed connection); a hung or unreachable node's {hung}; a task stuck "
            f"on a live node keeps its message until consumer_timeout ({stuck:g} s)"
        ))  # fmt: skip
    return Recovery(None, f"unknown for the broker {broker.partition('://')[0]}://")


def _visibility(conf: Any, heartbeat: bool | None, tasks: list[Any]) -> list[Finding]:
    findings = []
    timeout = _visibility_timeout(conf)
    backend = str(conf.get("result_backend") or "").lower()
    result_vt = (conf.get("result_backend_transport_options") or {}).get("visibility_timeout")
    if backend.startswith(REDIS_BROKERS) and result_vt is not None and float(result_vt) != timeout:
        findings.append(Finding(
            'result_backend_transport_options["visibility_timeout"]',
            f"is {result_vt!r} but the broker's visibility timeout is {timeout:g} s.",
            f'set result_backend_transport_options={{"visibility_timeout": {timeout:g}}}, '
            "the broker's value.",
        ))  # fmt: skip
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


def _recovery_time(app: Any, conf: Any, settings: Settings) -> list[Finding]:
    """A dead node's tasks waiting longer than ``MAX_RECOVERY`` on a Redis broker: by the
    node TTL with liveness, by the visibility timeout with the heartbeat off (with
    liveness a long timeout is the backstop, kombu's 3600 s the recommended one)."""
    within = recovery(app).within
    if within is None or within <= MAX_RECOVERY:
        return []
    if liveness.enabled(conf, settings):
        return [Finding(
            settings.name_of("node_ttl"),
            f"is {settings.node_ttl:g} s: a dead node's tasks come back only after "
            f"~{_about(within)}.",
            "lower it to a few seconds (the default is 6 s: the presence is renewed three "
            "times per TTL).",
        )]  # fmt: skip
    set_by = (
        ""
        if (conf.get("broker_transport_options") or {}).get("visibility_timeout")
        else (", kombu's default")
    )
    return [Finding(
        'broker_transport_options["visibility_timeout"]',
        f"is {_visibility_timeout(conf):g} s{set_by} with the visibility heartbeat off: a "
        f"dead node's tasks come back only after ~{_about(within)}.",
        f"turn {settings.name_of('visibility_heartbeat')} on (recovery by liveness, within "
        'seconds), or shorten the timeout, e.g. broker_transport_options={"visibility_timeout": '
        '60}, the same on every worker and publisher (see docs/recovery.md).',
    )]  # fmt: skip


def _node_ttl(settings: Settings) -> list[Finding]:
    """A presence lease so short that a brief stall of a live node makes it look dead."""
    ttl = settings.node_ttl
    if ttl >= MIN_NODE_TTL:
        return []
    return [Finding(
        settings.name_of("node_ttl"),
        f"is {ttl:g} s: a pause of as little as ~{_seconds(ttl * 2 / 3)} s of a worker's "
        "main process (its event loop: a GC pause, a large message) or of the broker's "
        "Redis (a fork for a snapshot) makes a live node look dead, and other nodes deliver "
        "the messages it holds again.",
        "raise it to 1 s or more; the default, 6 s, still brings a dead node's tasks back "
        "within seconds.",
        warning=True,
    )]  # fmt: skip


def _backends(app: Any, settings: Settings) -> list[Finding]:
    """The coordination and DLQ backends: shared across processes, served, reachable,
    persistent, not evicting dead letters."""
    unshared = unshared_backend(settings, app.conf)
    if unshared is not None:
        return [Finding(settings.name_of("url"), *unshared)]
    rt = runtime(app)
    backends: list[tuple[str, Callable[[], CoordinationBackend | DeadLetterBackend]]] = [
        ("url", lambda: rt.backend)
    ]
    if settings.dlq_url != settings.url:
        backends.append(("dlq_url", lambda: rt.dlq))
    findings = []
    for name, build in backends:
        setting = settings.name_of(name)
        options = settings.transport_options, settings.name_of("transport_options")
        found = problem_of(getattr(settings, name), *options)
        if found is not None:
            findings.append(Finding(setting, *found))
            continue
        try:
            build().ping()
        except ConfigurationError as exc:
            problem = str(exc).removeprefix(f"setting {setting}=")
            findings.append(Finding(setting, f"{problem}.", f"correct the URL in {setting}."))
        except ResilienceError as exc:
            findings.append(Finding(
                setting, f"cannot be reached: {exc}.", f"start that server or correct {setting}."
            ))  # fmt: skip
    if findings:
        return findings
    return storage_findings(settings, rt.dlq)


def storage_findings(settings: Settings, dlq: DeadLetterBackend) -> list[Finding]:
    """A coordination or DLQ Redis that loses its data on restart (no AOF, no RDB) or
    evicts keys under memory pressure (``maxmemory-policy`` other than ``noeviction``);
    a DLQ on another backend is asked for its eviction policy itself.

    Also what the worker logs at start. A server that does not answer ``CONFIG GET``
    (an ACL, a managed Redis) gives one warning per server that it could not be checked.
    """
    losses = {
        "url": "every lease, crash count and completion record (a locked task gets a "
        "second holder while the first still runs; a finished task runs again)",
        "dlq_url": "every dead letter",
    }
    findings = []
    for url, names in _redis_urls(settings).items():
        setting = settings.name_of(names[0])
        try:
            role = "coordination" if "url" in names else "DLQ"
            kept = storage(url, role, settings.transport_options)
        except BackendUnavailable as exc:
            findings.append(Finding(
                setting,
                f"could not check that its Redis keeps data over a restart and does not "
                f"evict keys: {exc}.",
                "make sure that Redis has appendonly yes (or RDB save points) and "
                "maxmemory-policy noeviction.",
                warning=True,
            ))  # fmt: skip
            continue
        lost = " and ".join(losses[n] for n in names)
        # resilience_url unset: the broker's Redis is also the coordination backend
        other = "set resilience_url to" if setting == "broker_url" else f"point {setting} at"
        if not kept.persistent:
            findings.append(Finding(
                setting,
                f"the Redis at {mask_url(url)} has no persistence (appendonly no, no RDB "
                f"save points): a restart loses {lost}.",
                "turn on appendonly yes on that Redis (redis.conf, or CONFIG SET appendonly "
                f"yes and CONFIG REWRITE), or {other} a Redis that has it.",
            ))  # fmt: skip
        if kept.eviction_policy is not None:
            findings.append(Finding(
                setting,
                f"the Redis at {mask_url(url)} has maxmemory-policy {kept.eviction_policy}: "
                f"under memory pressure it evicts, without trace, {lost}.",
                f"set maxmemory-policy noeviction on that Redis, or {other} one that has it.",
            ))  # fmt: skip
    if not settings.dlq_url.lower().startswith(REDIS_SCHEMES):  # a plugin's DLQ
        findings += _dlq_eviction(settings.name_of("dlq_url"), dlq)
    return findings


def _redis_urls(settings: Settings) -> dict[str, list[str]]:
    """Each Redis URL of the backends, with the settings (``url``, ``dlq_url``) naming it."""
    urls: dict[str, list[str]] = {}
    for name in ("url", "dlq_url"):
        url = getattr(settings, name)
        if url.lower().startswith(REDIS_SCHEMES):
            urls.setdefault(url, []).append(name)
    return urls


def _dlq_eviction(setting: str, dlq: DeadLetterBackend) -> list[Finding]:
    try:
        policy = dlq.eviction_policy()
    except ResilienceError as exc:
        return [Finding(
            setting,
            f"could not check the DLQ's maxmemory-policy: {exc}.",
            "make sure the DLQ's Redis has maxmemory-policy noeviction.",
            warning=True,
        )]  # fmt: skip
    if policy is None:
        return []
    return [Finding(
        setting,
        f"the DLQ's Redis has maxmemory-policy {policy}, which evicts dead letters "
        "without trace.",
        f"put the DLQ on a Redis with maxmemory-policy noeviction ({setting}).",
    )]  # fmt: skip
