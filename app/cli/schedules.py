"""`jobworker schedules ...` and `jobworker why ...`: the trigger tier's API for people.

Each opens one grpclib channel to a trigger replica (`--target`, else `$JOBWORKER_TRIGGER_TARGET`,
else the config key `client.trigger`, else the trigger of a running `jobworker dev`, else
localhost:9089, see `app.cli.targets`; any replica answers for all), makes its calls under
`--timeout`, and
prints: a readable listing for `list`, `decisions`, `backfill` and `why` (`--json` for the
messages as JSON), the JSON of the schedule for the others. Exit 0, or 1 when a call failed
(the status and its one-line reason on stderr), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from app.cli.targets import add_config_options, env_help
from app.errors import ConfigError

T = TypeVar("T")

DEFAULT_TRIGGER = "localhost:9089"
TARGET_ENV = "JOBWORKER_TRIGGER_TARGET"

ENV_HELP = f"""\
{env_help("trigger")}
Times (--at, --from, --to, --before, --start) are ISO 8601; without an offset they are wall
times in the schedule's zone (2026-03-08T02:30 in America/New_York); `now` works too.
"""


def _call(args: argparse.Namespace, call: Callable[[Any], Awaitable[T]]) -> T:
    """Open a channel to the trigger target, run `call(stub)` under `--timeout`, close the
    channel (a target that does not answer, or is another tier, is said in one line)."""
    from app.cli.clients import _client_call
    from app.cli.targets import config_args, resolve
    from app.pb import trigger as pb

    target = resolve("trigger", args.target, **config_args(args))
    return _client_call(target, lambda channel: call(pb.TriggerServiceStub(channel)), args.timeout)


def _json(message: Any) -> None:
    print(json.dumps(message.to_dict(), indent=2))


def _params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--param", f"expected KEY=VALUE, got {pair!r}")
        params[key] = value
    return params


# --- list, get, decisions, why --------------------------------------------------------------------


def _status_lines(status: Any) -> list[str]:
    s = status.schedule
    flags = [f"job {s.job_type}", f"overlap {s.overlap}"]
    if s.paused:
        flags.append("PAUSED" + (f" ({s.pause_note})" if s.pause_note else ""))
    if s.source == "config":
        flags.append("from the config")
    flags.append(f"worked by {status.owner}" if status.owner else "no replica holds it")
    lines = [f"{s.name}  {s.description}  ({', '.join(flags)})"]
    upcoming = "  ".join(status.next_fire_times) or "none"
    lines.append(f"  next:  {upcoming}")
    if status.pending:
        err = f": {status.pending_error}" if status.pending_error else ""
        lines.append(f"  now:   submitting {status.pending} ({status.pending_replica}{err})")
    last = status.last_decision.sentence if status.last_decision else "no decision yet"
    lines.append(f"  last:  {last}")
    return lines


def _list(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    res = _call(args, lambda stub: stub.list_schedules(
        pb.ListSchedulesRequest(next_fire_times=args.next)))  # fmt: skip
    if args.json:
        _json(res)
        return 0
    if not res.schedules:
        print("no schedules")
    for status in res.schedules:
        print("\n".join(_status_lines(status)))
    print(f"replicas up: {', '.join(res.replicas) or 'none'}")
    return 0


def _get(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    res = _call(args, lambda stub: stub.get_schedule(pb.ScheduleRequest(name=args.name)))
    if args.json:
        _json(res)
    else:
        print("\n".join(_status_lines(res)))
    return 0


def _decisions(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    request = pb.ListDecisionsRequest(name=args.name, limit=args.limit, before=args.before or "")
    res = _call(args, lambda stub: stub.list_decisions(request))
    if args.json:
        _json(res)
        return 0
    for d in res.decisions:
        print(f"{d.tick}  {d.kind:<10}  {d.sentence}")
    if not res.decisions:
        print(f"no decisions of {args.name}")
    return 0


def _why(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    request = pb.ExplainRequest(name=args.schedule, at=args.at or "")
    res = _call(args, lambda stub: stub.explain(request))
    if args.json:
        _json(res)
    else:
        print(res.sentence)
    return 0


# --- changes --------------------------------------------------------------------------------------


def _apply_options(schedule: Any, args: argparse.Namespace) -> None:
    """Set the fields the options give (None: left as they are)."""
    if args.cron is not None:
        schedule.cron, schedule.interval_seconds = args.cron, 0.0
    if args.every is not None:
        schedule.cron, schedule.interval_seconds = "", args.every
    for option, field in (
        ("start", "interval_start"), ("tz", "time_zone"), ("dst_skipped", "dst_skipped"),
        ("dst_repeated", "dst_repeated"), ("job", "job_type"), ("overlap", "overlap"),
        ("grace", "misfire_grace_seconds"), ("jitter", "jitter_seconds"),
        ("deadline", "deadline_seconds"), ("job_timeout", "timeout_seconds"),
        ("priority", "priority"), ("max_attempts", "max_attempts"),
        ("retry_on_failure", "retry_on_failure"),
    ):  # fmt: skip
        value = getattr(args, option)
        if value is not None:
            setattr(schedule, field, value)
    if args.param:
        schedule.params = _params(args.param)


def _create(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    if args.cron is None and args.every is None:
        raise ConfigError("--cron", "give --cron EXPR or --every SECONDS")
    if args.job is None:
        raise ConfigError("--job", "give the job type the schedule submits")
    schedule = pb.Schedule(name=args.name, paused=args.paused)
    _apply_options(schedule, args)
    _json(_call(args, lambda stub: stub.create_schedule(schedule)))
    return 0


def _update(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    async def call(stub: Any) -> Any:
        current = (await stub.get_schedule(pb.ScheduleRequest(name=args.name))).schedule
        _apply_options(current, args)  # the stored version goes along: a change meanwhile aborts
        return await stub.update_schedule(current)

    _json(_call(args, call))
    return 0


def _simple(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    ref = pb.ScheduleRequest(name=args.name)

    def call(stub: Any) -> Awaitable[Any]:
        if args.action == "delete":
            return stub.delete_schedule(ref)  # type: ignore[no-any-return]
        if args.action == "pause":
            return stub.pause_schedule(  # type: ignore[no-any-return]
                pb.PauseScheduleRequest(name=args.name, note=args.note or "")
            )
        return stub.resume_schedule(ref)  # type: ignore[no-any-return]

    _json(_call(args, call))
    return 0


def _trigger_now(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    res = _call(args, lambda stub: stub.trigger_schedule(pb.ScheduleRequest(name=args.name)))
    if args.json:
        _json(res)
    else:
        print(res.decision.sentence if res.decision else res.job_id)
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from app.pb import trigger as pb

    request = pb.BackfillRequest(
        name=args.name, start=args.start, end=args.end or "", max_ticks=args.max or 0
    )
    res = _call(args, lambda stub: stub.backfill_schedule(request))
    if args.json:
        _json(res)
    else:
        for d in res.submitted:
            print(d.sentence)
        print(f"submitted {len(res.submitted)}, already ran {res.already_ran}")
        if res.next_start:
            print(f"more fire times remain: run again with --from {res.next_start}")
        if res.error:
            print(f"stopped: {res.error}")
    return 1 if res.error else 0


# --- the parsers ----------------------------------------------------------------------------------


def _connection(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # on the command and on each action, so that either place works; an action's value wins
    default: Any = argparse.SUPPRESS
    p.add_argument(
        "--target", default=None if top else default, metavar="HOST:PORT",
        help=f"a trigger replica (default ${TARGET_ENV}, else client.trigger, else a running"
        f" `jobworker dev`'s, else {DEFAULT_TRIGGER})",
    )  # fmt: skip
    add_config_options(p, suppress=not top)
    p.add_argument(
        "--timeout", type=float, default=30.0 if top else default,
        help="seconds to wait for the answer (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true", default=False if top else default,
        help="print the reply as JSON",
    )  # fmt: skip


def _definition(p: argparse.ArgumentParser, *, create: bool) -> None:
    keep = "" if create else " (default: as it is)"
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help=f"5 fields, 6 (seconds first), @daily{keep}")
    when.add_argument("--every", type=float, metavar="SECONDS", help=f"an interval{keep}")
    p.add_argument("--start", metavar="TIME", help="where the interval's grid starts (the epoch)")
    p.add_argument("--tz", metavar="ZONE", help="IANA zone of the cron expression (UTC)")
    p.add_argument("--dst-skipped", choices=["run_at_transition", "skip"],
                   help="a fire time in a DST gap (run_at_transition)")  # fmt: skip
    p.add_argument("--dst-repeated", choices=["once", "twice"],
                   help="a fire time in a DST fold (once)")  # fmt: skip
    p.add_argument("--job", metavar="TYPE", help=f"the job type to submit{keep}")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a job parameter (repeatable; on update, replaces them all)")  # fmt: skip
    p.add_argument("--overlap", choices=["forbid", "allow", "replace"],
                   help="while the previous fire time's job still goes (forbid)")  # fmt: skip
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="misfire grace: later than this, a fire time is missed (300)")  # fmt: skip
    p.add_argument("--jitter", type=float, metavar="SECONDS", help="delay each by up to (0)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="the job's deadline, waiting and running (the orchestrator's)")  # fmt: skip
    p.add_argument("--job-timeout", type=float, metavar="SECONDS", help="the job's run limit")
    p.add_argument("--priority", type=int, help="0 (default) to 9")
    p.add_argument("--max-attempts", type=int, help="the orchestrator's, when 0")
    p.add_argument("--retry-on-failure", action="store_true", default=None,
                   help="retry a run that failed on its worker")  # fmt: skip
    if create:
        p.add_argument("--paused", action="store_true", help="create it paused")


def add_parsers(sub: Any) -> None:
    """`schedules` and `why`, on the `jobworker` subparsers `sub`."""
    fmt = argparse.RawDescriptionHelpFormatter
    schedules = sub.add_parser(
        "schedules",
        help="the trigger tier's schedules: list (default), get, create, update, delete, pause,"
        " resume, trigger, backfill, decisions",
        description="Manage the trigger tier's schedules through any trigger replica.",
        epilog=ENV_HELP, formatter_class=fmt,
    )  # fmt: skip
    _connection(schedules, top=True)
    schedules.add_argument("--next", type=int, default=3, help=argparse.SUPPRESS)
    schedules.set_defaults(func=_list, action="list")
    actions = schedules.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, help_: str, func: Callable[[argparse.Namespace], int],
               *, named: bool = True) -> argparse.ArgumentParser:  # fmt: skip
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=help_, description=help_[0].upper() + help_[1:] + ".", epilog=ENV_HELP,
            formatter_class=fmt,
        )  # fmt: skip
        if named:
            p.add_argument("name", help="the schedule's name")
        _connection(p)
        p.set_defaults(func=func)
        return p

    listing = action("list", "every schedule, its next fire times and last decision", _list,
                     named=False)  # fmt: skip
    listing.add_argument("-n", "--next", type=int, default=3, help="next fire times (3)")
    action("get", "one schedule, its next fire times and last decision", _get)
    _definition(action("create", "create a schedule (kept in Redis)", _create), create=True)
    _definition(
        action("update", "change a schedule: the options given, the rest as it is", _update),
        create=False,
    )
    action("delete", "delete a schedule (its decisions are kept for the retention)", _simple)
    pause = action("pause", "pause a schedule: its fire times are missed until resumed", _simple)
    pause.add_argument("--note", help="why (shown in the decisions)")
    action("resume", "resume a paused schedule", _simple)
    action("trigger", "run a schedule's job now (the overlap policy does not apply)",
           _trigger_now)  # fmt: skip
    backfill = action(
        "backfill", "submit the past fire times in a window that did not run, oldest first",
        _backfill,
    )  # fmt: skip
    backfill.add_argument("--from", dest="start", required=True, metavar="TIME",
                          help="the window's start")  # fmt: skip
    backfill.add_argument("--to", dest="end", metavar="TIME", help="its end (default now)")
    backfill.add_argument("--max", type=int, metavar="N",
                          help="at most N fire times per call (100; at most 1000)")  # fmt: skip
    decisions = action("decisions", "a schedule's decision ledger, newest first", _decisions)
    decisions.add_argument("--limit", type=int, default=20, help="how many (20)")
    decisions.add_argument("--before", metavar="TIME", help="fire times at or before TIME")

    why = sub.add_parser(
        "why",
        help="why did a schedule (not) run then? one sentence from its decision ledger",
        description="Why did SCHEDULE (not) run at TIME? Answered from the decision ledger.",
        epilog=ENV_HELP, formatter_class=fmt,
    )  # fmt: skip
    why.add_argument("schedule", metavar="SCHEDULE", help="the schedule's name")
    why.add_argument("--at", metavar="TIME", help="the time asked about (default: its latest"
                     " decision)")  # fmt: skip
    _connection(why, top=True)
    why.set_defaults(func=_why)
