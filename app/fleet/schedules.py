"""The trigger tier's records: a schedule's definition, its cursor, and its decision ledger.

Shared by the trigger role (which keeps them), the stores (which hold them in Redis) and anything
that reads them (the CLI through gRPC, the web console). A schedule says when (a cron expression
in a zone with its DST policies, or an interval on a grid), what (a job type and its parameters,
the job's deadline and timeout) and how (overlap, misfire grace, jitter). Every nominal fire time
leaves one `TickDecision` in the ledger.

Job ids carry the schedule and the fire time, `nightly@2026-03-08T07:30:00Z` (UTC), so that a
tick submitted twice (a replica that took it over from one killed mid-submit) is one job: the
orchestrator answers a known id with the existing job.
"""

from __future__ import annotations

import enum
import math
import re
from datetime import UTC, datetime

import msgspec

from app.fleet.limits import MAX_NAME_LENGTH, params_problem
from app.scheduling.cron import CronError, RepeatedTime, SkippedTime, parse_cron, parse_zone
from app.scheduling.decisions import Overlap
from app.scheduling.triggers import CronTrigger, IntervalTrigger, Trigger

#: Letters, digits and `_.-`: a schedule's name is part of Redis keys (in a `{...}` hash tag)
#: and of job ids (before the `@`).
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: What the orchestrator takes for a job type.
JOB_TYPE = re.compile(r"^[A-Za-z0-9_.:@/-]+$")
MAX_SCHEDULE_NAME = 100
#: A year: the longest grace, jitter, deadline or timeout a schedule may ask for.
MAX_SECONDS = 366 * 86_400
MAX_PRIORITY = 9
MAX_ATTEMPTS = 20
DEFAULT_MISFIRE_GRACE = 300.0


