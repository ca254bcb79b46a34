"""`jobworker submit`, `job`, `cancel` and `jobs`: jobs for people, through the orchestrator.

Each goes to the orchestrator (`--target`, else `$JOBWORKER_ORCHESTRATOR_TARGET`, else the
orchestrator of a running `jobworker dev`, else localhost:9090); `--worker HOST:PORT` calls one
worker directly instead (its own SendWork/RunWork, GetJob and CancelJob). Answers print for
people (`--json`: the messages as JSON, as the commands printed before).

`--wait` (and `jobs watch ID`) follows the job to its end: a line rewritten in place on a
terminal, a plain line per change in a pipe; the exit code says how it ended (see
`job_views.EXIT_CODES_HELP`). It has no time limit unless `--timeout` sets one: connecting is
bounded, and keepalive pings notice a server that goes silent meanwhile.

`jobs submit|get|cancel|watch` are the older spellings, kept so that scripts go on working.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import anyio
import msgspec

from app.cli import job_views as views
from app.cli import targets
from app.cli.clients import (
    DEFAULT_TIMEOUT_SECONDS,
    DEFAULTS,
    _client_call,
    _parse_params,
)
from app.cli.job_views import Progress
from app.cli.targets import TARGET_ENV, Target
from app.core.clock import utc_iso
from app.errors import ConfigError

#: Jobs `jobworker jobs` shows unless --limit says otherwise.
DEFAULT_LIST_LIMIT = 20
#: Index entries `jobworker jobs` has the orchestrator look at, over its calls, before it stops
#: and prints where to go on from (a filter that matches little would read every record).
LIST_MAX_EXAMINED = 20_000
#: How often a wait on a worker (which has no watch stream) asks it how the job is doing.
WORKER_POLL_SECONDS = 0.5
#: How often the live line's elapsed time is redrawn.
REDRAW_SECONDS = 1.0

ENV_HELP = targets.env_help("orchestrator")


# --- following a job as it changes ----------------------------------------------------------------


class Display:
    """Shows a job's progress: one line rewritten in place on a terminal (`live`), else a plain
    line each time its state, attempt or worker changes."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self._stream = stream
        self.live = live
        self._last: Progress | None = None
        self._shown: tuple[str, int, str] | None = None
        self._open = False  # a live line is on screen, without its newline

    def show(self, progress: Progress) -> None:
        """The job as it is now."""
        self._last = progress
        key = (progress.state, progress.attempts, progress.worker)
        if self.live:
            self._draw()
        elif key != self._shown and not progress.finished:  # the end has lines of its own
            self._write(views.progress_line(progress, time.time()) + "\n")
        self._shown = key

    def redraw(self) -> None:
        """Bring the live line's elapsed time up to date."""
        if self.live and self._last is not None:
            self._draw()

    def end(self, lines: list[str]) -> None:
        """The outcome: replaces the live line."""
        self._clear()
        self._write("".join(line + "\n" for line in lines))

    def close(self) -> None:
        """Leave the terminal on a fresh line (an interrupted wait)."""
        if self._open:
            self._write("\n")
            self._open = False

    def _draw(self) -> None:
        assert self._last is not None
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
        line = views.progress_line(self._last, time.time())[:width]
        self._write(f"\r\x1b[K{line}")
        self._open = True

    def _clear(self) -> None:
        if self._open:
            self._write("\r\x1b[K")
            self._open = False

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


class Followed(msgspec.Struct, kw_only=True):
    """How a wait ended: the job as last seen, and whether --timeout ended the wait first."""

    last: Progress | None = None
    message: Any = None  # the last message (Job or JobInfo), for --json
    expired: bool = False


@contextmanager
def _closed_on_error(display: Display | None) -> Iterator[None]:
    """An error or Ctrl-C while a live line is open leaves the terminal on a fresh line."""
    try:
        yield
    except BaseException:
        if display is not None:
            display.close()
        raise


def _display(args: argparse.Namespace) -> Display | None:
    """None with --json (the messages are printed instead)."""
    return None if args.json else Display(sys.stdout, live=sys.stdout.isatty())


async def _redrawing(display: Display | None) -> None:
    if display is None or not display.live:
        return
    while True:
        await anyio.sleep(REDRAW_SECONDS)
        display.redraw()


