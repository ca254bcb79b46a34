"""ScheduleManager: exact fire instants in virtual time, isolation of failures, overlap, pause."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import trio.testing

from app.clock import LoopWallClock
from app.schedule_manager import IntervalTrigger, ScheduleManager

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # virtual time: a day of ticks runs in milliseconds and fire instants are exact
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def test_interval_trigger_grid() -> None:
    trigger = IntervalTrigger(5, T0)
    assert trigger.next_fire(T0 - timedelta(days=1)) == T0
    assert trigger.next_fire(T0) == T0 + timedelta(seconds=5)
    assert trigger.next_fire(T0 + timedelta(seconds=7)) == T0 + timedelta(seconds=10)
    with pytest.raises(ValueError, match="positive"):
        IntervalTrigger(0, T0)


async def test_a_day_of_five_second_ticks_fires_on_the_grid() -> None:
    clock = LoopWallClock(T0)
    manager = ScheduleManager(clock)
    fired: list[datetime] = []

    async def tick() -> None:
        fired.append(clock.now())

    manager.add_schedule(tick, IntervalTrigger(5, T0), name="tick")
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        await anyio.sleep(86_400.5)  # noqa: ASYNC116  (a day and a bit, in virtual time)
        tg.cancel_scope.cancel()
    assert len(fired) == 86_400 // 5 + 1
    assert fired[0] == T0
    assert fired[-1] == T0 + timedelta(days=1)
    assert all(b - a == timedelta(seconds=5) for a, b in itertools.pairwise(fired))
    (info,) = manager.schedules()
    assert info.run_count == len(fired)
    assert info.last_outcome == "ok"


async def test_a_failing_job_is_counted_and_never_stops_others() -> None:
    clock = LoopWallClock(T0)
    manager = ScheduleManager(clock)
    good: list[datetime] = []

    async def bad() -> None:
        raise RuntimeError("broken")

    async def ok() -> None:
        good.append(clock.now())

    manager.add_schedule(bad, IntervalTrigger(1, T0), name="bad")
    manager.add_schedule(ok, IntervalTrigger(1, T0), name="ok")
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        await anyio.sleep(9.5)
        tg.cancel_scope.cancel()
    infos = {i.name: i for i in manager.schedules()}
    assert infos["bad"].failure_count == 10
    assert infos["bad"].last_outcome == "failed: RuntimeError: broken"
    assert len(good) == 10


async def test_overlapping_tick_is_skipped() -> None:
    clock = LoopWallClock(T0)
    manager = ScheduleManager(clock)
    starts: list[datetime] = []

    async def slow() -> None:
        starts.append(clock.now())
        await anyio.sleep(2.5)  # longer than the 1 s period

    manager.add_schedule(slow, IntervalTrigger(1, T0), name="slow")
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        await anyio.sleep(5.5)
        tg.cancel_scope.cancel()
    assert starts == [T0, T0 + timedelta(seconds=3)]
    (info,) = manager.schedules()
    assert info.skipped_count == 4


async def test_pause_resume_remove_and_add_while_running() -> None:
    clock = LoopWallClock(T0)
    manager = ScheduleManager(clock)
    fired: list[datetime] = []

    async def tick() -> None:
        fired.append(clock.now())

    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        manager.add_schedule(tick, IntervalTrigger(1, T0), name="tick")
        await anyio.sleep(2.5)  # fires at 0, 1, 2
        manager.pause_schedule("tick")
        assert manager.schedules()[0].paused
        await anyio.sleep(3)  # 3, 4, 5 are not owed
        manager.resume_schedule("tick")
        await anyio.sleep(1)  # fires at 6
        manager.remove_schedule("tick")
        await anyio.sleep(3)
        tg.cancel_scope.cancel()
    assert fired == [T0 + timedelta(seconds=s) for s in (0, 1, 2, 6)]
    assert manager.schedules() == []
    with pytest.raises(KeyError, match="no schedule named 'tick'"):
        manager.pause_schedule("tick")