class ScheduleSource(enum.StrEnum):
    """Who owns a schedule: the TOML config (synced at start) or the runtime API."""

    CONFIG = "config"
    RUNTIME = "runtime"


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule of the trigger tier. Times are Unix epoch seconds.

    Exactly one of `cron` (5 fields, 6 with seconds first, or a macro; in `time_zone` with the
    DST policies) and `interval_seconds` (every so many seconds on a grid from
    `interval_start`, the epoch by default, so that every replica computes the same ticks).
    Ticks come strictly after `since` (the creation, or the last change of when it fires).
    """

    name: str
    job_type: str
    cron: str = ""
    interval_seconds: float = 0.0
    interval_start: float = 0.0
    time_zone: str = "UTC"
    dst_skipped: SkippedTime = SkippedTime.RUN_AT_TRANSITION
    dst_repeated: RepeatedTime = RepeatedTime.ONCE
    params: dict[str, str] = msgspec.field(default_factory=dict)
    overlap: Overlap = Overlap.FORBID
    misfire_grace_seconds: float = DEFAULT_MISFIRE_GRACE
    jitter_seconds: float = 0.0
    # the job's, passed to the orchestrator (0: its defaults)
    deadline_seconds: float = 0.0
    timeout_seconds: float = 0.0
    priority: int = 0
    retry_on_failure: bool = False
    max_attempts: int = 0
    paused: bool = False
    paused_at: float | None = None
    pause_note: str = ""
    source: ScheduleSource = ScheduleSource.RUNTIME
    created_at: float = 0.0
    updated_at: float = 0.0
    since: float = 0.0
    version: int = 0

    @property
    def zone_name(self) -> str:
        """The zone its ticks are shown in (an interval's too)."""
        return self.time_zone or "UTC"

    def timing(self) -> tuple[object, ...]:
        """What decides its fire times: a change of these starts its ticks afresh."""
        return (self.cron, self.interval_seconds, self.interval_start, self.time_zone,
                self.dst_skipped, self.dst_repeated)  # fmt: skip

    def describe(self) -> str:
        """When it fires, in a few words: `cron '30 2 * * *' Europe/Berlin`, `every 60s`."""
        return trigger_for(self).describe()


class InvalidSchedule(ValueError):
    """A schedule field is wrong; `field` names it (as the wire and the config spell it)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _seconds_problem(value: float, *, positive: bool = False) -> str | None:
    low = "above 0" if positive else "0 or more"
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > MAX_SECONDS:
        return f"must be {low} and at most {MAX_SECONDS} seconds"
    return None


def schedule_problem(spec: ScheduleSpec, *, min_grace: float = 0.0) -> tuple[str, str] | None:
    """(field, problem) for the first thing wrong with `spec`, or None when it can run.

    `min_grace`: the shortest misfire grace in which another replica can take a tick over (the
    trigger asks for twice its lease).
    """
    if not spec.name or len(spec.name) > MAX_SCHEDULE_NAME or not SCHEDULE_NAME.match(spec.name):
        return "name", f"letters, digits and _.- only, 1 to {MAX_SCHEDULE_NAME} characters"
    if not spec.job_type:
        return "job_type", "must not be empty"
    if len(spec.job_type) > MAX_NAME_LENGTH or not JOB_TYPE.match(spec.job_type):
        return "job_type", f"letters, digits and _.:@/- only, at most {MAX_NAME_LENGTH}"
    if bool(spec.cron) == bool(spec.interval_seconds):
        return "cron", "give either a cron expression or interval_seconds, not both or neither"
    if spec.cron:
        try:
            parse_cron(spec.cron)
        except CronError as exc:
            return "cron", str(exc)
    else:
        wrong = _seconds_problem(spec.interval_seconds, positive=True)
        if wrong is not None:
            return "interval_seconds", wrong
        if not math.isfinite(spec.interval_start) or abs(spec.interval_start) > 1e11:
            return "interval_start", "must be a time between years 1 and 5000"
    try:
        parse_zone(spec.zone_name)
    except ValueError as exc:
        return "time_zone", str(exc)
    problem = params_problem(spec.params)
    if problem is not None:
        return problem
    for name in ("jitter_seconds", "deadline_seconds", "timeout_seconds"):
        wrong = _seconds_problem(getattr(spec, name))
        if wrong is not None:
            return name, wrong
    wrong = _seconds_problem(spec.misfire_grace_seconds, positive=True)
    if wrong is not None:
        return "misfire_grace_seconds", wrong
    if spec.misfire_grace_seconds < min_grace:
        return "misfire_grace_seconds", (
            f"must be at least {min_grace:g}s (twice trigger.lease_seconds), so that another "
            "replica can take a tick over in time"
        )
    if not 0 <= spec.priority <= MAX_PRIORITY:
        return "priority", f"must be 0..{MAX_PRIORITY}"
    if not 0 <= spec.max_attempts <= MAX_ATTEMPTS:
        return "max_attempts", f"must be 0..{MAX_ATTEMPTS}"
    if len(spec.pause_note) > 1024:
        return "pause_note", "at most 1024 characters"
    return None


def check_schedule(spec: ScheduleSpec, *, min_grace: float = 0.0) -> ScheduleSpec:
    """`spec` when it can run; InvalidSchedule naming the first bad field otherwise."""
    problem = schedule_problem(spec, min_grace=min_grace)
    if problem is not None:
        raise InvalidSchedule(*problem)
    return spec


def trigger_for(spec: ScheduleSpec) -> Trigger:
    """The scheduling kernel's trigger for a (valid) schedule."""
    if spec.cron:
        return CronTrigger(
            spec.cron, tz=spec.zone_name, skipped=spec.dst_skipped, repeated=spec.dst_repeated
        )
    start = datetime.fromtimestamp(spec.interval_start, UTC)
    return IntervalTrigger(spec.interval_seconds, start)


def utc_label(timestamp: float) -> str:
    """`2026-03-08T07:30:00Z`, with microseconds only when there are some: job ids and keys."""
    at = datetime.fromtimestamp(timestamp, UTC)
    text = at.strftime("%Y-%m-%dT%H:%M:%S")
    if at.microsecond:
        text += f".{at.microsecond:06d}".rstrip("0")
    return text + "Z"


def local_label(timestamp: float, zone_name: str) -> str:
    """The instant in the schedule's zone, ISO 8601 with its offset (what people read)."""
    at = datetime.fromtimestamp(timestamp, UTC).astimezone(parse_zone(zone_name))
    return at.isoformat(timespec="microseconds" if at.microsecond else "seconds")


def tick_job_id(schedule: str, tick: float) -> str:
    """The job id of a nominal tick: `<schedule>@<UTC instant>`, the same on every replica."""
    return f"{schedule}@{utc_label(tick)}"


def manual_job_id(schedule: str, at: float) -> str:
    """The job id of a run triggered by hand at `at` (milliseconds: two asks, two runs)."""
    return f"{schedule}@manual-{utc_label(round(at, 3))}"


# --- the cursor and the ledger ------------------------------------------------------------------


class PendingTick(msgspec.Struct, frozen=True, kw_only=True):
    """A tick a replica has taken and is submitting: what a replica that takes over reads."""

    tick: float
    replica: str
    since: float
    attempts: int = 0
    last_error: str = ""


class ScheduleCursor(msgspec.Struct, frozen=True, kw_only=True):
    """How far a schedule's ticks are decided: the last nominal tick with a decision (None: none
    yet), the job of the last run (what overlap is judged against), a tick being submitted."""

    tick: float | None = None
    last_job_id: str = ""
    pending: PendingTick | None = None


class TickKind(enum.StrEnum):
    """What became of a tick."""

    FIRED = "fired"
    MOVED = "moved"
    """Fired at an instant a DST rule moved it to (its wall time did not exist)."""
    SKIPPED = "skipped"
    """Not run: the previous tick's job still going (overlap forbid), or a DST-skipped time."""
    MISSED = "missed"
    """Not run within the misfire grace, or the schedule was paused."""
    BACKFILLED = "backfilled"
    """Run later, by a backfill of a past window."""
    TRIGGERED = "triggered"
    """Run by hand (not a nominal fire time: `tick` is when it was asked for)."""


#: Kinds whose tick has a job: a backfill leaves them alone.
RAN = frozenset({TickKind.FIRED, TickKind.MOVED, TickKind.BACKFILLED})


class TickCause(enum.StrEnum):
    """Why a tick did not run (or ran unusually)."""

    NONE = ""
    OVERLAP = "overlap"
    DST = "dst"
    PAUSED = "paused"
    NO_REPLICA = "no_replica"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"


class TickDecision(msgspec.Struct, frozen=True, kw_only=True):
    """One record of the decision ledger: what became of one nominal tick (or of `count`
    consecutive ones decided alike, from `first_tick` to `tick`), and why."""

    schedule: str
    tick: float
    kind: TickKind
    decided_at: float
    tick_text: str = ""
    cause: TickCause = TickCause.NONE
    reason: str = ""
    job_id: str = ""
    existing: bool = False
    """The orchestrator knew the job id already (a replica took the tick over mid-submit)."""
    late_seconds: float = 0.0
    jitter_seconds: float = 0.0
    grace_seconds: float = 0.0
    """For a miss past the grace: the schedule's misfire grace then."""
    blocking_job: str = ""
    blocking_state: str = ""
    attempts: int = 0
    count: int = 1
    first_tick: float | None = None
    replica: str = ""
    previous: str = ""
    """For a backfill: what the record of that tick said before."""


_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(ScheduleSpec)
_decision_decoder = msgspec.json.Decoder(TickDecision)
_pending_decoder = msgspec.json.Decoder(PendingTick)


def encode_record(record: ScheduleSpec | TickDecision | PendingTick) -> bytes:
    """A record as stored: compact JSON."""
    return _encoder.encode(record)


def decode_spec(raw: bytes | str) -> ScheduleSpec:
    """A schedule from its stored JSON (msgspec.DecodeError when it is not one)."""
    return _spec_decoder.decode(raw)


def decode_decision(raw: bytes | str) -> TickDecision:
    """A ledger record from its stored JSON (msgspec.DecodeError when it is not one)."""
    return _decision_decoder.decode(raw)


def decode_pending(raw: bytes | str) -> PendingTick:
    """A pending tick from its stored JSON (msgspec.DecodeError when it is not one)."""
    return _pending_decoder.decode(raw)
