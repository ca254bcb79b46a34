"""The pure core of the trigger: which tick comes next, and what to do about it. No I/O, no awaits.

A replica working a schedule asks `plan_step` what to do, given the schedule, its cursor (the
last nominal tick decided) and the wall time:

- `Idle`: nothing is due; wake at the next tick's planned instant (jitter included);
- `Record`: ticks decided without asking anyone: the schedule is paused (each tick is *missed*,
  paused), a DST rule skips the time (*skipped*), or the tick is later than its misfire grace
  (*missed*: a replica was stopped for long, or none was up). They go to the ledger in one step;
- `Submit`: a tick that should run now; the shell asks the orchestrator about the previous
  tick's job, then `judge` applies the overlap policy through the scheduling kernel's
  `decide()`, and the shell submits.

Ticks come from the kernel's triggers (`app.fleet.schedules.trigger_for`), strictly after the
cursor (or the schedule's `since` when the cursor is older), so every replica computes the
same ticks, and jitter is the kernel's deterministic fraction per (schedule, tick).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from app.fleet.schedules import (
    ScheduleCursor,
    ScheduleSpec,
    TickCause,
    TickDecision,
    TickKind,
    local_label,
)
from app.scheduling.decisions import DecisionKind, DueTick, SchedulePolicy, Verdict, decide
from app.scheduling.decisions import jitter_for as kernel_jitter
from app.scheduling.triggers import Tick, Trigger

#: Past this many due ticks at once, the rest up to the newest are found by bisection.
MAX_ENUMERATED = 100_000


class Idle(msgspec.Struct, frozen=True, kw_only=True):
    """Nothing due: the next tick's planned instant (None: the schedule fires no more)."""

    wake_at: float | None
    tick: Tick | None = None


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """Ticks decided here and now, oldest first: write them and move the cursor."""

    decisions: list[TickDecision]


class Submit(msgspec.Struct, frozen=True, kw_only=True):
    """A tick that should run: judge overlap, then submit by `deadline` (planned + grace)."""

    tick: Tick
    planned: float
    jitter: float
    deadline: float


Step = Idle | Record | Submit


def jitter_for(spec: ScheduleSpec, tick: Tick) -> float:
    """The tick's delay within the schedule's jitter: the same on every replica."""
    return kernel_jitter(spec.name, tick, spec.jitter_seconds)


