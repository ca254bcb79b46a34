"""ScheduleManager: exact fire instants in virtual time, decisions, overlap, misfire, clock steps.

The time-heavy tests run on trio's MockClock (autojump): a year of nightly ticks takes
milliseconds and every fire instant is exact. The rest run on both anyio backends in real time,
waiting on conditions, never sleeping to wait.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import pytest
import trio.testing

from app.core.clock import LoopClock
from app.core.lifecycle import Lifecycle
from app.core.log_context import log_fields
from app.scheduling.cron import RepeatedTime, SkippedTime
from app.scheduling.decisions import (
    DecisionKind,
    DueTick,
    Overlap,
    SchedulePolicy,
    decide,
    jitter_for,
)
from app.scheduling.schedule_manager import RUNNER_KEEP_ALIVE, ScheduleManager
from app.scheduling.triggers import (
    CronTrigger,
    FixedDelayTrigger,
    IntervalTrigger,
    OneShotTrigger,
    Tick,
)
from tests.helpers import eventually

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")


def secs(*values: float) -> list[datetime]:
    return [T0 + timedelta(seconds=v) for v in values]


@asynccontextmanager
async def running(manager: ScheduleManager) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        yield
        tg.cancel_scope.cancel()


def recorder(clock: LoopClock, into: list[datetime]) -> Callable[[], Awaitable[None]]:
    async def record() -> None:
        into.append(clock.now())

    return record


# --- the pure core ---


def test_decide_coalesces_late_ticks_and_misses_past_the_grace() -> None:
    ticks = [DueTick(tick=Tick(at=t), late=10 - i) for i, t in enumerate(secs(1, 2, 3, 4, 5))]
    verdicts = decide(ticks, policy=SchedulePolicy(misfire_grace=8.5), running=0)
    assert [(v.tick.at, v.kind, v.run) for v in verdicts] == [
        (secs(1)[0], DecisionKind.MISSED, False),
        (secs(2)[0], DecisionKind.MISSED, False),
        (secs(3)[0], DecisionKind.COALESCED, False),
        (secs(4)[0], DecisionKind.COALESCED, False),
        (secs(5)[0], DecisionKind.FIRED, True),
    ]
    assert "past the 8.5s grace" in verdicts[0].reason
    assert "folded into the run for 2026-01-01T00:00:05+00:00" in verdicts[2].reason
    assert verdicts[4].reason == "late by 6s; 2 earlier due tick(s) folded in"


def test_decide_overlap_policies() -> None:
    due = [DueTick(tick=Tick(at=T0))]
    forbid = decide(due, policy=SchedulePolicy(), running=1)
    assert [(v.kind, v.run) for v in forbid] == [(DecisionKind.SKIPPED, False)]
    assert forbid[0].reason == "the previous run is still going"
    allow = SchedulePolicy(overlap=Overlap.ALLOW, max_instances=2)
    assert decide(due, policy=allow, running=1)[0].run
    assert "2 runs going (max_instances 2)" in decide(due, policy=allow, running=2)[0].reason
    replace = decide(due, policy=SchedulePolicy(overlap=Overlap.REPLACE), running=1)
    assert [(v.kind, v.run, v.replace) for v in replace] == [(DecisionKind.FIRED, True, True)]


def test_decide_without_coalesce_runs_each_due_tick_and_groups_many() -> None:
    many = [DueTick(tick=Tick(at=t), late=1) for t in secs(*range(10))]
    each = decide(many, policy=SchedulePolicy(coalesce=False, overlap=Overlap.ALLOW), running=0)
    assert sum(v.run for v in each) == 10
    grouped = decide(many, policy=SchedulePolicy(), running=0)
    assert [(v.kind, v.count) for v in grouped] == [
        (DecisionKind.COALESCED, 9),
        (DecisionKind.FIRED, 1),
    ]
    assert grouped[0].reason.startswith("9 ticks from 2026-01-01T00:00:00+00:00 to")


def test_decide_steps_never_burst_even_without_coalesce() -> None:
    jumped = [DueTick(tick=Tick(at=t), jumped=True, late=0) for t in secs(1, 2, 3)]
    verdicts = decide(jumped, policy=SchedulePolicy(coalesce=False, misfire_grace=0), running=0)
    assert [v.kind for v in verdicts] == [DecisionKind.COALESCED] * 2 + [DecisionKind.FIRED]
    assert "the wall clock stepped over it" in verdicts[-1].reason


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="needs overlap=allow"):
        SchedulePolicy(max_instances=3)
    with pytest.raises(ValueError, match="misfire_grace must be"):
        SchedulePolicy(misfire_grace=-1)
    with pytest.raises(ValueError, match="at least 1"):
        SchedulePolicy(overlap=Overlap.ALLOW, max_instances=0)


def test_jitter_is_a_fixed_fraction_per_name_and_tick() -> None:
    tick = Tick(at=T0)
    a = jitter_for("a", tick, 10)
    assert 0 <= a < 10
    assert a == jitter_for("a", tick, 10)
    assert a != jitter_for("b", tick, 10)
    assert jitter_for("a", tick, 0) == 0


# --- virtual time ---


class TestVirtualTime:
    @pytest.fixture
    def mock_clock(self) -> trio.testing.MockClock:
        return trio.testing.MockClock(autojump_threshold=0)

    @pytest.fixture
    def anyio_backend(self, mock_clock: trio.testing.MockClock) -> tuple[str, dict[str, Any]]:
        return ("trio", {"clock": mock_clock})

    async def test_a_day_of_minute_ticks_fires_on_the_grid(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        manager.add_schedule(recorder(clock, fired), IntervalTrigger(60, T0), name="tick")
        async with running(manager):
            await anyio.sleep(86_400.5)  # noqa: ASYNC116  (virtual time)
        assert len(fired) == 1441
        assert fired[0] == T0
        assert fired[-1] == T0 + timedelta(days=1)
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(fired))
        (info,) = manager.schedules()
        assert info.run_count == len(fired)
        assert info.last_outcome == "ok"
        assert info.last_run_at == T0 + timedelta(days=1)
        assert info.next_fire_at == T0 + timedelta(days=1, minutes=1)

    async def test_a_year_of_nightly_runs_in_new_york(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        trigger = CronTrigger("30 2 * * *", tz="America/New_York")
        manager.add_schedule(recorder(clock, fired), trigger, name="nightly")
        async with running(manager):
            await anyio.sleep(365 * 86_400)
        local = [t.astimezone(NEW_YORK) for t in fired]
        assert len(local) == 365
        assert len({t.date() for t in local}) == 365
        assert [t for t in local if t.strftime("%H:%M") != "02:30"] == [
            datetime(2026, 3, 8, 3, 0, tzinfo=NEW_YORK)  # 02:30 did not exist: the transition
        ]
        assert local[0].isoformat() == "2026-01-01T02:30:00-05:00"
        assert local[-1].isoformat() == "2026-12-31T02:30:00-05:00"

    async def test_why_it_did_not_run_at_0230_on_a_spring_forward_night(self) -> None:
        clock = LoopClock(datetime(2026, 3, 7, 12, tzinfo=UTC))
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        manager.add_schedule(
            recorder(clock, fired),
            CronTrigger("30 2 * * *", tz="America/New_York", skipped=SkippedTime.SKIP),
            name="nightly",
        )
        moved: list[datetime] = []
        manager.add_schedule(
            recorder(clock, moved), CronTrigger("30 2 * * *", tz="America/New_York"), name="moved"
        )
        async with running(manager):
            await anyio.sleep(2 * 86_400)
        assert [t.astimezone(NEW_YORK).isoformat() for t in fired] == ["2026-03-09T02:30:00-04:00"]
        assert [t.astimezone(NEW_YORK).isoformat() for t in moved] == [
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ]
        infos = {i.name: i for i in manager.schedules()}
        skipped, ran = infos["nightly"].decisions[0], infos["moved"].decisions[0]
        assert skipped.kind is DecisionKind.SKIPPED
        assert "2026-03-08 02:30:00 does not exist in America/New_York (DST): skipped" in (
            skipped.reason
        )
        assert ran.kind is DecisionKind.MOVED
        assert "ran at the transition" in ran.reason
        assert infos["nightly"].skipped_count == 1

    async def test_fall_back_twice_runs_in_both_passes(self) -> None:
        clock = LoopClock(datetime(2026, 10, 31, 12, tzinfo=UTC))
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        trigger = CronTrigger("30 1 * * *", tz="America/New_York", repeated=RepeatedTime.TWICE)
        manager.add_schedule(recorder(clock, fired), trigger, name="twice")
        async with running(manager):
            await anyio.sleep(2 * 86_400)
        assert [t.astimezone(NEW_YORK).isoformat() for t in fired] == [
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-02T01:30:00-05:00",
        ]

    async def test_a_failing_job_is_counted_and_never_stops_others(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        good: list[datetime] = []

        async def bad() -> None:
            raise RuntimeError("broken")

        manager.add_schedule(bad, IntervalTrigger(1, T0), name="bad")
        manager.add_schedule(recorder(clock, good), IntervalTrigger(1, T0), name="ok")
        async with running(manager):
            await anyio.sleep(9.5)
        infos = {i.name: i for i in manager.schedules()}
        assert infos["bad"].failure_count == 10
        assert infos["bad"].run_count == 10
        assert infos["bad"].last_outcome == "failed: RuntimeError: broken"
        assert len(good) == 10
        assert manager.statistics().failed == 10

    async def test_overlap_forbid_skips_ticks_while_running(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        starts: list[datetime] = []

        async def slow() -> None:
            starts.append(clock.now())
            await anyio.sleep(2.5)  # longer than the 1 s period

        manager.add_schedule(slow, IntervalTrigger(1, T0), name="slow")
        async with running(manager):
            await anyio.sleep(5.5)
        assert starts == secs(0, 3)
        (info,) = manager.schedules()
        assert info.skipped_count == 4
        assert [d.kind for d in info.decisions] == [
            DecisionKind.FIRED, DecisionKind.SKIPPED, DecisionKind.SKIPPED,
            DecisionKind.FIRED, DecisionKind.SKIPPED, DecisionKind.SKIPPED,
        ]  # fmt: skip
        assert info.decisions[1].reason == "the previous run is still going"

    async def test_overlap_allow_up_to_max_instances(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        starts: list[datetime] = []
        peak = 0
        going = 0

        async def slow() -> None:
            nonlocal going, peak
            starts.append(clock.now())
            going += 1
            peak = max(peak, going)
            await anyio.sleep(2.5)
            going -= 1

        manager.add_schedule(
            slow, IntervalTrigger(1, T0), name="slow", overlap="allow", max_instances=2
        )
        async with running(manager):
            await anyio.sleep(6.5)
        # 0 and 1 run; 2 is skipped (two going); 2.5 ends the first, so 3 runs; 4 skipped...
        assert starts == secs(0, 1, 3, 4, 6)
        assert peak == 2

    async def test_overlap_replace_cancels_the_running_one(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        starts: list[datetime] = []
        ends: list[datetime] = []

        async def slow() -> None:
            starts.append(clock.now())
            try:
                await anyio.sleep(2.5)
            finally:
                ends.append(clock.now())

        manager.add_schedule(slow, IntervalTrigger(1, T0), name="slow", overlap=Overlap.REPLACE)
        async with running(manager):
            await anyio.sleep(3.5)
        assert starts == secs(0, 1, 2, 3)
        assert ends[:3] == secs(1, 2, 3)  # each cancelled when the next tick replaced it
        (info,) = manager.schedules()
        assert info.decisions[1].reason == "cancelled the run still going"
        assert info.running == 0  # the last one was cancelled with the manager

    async def test_a_blocked_loop_coalesces_and_the_grace_misses(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        coalesced: list[datetime] = []
        graced: list[datetime] = []
        each: list[datetime] = []
        manager.add_schedule(recorder(clock, coalesced), IntervalTrigger(1, T0), name="default")
        manager.add_schedule(
            recorder(clock, graced), IntervalTrigger(1, T0), name="grace", misfire_grace=3
        )
        manager.add_schedule(
            recorder(clock, each), IntervalTrigger(1, T0), name="each",
            misfire_grace=3, coalesce=False, overlap="allow",
        )  # fmt: skip
        async with running(manager):
            await anyio.sleep(0.5)
            mock_clock.jump(10)  # the loop was blocked (or the process paused) for 10 s
            await anyio.sleep(0.25)
        late = T0 + timedelta(seconds=10.5)
        assert coalesced == [T0, late]
        assert graced == [T0, late]
        assert each == [T0, late, late, late]  # ticks 8, 9 and 10, each its own run
        infos = {i.name: i for i in manager.schedules()}
        d = infos["default"].decisions
        assert [(x.kind, x.count) for x in d] == [
            (DecisionKind.FIRED, 1),
            (DecisionKind.COALESCED, 9),
            (DecisionKind.FIRED, 1),
        ]
        assert d[2].reason == "9 earlier due tick(s) folded in"  # tick 10 is 0.5 s late
        g = infos["grace"].decisions
        assert [(x.kind, x.count) for x in g] == [
            (DecisionKind.FIRED, 1),
            (DecisionKind.MISSED, 7),  # ticks 1-7: later than 3 s
            (DecisionKind.COALESCED, 1),
            (DecisionKind.COALESCED, 1),
            (DecisionKind.FIRED, 1),
        ]
        assert "past the 3s grace" in g[1].reason
        assert infos["grace"].missed_count == 7
        assert infos["grace"].coalesced_count == 2

    async def test_one_shot_added_late_runs_within_the_grace_only(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        early = T0 - timedelta(seconds=2)
        manager.add_schedule(
            recorder(clock, fired), OneShotTrigger(early), name="late-ok", misfire_grace=5
        )
        manager.add_schedule(
            recorder(clock, fired), OneShotTrigger(early), name="too-late", misfire_grace=1
        )
        manager.add_schedule(
            recorder(clock, fired), OneShotTrigger(T0 + timedelta(hours=1)), name="later"
        )
        async with running(manager):
            await anyio.sleep(7200)
        assert fired == [T0, T0 + timedelta(hours=1)]
        infos = {i.name: i for i in manager.schedules()}
        assert infos["too-late"].decisions[0].kind is DecisionKind.MISSED
        assert infos["late-ok"].decisions[0].reason == "late by 2s"
        assert infos["later"].next_fire_at is None

    async def test_fixed_delay_counts_from_the_end_of_each_run(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        starts: list[datetime] = []

        async def work() -> None:
            starts.append(clock.now())
            await anyio.sleep(2)

        manager.add_schedule(work, FixedDelayTrigger(3), name="delay", initial_delay=1)
        async with running(manager):
            await anyio.sleep(17)
        assert starts == secs(1, 6, 11, 16)

    async def test_initial_delay_and_jitter(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        manager.add_schedule(
            recorder(clock, fired), IntervalTrigger(60, T0), name="j", jitter=10,
            initial_delay=90,
        )  # fmt: skip
        async with running(manager):
            await anyio.sleep(600)
        nominal = secs(120, 180, 240, 300, 360, 420, 480, 540)
        assert len(fired) == len(nominal)
        offsets = [(f - n).total_seconds() for f, n in zip(fired, nominal, strict=True)]
        assert all(0 <= o < 10 for o in offsets)
        assert len(set(offsets)) == len(offsets)  # each tick its own delay
        expected = [jitter_for("j", Tick(at=n), 10) for n in nominal]
        assert offsets == pytest.approx(expected, abs=1e-6)

    async def test_pause_resume_remove_and_add_while_running(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        fired: list[datetime] = []
        async with running(manager):
            manager.add_schedule(recorder(clock, fired), IntervalTrigger(1, T0), name="tick")
            await anyio.sleep(2.5)  # fires at 0, 1, 2
            manager.pause_schedule("tick")
            assert manager.schedule("tick").paused
            assert manager.schedule("tick").next_fire_at is None
            await anyio.sleep(3)  # 3, 4, 5 are not owed
            manager.resume_schedule("tick")
            info = manager.schedule("tick")
            assert [(d.tick, d.kind) for d in info.decisions[-3:]] == [
                (t, DecisionKind.SKIPPED) for t in secs(3, 4, 5)
            ]
            assert info.decisions[-1].reason == "paused since 2026-01-01T00:00:02+00:00"
            assert info.skipped_count == 3
            await anyio.sleep(1)  # fires at 6
            manager.remove_schedule("tick")
            await anyio.sleep(3)
        assert fired == secs(0, 1, 2, 6)
        assert manager.schedules() == []
        with pytest.raises(KeyError, match="no schedule named 'tick'"):
            manager.pause_schedule("tick")

    async def test_remove_cancels_a_run_in_progress(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        ended = anyio.Event()

        async def long() -> None:
            try:
                await anyio.sleep(3600)
            finally:
                ended.set()

        manager.add_schedule(long, IntervalTrigger(7200, T0), name="long")
        async with running(manager):
            await anyio.sleep(1)
            assert manager.schedule("long").running == 1
            manager.remove_schedule("long")
            with anyio.fail_after(1):
                await ended.wait()
            assert anyio.current_time() < 2  # at once, not after the hour

    async def test_a_forward_wall_clock_step_runs_the_jumped_ticks_once(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock, step_check_interval=1)
        cron: list[datetime] = []
        rate: list[float] = []

        async def paced() -> None:
            rate.append(anyio.current_time())

        manager.add_schedule(recorder(clock, cron), CronTrigger("*/10 * * * *"), name="cron")
        manager.add_schedule(paced, IntervalTrigger(60, T0), name="rate")
        async with running(manager):
            start = anyio.current_time()
            await anyio.sleep(300.5)
            clock.step(3600)  # NTP, or someone, set the clock an hour ahead
            await anyio.sleep(1200)
        # cron: 00:00, then the 6 ticks up to 01:00 that the step jumped over run once
        assert cron[:2] == [T0, T0 + timedelta(seconds=3600 + 301)]
        assert cron[2:] == [T0 + timedelta(hours=1, minutes=m) for m in (10, 20)]
        decisions = manager.schedule("cron").decisions
        assert [(d.kind, d.count) for d in decisions] == [
            (DecisionKind.FIRED, 1),
            (DecisionKind.COALESCED, 5),
            (DecisionKind.FIRED, 1),
            (DecisionKind.FIRED, 1),
            (DecisionKind.FIRED, 1),
        ]
        assert "the wall clock stepped over it" in decisions[2].reason
        # the rate keeps its pace in loop time: no burst, no gap
        assert [round(t - start, 6) for t in rate] == [60.0 * i for i in range(26)]
        assert manager.statistics().clock_steps == 1

    async def test_a_backward_wall_clock_step_repeats_no_tick(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock, step_check_interval=1)
        cron: list[datetime] = []
        rate: list[float] = []

        async def paced() -> None:
            rate.append(anyio.current_time())

        manager.add_schedule(recorder(clock, cron), CronTrigger("*/10 * * * *"), name="cron")
        manager.add_schedule(paced, IntervalTrigger(60, T0), name="rate")
        async with running(manager):
            start = anyio.current_time()
            await anyio.sleep(1800.5)  # 00:00 .. 00:30 ran
            clock.step(-1200)  # back to 00:10:00.5
            await anyio.sleep(1800)
        wall = [t - T0 for t in cron]
        # 00:10 .. 00:30 are not run again; 00:40 runs when the wall clock reads it
        assert wall == [timedelta(minutes=m) for m in (0, 10, 20, 30, 40)]
        assert len(set(cron)) == len(cron)
        assert [round(t - start, 6) for t in rate] == [60.0 * i for i in range(61)]

    async def test_the_status_rpc_shows_schedules_with_their_decisions(self) -> None:
        from app.pb import worker as pb
        from app.worker.job_master import JobMaster
        from app.worker.job_registry import JobRegistry
        from app.worker.service import WorkerService

        clock = LoopClock(datetime(2026, 3, 7, 12, tzinfo=UTC))
        manager = ScheduleManager(clock)
        service = WorkerService(JobMaster(JobRegistry()), manager)

        async def noop() -> None:
            pass

        manager.add_schedule(noop, CronTrigger("30 2 * * *", tz="America/New_York"), name="n")
        async with running(manager):
            await anyio.sleep(86_400)
            status = await service.get_status(pb.StatusReq())
        (info,) = status.schedules
        assert info.name == "n"
        assert info.trigger == "cron '30 2 * * *' America/New_York"
        assert info.run_count == 1
        assert info.last_outcome == "ok"
        assert info.next_fire_at == "2026-03-09T06:30:00.000+00:00"
        assert info.overlap == "forbid"
        (decision,) = info.decisions
        assert decision.tick == "2026-03-08T03:00:00-04:00"
        assert decision.kind == "moved"
        assert "02:30:00 does not exist in America/New_York (DST)" in decision.reason
        assert decision.count == 1

    async def test_drain_stops_ticks_at_once_and_gives_runs_the_grace(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        outcomes: dict[str, str] = {}

        def job(name: str, seconds: float) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                try:
                    await anyio.sleep(seconds)
                    outcomes[name] = "done"
                except anyio.get_cancelled_exc_class():
                    outcomes[name] = "cancelled"
                    raise

            return run

        manager.add_schedule(job("short", 2), IntervalTrigger(3600, T0), name="short")
        manager.add_schedule(job("long", 20), IntervalTrigger(3600, T0), name="long")
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            await anyio.sleep(1)
            manager.begin_drain(5)
            await manager.wait_stopped()
            stopped_at = anyio.current_time()
        assert outcomes == {"short": "done", "long": "cancelled"}
        assert stopped_at == pytest.approx(6)
        assert manager.statistics().state is Lifecycle.STOPPED
        assert "STOPPED" in repr(manager)

    # --- runs on pooled runners ---

    async def test_runs_that_wait_do_not_hold_up_runs_due_with_them(self) -> None:
        # each run waits until all have started: runs taken one after the other would never get
        # past the first; the manager sends more runners while the queue stays untaken
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        count = 40
        started: list[datetime] = []
        all_started = anyio.Event()

        async def wait_for_all() -> None:
            started.append(clock.now())
            if len(started) == count:
                all_started.set()
            await all_started.wait()

        for i in range(count):
            manager.add_schedule(wait_for_all, IntervalTrigger(3600, T0), name=f"s{i}")
        async with running(manager):
            with anyio.fail_after(1):
                await all_started.wait()
            assert started == [T0] * count  # all at the instant they were due
            runners = manager.statistics().runners
            assert count <= runners < 2 * count  # a runner per waiting run, give or take
            await anyio.sleep(RUNNER_KEEP_ALIVE + 1)
            assert manager.statistics().runners == 0  # idle runners end
            assert manager.statistics().running == 0
            await anyio.sleep(3600 - RUNNER_KEEP_ALIVE)  # the next hour: runners again
            assert len(started) == 2 * count
        assert {i.run_count for i in manager.schedules()} == {2}

    async def test_a_run_removed_before_a_runner_took_it_does_not_run(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        ran: list[str] = []

        async def remove_b() -> None:
            ran.append("a")
            manager.remove_schedule("b")  # b's run is queued behind this one, due with it

        async def b() -> None:
            ran.append("b")

        manager.add_schedule(remove_b, OneShotTrigger(T0), name="a")
        manager.add_schedule(b, OneShotTrigger(T0), name="b")
        async with running(manager):
            await anyio.sleep(1)
            assert manager.statistics().running == 0
        assert ran == ["a"]

    async def test_a_cancelled_run_leaves_the_runs_after_it_on_its_runner_alone(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        after: list[datetime] = []

        async def remove_itself() -> None:
            # cancels its own run, then returns before any checkpoint could deliver it
            manager.remove_schedule("quitter")

        async def checkpointing() -> None:
            # a checkpoint: it would raise if this ran under the quitter's cancelled scope
            await anyio.lowlevel.checkpoint()
            after.append(clock.now())

        async def forever() -> None:
            await anyio.sleep_forever()

        manager.add_schedule(remove_itself, IntervalTrigger(1, T0), name="quitter")
        manager.add_schedule(checkpointing, IntervalTrigger(1, T0), name="next")
        manager.add_schedule(forever, IntervalTrigger(10, T0 + timedelta(seconds=1)), name="hung")
        async with running(manager):
            await anyio.sleep(1.5)
            assert manager.schedule("hung").running == 1
            manager.remove_schedule("hung")  # cancels the run a runner is held up in
            await anyio.sleep(2)
        assert after == secs(0, 1, 2, 3)
        info = manager.schedule("next")
        assert (info.run_count, info.last_outcome, info.failure_count) == (4, "ok", 0)

    async def test_each_run_logs_as_its_own_schedule_on_a_shared_runner(self) -> None:
        clock = LoopClock(T0)
        manager = ScheduleManager(clock)
        seen: list[tuple[str, str | None]] = []

        def job(name: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                seen.append((name, log_fields().get("schedule")))

            return run

        for name in ("a", "b", "c"):
            manager.add_schedule(job(name), IntervalTrigger(1, T0), name=name)
        async with running(manager):
            await anyio.sleep(1.5)
            assert manager.statistics().runners == 1  # quick runs: one runner took them all
            assert "runners=1 RUNNING" in repr(manager)
        assert seen == [(n, n) for n in ("a", "b", "c")] * 2
        assert log_fields().get("schedule") is None

    async def test_schedules_with_one_trigger_share_the_next_tick_but_not_their_state(
        self,
    ) -> None:
        # the dispatcher asks an equal trigger once per pass; each schedule keeps its own
        # decisions, and a DST fold's two sides stay two ticks
        clock = LoopClock(datetime(2026, 11, 1, 4, 0, tzinfo=UTC))
        manager = ScheduleManager(clock)
        fired: dict[str, list[datetime]] = {"a": [], "b": [], "paused": []}
        trigger = CronTrigger("*/30 1 * * *", tz="America/New_York", repeated=RepeatedTime.TWICE)
        for name, into in fired.items():
            manager.add_schedule(recorder(clock, into), trigger, name=name)
        async with running(manager):
            await anyio.sleep(3600 * 1.25)  # 00:00 EDT .. 01:15 EDT
            manager.pause_schedule("paused")
            await anyio.sleep(3600 * 2)
        local = [t.astimezone(NEW_YORK).isoformat() for t in fired["a"]]
        assert local == [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:30:00-05:00",
        ]
        assert fired["b"] == fired["a"]
        assert fired["paused"] == fired["a"][:1]
        assert manager.schedule("paused").next_fire_at is None


# --- both backends, real time ---


async def test_schedules_fire_add_and_remove_on_both_backends() -> None:
    clock = LoopClock()
    manager = ScheduleManager(clock)
    fired: list[datetime] = []
    failures = 0

    async def bad() -> None:
        nonlocal failures
        failures += 1
        raise ValueError("nope")

    async with running(manager):
        manager.add_schedule(recorder(clock, fired), IntervalTrigger(0.01, clock.now()), name="a")
        manager.add_schedule(bad, IntervalTrigger(0.01, clock.now()), name="bad")
        await eventually(lambda: len(fired) >= 3 and failures >= 3)
        manager.remove_schedule("a")
        count = len(fired)
        await eventually(lambda: failures >= 6)  # the failing one still fires
        assert len(fired) == count
    assert manager.schedule("bad").failure_count >= 6
    assert manager.schedule("bad").last_outcome == "failed: ValueError: nope"


async def test_runs_that_wait_and_quick_runs_due_together_on_both_backends() -> None:
    manager = ScheduleManager(LoopClock())
    count = 30
    quick = 0
    waiting = 0
    release = anyio.Event()

    async def wait() -> None:
        nonlocal waiting
        waiting += 1
        await release.wait()

    async def instant() -> None:
        nonlocal quick
        quick += 1

    now = manager.clock.now()
    for i in range(count):  # alternating: every other run holds its runner up
        fn = wait if i % 2 else instant
        manager.add_schedule(fn, OneShotTrigger(now), name=f"s{i}")
    async with running(manager):
        await eventually(lambda: waiting == count // 2 and quick == count - count // 2)
        assert manager.statistics().running == count // 2
        release.set()
        await eventually(lambda: manager.statistics().running == 0)
    assert {i.last_outcome for i in manager.schedules()} == {"ok"}


async def test_drain_waits_for_a_running_job_on_both_backends() -> None:
    manager = ScheduleManager(LoopClock())
    started, release = anyio.Event(), anyio.Event()
    finished: list[bool] = []

    async def job() -> None:
        started.set()
        await release.wait()
        finished.append(True)

    manager.add_schedule(job, FixedDelayTrigger(3600), name="job")
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        with anyio.fail_after(5):
            await started.wait()
        manager.begin_drain(30)
        release.set()
        with anyio.fail_after(5):
            await manager.wait_stopped()
    assert finished == [True]
    assert manager.schedule("job").last_outcome == "ok"
