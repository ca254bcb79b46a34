""" "Why did it (not) run then?": the decision ledger in sentences. Pure: records in, text out.

`sentence(d)` says what one record means. `explain(...)` answers for an instant: the record of
the fire time at it (or the last one before it, saying there was no fire time at that very
instant), or why there is none (in the future, not decided yet, before the schedule existed,
past the ledger's reach).
"""

from __future__ import annotations

from app.fleet.schedules import (
    ScheduleCursor,
    ScheduleSpec,
    TickCause,
    TickDecision,
    TickKind,
    local_label,
)
from app.scheduling.triggers import Trigger
from app.trigger.ticks import after_for, next_tick

#: Within this many seconds of a record's fire time, a question is about that fire time.
SAME_INSTANT = 1.0


def duration(seconds: float) -> str:
    """`0.42s`, `12s`, `5m 03s`, `2h 05m`, `3d 04h`: for people."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _when(d: TickDecision, zone: str) -> str:
    if d.count > 1 and d.first_tick is not None:
        return f"{d.count} fire times from {local_label(d.first_tick, zone)} to {d.tick_text}"
    return d.tick_text or local_label(d.tick, zone)


def sentence(d: TickDecision, zone: str = "UTC") -> str:
    """One record as one sentence."""
    name, when = d.schedule, _when(d, zone)
    by = f" by replica {d.replica}" if d.replica else ""
    grace = f" {duration(d.grace_seconds)}" if d.grace_seconds else ""
    if d.kind in (TickKind.FIRED, TickKind.MOVED):
        late = f"{duration(d.late_seconds)} after its planned time" if d.late_seconds >= 0.05 \
            else "on time"  # fmt: skip
        text = f"{name} ran for {when}: job {d.job_id}, submitted {late}{by}"
        if d.kind is TickKind.MOVED:
            text += f"; DST moved it ({d.reason})"
        elif d.reason:
            text += f" ({d.reason})"
        if d.existing:
            text += "; the orchestrator had the job already (a replica that stopped mid-way had" \
                " submitted it)"  # fmt: skip
        if d.blocking_job:
            text += f"; it replaced job {d.blocking_job}, which was cancelled"
        return text + "."
    if d.kind is TickKind.BACKFILLED:
        before = f" (before, its decision was: {d.previous})" if d.previous else ""
        note = f"; {d.reason}" if d.reason else ""
        return f"{name} ran for {when} later, by a backfill{by}: job {d.job_id}{before}{note}."
    if d.kind is TickKind.TRIGGERED:
        note = f"; {d.reason}" if d.reason else ""
        return f"{name} was triggered by hand at {when}{by}: job {d.job_id}{note}."
    why = {
        TickCause.OVERLAP: (
            f"its overlap policy forbids a second run and job {d.blocking_job} (the previous"
            f" one) was still {d.blocking_state or 'going'}"
        ),
        TickCause.DST: f"{d.reason}; its DST policy skips such times",
        TickCause.PAUSED: f"the schedule was {d.reason}",
        TickCause.NO_REPLICA: (
            f"{d.reason}; it was decided {duration(d.late_seconds)} after its time, past its"
            f"{grace} misfire grace"
        ),
        TickCause.UNREACHABLE: (
            f"the orchestrator did not take it within its{grace} misfire grace ({d.reason})"
        ),
        TickCause.REFUSED: d.reason,
    }.get(d.cause, d.reason or d.kind.value)
    return f"{name} did not run at {when}: {why}."


def explain(
    name: str,
    *,
    at: float | None,
    now: float,
    spec: ScheduleSpec | None,
    trigger: Trigger | None,
    cursor: ScheduleCursor,
    before: TickDecision | None,
    manual: TickDecision | None = None,
    ledger_size: int,
    retention_seconds: float,
) -> str:
    """Why `name` did (not) run at `at` (None: its latest decision), in one sentence or two.

    `before` is the newest record at or before `at` that is not a run by hand; `manual` the
    newest run by hand between that record and `at`, if any.
    """
    zone = spec.zone_name if spec is not None else "UTC"
    if at is None:
        if before is not None:
            return sentence(before, zone)
        if spec is None or trigger is None:
            return f"{name} has no decisions."
        first = next_tick(trigger, after_for(spec, cursor))
        then = f"; its first fire time is {first.at.isoformat()}" if first else ""
        return f"{name} has no decisions yet{then}."
    label = local_label(at, zone)
    if before is not None and abs(before.tick - at) < SAME_INSTANT:
        return sentence(before, zone)
    if manual is not None and abs(manual.tick - at) < SAME_INSTANT:
        return sentence(manual, zone)
    also = (
        f" It was also triggered by hand at {manual.tick_text}: job {manual.job_id}."
        if manual is not None
        else ""
    )
    if spec is not None and trigger is not None:
        nominal = _nominal_at_or_before(trigger, spec, before, at)
        if at > now:
            upcoming = next_tick(trigger, max(now, after_for(spec, cursor)))
            nxt = f"; its next fire time is {upcoming.at.isoformat()}" if upcoming else ""
            return f"{label} is in the future{nxt}."
        if nominal is not None and (before is None or nominal > before.tick + SAME_INSTANT):
            return _undecided(name, spec, cursor, nominal, at, label, ledger_size,
                              retention_seconds) + also  # fmt: skip
        if before is None and at < spec.created_at:
            return (
                f"{name} did not exist yet at {label} (created"
                f" {local_label(spec.created_at, zone)})." + also
            )
    if before is None:
        return (
            f"No decision of {name} at or before {label} is kept (the ledger keeps the last"
            f" {ledger_size} per schedule, for {duration(retention_seconds)})." + also
        )
    last = sentence(before, zone)
    return f"{name} had no fire time at {label}; the last one before: {last}{also}"


def _nominal_at_or_before(
    trigger: Trigger, spec: ScheduleSpec, before: TickDecision | None, at: float
) -> float | None:
    """The last fire time at or before `at` after the record `before` (None: there is none)."""
    start = max(before.tick if before is not None else spec.since, spec.since)
    tick = next_tick(trigger, start)
    found = None
    # a few steps at most in practice: `before` is the record just before `at`
    for _ in range(10_000):
        if tick is None or tick.timestamp > at:
            break
        if tick.runs or not found:
            found = tick.timestamp
        tick = next_tick(trigger, tick.timestamp)
    return found


def _undecided(
    name: str,
    spec: ScheduleSpec,
    cursor: ScheduleCursor,
    nominal: float,
    at: float,
    label: str,
    ledger_size: int,
    retention_seconds: float,
) -> str:
    fire = local_label(nominal, spec.zone_name)
    head = f"{name}'s fire time {fire}" if abs(nominal - at) < SAME_INSTANT else (
        f"{name} had no fire time at {label}; the last one before, {fire},"
    )  # fmt: skip
    if cursor.tick is None or nominal > cursor.tick:
        if cursor.pending is not None and cursor.pending.tick == nominal:
            err = f" (the last error: {cursor.pending.last_error})" if cursor.pending.last_error \
                else ""  # fmt: skip
            return f"{head} is being submitted by replica {cursor.pending.replica}{err}."
        upto = local_label(cursor.tick, spec.zone_name) if cursor.tick is not None else "nothing"
        return (
            f"{head} has not been decided yet: the replicas have decided up to {upto} (is a"
            " trigger replica running?)."
        )
    return (
        f"{head} has no decision kept (the ledger keeps the last {ledger_size} per schedule,"
        f" for {duration(retention_seconds)})."
    )
