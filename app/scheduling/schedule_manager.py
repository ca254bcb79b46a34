"""ScheduleManager: runs functions on triggers in one task group, with a decision for every tick.

The seed's `ScheduleManager` + `Job`/`JobBuilder`, grown into a scheduler a nightly batch can
trust. Pure core, async shell: triggers (`app.scheduling.triggers`) say when;
`app.scheduling.decisions.decide()` says what to do with the ticks that are due (run, skip, miss,
coalesce); the async part only sleeps until the next tick and starts runs. One dispatcher task
sleeps for all schedules, on one heap.

Runs go on pooled runner tasks in the manager's task group, not on a task each: starting a task
costs more than a quick scheduled function, and a thousand schedules due at one instant would
wait for a thousand task starts. A runner takes ready runs one after the other; when it is held
up by a run that waits (I/O, sleep), the dispatcher sees the queue untaken after a loop turn and
sends more runners (twice as many each turn), so a waiting run never delays another by more than
a few loop turns. Idle runners park and end after `RUNNER_KEEP_ALIVE` seconds. A run executes in
its runner's context (as a job on the worker's pool does): the schedule's log field is bound for
the run and unbound after it.

Per schedule:

- overlap (Kubernetes CronJob's names): FORBID skips a tick while a run is going (the default);
  ALLOW runs up to `max_instances` at once (no limit when None); REPLACE cancels the running one
  and starts the new one when it has ended;
- misfire: a tick later than `misfire_grace` seconds is MISSED (None: no limit, the default);
  several ticks due at once (the process was paused, the loop blocked) run once for the latest
  when `coalesce` (the default), the others are COALESCED;
- `jitter`: each tick is delayed by up to that many seconds, a fixed fraction per schedule name
  and tick (deterministic, so replicas and reruns agree);
- `initial_delay`: no tick before that many seconds after the schedule begins.

A wall-clock step (NTP, a resumed VM) is noticed as a change of wall time minus loop time. A step
forward runs the ticks it jumped over once, coalesced (no burst); a step back repeats no tick
(no tick runs twice). Rate and delay triggers keep their pace across a step (no gap).

Every nominal tick gets a `Decision` with a reason; each schedule keeps its last ones.
A function that raises is logged and counted and never stops its schedule or another.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from app.core.clock import Clock, LoopClock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.log_context import bind_log_fields, unbind_log_fields
from app.scheduling.decisions import (
    Decision,
    DecisionKind,
    DueTick,
    Overlap,
    SchedulePolicy,
    Verdict,
    decide,
    grouped,
    jitter_for,
    tick_label,
)
from app.scheduling.triggers import Tick, Trigger, utc

log = logging.getLogger(__name__)

ScheduledFn = Callable[[], Awaitable[object]]

DECISIONS_KEPT = 20
# a runner with nothing to take for this long ends (the pool shrinks back after a burst)
RUNNER_KEEP_ALIVE = 60.0
# more due ticks than this at once (a long pause) are not listed one by one
_MAX_DUE = 1000
_EPSILON = 1e-6
_FIRED = DecisionKind.FIRED


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
    missed_count: int = 0
    coalesced_count: int = 0
    running: int = 0
    overlap: Overlap = Overlap.FORBID
    decisions: list[Decision] = msgspec.field(default_factory=list)


class ScheduleManagerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the schedule manager: its state, schedules, runs and wall-clock steps."""

    state: Lifecycle
    schedules: int
    running: int
    started: int
    failed: int
    clock_steps: int
    runners: int = 0
    """Runner tasks alive (busy or parked)."""


# --- the async shell -------------------------------------------------------------------------