async def _follow(
    display: Display | None,
    followed: Followed,
    limit: float | None,
    changes: Callable[[Followed], Awaitable[None]],
) -> Followed:
    """Run `changes(followed)` (which updates `followed` and the display as the job changes,
    and returns once it has ended) for at most `limit` seconds, the live line redrawn
    meanwhile."""
    with anyio.move_on_after(math.inf if limit is None else limit) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_redrawing, display)
            await changes(followed)
            tg.cancel_scope.cancel()
    followed.expired = scope.cancelled_caught
    return followed


def _ended(
    args: argparse.Namespace, display: Display | None, followed: Followed, job_id: str
) -> int:
    """Print how a wait ended and return its exit code."""
    last = followed.last
    if display is not None and (followed.expired or last is None or not last.finished):
        display.close()
    if followed.expired:
        worker = getattr(args, "worker", None) or ""
        print(views.expired_line(last, job_id, args.timeout, worker), file=sys.stderr)
        return views.EXIT_WAIT_EXPIRED
    if last is None or not last.finished:
        state = f" ({last.state})" if last is not None else ""
        print(f"jobworker: the wait for job {job_id} ended before the job did{state}",
              file=sys.stderr)  # fmt: skip
        return views.EXIT_CALL_FAILED
    if display is not None:
        display.end(views.outcome_lines(last))
    return views.OUTCOME_EXIT[last.state]


# --- the orchestrator -----------------------------------------------------------------------------


def _orchestrator(args: argparse.Namespace) -> Target:
    """The orchestrator to call, and where that came from (for the one-line failures)."""
    return targets.resolve("orchestrator", args.target, **targets.config_args(args))


def _worker(args: argparse.Namespace) -> Target:
    """The worker `--worker` names."""
    return Target(kind="worker", address=args.worker, source="--worker")


def _answer_timeout(args: argparse.Namespace) -> float:
    return float(args.timeout) if args.timeout is not None else DEFAULT_TIMEOUT_SECONDS


def _print_json(message: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(message.to_dict(), indent=indent), flush=True)


async def _watch_orchestrator(
    stub: Any, job_id: str, display: Display | None, followed: Followed, *, lines: bool
) -> None:
    """Follow WatchJob's stream to the job's end (`lines`: each change as a JSON line when
    there is no display)."""
    from app.pb import orchestrator as pb

    async for job in stub.watch_job(pb.JobRequest(job_id=job_id)):
        followed.last, followed.message = views.from_job(job), job
        if display is not None:
            display.show(followed.last)
        elif lines:
            _print_json(job, indent=None)


def _submit(args: argparse.Namespace) -> int:
    if args.worker:
        return _submit_to_worker(args)
    from app.pb import orchestrator as pb

    req = pb.BatchExecutionRequest(
        job_id=args.id or "", job_type=args.job_type, params=_parse_params(args.param),
        timeout_seconds=args.job_timeout or 0.0, deadline_seconds=args.deadline or 0.0,
        priority=args.priority, retry_on_failure=args.retry_on_failure,
        max_attempts=args.max_attempts or 0,
    )  # fmt: skip
    if not args.wait:
        res = _client_call(
            _orchestrator(args),
            lambda ch: pb.OrchestratorServiceStub(ch).submit(req),
            _answer_timeout(args),
        )
        if args.json:
            _print_json(res)
        else:
            _say_submitted(res.job_id, views.state_name(res.state, pb.JobState), res.existing)
        return 0
    display = _display(args)
    submitted: list[str] = []

    async def call(ch: Any) -> Followed:
        stub = pb.OrchestratorServiceStub(ch)

        async def changes(followed: Followed) -> None:
            res = await stub.submit(req)
            submitted.append(res.job_id)
            if res.existing:
                state = views.state_name(res.state, pb.JobState)
                print(f"job {res.job_id} exists already ({state}): not submitted again;"
                      " following it", file=sys.stderr)  # fmt: skip
            # --json prints the end alone (as Execute answers), not each change
            await _watch_orchestrator(stub, res.job_id, display, followed, lines=False)

        return await _follow(display, Followed(), args.timeout, changes)

    target = _orchestrator(args)
    with _closed_on_error(display):
        followed = _client_call(target, call, None)
    if not submitted:  # --timeout ran out before the orchestrator answered the submit
        print(f"jobworker: TimeoutError: no answer from {target} within {args.timeout:g}s"
              " (--timeout)", file=sys.stderr)  # fmt: skip
        return views.EXIT_CALL_FAILED
    job_id = submitted[0]
    if args.json and followed.message is not None and not followed.expired:
        _print_json(pb.BatchExecutionResponse(job=followed.message))
    return _ended(args, display, followed, job_id)


