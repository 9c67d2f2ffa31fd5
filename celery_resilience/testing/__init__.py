"""Helpers for your own tests: a hook recorder, an eager app, the backend contract suites.

``HookRecorder`` records the observer hook calls of the code under test,
``eager_app`` builds a Celery app that runs resilient tasks eagerly on a private
``memory://`` store, and ``CoordinationBackendContract`` and
``DeadLetterBackendContract`` are the test suites every built-in backend passes:
subclass one and a plugin's backend is checked exactly as the built-ins are.

Only the contract suites need pytest, and they import it when one is subclassed (in a
test module); the recorder and the app factory work without it (unittest, the demo).
``import celery_resilience`` does not import this module.
"""

from celery_resilience.testing.apps import backend_for, dlq_backend_for, eager_app
from celery_resilience.testing.coordination import CoordinationBackendContract
from celery_resilience.testing.dlq import DeadLetterBackendContract
from celery_resilience.testing.hooks import HookCall, HookRecorder, record_hooks

__all__ = [
    "CoordinationBackendContract",
    "DeadLetterBackendContract",
    "HookCall",
    "HookRecorder",
    "backend_for",
    "dlq_backend_for",
    "eager_app",
    "record_hooks",
]
