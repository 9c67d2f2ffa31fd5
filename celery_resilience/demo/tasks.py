"""The demo's resilient tasks, one per scenario, defined on a given app.

Each body records what it did in the :class:`~celery_resilience.demo.store.Store`
(runs, intervals, pids), so the demo can show and check it whichever process ran it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from celery_resilience.attempt import current_attempt
from celery_resilience.backoff import Backoff
from celery_resilience.decorator import resilient
from celery_resilience.demo.store import Store

FLAKY = "demo.flaky_import"
EXCLUSIVE = "demo.update_account"
CHARGE = "demo.charge_order"
POISON = "demo.render_pdf"
LONG = "demo.long_import"

FLAKY_FAILURES = 2
"""The flaky task fails this many times, then succeeds."""
FLAKY_BACKOFF = Backoff(base=0.2, factor=2.0, cap=2.0, jitter="none")
EXCLUSIVE_BODY_S = 0.15
CHARGE_MAX_RETRIES = 2
MAX_CRASHES = 3
LONG_BODY_S = 3.0
GATEWAY_FLAG = "gateway-up"


def _register(app: Celery, name: str, body: Callable[..., Any], **options: Any) -> None:
    """``@resilient(**options)`` over ``@app.task(bind=True, name=name)``, without the
    decorator syntax (Celery's decorator is untyped)."""
    resilient(**options)(app.task(bind=True, shared=False, name=name)(body))


def define_tasks(app: Celery, store: Store, crash: Callable[[str], None]) -> None:
    """Register the demo tasks on ``app``; their bodies record into ``store``.

    ``crash(task_id)`` is what the poison task does to its worker: a real SIGKILL of
    its own process, or (in-process) a simulation that never returns normally.
    """

    def flaky_import(self: Any, feed: str) -> str:
        """Fails with ConnectionError on its first runs, then imports ``feed``."""
        run = store.incr(f"flaky:{self.request.id}")
        if run <= FLAKY_FAILURES:
            store.emit("body", task=FLAKY, task_id=self.request.id, text=f"run {run}: timed out")
            raise ConnectionError(f"feed {feed!r} timed out (run {run})")
        store.emit("body", task=FLAKY, task_id=self.request.id, text=f"run {run}: imported")
        return f"{feed} imported"

    def update_account(self: Any, account: str, n: int) -> int:
        """A critical section on ``account``: records its interval and fencing token."""
        start = time.time()
        time.sleep(EXCLUSIVE_BODY_S)
        end = time.time()
        token = current_attempt().fencing_token
        record = {"key": account, "n": n, "start": start, "end": end, "token": token}
        store.push("intervals", json.dumps(record))
        text = f"account {account} update #{n} ran {end - start:.2f} s, fencing token {token}"
        store.emit("body", task=EXCLUSIVE, task_id=self.request.id, text=text)
        return n

    def charge_order(self: Any, order: str) -> str:
        """Fails with ConnectionError until the demo raises the gateway flag."""
        if not store.flag(GATEWAY_FLAG):
            store.emit(
                "body", task=CHARGE, task_id=self.request.id, text="payment gateway unreachable"
            )
            raise ConnectionError("payment gateway unreachable")
        store.emit("body", task=CHARGE, task_id=self.request.id, text=f"{order} charged")
        return f"{order} charged"

    def render_pdf(self: Any, document: str) -> None:
        """A poison message: every delivery takes its worker down with it."""
        run = store.incr(f"poison:{self.request.id}")
        store.push(f"poison-pids:{self.request.id}", str(os.getpid()))
        text = f"delivery {run} starts rendering {document} (pid {os.getpid()})"
        store.emit("body", task=POISON, task_id=self.request.id, text=text)
        crash(self.request.id)

    def long_import(self: Any, batch: str) -> str:
        """Works for a few seconds under a lock; records which node and pid ran it."""
        run = store.incr(f"long:{self.request.id}")
        where = {"node": self.request.hostname, "pid": os.getpid(), "t": time.time()}
        store.push(f"long-starts:{self.request.id}", json.dumps(where))
        text = f"run {run} starts on {self.request.hostname} (pid {os.getpid()})"
        store.emit("body", task=LONG, task_id=self.request.id, text=text)
        time.sleep(LONG_BODY_S)
        store.emit("body", task=LONG, task_id=self.request.id, text=f"run {run} completes")
        return f"{batch} imported"

    _register(
        app, FLAKY, flaky_import, max_retries=4, retry_on=ConnectionError, backoff=FLAKY_BACKOFF
    )
    _register(
        app,
        EXCLUSIVE,
        update_account,
        lock="account:{account}",
        lock_ttl=10.0,
        max_retries=100,
        backoff=Backoff(base=0.1, factor=2.0, cap=0.4, jitter="equal"),
    )
    _register(
        app,
        CHARGE,
        charge_order,
        max_retries=CHARGE_MAX_RETRIES,
        retry_on=ConnectionError,
        backoff=Backoff(base=0.1, factor=2.0, cap=1.0, jitter="none"),
    )
    _register(app, POISON, render_pdf, max_crashes=MAX_CRASHES, max_retries=0)
    _register(
        app,
        LONG,
        long_import,
        lock="import:{batch}",
        lock_ttl=10.0,
        max_retries=20,
        backoff=Backoff(base=0.2, factor=2.0, cap=1.0, jitter="equal"),
    )
