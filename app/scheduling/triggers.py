"""Triggers: when a schedule fires. Pure objects that answer "the next tick after this instant?".

A trigger does no I/O and reads no clock; the schedule manager asks it and only waits. Ticks are
instants (aware datetimes). Compare them by `timestamp()`: two aware datetimes of one zone
compare by wall time and miss a DST fold.

- `CronTrigger`: the wall times an expression names, in a zone (wall-anchored);
- `IntervalTrigger`: fixed rate, every `seconds` on a grid from `start` (start to start);
- `FixedDelayTrigger`: `seconds` after the previous run ended (end to start);
- `OneShotTrigger`: once, at `at` (wall-anchored).

A wall-clock step moves the ticks of a rate or delay along with it (they keep their pace);
wall-anchored ticks stay on the wall clock.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, tzinfo
from typing import ClassVar, Protocol

import msgspec

from app.scheduling.cron import RepeatedTime, SkippedTime, next_fire, parse_cron, parse_zone

_TICK = timedelta(microseconds=1)


def utc(value: datetime) -> datetime:
    """`value` in UTC: what to compare ticks and do arithmetic on. (Adding a timedelta to a
    zoned datetime drops its `fold`, turning 01:30 EST back into 01:30 EDT.)"""
    return value.astimezone(UTC)


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """One nominal fire time of a trigger."""

    at: datetime
    """The instant (aware; a cron tick is in its zone, so the offset shows)."""
    runs: bool = True
    """False for a tick the trigger reports but drops (a DST-skipped time), so that the
    schedule's decisions can say why nothing ran then."""
    moved: bool = False
    """A DST rule moved the tick off its nominal wall time."""
    note: str = ""
    """Why the tick is not a plain one (DST), in a few words."""

    @property
    def timestamp(self) -> float:
        """`at` in Unix seconds: what to compare ticks by."""
        return self.at.timestamp()


class Trigger(Protocol):
    """When a schedule fires. Pure: no I/O and no clock reads of its own."""

    wall_anchored: ClassVar[bool]
    """True when ticks are wall-clock times (cron, one-shot): a wall-clock step moves them.
    False for a pace (rate, delay): its ticks move with the step."""
    from_run_end: ClassVar[bool]
    """True when the next tick counts from the end of the previous run (fixed delay)."""

    def first_tick(self, begin: datetime) -> Tick | None:
        """The first tick at or after `begin` (a one-shot's own time even when past)."""
        ...

    def next_tick(self, after: datetime) -> Tick | None:
        """The first tick strictly after `after`, or None when it fires no more."""
        ...

    def describe(self) -> str:
        """The trigger in a few words, for status and logs (`every 5s`)."""
        ...


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be an aware datetime (with a time zone)")
    return value


def _period(seconds: float) -> timedelta:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError("interval must be a positive number of seconds")
    period = timedelta(seconds=seconds)
    if period < _TICK:
        raise ValueError("interval must be at least a microsecond")
    return period


