"""``python -m celery_resilience``: the same as the ``celery-resilience`` command."""

from celery_resilience.console import main

raise SystemExit(main())
