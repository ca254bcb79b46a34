"""What the job commands print, and the exit codes they end with: plain functions of the answers.

A job shows the same whichever tier answered: `Progress` is the part of an orchestrator's `Job`
or a worker's `JobInfo` that a person follows (state, attempts, where, how long). The commands'
I/O is in `app.cli.jobs`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec

from app.pb import orchestrator as opb
from app.pb import worker as wpb

#: A job's outcome as the exit code of a command that waited for it.
EXIT_SUCCEEDED = 0
EXIT_CALL_FAILED = 1  # the call failed: unreachable, refused, the wrong tier...
EXIT_USAGE = 2  # a bad option or config value (argparse's code too)
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_TIMED_OUT = 5  # the job ran past its own timeout (state TIMED_OUT)
EXIT_WAIT_EXPIRED = 6  # --timeout ran out while the job went on
OUTCOME_EXIT = {
    "SUCCEEDED": EXIT_SUCCEEDED,
    "FAILED": EXIT_FAILED,
    "CANCELLED": EXIT_CANCELLED,
    "TIMED_OUT": EXIT_TIMED_OUT,
}
FINISHED = frozenset(OUTCOME_EXIT)
EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_SUCCEEDED}  done (with --wait: the job SUCCEEDED)
  {EXIT_CALL_FAILED}  the call failed (one line on stderr: unreachable, refused, wrong tier...)
  {EXIT_USAGE}  a bad option or config value
  {EXIT_FAILED}  with --wait: the job FAILED
  {EXIT_CANCELLED}  with --wait: the job was CANCELLED
  {EXIT_TIMED_OUT}  with --wait: the job TIMED_OUT (ran past its own --job-timeout)
  {EXIT_WAIT_EXPIRED}  with --wait: --timeout ran out first (the job goes on)
"""

LIST_EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_SUCCEEDED}  listed (no job matching is no error)
  {EXIT_CALL_FAILED}  the call failed (one line on stderr: unreachable, refused, wrong tier...)
  {EXIT_USAGE}  a bad option
"""

#: The orchestrator's state names, for --state.
STATE_NAMES = tuple(s.name for s in opb.JobState if s is not opb.JobState.JOB_STATE_UNSPECIFIED)


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """A job as someone following it sees it. Times are Unix seconds (None: not yet)."""

    job_id: str
    job_type: str
    state: str
    attempts: int = 0
    worker: str = ""
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result_json: str = ""
    error: str = ""

    @property
    def finished(self) -> bool:
        """Whether the job has reached one of its four ends."""
        return self.state in FINISHED


def instant(text: str) -> float | None:
    """An RFC 3339 instant from a message as Unix seconds; None when empty (or unreadable)."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def state_name(state: int, enum: type[opb.JobState] | type[wpb.JobState]) -> str:
    """The name of a state of either tier's enum (its number when this version lacks it)."""
    try:
        return enum(state).name
    except ValueError:
        return str(int(state))


def from_job(job: opb.Job) -> Progress:
    """An orchestrator's `Job`: its last attempt says where it runs (or ran)."""
    last = job.attempts[-1] if job.attempts else None
    return Progress(
        job_id=job.job_id, job_type=job.job_type, state=state_name(job.state, opb.JobState),
        attempts=len(job.attempts), worker=last.worker if last else "",
        submitted_at=instant(job.submitted_at),
        started_at=instant(last.started_at) if last else None,
        finished_at=instant(job.finished_at), result_json=job.result_json, error=job.error,
    )  # fmt: skip


def from_info(info: wpb.JobInfo, worker: str) -> Progress:
    """A worker's `JobInfo` (one run: no attempts to count)."""
    return Progress(
        job_id=info.id, job_type=info.name, state=state_name(info.state, wpb.JobState),
        attempts=1 if instant(info.started_at) else 0, worker=worker,
        submitted_at=instant(info.submitted_at), started_at=instant(info.started_at),
        finished_at=instant(info.finished_at), result_json=info.result_json, error=info.error,
    )  # fmt: skip


# --- durations and instants ---------------------------------------------------------------------