class _Run:
    """One run of a schedule: queued until a runner takes it, then going until it ends."""

    __slots__ = ("_done", "cancel_called", "ended", "previous", "replaced", "schedule", "scope",
                 "tick")  # fmt: skip

    def __init__(self, schedule: _Schedule, tick: Tick, previous: Sequence[_Run]) -> None:
        self.schedule, self.tick = schedule, tick
        self.previous = previous  # REPLACE: the runs it waits out before it starts
        # its runner's cancel scope while this is the runner's run; a run is cancelled alone
        # because a runner holds one run at a time (the scope is renewed after a cancel)
        self.scope: anyio.CancelScope | None = None
        self.cancel_called = self.replaced = self.ended = False
        self._done: anyio.Event | None = None  # made only when someone waits: most never do

    def cancel(self) -> None:
        """Cancel the run; one still queued ends without calling the function."""
        self.cancel_called = True
        if self.scope is not None:
            self.scope.cancel()

    async def wait_ended(self) -> None:
        if not self.ended:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()

    def set_ended(self) -> None:
        self.ended = True
        if self._done is not None:
            self._done.set()


class _Runner:
    """A parked runner task: `_add_taker` sets `woken` and `wake` to send it to the queue."""

    __slots__ = ("wake", "woken")

    def __init__(self) -> None:
        self.wake = anyio.Event()
        self.woken = False


class _Schedule:
    __slots__ = (
        "after_next", "after_next_planned", "begin", "coalesced", "decisions", "failures",
        "finished", "fn", "jump_from", "last_outcome", "last_run_ts", "missed", "name", "next",
        "paused_since", "planned", "policy", "runs", "shift", "skipped", "started", "trigger",
        "version",
    )  # fmt: skip

    def __init__(
        self, name: str, fn: ScheduledFn, trigger: Trigger, policy: SchedulePolicy
    ) -> None:
        self.name, self.fn, self.trigger, self.policy = name, fn, trigger, policy
        self.begin: datetime | None = None
        self.next: Tick | None = None
        self.planned = math.inf  # wall timestamp of `next`, jitter included
        # the tick after `next` and its planned instant, known once `next` is on the heap (not
        # for a fixed delay): at the fire, whether more than one tick is due costs nothing
        self.after_next: Tick | None = None
        self.after_next_planned = math.inf
        self.shift = timedelta(0)  # wall-clock steps so far, for rate and delay triggers
        self.jump_from: float | None = None  # wall time a forward step started from
        self.paused_since: datetime | None = None
        self.version = 0
        self.runs: list[_Run] = []
        self.last_run_ts: float | None = None  # a datetime only when status asks
        self.last_outcome = "never run"
        self.started = self.finished = self.failures = 0
        self.skipped = self.missed = self.coalesced = 0
        self.decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)

    @property
    def active_runs(self) -> int:
        return sum(not r.replaced for r in self.runs)

    def info(self) -> ScheduleInfo:
        paused = self.paused_since is not None
        ran = self.last_run_ts
        return ScheduleInfo(
            name=self.name,
            trigger=self.trigger.describe(),
            next_fire_at=None if paused or self.next is None else self.next.at,
            last_run_at=None if ran is None else datetime.fromtimestamp(ran, UTC),
            last_outcome=self.last_outcome,
            run_count=self.finished,
            failure_count=self.failures,
            skipped_count=self.skipped,
            paused=paused,
            missed_count=self.missed,
            coalesced_count=self.coalesced,
            running=len(self.runs),
            overlap=self.policy.overlap,
            decisions=list(self.decisions),
        )


