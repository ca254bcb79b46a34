"""`jobworker cron preview`: the next fire instants of a cron expression, DST marks included."""

from __future__ import annotations

import argparse
from typing import Any

from app.errors import ConfigError


def _cron_preview(args: argparse.Namespace) -> int:
    """The next N fire instants of an expression, one a line: the instant with its offset in
    the zone first (what scripts read), then the same in UTC, then a mark when DST moved it."""
    from datetime import UTC, datetime

    from app.scheduling.cron import (
        CronError,
        RepeatedTime,
        SkippedTime,
        next_fire,
        parse_cron,
        parse_zone,
    )

    try:
        cron = parse_cron(args.expression)
    except CronError as exc:
        raise ConfigError("EXPR", str(exc)) from None
    try:
        zone = parse_zone(args.tz)
    except ValueError as exc:
        raise ConfigError("--tz", str(exc)) from None
    if args.n < 1:
        raise ConfigError("-n", f"must be at least 1, got {args.n}")
    after = datetime.now(UTC)
    if args.after:
        try:
            after = datetime.fromisoformat(args.after)
        except ValueError:
            raise ConfigError("--after", f"expected ISO 8601, got {args.after!r}") from None
        if after.tzinfo is None:
            after = after.replace(tzinfo=zone)  # a wall time in the zone
    printed = 0
    while printed < args.n:
        fire = next_fire(
            cron,
            zone,
            after,
            skipped=SkippedTime(args.skipped),
            repeated=RepeatedTime(args.repeated),
        )
        if fire is None:
            break
        after = fire.at
        if fire.skipped:
            continue  # not a fire instant
        at_utc = fire.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        mark = ""
        if fire.moved:
            mark = f"  moved (DST): {fire.nominal.isoformat()} does not exist"
        elif fire.repeat:
            mark = f"  repeated (DST): second {fire.nominal.isoformat()}"
        print(f"{fire.at.isoformat()}  {at_utc}{mark}")
        printed += 1
    return 0


def add_parsers(sub: Any) -> None:
    """`cron preview`, on the `jobworker` subparsers `sub`."""
    cron = sub.add_parser("cron", help="cron expressions: preview fire times")
    cron_actions = cron.add_subparsers(dest="action", required=True, metavar="ACTION")
    preview = cron_actions.add_parser("preview", help="print the next fire instants")
    preview.add_argument("expression", metavar="EXPR", help="5 fields, 6 (seconds first), @daily")
    preview.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA zone (default UTC)")
    preview.add_argument("-n", type=int, default=10, help="how many (default 10)")
    preview.add_argument("--after", metavar="TIME", help="ISO 8601; without offset: in ZONE")
    preview.add_argument(
        "--skipped", choices=["run_at_transition", "skip"], default="run_at_transition",
        help="a time a DST gap skips (default: run at the transition)",
    )  # fmt: skip
    preview.add_argument(
        "--repeated", choices=["once", "twice"], default="once",
        help="a time a DST fold repeats (default: once, the first)",
    )  # fmt: skip
    preview.set_defaults(func=_cron_preview)