def duration(seconds: float) -> str:
    """`850ms`, `4.2s`, `3m04s`, `2h05m`, `3d04h`: short, and exact enough to compare."""
    if seconds < 0 or not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86_400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86_400}d{whole % 86_400 // 3600:02d}h"


def utc_label(timestamp: float | None) -> str:
    """`2026-11-29T18:11:07Z`: to the second, in UTC (as the trigger's job ids are)."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_when(text: str, now: float) -> float:
    """`--since`/`--until`: an ISO 8601 time (local when it has no offset), `now`, or an age
    such as `90s`, `10m`, `2h`, `3d`, `1w` (that long before `now`). ValueError otherwise."""
    value = text.strip().lower()
    if value == "now":
        return now
    relative = _RELATIVE.match(value)
    if relative:
        return now - float(relative[1]) * _UNIT[relative[2]]
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time (2026-11-29T18:00, local unless it has an offset) or"
            f" an age like 10m, 2h, 3d; got {text!r}"
        ) from None
    return at.timestamp() if at.tzinfo else at.astimezone().timestamp()


def parse_states(values: Sequence[str]) -> list[str]:
    """`--state` values (repeatable, or comma-separated; any case) as state names; ValueError
    naming the unknown one."""
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().upper().replace("-", "_")
            if not name:
                continue
            if name not in STATE_NAMES:
                raise ValueError(f"unknown state {part.strip()!r}; one of {', '.join(STATE_NAMES)}")
            if name not in names:
                names.append(name)
    return names


# --- following a job ------------------------------------------------------------------------------


def where(p: Progress) -> str:
    """`attempt 2 on 10.0.0.7:9091`, or empty before the first."""
    if not p.attempts:
        return ""
    return f"attempt {p.attempts} on {p.worker}" if p.worker else f"attempt {p.attempts}"


def progress_line(p: Progress, now: float) -> str:
    """One line while the job goes on: id, state, how long since it was submitted, where (the
    end of the line is what a narrow terminal cuts)."""
    parts = [p.job_id, f"{p.state:<10}"]
    if p.submitted_at is not None:
        parts.append(f"{duration(now - p.submitted_at):>6}")
    if here := where(p):
        parts.append(here)
    return "  ".join(parts)


def took(p: Progress) -> float | None:
    """Seconds from submit to the end; None while it goes on (or when a time is missing)."""
    if p.finished_at is None or p.submitted_at is None:
        return None
    return p.finished_at - p.submitted_at


def outcome_lines(p: Progress) -> list[str]:
    """The end: its state, how long it took and where, then its result or error."""
    head = f"{p.job_id}  {p.state}"
    if (seconds := took(p)) is not None:
        head += f" in {duration(seconds)}"
    detail = [f"{p.attempts} attempt{'s' if p.attempts != 1 else ''}"] if p.attempts else []
    if p.worker:
        detail.append(f"last on {p.worker}")
    if detail:
        head += f" ({', '.join(detail)})"
    lines = [head]
    if p.result_json:
        lines.append(f"result: {p.result_json}")
    if p.error:
        lines.append(f"error: {p.error}")
    return lines


def expired_line(p: Progress | None, job_id: str, seconds: float, worker: str = "") -> str:
    """What a wait that --timeout ended says: the job goes on (on `worker`, when called
    directly)."""
    state = f"is {p.state} and goes on" if p is not None else "was not seen yet (it may go on)"
    again = f"jobworker job {job_id} --wait" + (f" --worker {worker}" if worker else "")
    return (
        f"jobworker: stopped waiting after {seconds:g}s (--timeout): job {job_id} {state};"
        f" `{again}` follows it again"
    )


# --- listing and showing ------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart (the last one not padded)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


JOB_COLUMNS = ("ID", "TYPE", "STATE", "ATTEMPTS", "WORKER", "SUBMITTED", "TOOK")


def jobs_table(jobs: Sequence[opb.Job]) -> list[str]:
    """`jobworker jobs`: one row per job (TOOK: from submit to the end)."""
    rows = []
    for job in jobs:
        p = from_job(job)
        seconds = took(p)
        rows.append([
            p.job_id, p.job_type, p.state, str(p.attempts), p.worker or "-",
            utc_label(p.submitted_at), duration(seconds) if seconds is not None else "-",
        ])  # fmt: skip
    return table(JOB_COLUMNS, rows)


def _block(fields: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in fields)
    return [f"{name.ljust(width)}  {value}" for name, value in fields if value]


def _params(params: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def job_block(job: opb.Job) -> list[str]:
    """`jobworker job ID`: the job's fields, then its attempts as a table."""
    p = from_job(job)
    first = instant(job.attempts[0].started_at) if job.attempts else None
    timings = []
    if first is not None and p.submitted_at is not None:
        timings.append(f"waited {duration(first - p.submitted_at)}")
    if p.started_at is not None and p.finished_at is not None:
        timings.append(f"last attempt ran {duration(p.finished_at - p.started_at)}")
    if (seconds := took(p)) is not None:
        timings.append(f"took {duration(seconds)} in all")
    lines = _block([
        ("job", p.job_id), ("type", p.job_type), ("state", p.state),
        ("schedule", job.schedule), ("params", _params(job.params)),
        ("submitted", job.submitted_at), ("finished", job.finished_at),
        ("timings", ", ".join(timings)), ("deadline", job.deadline_at),
        ("timeout", f"{job.timeout_seconds:g}s" if job.timeout_seconds else ""),
        ("priority", str(job.priority) if job.priority else ""),
        ("result", job.result_json), ("error", job.error),
    ])  # fmt: skip
    if not job.attempts:
        return [*lines, "attempts  none yet"]
    rows = [
        [str(a.number), a.worker or "-", str(a.fencing_token), a.started_at or "-",
         a.finished_at or "-", a.outcome or "(going)", a.error]
        for a in job.attempts
    ]  # fmt: skip
    header = ("#", "WORKER", "TOKEN", "STARTED", "FINISHED", "OUTCOME", "ERROR")
    return [*lines, "", "attempts:", *("  " + line for line in table(header, rows))]


def info_block(info: wpb.JobInfo, worker: str) -> list[str]:
    """`jobworker job ID --worker ADDR`: one worker's run of the job."""
    p = from_info(info, worker)
    ran = (
        f"ran {duration(p.finished_at - p.started_at)}"
        if p.started_at is not None and p.finished_at is not None
        else ""
    )
    return _block([
        ("job", p.job_id), ("type", p.job_type), ("state", p.state), ("worker", worker),
        ("params", _params(info.params)), ("submitted", info.submitted_at),
        ("started", info.started_at), ("finished", info.finished_at), ("timings", ran),
        ("timeout", f"{info.timeout_seconds:g}s" if info.timeout_seconds else ""),
        ("result", info.result_json), ("error", info.error),
    ])  # fmt: skip
