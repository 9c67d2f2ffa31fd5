"""``python -m celery_resilience``: the same as the ``celery-resilience`` command."""

from celery_resilience.demo.cli import main

raise SystemExit(main())
