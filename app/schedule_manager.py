"""ScheduleManager: runs functions on triggers, one task per schedule, in one task group.

The seed's `ScheduleManager` + `Job`/`JobBuilder`. A trigger is a pure object that answers
"when next, after this instant?"; the manager only sleeps until then and runs the function.
Overlap is forbidden: a tick that comes while the previous run still goes is skipped and
recorded as such. A function that raises is logged and counted and never stops its schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Protocol

import anyio
import anyio.abc
import msgspec

from app.clock import LoopWallClock

log = logging.getLogger(__name__)

ScheduledFn = Callable[[], Awaitable[object]]


class Trigger(Protocol):
    """When a schedule fires. Pure: no I/O, no clock reads of its own."""

    def next_fire(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after `after`, or None when it fires no more."""
        ...

    def describe(self) -> str: ...


class IntervalTrigger(msgspec.Struct, frozen=True):
    """Fixed rate: every `seconds`, on a grid that starts at `start`."""

    seconds: float
    start: datetime

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError("interval must be a positive number of seconds")

    def next_fire(self, after: datetime) -> datetime | None:
        if after < self.start:
            return self.start
        periods = math.floor((after - self.start).total_seconds() / self.seconds) + 1
        return self.start + timedelta(seconds=periods * self.seconds)

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as status shows it."""

    name: str
    trigger: str
    next_fire_at: datetime | None
    last_run_at: datetime | None
    last_outcome: str
    run_count: int
    failure_count: int
    skipped_count: int
    paused: bool


class _Schedule:
    __slots__ = (
        "failures", "fn", "last_outcome", "last_run_at", "name", "next_fire_at", "paused",
        "resumed", "running", "runs", "scope", "skipped", "trigger",
    )  # fmt: skip

    def __init__(self, name: str, fn: ScheduledFn, trigger: Trigger) -> None:
        self.name, self.fn, self.trigger = name, fn, trigger
        self.next_fire_at: datetime | None = None
        self.last_run_at: datetime | None = None
        self.last_outcome = "never run"
        self.runs = self.failures = self.skipped = 0
        self.running = self.paused = False
        self.resumed = anyio.Event()
        self.scope = anyio.CancelScope()

    def info(self) -> ScheduleInfo:
        return ScheduleInfo(
            name=self.name,
            trigger=self.trigger.describe(),
            next_fire_at=None if self.paused else self.next_fire_at,
            last_run_at=self.last_run_at,
            last_outcome=self.last_outcome,
            run_count=self.runs,
            failure_count=self.failures,
            skipped_count=self.skipped,
            paused=self.paused,
        )


class ScheduleManager:
    """Owns one task group with a task per schedule. Create and run it inside the event loop."""

    def __init__(self, clock: LoopWallClock | None = None) -> None:
        self._clock = clock or LoopWallClock()
        self._schedules: dict[str, _Schedule] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<ScheduleManager schedules={len(self._schedules)}>"

    @property
    def clock(self) -> LoopWallClock:
        return self._clock

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every schedule until cancelled; report ready when schedules can be added."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                for schedule in self._schedules.values():
                    tg.start_soon(self._loop, schedule, name=f"schedule {schedule.name}")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._task_group = None

    def add_schedule(self, fn: ScheduledFn, trigger: Trigger, *, name: str) -> None:
        """Add a schedule; it starts at once when the manager runs. Names are unique."""
        if name in self._schedules:
            raise ValueError(f"a schedule named {name!r} exists already")
        schedule = _Schedule(name, fn, trigger)
        self._schedules[name] = schedule
        if self._task_group is not None:
            self._task_group.start_soon(self._loop, schedule, name=f"schedule {name}")

    def remove_schedule(self, name: str) -> None:
        self._get(name).scope.cancel()
        del self._schedules[name]

    def pause_schedule(self, name: str) -> None:
        self._get(name).paused = True

    def resume_schedule(self, name: str) -> None:
        schedule = self._get(name)
        schedule.paused = False
        schedule.resumed.set()

    def schedules(self) -> list[ScheduleInfo]:
        return [s.info() for s in self._schedules.values()]

    def _get(self, name: str) -> _Schedule:
        try:
            return self._schedules[name]
        except KeyError:
            raise KeyError(f"no schedule named {name!r}") from None

    async def _loop(self, schedule: _Schedule) -> None:
        with schedule.scope:
            async with anyio.create_task_group() as runs:
                after = self._clock.now() - timedelta(microseconds=1)  # a fire at "now" counts
                while True:
                    fire_at = schedule.trigger.next_fire(after)
                    schedule.next_fire_at = fire_at
                    if fire_at is None:
                        break
                    await anyio.sleep_until(self._clock.loop_time_at(fire_at))
                    after = fire_at
                    while schedule.paused:
                        schedule.resumed = anyio.Event()
                        await schedule.resumed.wait()
                        after = self._clock.now()
                    if schedule.paused or after != fire_at:
                        continue  # ticks that fell into the pause are not owed
                    if schedule.running:
                        schedule.skipped += 1
                        schedule.last_outcome = f"skipped {fire_at.isoformat()}: still running"
                        continue
                    schedule.running = True
                    runs.start_soon(self._run_once, schedule, fire_at)

    async def _run_once(self, schedule: _Schedule, fire_at: datetime) -> None:
        schedule.last_run_at = self._clock.now()
        try:
            await schedule.fn()
        except Exception as exc:
            schedule.failures += 1
            schedule.last_outcome = f"failed: {type(exc).__name__}: {exc}"
            log.exception("schedule %s failed", schedule.name)
        else:
            schedule.last_outcome = "ok"
        finally:
            schedule.runs += 1
            schedule.running = False