def _say_submitted(job_id: str, state: str, existing: bool) -> None:
    if existing:
        print(f"job {job_id} exists already ({state}): not submitted again")
    else:
        print(f"submitted {job_id} ({state})")


def _job(args: argparse.Namespace) -> int:
    """`job ID` (`jobs get`), with --wait `jobs watch`; `cancel ID` (`jobs cancel`)."""
    if args.worker:
        return _worker_job(args)
    from app.pb import orchestrator as pb

    ref = pb.JobRequest(job_id=args.id)
    if args.command_name == "cancel" or not args.wait:
        cancel = args.command_name == "cancel"

        def call(ch: Any) -> Any:
            stub = pb.OrchestratorServiceStub(ch)
            return stub.cancel_job(ref) if cancel else stub.get_job(ref)

        job = _client_call(_orchestrator(args), call, _answer_timeout(args))
        if args.json:
            _print_json(job)
        else:
            print("\n".join(views.job_block(job)))
        return 0
    display = _display(args)

    async def follow(ch: Any) -> Followed:
        stub = pb.OrchestratorServiceStub(ch)

        async def changes(followed: Followed) -> None:
            await _watch_orchestrator(stub, args.id, display, followed, lines=True)

        return await _follow(display, Followed(), args.timeout, changes)

    with _closed_on_error(display):
        followed = _client_call(_orchestrator(args), follow, None)
    return _ended(args, display, followed, args.id)


def _list(args: argparse.Namespace) -> int:
    """`jobworker jobs` (`jobs list`): recent jobs, newest first, as a table."""
    from app.pb import orchestrator as pb

    try:
        states = views.parse_states(args.state)
    except ValueError as exc:
        raise ConfigError("--state", str(exc)) from None
    now = time.time()
    bounds: dict[str, float] = {}
    for flag, value in (("--since", args.since), ("--until", args.until)):
        if value:
            try:
                bounds[flag] = views.parse_when(value, now)
            except ValueError as exc:
                raise ConfigError(flag, str(exc)) from None
    if bounds.get("--until", math.inf) <= bounds.get("--since", -math.inf):
        raise ConfigError("--until", "must be after --since")
    if args.limit < 1:
        raise ConfigError("--limit", "must be at least 1")

    async def call(ch: Any) -> pb.ListJobsResponse:
        stub = pb.OrchestratorServiceStub(ch)
        found: list[pb.Job] = []
        token, examined = args.page_token or "", 0
        while True:
            res = await stub.list_jobs(pb.ListJobsRequest(
                states=[pb.JobState[name] for name in states], job_type=args.type or "",
                schedule=args.schedule or "",
                submitted_since=utc_iso(bounds["--since"]) if "--since" in bounds else "",
                submitted_until=utc_iso(bounds["--until"]) if "--until" in bounds else "",
                limit=min(1000, args.limit - len(found)), page_token=token,
            ))  # fmt: skip
            found += res.jobs
            examined += res.examined
            token = res.next_page_token
            if not token or len(found) >= args.limit or examined >= LIST_MAX_EXAMINED:
                break
        return pb.ListJobsResponse(jobs=found, next_page_token=token, examined=examined)

    res = _client_call(_orchestrator(args), call, _answer_timeout(args))
    if args.json:
        _print_json(res)
        return 0
    print("\n".join(views.jobs_table(res.jobs)) if res.jobs else "no jobs")
    if res.next_page_token:
        more = "more" if len(res.jobs) >= args.limit else "older ones not looked at"
        print(f"({len(res.jobs)} shown, {res.examined} looked at; {more}:"
              f" --page-token {res.next_page_token})", file=sys.stderr)  # fmt: skip
    return 0


# --- one worker, directly ------------------------------------------------------------------------


