"""`jobworker trigger`: run a replica of the trigger tier (the seed's server-batch)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from app.cli.runtime import setup_logging
from app.config import load_config

EPILOG = """\
Schedules come from the config's [[schedules]] tables (synced at start; the config owns those
names) and from `jobworker schedules create` (kept in Redis). Run as many replicas as you like
against one Redis: each fire time is submitted once across them, and a replica that stops
hands its schedules over within trigger.lease_seconds.

environment:
  REDIS_URL                      the Redis the replicas share (required)
  PROFILE                        the config profile (default local)
  JOBWORKER_CONFIG_DIR           a folder of application*.toml (as --config-dir)
  JOBWORKER_TRIGGER__<KEY>       any [trigger] key, e.g. JOBWORKER_TRIGGER__LEASE_SECONDS=5,
                                 JOBWORKER_TRIGGER__ORCHESTRATORS='["o1:9090","o2:9090"]'
A bad key or schedule exits 2 naming it: `schedules[0].cron: ...`.
"""


def _trigger(args: argparse.Namespace) -> int:
    from app.cli.launcher import _run_service
    from app.trigger.main import serve_trigger

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["trigger.port"] = args.port
    if args.host is not None:
        overrides["trigger.host"] = args.host
    if args.orchestrator:
        overrides["trigger.orchestrators"] = list(args.orchestrator)
    config = load_config(
        dict(os.environ), profile=args.profile, config_dir=args.config_dir, overrides=overrides
    )
    setup_logging(config.log.level)
    _run_service(lambda: serve_trigger(config))
    return 0


def add_parsers(sub: Any) -> None:
    """`trigger`, on the `jobworker` subparsers `sub`."""
    trigger = sub.add_parser(
        "trigger",
        help="run a trigger replica: cron and interval schedules submit jobs to orchestrators",
        description="Run a replica of the trigger tier: schedules submit jobs to orchestrators.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trigger.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    trigger.add_argument("--config-dir", type=Path, help="folder of external application*.toml")
    trigger.add_argument("--port", type=int, help="first gRPC port to try (trigger.port, 9089)")
    trigger.add_argument("--host", help="address to bind (trigger.host)")
    trigger.add_argument(
        "--orchestrator", action="append", metavar="HOST:PORT",
        help="an orchestrator to submit to (repeatable; trigger.orchestrators)",
    )  # fmt: skip
    trigger.set_defaults(func=_trigger)