class IntervalTrigger(msgspec.Struct, frozen=True):
    """Fixed rate (start to start): every `seconds`, on a grid that starts at `start`."""

    wall_anchored: ClassVar[bool] = False
    from_run_end: ClassVar[bool] = False

    seconds: float
    start: datetime

    def __post_init__(self) -> None:
        _period(self.seconds)
        _aware(self.start, "start")

    def first_tick(self, begin: datetime) -> Tick | None:
        """The first grid time at or after `begin` (`start` when `begin` is before it)."""
        return self.next_tick(utc(begin) - _TICK)

    def next_tick(self, after: datetime) -> Tick | None:
        """The first grid time strictly after `after`, in UTC (`start` when `after` is earlier)."""
        # in UTC: arithmetic between datetimes of one zone ignores their offsets
        start, after = utc(self.start), utc(after)
        if after < start:
            return Tick(at=start)
        period = _period(self.seconds)
        # timedelta // timedelta is exact integer arithmetic on microseconds
        return Tick(at=start + ((after - start) // period + 1) * period)

    def describe(self) -> str:
        """The period: `every 30s`."""
        return f"every {self.seconds:g}s"


class FixedDelayTrigger(msgspec.Struct, frozen=True):
    """Fixed delay (end to start): the first tick when the schedule begins, then each next one
    `seconds` after the previous run ended."""

    wall_anchored: ClassVar[bool] = False
    from_run_end: ClassVar[bool] = True

    seconds: float

    def __post_init__(self) -> None:
        _period(self.seconds)

    def first_tick(self, begin: datetime) -> Tick | None:
        """`begin` itself: the first run starts when the schedule begins."""
        return Tick(at=begin)

    def next_tick(self, after: datetime) -> Tick | None:
        """`seconds` after `after`, the end of the previous run, in UTC (never None)."""
        return Tick(at=utc(after) + _period(self.seconds))

    def describe(self) -> str:
        """The delay: `30s after each run`."""
        return f"{self.seconds:g}s after each run"


class OneShotTrigger(msgspec.Struct, frozen=True):
    """Once, at `at`. Added after `at`, it is due at once and the misfire grace decides."""

    wall_anchored: ClassVar[bool] = True
    from_run_end: ClassVar[bool] = False

    at: datetime

    def __post_init__(self) -> None:
        _aware(self.at, "at")

    def first_tick(self, begin: datetime) -> Tick | None:
        """`at`, whatever `begin` is: a one-shot added after its time is due at once."""
        return Tick(at=self.at)

    def next_tick(self, after: datetime) -> Tick | None:
        """`at` while it is later than `after`, else None: a one-shot fires once."""
        return Tick(at=self.at) if utc(self.at) > utc(after) else None

    def describe(self) -> str:
        """The instant: `once at <ISO 8601 time>`."""
        return f"once at {self.at.isoformat()}"


class CronTrigger(msgspec.Struct, frozen=True):
    """A cron expression in a time zone, with this schedule's DST policy.

    `expression` has 5 fields (Unix) or 6 (seconds first, as in Spring), or is a macro.
    `tz` is an IANA zone name. `skipped`: a fire time inside a DST gap runs at the transition
    (the default) or is skipped. `repeated`: a fire time in a DST fold runs once, at its first
    occurrence (the default), or twice. An invalid expression or zone raises `ValueError`
    (`CronError` for the expression, naming the bad field).
    """

    wall_anchored: ClassVar[bool] = True
    from_run_end: ClassVar[bool] = False

    expression: str
    tz: str = "UTC"
    skipped: SkippedTime = SkippedTime.RUN_AT_TRANSITION
    repeated: RepeatedTime = RepeatedTime.ONCE

    def __post_init__(self) -> None:
        parse_cron(self.expression)  # raises CronError
        parse_zone(self.tz)

    @property
    def zone(self) -> tzinfo:
        """`tz` as a tzinfo (`UTC` or `Z`: datetime.UTC, else a zoneinfo zone)."""
        return parse_zone(self.tz)

    def first_tick(self, begin: datetime) -> Tick | None:
        """The first fire time at or after `begin` (a DST-skipped one comes with `runs` False)."""
        return self.next_tick(utc(begin) - _TICK)

    def next_tick(self, after: datetime) -> Tick | None:
        """The first fire time strictly after `after`, in the zone; None past year 9999.

        A fire time moved or skipped by DST says so in `moved`, `runs` and `note`. A naive `after`
        raises ValueError.
        """
        zone = self.zone
        fire = next_fire(
            parse_cron(self.expression),
            zone,
            _aware(after, "after"),
            skipped=self.skipped,
            repeated=self.repeated,
        )
        if fire is None:
            return None
        return Tick(
            at=fire.at,
            runs=not fire.skipped,
            moved=fire.moved,
            note=fire.note(zone),
        )

    def describe(self) -> str:
        """The expression and zone, plus any DST policy that is not the default."""
        policy = []
        if self.skipped is not SkippedTime.RUN_AT_TRANSITION:
            policy.append(f"skipped={self.skipped.value}")
        if self.repeated is not RepeatedTime.ONCE:
            policy.append(f"repeated={self.repeated.value}")
        extra = f" ({', '.join(policy)})" if policy else ""
        return f"cron {self.expression!r} {self.tz}{extra}"


__all__ = [
    "CronTrigger",
    "FixedDelayTrigger",
    "IntervalTrigger",
    "OneShotTrigger",
    "Tick",
    "Trigger",
]