def _submit_to_worker(args: argparse.Namespace) -> int:
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    from app.pb import worker as pb

    unused = [flag for flag, value in (("--deadline", args.deadline),
              ("--priority", args.priority), ("--retry-on-failure", args.retry_on_failure),
              ("--max-attempts", args.max_attempts)) if value]  # fmt: skip
    if unused:
        raise ConfigError(unused[0], "is the orchestrator's: not with --worker")
    req = pb.SendWorkReq(
        id=args.id or uuid.uuid4().hex,
        name=args.job_type,
        params=_parse_params(args.param),
        timeout_seconds=args.job_timeout or 0.0,
    )
    if not args.wait:
        res = _client_call(
            _worker(args), lambda ch: pb.WorkerServiceStub(ch).send_work(req), _answer_timeout(args)
        )
        if args.json:
            _print_json(res)
        else:
            print(f"sent {req.id} to {args.worker} ({views.state_name(res.state, pb.JobState)})")
        return 0
    display = _display(args)

    async def call(ch: Any) -> Followed:
        stub = pb.WorkerServiceStub(ch)

        async def changes(followed: Followed) -> None:
            async def poll() -> None:
                while True:
                    try:
                        info = await stub.get_job(pb.JobRef(id=req.id))
                    except GRPCError as exc:
                        if exc.status is not Status.NOT_FOUND:  # not there yet
                            raise
                    else:
                        _seen(display, followed, info, args.worker, lines=False)
                    await anyio.sleep(WORKER_POLL_SECONDS)

            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                final = await stub.run_work(req)  # runs it, and answers at its end
                tg.cancel_scope.cancel()
            _seen(display, followed, final, args.worker, lines=False)

        return await _follow(display, Followed(), args.timeout, changes)

    with _closed_on_error(display):
        followed = _client_call(_worker(args), call, None)
    if args.json and followed.message is not None and not followed.expired:
        _print_json(followed.message)
    return _ended(args, display, followed, req.id)


def _seen(
    display: Display | None, followed: Followed, info: Any, worker: str, *, lines: bool
) -> None:
    """A worker's JobInfo, polled: shown when it changed (`lines`: as a JSON line with --json)."""
    progress = views.from_info(info, worker)
    changed = followed.last is None or (followed.last.state != progress.state)
    followed.last, followed.message = progress, info
    if display is not None:
        display.show(progress)
    elif lines and changed:
        _print_json(info, indent=None)


def _worker_job(args: argparse.Namespace) -> int:
    from app.pb import worker as pb

    ref = pb.JobRef(id=args.id)
    if args.command_name == "cancel" or not args.wait:
        cancel = args.command_name == "cancel"

        def call(ch: Any) -> Any:
            stub = pb.WorkerServiceStub(ch)
            return stub.cancel_job(ref) if cancel else stub.get_job(ref)

        info = _client_call(_worker(args), call, _answer_timeout(args))
        if args.json:
            _print_json(info)
        else:
            print("\n".join(views.info_block(info, args.worker)))
        return 0
    display = _display(args)

    async def follow(ch: Any) -> Followed:
        stub = pb.WorkerServiceStub(ch)

        async def changes(followed: Followed) -> None:
            while followed.last is None or not followed.last.finished:
                if followed.last is not None:
                    await anyio.sleep(WORKER_POLL_SECONDS)
                _seen(display, followed, await stub.get_job(ref), args.worker, lines=True)

        return await _follow(display, Followed(), args.timeout, changes)

    with _closed_on_error(display):
        followed = _client_call(_worker(args), follow, None)
    return _ended(args, display, followed, args.id)


# --- the command line ----------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, worker: bool = True, waits: bool = False) -> None:
    p.add_argument(
        "--target", metavar="HOST:PORT",
        help=f"the orchestrator (default ${TARGET_ENV['orchestrator']}, else"
        f" client.orchestrator, else the running `jobworker dev` fleet's, else"
        f" {DEFAULTS['orchestrator']})",
    )  # fmt: skip
    targets.add_config_options(p)
    if worker:
        p.add_argument(
            "--worker", metavar="HOST:PORT",
            help="call this worker directly instead of an orchestrator",
        )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_SECONDS:g})"
        + ("; with --wait, for the job's end (default: no limit; then exit code"
           f" {views.EXIT_WAIT_EXPIRED})" if waits else ""),
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the answer as JSON (the messages)")
    p.set_defaults(target_kind="orchestrator")


def _submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_type", metavar="TYPE", help="the job's type: the worker's job name")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the job (repeatable); values are strings")  # fmt: skip
    p.add_argument("--id", help="job id (default: generated); an id known already is not run"
                   " again: the known job answers")  # fmt: skip
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end; the exit code says how it ended",
    )
    p.add_argument("--job-timeout", type=float, metavar="SECONDS",
                   help="the job's own run time limit (past it: TIMED_OUT)")  # fmt: skip
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="how long it may wait for a worker and run, in all")  # fmt: skip
    p.add_argument("--priority", type=int, default=0, help="0 (default) to 9: higher goes first")
    p.add_argument("--retry-on-failure", action="store_true",
                   help="run it again (on another worker) when it FAILED")  # fmt: skip
    p.add_argument("--max-attempts", type=int, metavar="N",
                   help="attempts in all (default: the orchestrator's)")  # fmt: skip
    _common(p, waits=True)
    p.set_defaults(func=_submit, command_name="submit")


