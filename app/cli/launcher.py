"""The role commands: `jobworker worker` and `jobworker orchestrator` (room for more).

Each loads the configuration, sets up logging and runs the role's composition root on asyncio;
a configuration problem found at run time (no Redis to embed) surfaces as a ConfigError.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from app.cli.logs import FORMATS
from app.cli.runtime import run_async, setup_logging
from app.config import load_config
from app.core.exception_groups import first_leaf
from app.errors import ConfigError

T = TypeVar("T")


def _worker(args: argparse.Namespace) -> int:
    from app.worker.main import build_job_registry, serve_worker

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["grpc.port"] = args.port
    if args.host is not None:
        overrides["grpc.host"] = args.host
    overrides.update(log_overrides(args))
    env = dict(os.environ)
    config = load_config(env, profile=args.profile, config_dir=args.config_dir, overrides=overrides)
    setup_logging(config.log.level, config.log.format)
    registry = build_job_registry(config, args.jobs)
    run_service(lambda: serve_worker(config, registry, env))
    return 0


def run_service(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` on asyncio; a ConfigError raised in its task groups comes out alone."""
    try:
        return run_async(main)
    except BaseExceptionGroup as group:
        # a config problem found at run time (no Redis to embed) surfaces from the task group
        config_errors = group.subgroup(ConfigError)
        if config_errors is None:
            raise
        raise first_leaf(config_errors) from None


def _orchestrator(args: argparse.Namespace) -> int:
    from app.orchestrator.main import serve_orchestrator

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["orchestrator.port"] = args.port
    if args.host is not None:
        overrides["orchestrator.host"] = args.host
    overrides.update(log_overrides(args))
    config = load_config(
        dict(os.environ), profile=args.profile, config_dir=args.config_dir, overrides=overrides
    )
    setup_logging(config.log.level, config.log.format)
    run_service(lambda: serve_orchestrator(config))
    return 0


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """`--log-format` (log.format) on a role's command."""
    parser.add_argument(
        "--log-format", choices=FORMATS, help="text (default) or json: one object per line"
    )


def log_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of `add_log_options`' options."""
    return {"log.format": args.log_format} if args.log_format is not None else {}


WORKER_EPILOG = """\
environment:
  REDIS_URL                      the Redis to report PodInfo to (none: an embedded
                                 redis-server, unless redis.embedded is false)
  PROFILE                        the config profile (as --profile; default local)
  JOBWORKER_CONFIG_DIR           a folder of application*.toml (as --config-dir)
  JOBWORKER_<SECTION>__<KEY>     any config key, e.g. JOBWORKER_GRPC__PORT=9200,
                                 JOBWORKER_WORKER__CORE_SIZE=8 (docs/config.md lists them)
  XDG_STATE_HOME                 where the port the worker chose itself is remembered
A bad key exits 2 naming it and where it came from.
"""

ORCHESTRATOR_EPILOG = """\
environment:
  REDIS_URL                      the Redis its workers report to (required)
  PROFILE                        the config profile (as --profile; default local)
  JOBWORKER_CONFIG_DIR           a folder of application*.toml (as --config-dir)
  JOBWORKER_ORCHESTRATOR__<KEY>  any [orchestrator] key, e.g.
                                 JOBWORKER_ORCHESTRATOR__MAX_INFLIGHT=64 (docs/config.md)
A bad key exits 2 naming it and where it came from.
"""


def add_parsers(sub: Any) -> None:
    """`worker` and `orchestrator`, on the `jobworker` subparsers `sub`."""
    raw = argparse.RawDescriptionHelpFormatter
    worker = sub.add_parser(
        "worker", help="run a gRPC job worker",
        description="Run a gRPC job worker: WorkerService, reflection and health; it reports"
        " its PodInfo to Redis every schedule.report_interval_seconds.",
        epilog=WORKER_EPILOG, formatter_class=raw,
    )  # fmt: skip
    worker.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    worker.add_argument("--config-dir", type=Path, help="folder of external application*.toml")
    worker.add_argument(
        "--jobs",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE so its @job functions register (repeatable)",
    )
    worker.add_argument("--port", type=int, help="first gRPC port to try (grpc.port)")
    worker.add_argument("--host", help="address to bind (grpc.host)")
    add_log_options(worker)
    worker.set_defaults(func=_worker)

    orchestrator = sub.add_parser(
        "orchestrator", help="run the gateway: queue, balance, delegate",
        description="Run an orchestrator: it queues jobs in Redis, picks a worker for each and"
        " delegates it, with retry and circuit breaking. Run several against one Redis.",
        epilog=ORCHESTRATOR_EPILOG, formatter_class=raw,
    )  # fmt: skip
    orchestrator.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    orchestrator.add_argument(
        "--config-dir", type=Path, help="folder of external application*.toml"
    )
    orchestrator.add_argument("--port", type=int, help="first gRPC port to try (orchestrator.port)")
    orchestrator.add_argument("--host", help="address to bind (orchestrator.host)")
    add_log_options(orchestrator)
    orchestrator.set_defaults(func=_orchestrator)
