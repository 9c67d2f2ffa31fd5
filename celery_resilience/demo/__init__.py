"""``celery-resilience demo``: the library's promises, shown end to end in well under a minute.

Run by :mod:`celery_resilience.demo.cli` (the ``celery-resilience`` command); nothing
here is imported by ``import celery_resilience``. Two modes tell the same story:

- no options: everything in this process (Celery's ``memory://`` broker, a worker on
  the threads pool in a thread, ``memory://`` coordination and DLQ backends), so it
  needs no service at all (:mod:`~celery_resilience.demo.inprocess`);
- ``--redis URL``: real ``celery worker`` processes against Redis, with real SIGKILLs
  (:mod:`~celery_resilience.demo.redis_mode`).

Task bodies, observer hooks and the demo itself write to one
:class:`~celery_resilience.demo.store.Store` (in memory, or Redis keys under one
prefix), which the demo reads back to print the report and check every scenario.
"""


class DemoError(Exception):
    """The demo cannot run (bad input, a service down); the message is one line for a person."""