class ScheduleManager:
    """Runs schedules until cancelled or drained. Create it, and run it, in the event loop.

    `clock` gives wall time (default: the system's). A step of the wall clock against the loop
    clock of `step_threshold` seconds or more is a step; the manager looks at least every
    `step_check_interval` seconds (default: every second with a `SystemClock`; with a
    `LoopClock`, which only steps when told, at each wake).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        step_threshold: float = 1.0,
        step_check_interval: float | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        if step_check_interval is None and not isinstance(self._clock, LoopClock):
            step_check_interval = 1.0
        self._step_threshold = step_threshold
        self._step_check_interval = step_check_interval
        self._schedules: dict[str, _Schedule] = {}
        # the loop times schedules are due at, each with its schedules in the order planned
        # (schedules due together share one heap entry: a thousand due at one instant cost one
        # push and one pop); an entry whose version is not its schedule's any more is spent
        self._heap: list[float] = []
        self._due_at: dict[float, list[tuple[int, _Schedule]]] = {}
        self._offset = 0.0
        self._state = Lifecycle.CREATED
        self._wake = anyio.Event()
        self._stopped = anyio.Event()
        self._dispatch_scope = anyio.CancelScope()
        self._runs_group: anyio.abc.TaskGroup | None = None
        self._clock_steps = 0
        self._ready: deque[_Run] = deque()  # started runs that no runner has taken yet
        self._parked: dict[_Runner, None] = {}  # parked runners, the latest parked last
        self._runners = 0  # runner tasks alive
        self._waking = 0  # runners sent to the queue that have not looked at it yet
        self._send = 1  # runners to send to a queue that stays untaken (doubles per loop turn)
        # next ticks asked in this dispatcher pass: (trigger, shift, after timestamp) -> tick
        self._shared: dict[tuple[object, timedelta, float], Tick | None] = {}
        # schedules fired in this pass whose next tick goes on the heap once the runs started
        self._unpushed: list[tuple[_Schedule, int]] = []

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<ScheduleManager schedules={s.schedules} running={s.running} started={s.started} "
            f"failed={s.failed} runners={s.runners} {s.state.value}>"
        )

    @property
    def clock(self) -> Clock:
        """The wall clock that ticks are read on (the one given, else the system's)."""
        return self._clock

    def statistics(self) -> ScheduleManagerStatistics:
        """Schedules, runs going, started and failed, wall-clock steps seen, and runner tasks.

        Runs are summed over the schedules there now: a removed schedule's no longer count.
        """
        schedules = self._schedules.values()
        return ScheduleManagerStatistics(
            state=self._state,
            schedules=len(self._schedules),
            running=sum(len(s.runs) for s in schedules),
            started=sum(s.started for s in schedules),
            failed=sum(s.failures for s in schedules),
            clock_steps=self._clock_steps,
            runners=self._runners,
        )

    # --- lifecycle ---

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every schedule; report ready when schedules fire. Returns once drained."""
        if self._state is not Lifecycle.CREATED:
            raise RuntimeError("a ScheduleManager runs once")
        try:
            async with anyio.create_task_group() as runs:
                self._runs_group = runs
                self._state = Lifecycle.RUNNING
                self._offset = self._clock.timestamp() - anyio.current_time()
                for schedule in self._schedules.values():
                    self._begin(schedule)
                task_status.started()
                with self._dispatch_scope:
                    await self._dispatch()
                self._release_runners()
        finally:
            self._state = Lifecycle.STOPPED
            self._runs_group = None
            while self._ready:  # cancelled before a runner took them
                self._end_unstarted(self._ready.popleft())
            self._stopped.set()

    def begin_drain(self, grace_seconds: float) -> None:
        """Stop firing now; runs still going after `grace_seconds` are cancelled."""
        if self._state in (Lifecycle.STOPPED, Lifecycle.DRAINING):
            return
        self._state = Lifecycle.DRAINING
        self._dispatch_scope.cancel()
        if self._runs_group is not None:
            scope = self._runs_group.cancel_scope
            scope.deadline = min(scope.deadline, anyio.current_time() + grace_seconds)

    async def wait_stopped(self) -> None:
        """Return once `run` has returned (drained, cancelled or failed)."""
        await self._stopped.wait()

    # --- schedules ---

    def add_schedule(
        self,
        fn: ScheduledFn,
        trigger: Trigger,
        *,
        name: str,
        overlap: Overlap | str = Overlap.FORBID,
        max_instances: int | None = None,
        misfire_grace: float | None = None,
        coalesce: bool = True,
        jitter: float = 0.0,
        initial_delay: float = 0.0,
    ) -> None:
        """Add a schedule; it begins at once when the manager runs. Names are unique.

        The options are `SchedulePolicy`'s (see the module doc). A bad value raises ValueError.
        """
        if name in self._schedules:
            raise ValueError(f"a schedule named {name!r} exists already")
        policy = SchedulePolicy(
            overlap=Overlap(overlap),
            max_instances=max_instances,
            misfire_grace=misfire_grace,
            coalesce=coalesce,
            jitter=jitter,
            initial_delay=initial_delay,
        )
        schedule = _Schedule(name, fn, trigger, policy)
        self._schedules[name] = schedule
        if self._state is Lifecycle.RUNNING:
            self._begin(schedule)

    def remove_schedule(self, name: str) -> None:
        """Remove a schedule and cancel its runs that are going."""
        schedule = self._get(name)
        del self._schedules[name]
        schedule.version += 1
        for run in schedule.runs:
            run.cancel()
        self._wake.set()

    def pause_schedule(self, name: str) -> None:
        """No ticks until resumed (runs going are left alone); resuming owes none of them."""
        schedule = self._get(name)
        if schedule.paused_since is None:
            schedule.paused_since = self._clock.now()
            schedule.version += 1

    def resume_schedule(self, name: str) -> None:
        """Fire again; the ticks that fell due while paused are recorded SKIPPED, not run.

        Nothing happens when the schedule is not paused; an unknown name raises KeyError.
        """
        schedule = self._get(name)
        since = schedule.paused_since
        if since is None:
            return
        schedule.paused_since = None
        if self._state is not Lifecycle.RUNNING or schedule.next is None:
            return
        now = self._clock.now()
        if schedule.next.timestamp > now.timestamp():
            self._plan(schedule, schedule.next)
            return
        ticks, uncounted, _ = self._due(schedule, now.timestamp())
        reason = f"paused since {since.isoformat(timespec='seconds')}"
        self._record(
            schedule,
            grouped(
                DecisionKind.SKIPPED,
                [DueTick(tick=t) for t in ticks],
                reason + (" (and more)" if uncounted else ""),
            ),
            now,
        )
        self._plan(schedule, self._next(schedule, now))

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule as status shows it, in the order they were added."""
        return [s.info() for s in self._schedules.values()]

    def schedule(self, name: str) -> ScheduleInfo:
        """The schedule named `name` as status shows it; KeyError when there is none."""
        return self._get(name).info()

    def _get(self, name: str) -> _Schedule:
        try:
            return self._schedules[name]
        except KeyError:
            raise KeyError(f"no schedule named {name!r}") from None

    # --- ticks in wall terms (a rate or delay trigger moves with wall-clock steps) ---

    def _shifted(self, schedule: _Schedule, tick: Tick | None) -> Tick | None:
        if tick is None or not schedule.shift:
            return tick
        return self._shifted_by(tick, schedule.shift)

    def _first(self, schedule: _Schedule, begin: datetime) -> Tick | None:
        return self._shifted(schedule, schedule.trigger.first_tick(utc(begin) - schedule.shift))

    def _next(self, schedule: _Schedule, after: datetime) -> Tick | None:
        return self._shifted(schedule, schedule.trigger.next_tick(utc(after) - schedule.shift))

    def _next_shared(self, schedule: _Schedule, after: datetime) -> Tick | None:
        """`_next`, asked once per dispatcher pass for equal triggers (a thousand schedules on
        one cron expression cost one cron computation, not a thousand)."""
        # keyed by the instant: equal datetimes of one zone can be the two sides of a DST fold
        key = (schedule.trigger, schedule.shift, after.timestamp())
        try:
            return self._shared[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable trigger: ask it
            return self._next(schedule, after)
        tick = self._shared[key] = self._next(schedule, after)
        return tick

    def _begin(self, schedule: _Schedule) -> None:
        begin = self._clock.now() + timedelta(seconds=schedule.policy.initial_delay)
        schedule.begin = begin
        self._plan(schedule, self._first(schedule, begin))

    def _plan(self, schedule: _Schedule, tick: Tick | None) -> None:
        """Make `tick` the schedule's next one and wake the dispatcher for it."""
        schedule.version += 1
        schedule.next = tick
        self._push(schedule)
        self._wake.set()

    def _push(self, schedule: _Schedule, *, shared: bool = False) -> None:
        """Put the schedule's next tick on the heap (unless paused), and find the one after it
        (`shared`: through the dispatcher pass's answers for equal triggers)."""
        tick = schedule.next
        if tick is None or schedule.paused_since is not None:
            schedule.planned = math.inf
            return
        jitter = schedule.policy.jitter
        schedule.planned = tick.timestamp + jitter_for(schedule.name, tick, jitter)
        if not schedule.trigger.from_run_end:
            after = (
                self._next_shared(schedule, tick.at) if shared else self._next(schedule, tick.at)
            )
            schedule.after_next = after
            schedule.after_next_planned = (
                math.inf
                if after is None
                else after.timestamp + jitter_for(schedule.name, after, jitter)
            )
        due = schedule.planned - self._offset  # loop time; the offset is kept by _check_clock
        entry = (schedule.version, schedule)
        if (together := self._due_at.get(due)) is not None:
            together.append(entry)
        else:
            self._due_at[due] = [entry]
            heapq.heappush(self._heap, due)

    def _push_fired(self) -> None:
        """`_push` the schedules `_fire_one` moved on, unless they changed since."""
        for schedule, version in self._unpushed:
            if schedule.version == version:  # not paused, removed or planned anew since
                self._push(schedule, shared=True)
        self._unpushed.clear()

    # --- the dispatcher ---

    async def _dispatch(self) -> None:
        while True:
            # read the clocks once a pass: each read costs more than the arithmetic around it
            now = anyio.current_time()
            wall_now = self._clock.timestamp()
            self._check_clock(wall_now - now, wall_now)
            wall_dt = datetime.fromtimestamp(wall_now, UTC)
            if self._shared:
                self._shared.clear()
            while self._heap and self._heap[0] <= now + _EPSILON:
                for version, schedule in self._due_at.pop(heapq.heappop(self._heap)):
                    if version == schedule.version:  # (a removed schedule's was moved on)
                        self._fire(schedule, wall_now, wall_dt)
            if self._ready:
                # runs a runner has not taken: send runners, and look again after a loop turn
                # (a queue still there then means the runners are held up by runs that wait)
                self._hand_out()
                await anyio.lowlevel.checkpoint()
            if self._unpushed:
                self._push_fired()
            if self._ready:
                continue
            self._send = 1
            deadline = self._heap[0] if self._heap else math.inf
            if self._step_check_interval is not None:
                deadline = min(deadline, now + self._step_check_interval)
            if self._wake.is_set():
                self._wake = anyio.Event()
            with anyio.CancelScope(deadline=deadline):
                await self._wake.wait()

    def _check_clock(self, offset: float, wall_now: float) -> None:
        step = offset - self._offset
        self._offset = offset  # slow drift (NTP slewing) is followed silently
        if abs(step) < self._step_threshold:
            return
        self._clock_steps += 1
        log.warning("wall clock stepped %+.3fs; schedules follow it", step)
        for schedule in self._schedules.values():
            if not schedule.trigger.wall_anchored:
                schedule.shift += timedelta(seconds=step)
                if schedule.next is not None:
                    schedule.next = self._shifted_by(schedule.next, timedelta(seconds=step))
            elif step > 0 and schedule.jump_from is None and schedule.planned <= wall_now:
                schedule.jump_from = wall_now - step  # the step made its next tick due
            if schedule.paused_since is None and schedule.next is not None:
                self._plan(schedule, schedule.next)

    @staticmethod
    def _shifted_by(tick: Tick, shift: timedelta) -> Tick:
        # in UTC, then back to the tick's zone: arithmetic on a zoned datetime drops its fold
        return msgspec.structs.replace(tick, at=(utc(tick.at) + shift).astimezone(tick.at.tzinfo))

    def _due(
        self, schedule: _Schedule, wall_now: float
    ) -> tuple[list[Tick], bool, tuple[Tick | None] | None]:
        """The schedule's ticks due by `wall_now`, from its next one; whether some between the
        last two were left out (more than `_MAX_DUE`); and the tick after them when known."""
        assert schedule.next is not None
        ticks = [schedule.next]
        if schedule.trigger.from_run_end:
            return ticks, False, None
        jitter = schedule.policy.jitter
        while len(ticks) < _MAX_DUE:
            tick = self._next(schedule, ticks[-1].at)
            if tick is None or tick.timestamp + jitter_for(schedule.name, tick, jitter) > wall_now:
                return ticks, False, (tick,)
            ticks.append(tick)
        last = self._last_due(schedule, ticks[-1], wall_now)
        if last.timestamp > ticks[-1].timestamp:
            ticks.append(last)
            return ticks, True, None
        return ticks, False, None

    def _last_due(self, schedule: _Schedule, known: Tick, wall_now: float) -> Tick:
        """The latest tick at or before `wall_now`, by bisection (a week of 1 s ticks is ~40
        trigger calls, not 600,000)."""
        lo, hi = known.at.astimezone(UTC), datetime.fromtimestamp(wall_now, UTC)
        best = known
        while hi - lo > timedelta(microseconds=1):
            mid = lo + (hi - lo) / 2
            tick = self._next(schedule, mid)
            if tick is not None and tick.timestamp <= wall_now:
                lo, best = mid, tick
            else:
                hi = mid
        return best

    def _fire(self, schedule: _Schedule, wall_now: float, now: datetime) -> None:
        """Decide on the schedule's due ticks, start the runs, plan the next tick (no await)."""
        if self._fire_one(schedule, wall_now, now):
            return
        ticks, uncounted, following = self._due(schedule, wall_now)
        jump_from, schedule.jump_from = schedule.jump_from, None
        step = 0.0 if jump_from is None else wall_now - jump_from
        due = []
        for tick in ticks:
            planned = tick.timestamp + jitter_for(schedule.name, tick, schedule.policy.jitter)
            if jump_from is not None and planned > jump_from:
                due.append(DueTick(tick=tick, jumped=True))
            else:
                due.append(DueTick(tick=tick, late=max(0.0, wall_now - step - planned)))
        verdicts = decide(
            due, policy=schedule.policy, running=schedule.active_runs, uncounted=uncounted
        )
        self._record(schedule, verdicts, now)
        started = False
        for verdict in verdicts:
            if verdict.run:
                self._start(schedule, verdict)
                started = True
        if schedule.trigger.from_run_end:
            # the next tick counts from the end of this run; without a run, from now
            self._plan(schedule, None if started else self._next(schedule, now))
        elif following is not None:
            self._plan(schedule, following[0])
        else:
            self._plan(schedule, self._next(schedule, ticks[-1].at))

    def _fire_one(self, schedule: _Schedule, wall_now: float, now: datetime) -> bool:
        """`_fire` for the common case, one tick due: False (and nothing done) when not.

        The tick after is known, and goes on the heap (with the one after it found) only once
        the runs have started: a burst of due schedules starts its runs sooner.
        """
        if (
            schedule.jump_from is not None
            or schedule.trigger.from_run_end
            or schedule.after_next_planned <= wall_now
        ):
            return False
        tick = schedule.next
        assert tick is not None
        due = DueTick(tick=tick, late=max(0.0, wall_now - schedule.planned))
        running = schedule.active_runs if schedule.runs else 0
        verdicts = decide([due], policy=schedule.policy, running=running)
        self._record(schedule, verdicts, now)
        for verdict in verdicts:
            if verdict.run:
                self._start(schedule, verdict)
        schedule.version += 1  # its entry on the heap is spent
        schedule.next = schedule.after_next
        schedule.planned = schedule.after_next_planned
        self._unpushed.append((schedule, schedule.version))
        return True

    def _record(self, schedule: _Schedule, verdicts: Sequence[Verdict], now: datetime) -> None:
        for v in verdicts:
            kind = v.kind
            schedule.decisions.append(
                Decision(tick=v.tick.at, kind=kind, reason=v.reason, count=v.count, decided_at=now)
            )
            if kind is _FIRED:  # the common case: nothing to count or say
                continue
            if kind is DecisionKind.SKIPPED:
                schedule.skipped += v.count
            elif kind is DecisionKind.MISSED:
                schedule.missed += v.count
            elif kind is DecisionKind.COALESCED:
                schedule.coalesced += v.count
            level = logging.INFO if kind is DecisionKind.MISSED else logging.DEBUG
            log.log(
                level,
                "schedule %s: %s %s: %s",
                schedule.name,
                kind,
                tick_label(v.tick),
                v.reason,
                extra={"schedule": schedule.name},
            )

    def _start(self, schedule: _Schedule, verdict: Verdict) -> None:
        """Queue a run of `verdict`'s tick for the runners (the dispatcher hands them out)."""
        previous: Sequence[_Run] = ()
        if verdict.replace:
            previous = [r for r in schedule.runs if not r.replaced]
            for r in previous:
                r.replaced = True
                r.cancel()
        run = _Run(schedule, verdict.tick, previous)
        schedule.runs.append(run)
        schedule.started += 1
        self._ready.append(run)

    # --- the runners ---

    def _hand_out(self) -> None:
        """Send runners to the ready runs unless some are on their way: one at first, then
        twice as many each time the queue is found untaken (they were held up)."""
        if self._waking:
            return
        for _ in range(min(len(self._ready), self._send)):
            self._add_taker()
        self._send *= 2

    def _add_taker(self) -> None:
        """Wake the latest parked runner to take ready runs, or start a new one."""
        assert self._runs_group is not None
        self._waking += 1
        if self._parked:
            runner, _ = self._parked.popitem()
            runner.woken = True
            runner.wake.set()
        else:
            self._runners += 1
            self._runs_group.start_soon(self._runner, name="ScheduleManager runner")

    def _release_runners(self) -> None:
        """The dispatcher has stopped: the runs it queued each get a runner, the rest end."""
        for _ in range(len(self._ready)):
            self._add_taker()
        while self._parked:
            runner, _ = self._parked.popitem()
            runner.wake.set()

    async def _runner(self) -> None:
        """Take ready runs until none is left; park; end when released or idle too long."""
        parking: _Runner | None = None
        try:
            while True:
                self._waking -= 1  # here now: the queue is looked at
                while self._ready:
                    # one scope for many runs: entering a scope per run costs more than a
                    # quick run; a cancelled run (the runner's one run then) ends the scope
                    with anyio.CancelScope() as scope:
                        while self._ready and not scope.cancel_called:
                            await self._run(self._ready.popleft(), scope)
                if self._state is not Lifecycle.RUNNING:
                    return
                parking = parking or _Runner()
                if not await self._park(parking):
                    return
        finally:
            self._runners -= 1

    async def _park(self, runner: _Runner) -> bool:
        """Wait to be sent to the queue: True when sent, False when released or idle."""
        runner.woken = False
        if runner.wake.is_set():
            runner.wake = anyio.Event()
        self._parked[runner] = None
        try:
            with anyio.move_on_after(RUNNER_KEEP_ALIVE):
                await runner.wake.wait()
        finally:
            self._parked.pop(runner, None)
        return runner.woken

    async def _run(self, run: _Run, scope: anyio.CancelScope) -> None:
        schedule = run.schedule
        # the run's log lines (and its child tasks') are the schedule's
        logged = bind_log_fields(schedule=schedule.name)
        try:
            if run.cancel_called:  # removed or replaced before a runner took it
                schedule.last_outcome = _cancelled(run)
                return
            run.scope = scope
            for old in run.previous:  # REPLACE: the new run starts once the old one has ended
                await old.wait_ended()
            schedule.last_run_ts = self._clock.timestamp()
            try:
                await schedule.fn()
            except Exception as exc:
                schedule.failures += 1
                schedule.last_outcome = f"failed: {type(exc).__name__}: {exc}"
                log.exception("schedule %s failed", schedule.name)
            else:
                schedule.last_outcome = "ok"
        except anyio.get_cancelled_exc_class():
            if run.cancel_called:  # this run's cancel, not the manager's
                schedule.last_outcome = _cancelled(run)
            raise
        finally:
            run.scope = None
            unbind_log_fields(logged)
            self._end(run)

    def _end_unstarted(self, run: _Run) -> None:
        run.schedule.last_outcome = _cancelled(run)
        self._end(run)

    def _end(self, run: _Run) -> None:
        schedule = run.schedule
        schedule.runs.remove(run)
        schedule.finished += 1
        run.set_ended()
        if (
            schedule.trigger.from_run_end
            and self._state is Lifecycle.RUNNING
            and self._schedules.get(schedule.name) is schedule
            and not schedule.runs
        ):
            self._plan(schedule, self._next(schedule, self._clock.now()))


def _cancelled(run: _Run) -> str:
    return "cancelled: replaced by a newer run" if run.replaced else "cancelled"
