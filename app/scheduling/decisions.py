"""The pure core of scheduling: policies, decisions, and `decide()`.

`decide()` turns the ticks of one schedule that are due now into verdicts (run, skip, miss,
coalesce, replace) with a reason each; it does no I/O and never awaits, so the worker's
ScheduleManager and the trigger tier share it and cancellation can never cut it in half.
See `app.scheduling.schedule_manager` for the policies' meaning.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from datetime import datetime

import msgspec

from app.scheduling.triggers import Tick


class Overlap(enum.StrEnum):
    """What a tick does while the schedule's previous run still goes (Kubernetes' names)."""

    FORBID = "forbid"
    ALLOW = "allow"
    REPLACE = "replace"


class DecisionKind(enum.StrEnum):
    """What became of a nominal tick: the `kind` of a `Decision`."""

    FIRED = "fired"
    MOVED = "moved"
    """Fired at an instant a DST rule moved it to."""
    SKIPPED = "skipped"
    """Not run: a run still going (overlap), a DST-skipped time, or the schedule paused."""
    MISSED = "missed"
    """Later than the misfire grace."""
    COALESCED = "coalesced"
    """Folded into the run of a later tick that was due at the same time."""


_FIRED, _MOVED = DecisionKind.FIRED, DecisionKind.MOVED


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the scheduler did with one nominal tick (or `count` of them, `tick` the last)."""

    tick: datetime
    kind: DecisionKind
    reason: str = ""
    count: int = 1
    decided_at: datetime


class SchedulePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a schedule treats overlap, lateness, jitter and its start. See the module doc."""

    overlap: Overlap = Overlap.FORBID
    max_instances: int | None = None
    misfire_grace: float | None = None
    coalesce: bool = True
    jitter: float = 0.0
    initial_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.max_instances is not None:
            if self.max_instances < 1:
                raise ValueError("max_instances must be at least 1")
            if self.overlap is not Overlap.ALLOW and self.max_instances != 1:
                raise ValueError("max_instances above 1 needs overlap=allow")
        for name in ("misfire_grace", "jitter", "initial_delay"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds, 0 or more")

    @property
    def limit(self) -> float:
        """Runs allowed at once."""
        if self.overlap is Overlap.ALLOW:
            return math.inf if self.max_instances is None else self.max_instances
        return 1


class DueTick(msgspec.Struct, frozen=True, kw_only=True):
    """A tick that is due now, and how late."""

    tick: Tick
    late: float = 0.0
    """Seconds past its planned instant (jitter included)."""
    jumped: bool = False
    """The wall clock stepped forward over it: not late, and never a burst."""


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """`decide()`'s answer for one tick (or `count` ticks, `tick` the last)."""

    tick: Tick
    kind: DecisionKind
    reason: str = ""
    count: int = 1
    run: bool = False
    replace: bool = False


def tick_label(tick: Tick) -> str:
    """The tick's instant for a reason text, to the second."""
    return tick.at.isoformat(timespec="seconds")


def _seconds(value: float) -> str:
    return f"{value:.3g}s" if value < 100 else f"{value:,.0f}s"


def grouped(kind: DecisionKind, items: list[DueTick], reason: str) -> list[Verdict]:
    """One verdict per tick, or one for all of them when there are many (a long pause)."""
    if len(items) <= 3:
        return [Verdict(tick=d.tick, kind=kind, reason=reason) for d in items]
    span = f"{len(items)} ticks from {tick_label(items[0].tick)} to {tick_label(items[-1].tick)}"
    return [Verdict(tick=items[-1].tick, kind=kind, reason=f"{span}: {reason}", count=len(items))]


def decide(
    due: Sequence[DueTick], *, policy: SchedulePolicy, running: int, uncounted: bool = False
) -> list[Verdict]:
    """What to do with one schedule's ticks that are due now (oldest first); pure.

    `running` is how many of its runs are going. `uncounted` says that more ticks than listed
    were due (between the last two), which the reasons then mention.
    """
    # the common case, taken on every tick (every limit is 1 or more)
    if len(due) == 1 and (running == 0 or running < policy.limit):
        d = due[0]
        tick = d.tick
        grace = policy.misfire_grace
        if tick.runs and not d.jumped and d.late < 1 and (grace is None or d.late <= grace):
            kind = _MOVED if tick.moved else _FIRED
            return [Verdict(tick=tick, kind=kind, reason=tick.note, run=True)]
    verdicts: list[Verdict] = []
    eligible: list[DueTick] = []
    missed: list[DueTick] = []
    for d in due:
        if not d.tick.runs:
            verdicts.append(Verdict(tick=d.tick, kind=DecisionKind.SKIPPED, reason=d.tick.note))
        elif policy.misfire_grace is not None and not d.jumped and d.late > policy.misfire_grace:
            missed.append(d)
        else:
            eligible.append(d)
    more = " and more" if uncounted else ""
    if missed:
        worst = max(d.late for d in missed)
        reason = f"late by up to {_seconds(worst)}, past the {policy.misfire_grace:g}s grace{more}"
        verdicts += grouped(DecisionKind.MISSED, missed, reason)
    # ticks the wall clock stepped over always run once together; others as `coalesce` says
    plain = [d for d in eligible if not d.jumped]
    jumped = [d for d in eligible if d.jumped]
    groups = ([plain] if policy.coalesce else [[d] for d in plain]) if plain else []
    if jumped:
        groups.append(jumped)
    limit = policy.limit
    for group in groups:
        runner, folded = group[-1], group[:-1]
        if folded:
            reason = f"folded into the run for {tick_label(runner.tick)}{more}"
            verdicts += grouped(DecisionKind.COALESCED, folded, reason)
        notes = [runner.tick.note] if runner.tick.note else []
        if runner.jumped:
            notes.append("the wall clock stepped over it")
        elif runner.late >= 1:
            notes.append(f"late by {_seconds(runner.late)}")
        if folded:
            notes.append(f"{len(folded)}{more} earlier due tick(s) folded in")
        kind = DecisionKind.MOVED if runner.tick.moved else DecisionKind.FIRED
        if running < limit:
            running += 1
            verdicts.append(Verdict(tick=runner.tick, kind=kind, reason="; ".join(notes), run=True))
        elif policy.overlap is Overlap.REPLACE:
            notes.append("cancelled the run still going")
            verdicts.append(
                Verdict(
                    tick=runner.tick, kind=kind, reason="; ".join(notes), run=True, replace=True
                )
            )
        else:
            why = (
                "the previous run is still going"
                if policy.overlap is Overlap.FORBID
                else f"{running} runs going (max_instances {policy.max_instances})"
            )
            verdicts.append(Verdict(tick=runner.tick, kind=DecisionKind.SKIPPED, reason=why))
    verdicts.sort(key=lambda v: v.tick.timestamp)
    return verdicts


def jitter_for(name: str, tick: Tick, jitter: float) -> float:
    """The delay for this schedule's tick: a fixed fraction of `jitter` per (name, tick)."""
    if not jitter:
        return 0.0
    digest = hashlib.blake2b(f"{name}\0{tick.timestamp!r}".encode(), digest_size=8).digest()
    return jitter * int.from_bytes(digest) / 2**64
