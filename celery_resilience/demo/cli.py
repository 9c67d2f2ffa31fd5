"""``celery-resilience``: the command that needs no app of yours (``celery-resilience demo``).

The commands that work on your app (``dlq``, ``doctor``, ``nodes``) are Celery sub-commands:
``celery -A proj resilience ...`` (:mod:`celery_resilience.cli`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SCENARIO_FAILED = 2
EXIT_INTERRUPTED = 130

_DEMO_HELP = """\
Show what celery-resilience does, end to end, in well under a minute: a flaky task
retried with backoff, tasks on one lock key never overlapping, a task that runs out of
retries kept in the dead-letter queue and replayed, a poison task stopped by the crash
budget, and the metrics that resulted.

Without --redis everything runs in this process (memory:// broker, an in-process
worker, memory:// backends) and nothing connects anywhere; worker crashes are
simulated. With --redis, real `celery worker` processes run against that Redis and
are SIGKILLed for real; every key the demo writes is under one prefix and deleted
when it ends.

exit status: 0 every scenario ended as promised, 1 bad input or a service
unreachable, 2 a scenario did not end as promised (one line each on stderr)."""


class _Parser(argparse.ArgumentParser):
    """Bad usage is bad input: one ``error:`` line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``celery-resilience`` argument parser."""
    parser = _Parser(
        prog="celery-resilience",
        description="celery-resilience: make any Celery task survive what production does.",
        epilog="Commands on your own app: celery -A proj resilience dlq|doctor|nodes --help",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="show retries, locks, the DLQ and the crash budget at work (no services needed)",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--redis",
        metavar="URL",
        help="run real worker processes against this Redis, e.g. redis://localhost:6379/13",
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", help="also print the workers' own logs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``celery-resilience`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0 success, 1 bad input or an unreachable service (one ``error:`` line on stderr),
    2 a demo scenario that did not end as promised, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or bad usage (reported by _Parser.error)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command != "demo":
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    from celery_resilience.demo import DemoError

    try:
        if args.redis is None:
            from celery_resilience.demo import inprocess

            return inprocess.run(sys.stdout, verbose=args.verbose)
        from celery_resilience.demo import redis_mode

        return redis_mode.run(args.redis, sys.stdout, verbose=args.verbose)
    except DemoError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`celery-resilience demo | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
