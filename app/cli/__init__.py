"""`jobworker`: the one console script, with a subcommand per role and per client task.

`launcher` runs the roles, `clients` talks to running ones (`jobs`: submits, shows, follows and
lists jobs), `cron` previews expressions;
`trigger` runs the trigger tier and `schedules` manages its schedules (and answers `why`);
`lost` lists the jobs Redis forgot; `status` shows the fleet from Redis. `targets` finds where
each client command calls (and says what went wrong there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app import __version__
from app.cli import clients, cron, dev, jobs, launcher, lost, schedules, status, trigger
from app.cli.runtime import EXIT_CONFIG
from app.cli.targets import ClientFailure
from app.errors import ConfigError

WRONG_TIER_HINT = (
    "is --target the right tier? status --worker and health ask a worker; submit, job, cancel,"
    " jobs and workers an orchestrator (submit, job and cancel take --worker ADDR for a"
    " worker); schedules and why a trigger"
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand of every module."""
    parser = argparse.ArgumentParser(
        prog="jobworker", description="A gRPC job worker and batch fleet: roles and clients."
    )
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launcher.add_parsers(sub)
    dev.add_parsers(sub)
    status.add_parsers(sub)
    clients.add_parsers(sub)
    jobs.add_parsers(sub)
    cron.add_parsers(sub)
    trigger.add_parsers(sub)
    schedules.add_parsers(sub)
    lost.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `jobworker` with `argv`; the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"jobworker: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except ClientFailure as exc:
        print(f"jobworker: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        return _client_failure(exc)


def _client_failure(exc: Exception) -> int:
    """One line for what a person can act on; a traceback only for what is a bug."""
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    if isinstance(exc, GRPCError):
        from app.grpc.status import retry_info

        hint = retry_info(exc.details)
        message = exc.message or ""
        if hint is not None and "retry after" not in message:
            message += f" (retry after {hint.retry_delay_seconds:g}s)"
        if exc.status is Status.UNIMPLEMENTED or message == "Missing content-type header":
            # grpclib's own server answers a method it lacks without a content-type
            message += f"; {WRONG_TIER_HINT}"
        said = (
            f"jobworker: {exc.status.name}: {message}"
            if message
            else f"jobworker: {exc.status.name}"
        )
        print(said, file=sys.stderr)
        return 1
    if isinstance(exc, OSError | TimeoutError):
        print(f"jobworker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    raise exc
