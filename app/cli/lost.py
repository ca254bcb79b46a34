"""`jobworker lost`: the operators' check for jobs Redis forgot.

When Redis loses its data (restarted without its files, flushed, failed over to a server that
lacked them), an orchestrator that held a job whose record vanished ends it and notes it in
`wpm-jobs:lost` (`orchestrator.lost_key`), with what it knew: its type, its last state, the worker
of its last attempt and, when the run had ended, its result or error. This command lists those
notes, newest first, reading Redis as the roles do (`REDIS_URL`, the profiles, `--config-dir`),
else the Redis of a running `jobworker dev`.

Exit status, as a monitoring check reads it: 0 none, 1 some were lost, 2 a configuration error,
3 Redis could not be asked.

What it cannot list (see the README): a job that was queued and not yet taken by any
orchestrator when Redis lost it, or whose orchestrator stopped in the same moment, left no note;
only its submitter knows of it (GetJob answers NOT_FOUND, and a Submit with its id runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from app.cli.runtime import run_async
from app.cli.targets import env_help, resolve_redis
from app.config import load_config
from app.errors import ConfigError, StoreBusy, StoreUnavailable
from app.fleet.batch_job import LostJob

#: Exit status when Redis could not be asked (a monitoring check's UNKNOWN).
EXIT_UNREACHABLE = 3


def _lost(args: argparse.Namespace) -> int:
    """Print the lost-job notes; exit 1 when there are any."""
    from app.core.clock import utc_iso
    from app.stores.redis.client import create_redis
    from app.stores.redis.job_store import RedisJobStore

    config = load_config(dict(os.environ), profile=args.profile, config_dir=args.config_dir)
    redis_target = resolve_redis(args.redis, profile=args.profile, config_dir=args.config_dir)
    if args.count < 1:
        raise ConfigError("--count", f"must be at least 1, got {args.count}")
    o = config.orchestrator

    async def read() -> list[LostJob]:
        redis = create_redis(redis_target.config, redis_target.url or None)
        try:
            store = RedisJobStore(
                redis, job_prefix=o.job_prefix, stream_key=o.stream_key, lost_key=o.lost_key
            )
            return await store.lost_jobs(count=args.count)
        finally:
            await redis.aclose()

    try:
        lost = run_async(read)
    except (StoreUnavailable, StoreBusy) as exc:
        print(f"jobworker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.since is not None:
        lost = [j for j in lost if j.noticed_at >= time.time() - args.since]
    for job in lost:
        if args.json:
            record: dict[str, Any] = msgspec.to_builtins(job)
            print(json.dumps(record, sort_keys=False))
            continue
        ran = f" on {job.worker}" if job.worker else ""
        print(
            f"{job.job_id}\t{job.job_type or '?'}\t{job.state or 'queued'}{ran}\t"
            f"noticed {utc_iso(job.noticed_at)} by {job.noticed_by}: {job.reason}"
            + (f"\terror: {job.error}" if job.error else "")
        )
    if not args.json:
        print(f"{len(lost)} lost job(s)", file=sys.stderr)
    return 1 if lost else 0


def add_parsers(sub: Any) -> None:
    """`lost`, on the `jobworker` subparsers `sub`."""
    lost = sub.add_parser(
        "lost",
        help="list jobs Redis forgot while an orchestrator held them (exit 1 when any)",
        description=(__doc__ or "").split("\n\n")[1],
        epilog=env_help(redis=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lost.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    lost.add_argument("--config-dir", type=Path, help="folder of external application*.toml")
    lost.add_argument(
        "--redis", metavar="URL",
        help="the Redis to read (default: $REDIS_URL / the config's [redis], else a running"
        " `jobworker dev`'s)",
    )  # fmt: skip
    lost.add_argument("--count", type=int, default=1000, help="the newest N (default 1000)")
    lost.add_argument("--since", type=float, metavar="SECONDS", help="noticed in the last SECONDS")
    lost.add_argument("--json", action="store_true", help="one JSON object a line")
    lost.set_defaults(func=_lost)