def _instant(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def after_for(spec: ScheduleSpec, cursor: ScheduleCursor) -> float:
    """The instant the schedule's next tick comes strictly after."""
    if cursor.tick is not None and cursor.tick >= spec.since:
        return cursor.tick
    return spec.since


def next_tick(trigger: Trigger, after: float) -> Tick | None:
    """The trigger's first tick strictly after the instant `after`."""
    return trigger.next_tick(_instant(after))


def ticks_between(trigger: Trigger, after: float, until: float, *, limit: int) -> list[Tick]:
    """The ticks in (`after`, `until`], oldest first, at most `limit`."""
    found: list[Tick] = []
    tick = next_tick(trigger, after)
    while tick is not None and tick.timestamp <= until and len(found) < limit:
        found.append(tick)
        tick = next_tick(trigger, tick.timestamp)
    return found


def last_tick_before(trigger: Trigger, known: Tick, until: float) -> Tick:
    """The latest tick at or before `until`, from a `known` one at or before it (bisection: a
    week of 1 s ticks is ~40 trigger calls)."""
    lo, hi = known.at.astimezone(UTC), _instant(until)
    best = known
    while hi - lo > timedelta(microseconds=1):
        mid = lo + (hi - lo) / 2
        tick = trigger.next_tick(mid)
        if tick is not None and tick.timestamp <= until:
            lo, best = mid, tick
        else:
            hi = mid
    return best


def decision(
    spec: ScheduleSpec,
    tick: float,
    kind: TickKind,
    *,
    now: float,
    replica: str,
    **fields: object,
) -> TickDecision:
    """A ledger record for `tick` of `spec`, its instant shown in the schedule's zone."""
    return TickDecision(
        schedule=spec.name,
        tick=tick,
        tick_text=local_label(tick, spec.zone_name),
        kind=kind,
        decided_at=now,
        replica=replica,
        **fields,  # type: ignore[arg-type]
    )


def _quiet(
    spec: ScheduleSpec, tick: Tick, cursor: ScheduleCursor, *, late: float
) -> tuple[TickKind, TickCause, str] | None:
    """How a due tick is decided without asking the orchestrator, or None when it should run."""
    if spec.paused:
        since = "" if spec.paused_at is None else f" since {local_label(spec.paused_at, 'UTC')}"
        note = f": {spec.pause_note}" if spec.pause_note else ""
        return TickKind.MISSED, TickCause.PAUSED, f"paused{since}{note}"
    if not tick.runs:
        return TickKind.SKIPPED, TickCause.DST, tick.note
    if late <= spec.misfire_grace_seconds:
        return None
    pending = cursor.pending
    if pending is not None and pending.tick == tick.timestamp and pending.last_error:
        return (
            TickKind.MISSED,
            TickCause.UNREACHABLE,
            (
                f"{pending.attempts} failed attempt(s) by replica {pending.replica}, the last: "
                f"{pending.last_error}"
            ),
        )
    if pending is not None and pending.tick == tick.timestamp:
        return (
            TickKind.MISSED,
            TickCause.NO_REPLICA,
            (
                f"replica {pending.replica} took it and stopped before submitting it; no replica "
                "took it over within the grace"
            ),
        )
    return TickKind.MISSED, TickCause.NO_REPLICA, NO_REPLICA


#: Why a tick nobody took in time is missed (no replica was up, or none could reach Redis).
NO_REPLICA = "no trigger replica was working the schedule (none was up, or none reached Redis)"


def plan_step(
    spec: ScheduleSpec,
    trigger: Trigger,
    cursor: ScheduleCursor,
    *,
    now: float,
    replica: str,
    limit: int,
) -> Step:
    """What to do next for `spec` at wall time `now` (see the module doc).

    A `Record` holds at most `limit` records: beyond that, the oldest of the ticks decided
    alike are one record with their `count`.
    """
    quiet: list[tuple[Tick, float, float, TickKind, TickCause, str]] = []
    tick = next_tick(trigger, after_for(spec, cursor))
    while tick is not None:
        jitter = jitter_for(spec, tick)
        planned = tick.timestamp + jitter
        if planned > now:
            break
        late = now - planned
        verdict = _quiet(spec, tick, cursor, late=late)
        if verdict is None:
            if quiet:
                break  # record those first: the cursor moves in order
            return Submit(
                tick=tick,
                planned=planned,
                jitter=jitter,
                deadline=planned + spec.misfire_grace_seconds,
            )
        quiet.append((tick, late, jitter, *verdict))
        if len(quiet) >= MAX_ENUMERATED:
            # a long outage of a fast schedule: jump to the newest of the ticks decided alike
            bound = now - spec.jitter_seconds
            if verdict[1] is not TickCause.PAUSED:
                bound -= spec.misfire_grace_seconds
            newest = last_tick_before(trigger, tick, bound)
            if newest.timestamp > tick.timestamp:
                kind, cause, reason = verdict
                quiet.append((newest, now - newest.timestamp, 0.0, kind, cause,
                              f"{reason} (and more ticks before it)"))  # fmt: skip
            break
        tick = next_tick(trigger, tick.timestamp)
    if not quiet:
        wake = None if tick is None else tick.timestamp + jitter_for(spec, tick)
        return Idle(wake_at=wake, tick=tick)
    kept = quiet[len(quiet) - (limit - 1) :] if limit > 1 and len(quiet) >= limit else quiet
    if limit <= 1:
        kept = []
    records = [
        decision(spec, t.timestamp, kind, now=now, replica=replica, cause=cause, reason=reason,
                 late_seconds=late, jitter_seconds=jitter, grace_seconds=_grace(spec, cause))
        for t, late, jitter, kind, cause, reason in kept
    ]  # fmt: skip
    folded = quiet[: len(quiet) - len(kept)]
    if folded:
        first, last = folded[0], folded[-1]
        span = f"{len(folded)} ticks from {local_label(first[0].timestamp, spec.zone_name)}"
        records.insert(0, decision(
            spec, last[0].timestamp, last[3], now=now, replica=replica, cause=last[4],
            reason=f"{span}: {last[5]}", late_seconds=last[1], count=len(folded),
            first_tick=first[0].timestamp, grace_seconds=_grace(spec, last[4]),
        ))  # fmt: skip
    return Record(decisions=records)


def _grace(spec: ScheduleSpec, cause: TickCause) -> float:
    late = cause in (TickCause.NO_REPLICA, TickCause.UNREACHABLE)
    return spec.misfire_grace_seconds if late else 0.0


def policy_for(spec: ScheduleSpec) -> SchedulePolicy:
    """The kernel's policy for a schedule: its overlap and grace; ticks never coalesce (each
    nominal tick is decided on its own)."""
    return SchedulePolicy(
        overlap=spec.overlap, misfire_grace=spec.misfire_grace_seconds, coalesce=False
    )


def judge(spec: ScheduleSpec, step: Submit, *, previous_running: bool, now: float) -> Verdict:
    """The kernel's verdict for a due tick, with the previous tick's job going or not."""
    due = DueTick(tick=step.tick, late=max(0.0, now - step.planned))
    (verdict,) = decide([due], policy=policy_for(spec), running=int(previous_running))
    return verdict


def ran_kind(verdict: Verdict) -> TickKind:
    """FIRED, or MOVED when a DST rule moved the tick."""
    return TickKind.MOVED if verdict.kind is DecisionKind.MOVED else TickKind.FIRED
