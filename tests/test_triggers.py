"""Triggers: the next tick after an instant, for each kind, and their validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.scheduling.cron import CronError, RepeatedTime, SkippedTime
from app.scheduling.triggers import (
    CronTrigger,
    FixedDelayTrigger,
    IntervalTrigger,
    OneShotTrigger,
    Tick,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_interval_trigger_grid() -> None:
    trigger = IntervalTrigger(5, T0)
    assert trigger.next_tick(T0 - timedelta(days=1)) == Tick(at=T0)
    assert trigger.next_tick(T0) == Tick(at=T0 + timedelta(seconds=5))
    assert trigger.next_tick(T0 + timedelta(seconds=7)) == Tick(at=T0 + timedelta(seconds=10))
    assert trigger.first_tick(T0 + timedelta(seconds=10)) == Tick(at=T0 + timedelta(seconds=10))
    assert trigger.describe() == "every 5s"
    assert not trigger.wall_anchored
    assert not trigger.from_run_end


def test_interval_trigger_is_exact_over_a_year_of_fractional_periods() -> None:
    trigger = IntervalTrigger(0.1, T0)
    year = timedelta(days=365)
    tick = trigger.next_tick(T0 + year - timedelta(microseconds=1))
    assert tick is not None
    assert tick.at == T0 + year  # microsecond arithmetic: no float drift


def test_interval_trigger_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        IntervalTrigger(0, T0)
    with pytest.raises(ValueError, match="positive"):
        IntervalTrigger(float("nan"), T0)
    with pytest.raises(ValueError, match="aware"):
        IntervalTrigger(1, datetime(2026, 1, 1))


def test_fixed_delay_counts_from_the_given_end() -> None:
    trigger = FixedDelayTrigger(30)
    assert trigger.first_tick(T0) == Tick(at=T0)
    assert trigger.next_tick(T0 + timedelta(seconds=7)) == Tick(at=T0 + timedelta(seconds=37))
    assert trigger.from_run_end
    assert trigger.describe() == "30s after each run"


def test_one_shot() -> None:
    trigger = OneShotTrigger(T0)
    assert trigger.first_tick(T0 + timedelta(hours=1)) == Tick(at=T0)  # past: grace decides
    assert trigger.next_tick(T0 - timedelta(seconds=1)) == Tick(at=T0)
    assert trigger.next_tick(T0) is None
    assert trigger.wall_anchored


def test_cron_trigger_ticks_in_its_zone() -> None:
    trigger = CronTrigger("30 2 * * *", tz="America/New_York")
    tick = trigger.first_tick(datetime(2026, 3, 7, 12, tzinfo=UTC))
    assert tick is not None
    assert tick.at.isoformat() == "2026-03-08T03:00:00-04:00"
    assert tick.moved
    assert tick.runs
    assert "2026-03-08 02:30:00 does not exist in America/New_York (DST)" in tick.note
    assert trigger.describe() == "cron '30 2 * * *' America/New_York"


def test_cron_trigger_first_tick_counts_the_begin_instant() -> None:
    trigger = CronTrigger("0 0 * * *")
    assert trigger.first_tick(T0) == Tick(at=T0)
    assert trigger.next_tick(T0) == Tick(at=T0 + timedelta(days=1))


def test_cron_trigger_skip_policy_reports_a_tick_that_does_not_run() -> None:
    trigger = CronTrigger(
        "30 2 * * *", tz="Europe/Berlin", skipped=SkippedTime.SKIP, repeated=RepeatedTime.TWICE
    )
    tick = trigger.first_tick(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert tick is not None
    assert not tick.runs
    assert "skipped" in tick.note
    assert trigger.describe() == "cron '30 2 * * *' Europe/Berlin (skipped=skip, repeated=twice)"


def test_cron_trigger_rejects_bad_input_when_made() -> None:
    with pytest.raises(CronError, match=r"minute \(field 1 of 5\) '60'"):
        CronTrigger("60 * * * *")
    with pytest.raises(ValueError, match="unknown time zone 'Nowhere/Land'"):
        CronTrigger("* * * * *", tz="Nowhere/Land")
    # decoded from config, a bad expression is a validation error naming the field
    with pytest.raises(msgspec.ValidationError, match="day-of-month"):
        msgspec.convert({"expression": "0 0 32 * *"}, CronTrigger)
    decoded = msgspec.convert(
        {"expression": "@daily", "tz": "Asia/Tokyo", "repeated": "twice"}, CronTrigger
    )
    assert decoded.repeated is RepeatedTime.TWICE