def _job_options(p: argparse.ArgumentParser, name: str, *, wait: bool | None = None) -> None:
    p.add_argument("id", metavar="ID", help="the job's id")
    if name == "job" and wait is None:
        p.add_argument(
            "--wait",
            action="store_true",
            help="follow the job to its end; the exit code says how it ended",
        )
    _common(p, waits=name == "job")
    p.set_defaults(func=_job, command_name=name, **({"wait": wait} if wait is not None else {}))


def _list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", action="append", default=[], metavar="STATE",
                   help=f"only jobs in this state (repeatable, or comma-separated): "
                   f"{', '.join(views.STATE_NAMES)}")  # fmt: skip
    p.add_argument("--type", metavar="TYPE", help="only jobs of this type")
    p.add_argument("--schedule", metavar="NAME", help="only the runs of this schedule")
    p.add_argument("--since", metavar="TIME",
                   help="submitted at or after TIME: ISO 8601 (local time unless it has an"
                   " offset), or an age: 90s, 10m, 2h, 3d, 1w")  # fmt: skip
    p.add_argument("--until", metavar="TIME", help="submitted before TIME (as --since)")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        help=f"jobs to show, newest first (default {DEFAULT_LIST_LIMIT})",
    )
    p.add_argument(
        "--page-token",
        metavar="TOKEN",
        help="go on where an earlier listing stopped (it prints the token)",
    )
    _common(p, worker=False)
    p.set_defaults(func=_list, command_name="jobs")


def add_parsers(sub: Any) -> None:
    """`submit`, `job`, `cancel` and `jobs` (with the older `jobs submit|get|cancel|watch`), on
    the `jobworker` subparsers `sub`."""
    fmt = argparse.RawDescriptionHelpFormatter
    epilog = f"{views.EXIT_CODES_HELP}\n{ENV_HELP}"

    def command(parent: Any, name: str, help_: str | None, description: str) -> Any:
        kwargs: dict[str, Any] = {"help": help_} if help_ else {}
        return parent.add_parser(name, description=description, epilog=epilog,
                                 formatter_class=fmt, **kwargs)  # fmt: skip

    submit_help = "submit a job (through the orchestrator; --worker: to one worker)"
    _submit_options(command(sub, "submit", submit_help, submit_help[0].upper() + submit_help[1:]
                            + ". With --wait, follow it to its end."))  # fmt: skip
    _job_options(command(sub, "job", "show a job and its attempts (--wait: follow it)",
                         "Show a job: its fields and its attempts."), "job")  # fmt: skip
    _job_options(command(sub, "cancel", "cancel a job",
                         "Cancel a job: a queued one ends at once, a running one on its"
                         " worker; shows it after."), "cancel")  # fmt: skip

    list_help = "list recent jobs, newest first (filters: state, type, schedule, time)"
    list_about = (
        "List recent jobs, newest first, from the job index the orchestrators keep: ID, TYPE,"
        " STATE, ATTEMPTS, the WORKER of the last attempt, SUBMITTED (UTC) and TOOK (from"
        " submit to the end)."
    )
    list_epilog = f"{views.LIST_EXIT_CODES_HELP}\n{ENV_HELP}"
    jobs = sub.add_parser("jobs", help=list_help, description=list_about, epilog=list_epilog,
                          formatter_class=fmt)  # fmt: skip
    _list_options(jobs)
    actions = jobs.add_subparsers(
        dest="action", metavar="[list]", help="the default (and only) listing: as no action"
    )
    _list_options(actions.add_parser("list", help="the same: list recent jobs",
                                     description=list_about, epilog=list_epilog,
                                     formatter_class=fmt))  # fmt: skip
    # the older spellings, for scripts: not listed in --help
    _submit_options(command(actions, "submit", None, "As `jobworker submit`."))
    _job_options(command(actions, "get", None, "As `jobworker job ID`."), "job", wait=False)
    _job_options(command(actions, "cancel", None, "As `jobworker cancel ID`."), "cancel")
    _job_options(command(actions, "watch", None, "As `jobworker job ID --wait`."), "job",
                 wait=True)  # fmt: skip
