"""The trigger's pure core: schedule checks, fire times, what is due, the ledger's sentences."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.config import ScheduleEntry, load_config
from app.errors import ConfigError
from app.fleet.schedules import (
    InvalidSchedule,
    PendingTick,
    ScheduleCursor,
    ScheduleSource,
    ScheduleSpec,
    TickCause,
    TickDecision,
    TickKind,
    manual_job_id,
    schedule_problem,
    tick_job_id,
    trigger_for,
    utc_label,
)
from app.scheduling.cron import SkippedTime
from app.scheduling.decisions import DecisionKind, Overlap
from app.trigger.config_sync import config_specs
from app.trigger.explain import duration, explain, sentence
from app.trigger.replica import preferred_replica
from app.trigger.specs import parse_time, same_definition, spec_from_fields
from app.trigger.ticks import Idle, Record, Submit, judge, plan_step

T0 = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def spec(**fields: Any) -> ScheduleSpec:
    fields.setdefault("name", "s")
    fields.setdefault("job_type", "echo")
    if "cron" not in fields:
        fields.setdefault("interval_seconds", 60.0)
    fields.setdefault("since", T0)
    fields.setdefault("misfire_grace_seconds", 30.0)
    return ScheduleSpec(**fields)


def plan(s: ScheduleSpec, cursor: ScheduleCursor, now: float, limit: int = 100) -> Any:
    return plan_step(s, trigger_for(s), cursor, now=now, replica="r1", limit=limit)


# --- checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"name": "a b"}, "name", "letters, digits"),
        ({"name": "x" * 101}, "name", "1 to 100"),
        ({"job_type": ""}, "job_type", "must not be empty"),
        ({"job_type": "a b"}, "job_type", "letters"),
        ({"cron": "61 * * * *"}, "cron", "minute (field 1 of 5) '61'"),
        ({"cron": "* * * *"}, "cron", "5 fields"),
        ({"cron": "* * * * *", "interval_seconds": 5.0}, "cron", "not both"),
        ({"interval_seconds": 0.0}, "cron", "or neither"),
        ({"interval_seconds": -1.0}, "interval_seconds", "above 0"),
        ({"interval_seconds": float("nan")}, "interval_seconds", "above 0"),
        ({"time_zone": "Mars/Olympus"}, "time_zone", "Mars/Olympus"),
        ({"params": {"": "x"}}, "params", "keys must not be empty"),
        ({"jitter_seconds": -1.0}, "jitter_seconds", "0 or more"),
        ({"deadline_seconds": 1e308}, "deadline_seconds", "at most"),
        ({"misfire_grace_seconds": 0.0}, "misfire_grace_seconds", "above 0"),
        ({"misfire_grace_seconds": 5.0}, "misfire_grace_seconds", "twice trigger.lease"),
        ({"priority": 10}, "priority", "0..9"),
        ({"max_attempts": 21}, "max_attempts", "0..20"),
    ],
)
def test_a_bad_schedule_names_its_field(fields: dict[str, Any], field: str, words: str) -> None:
    problem = schedule_problem(spec(**fields), min_grace=10.0)
    assert problem is not None
    assert problem[0] == field
    assert words in problem[1]


def test_a_good_schedule_passes() -> None:
    assert schedule_problem(spec(cron="@daily", time_zone="Europe/Berlin")) is None
    assert schedule_problem(spec(), min_grace=30.0) is None


def test_fields_as_people_write_them() -> None:
    given = {"name": "n", "job_type": "echo", "interval_seconds": 5, "overlap": "REPLACE",
             "interval_start": "2026-03-01T00:00:02", "time_zone": "Europe/Berlin",
             "params": {"a": 1}}  # fmt: skip
    made = spec_from_fields(given, now=T0, source=ScheduleSource.RUNTIME, min_grace=0)
    assert made.overlap is Overlap.REPLACE
    assert made.params == {"a": "1"}
    assert made.interval_start == T0 + 2 - 3600  # a wall time in Berlin (UTC+1)
    assert made.misfire_grace_seconds == 300.0  # 0 or absent: the default
    with pytest.raises(InvalidSchedule, match=r"^overlap: must be 'forbid' or 'allow' or"):
        spec_from_fields(given | {"overlap": "sometimes"}, now=T0,
                         source=ScheduleSource.RUNTIME, min_grace=0)  # fmt: skip
    with pytest.raises(InvalidSchedule, match=r"^interval_start: expected an ISO 8601 time"):
        spec_from_fields(given | {"interval_start": "yesterday"}, now=T0,
                         source=ScheduleSource.RUNTIME, min_grace=0)  # fmt: skip


def test_an_update_keeps_its_place_in_time_unless_its_fire_times_change() -> None:
    first = spec_from_fields({"name": "n", "job_type": "echo", "cron": "0 * * * *"}, now=T0,
                             source=ScheduleSource.RUNTIME, min_grace=0)  # fmt: skip
    first = ScheduleSpec(**{**_fields(first), "paused": True, "version": 4})
    params = spec_from_fields(
        {"name": "n", "job_type": "echo", "cron": "0 * * * *", "params": {"a": "b"}},
        now=T0 + 100, source=ScheduleSource.RUNTIME, min_grace=0, previous=first,
    )  # fmt: skip
    assert (params.since, params.created_at, params.paused, params.version) == (T0, T0, True, 4)
    assert not same_definition(first, params)
    timing = spec_from_fields({"name": "n", "job_type": "echo", "cron": "5 * * * *"},
                              now=T0 + 100, source=ScheduleSource.RUNTIME, min_grace=0,
                              previous=first)  # fmt: skip
    assert timing.since == T0 + 100


def _fields(s: ScheduleSpec) -> dict[str, Any]:
    return {f: getattr(s, f) for f in ScheduleSpec.__struct_fields__}


def test_parse_time() -> None:
    assert parse_time("2026-03-01T00:00:00Z", zone_name="Asia/Tokyo", field="at") == T0
    assert parse_time("2026-03-01T09:00", zone_name="Asia/Tokyo", field="at") == T0
    assert parse_time("now", zone_name="UTC", field="at", now=5.0) == 5.0
    with pytest.raises(InvalidSchedule, match=r"^at: expected an ISO 8601"):
        parse_time("soon", zone_name="UTC", field="at")


def test_config_schedules_are_checked_naming_the_key() -> None:
    good = ScheduleEntry(name="a", job_type="echo", cron="* * * * *")
    with pytest.raises(ConfigError, match=r"^schedules\[1\]\.cron: '61 \* \* \* \*': minute"):
        config_specs([good, ScheduleEntry(name="b", job_type="echo", cron="61 * * * *")],
                     now=T0, min_grace=0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"^schedules\[1\]\.name: 'a' is declared already"):
        config_specs([good, good], now=T0, min_grace=0)
    with pytest.raises(ConfigError, match=r"^schedules\[0\]\.misfire_grace_seconds: must be"):
        config_specs([good], now=T0, min_grace=600)
    (made,) = config_specs([good], now=T0, min_grace=0)
    assert made.source is ScheduleSource.CONFIG


def test_config_tables_decode(tmp_path: Any) -> None:
    (tmp_path / "application.toml").write_text(
        '[trigger]\nlease_seconds = 2\norchestrators = ["o1:9090", "o2:9090"]\n'
        '[[schedules]]\nname = "nightly"\njob_type = "echo"\ncron = "30 2 * * *"\n'
        'time_zone = "America/New_York"\nparams = { a = "1" }\n'
        '[[schedules]]\nname = "often"\njob_type = "echo"\ninterval_seconds = 10\n'
    )
    config = load_config({}, config_dir=tmp_path)
    assert [s.name for s in config.schedules] == ["nightly", "often"]
    assert config.trigger.orchestrators == ["o1:9090", "o2:9090"]
    (tmp_path / "application.toml").write_text('[[schedules]]\nname = "x"\ncron = "* * * * *"\n')
    with pytest.raises(ConfigError, match=r"schedules\[0\]"):
        load_config({}, config_dir=tmp_path)


def test_job_ids_carry_schedule_and_fire_time() -> None:
    assert tick_job_id("nightly", T0) == "nightly@2026-03-01T00:00:00Z"
    assert tick_job_id("fast", T0 + 0.25) == "fast@2026-03-01T00:00:00.25Z"
    assert manual_job_id("nightly", T0 + 1.2345) == "nightly@manual-2026-03-01T00:00:01.234Z"
    assert utc_label(T0) == "2026-03-01T00:00:00Z"


# --- what is due ----------------------------------------------------------------------------------


def test_nothing_due_waits_for_the_next_tick() -> None:
    step = plan(spec(), ScheduleCursor(), now=T0 + 10)
    assert isinstance(step, Idle)
    assert step.wake_at == T0 + 60


def test_a_due_tick_is_submitted_and_ticks_come_after_the_cursor() -> None:
    step = plan(spec(), ScheduleCursor(), now=T0 + 61)
    assert isinstance(step, Submit)
    assert (step.tick.timestamp, step.deadline) == (T0 + 60, T0 + 90)
    after = plan(spec(), ScheduleCursor(tick=T0 + 60), now=T0 + 61)
    assert isinstance(after, Idle)
    assert after.wake_at == T0 + 120


def test_jitter_delays_the_tick_the_same_on_every_replica() -> None:
    s = spec(jitter_seconds=20.0)
    step = plan(s, ScheduleCursor(), now=T0 + 59)
    assert isinstance(step, Idle)
    assert step.wake_at is not None
    assert T0 + 60 <= step.wake_at <= T0 + 80
    assert plan(s, ScheduleCursor(), now=T0 + 59) == step
    due = plan(s, ScheduleCursor(), now=step.wake_at)
    assert isinstance(due, Submit)
    assert due.planned == step.wake_at
    assert due.deadline == step.wake_at + 30


def test_ticks_past_the_grace_are_missed_without_asking_anyone() -> None:
    step = plan(spec(), ScheduleCursor(), now=T0 + 200)
    assert isinstance(step, Record)
    assert [(d.tick, d.kind, d.cause) for d in step.decisions] == [
        (T0 + 60, TickKind.MISSED, TickCause.NO_REPLICA),
        (T0 + 120, TickKind.MISSED, TickCause.NO_REPLICA),
    ]  # the one at 180 is within its grace: submitted next
    assert step.decisions[0].late_seconds == 140
    assert step.decisions[0].grace_seconds == 30
    nxt = plan(spec(), ScheduleCursor(tick=T0 + 120), now=T0 + 200)
    assert isinstance(nxt, Submit)
    assert nxt.tick.timestamp == T0 + 180


def test_a_miss_after_a_replica_that_tried_says_what_the_orchestrator_answered() -> None:
    pending = PendingTick(tick=T0 + 60, replica="r9", since=T0 + 60, attempts=7,
                          last_error="UNAVAILABLE: down")  # fmt: skip
    step = plan(spec(), ScheduleCursor(pending=pending), now=T0 + 95)
    assert isinstance(step, Record)
    (d,) = step.decisions
    assert (d.cause, d.reason) == (
        TickCause.UNREACHABLE,
        "7 failed attempt(s) by replica r9, the last: UNAVAILABLE: down",
    )
    quiet = PendingTick(tick=T0 + 60, replica="r9", since=T0 + 60)
    (d,) = plan(spec(), ScheduleCursor(pending=quiet), now=T0 + 95).decisions
    assert d.cause is TickCause.NO_REPLICA
    assert "replica r9 took it and stopped" in d.reason


def test_a_paused_schedule_misses_each_tick_as_it_comes() -> None:
    s = spec(paused=True, paused_at=T0 + 30, pause_note="maintenance")
    step = plan(s, ScheduleCursor(), now=T0 + 121)
    assert isinstance(step, Record)
    assert [(d.tick, d.cause) for d in step.decisions] == [
        (T0 + 60, TickCause.PAUSED), (T0 + 120, TickCause.PAUSED),
    ]  # fmt: skip
    assert step.decisions[0].reason == "paused since 2026-03-01T00:00:30+00:00: maintenance"


def test_a_long_outage_is_one_record_for_the_oldest_and_one_each_for_the_newest() -> None:
    week = 7 * 86_400
    step = plan(spec(), ScheduleCursor(), now=T0 + week + 1, limit=5)
    assert isinstance(step, Record)
    records = step.decisions
    assert len(records) == 5
    assert records[0].count == week // 60 - 1 - 4  # all but the newest 4 that are missed
    assert records[0].first_tick == T0 + 60
    assert [r.count for r in records[1:]] == [1, 1, 1, 1]
    assert records[-1].tick == T0 + week - 60  # the last is within its grace: submitted next
    assert "ticks from 2026-03-01T00:01:00+00:00" in records[0].reason


def test_a_huge_outage_of_a_fast_schedule_does_not_list_every_tick() -> None:
    s = spec(interval_seconds=0.01)
    step = plan(s, ScheduleCursor(), now=T0 + 86_400, limit=3)
    assert isinstance(step, Record)
    first, newest = step.decisions[0], step.decisions[-1]
    assert first.first_tick == pytest.approx(T0 + 0.01)
    assert first.count == 99_999  # listed one by one up to a bound, then found by bisection
    assert "and more ticks before it" in newest.reason
    assert T0 + 86_400 - 30 - 0.02 <= newest.tick <= T0 + 86_400 - 30


def test_dst_moved_and_skipped_times() -> None:
    new_york = {"cron": "30 2 * * *", "time_zone": "America/New_York",
                "misfire_grace_seconds": 60.0}  # fmt: skip
    march = datetime(2026, 3, 8, 5, tzinfo=UTC).timestamp()  # 00:00 in New York
    moved = plan(spec(**new_york, since=march), ScheduleCursor(), now=march + 2 * 3600 + 1)
    assert isinstance(moved, Submit)
    assert moved.tick.moved
    assert moved.tick.at.isoformat() == "2026-03-08T03:00:00-04:00"
    skip = spec(**new_york, since=march, dst_skipped=SkippedTime.SKIP)
    step = plan(skip, ScheduleCursor(), now=march + 2 * 3600 + 1)
    assert isinstance(step, Record)
    (d,) = step.decisions
    assert (d.kind, d.cause) == (TickKind.SKIPPED, TickCause.DST)
    assert "does not exist in America/New_York" in d.reason
    verdict = judge(spec(**new_york, since=march), moved, previous_running=False,
                    now=moved.planned + 2)  # fmt: skip
    assert verdict.kind is DecisionKind.MOVED


@pytest.mark.parametrize(
    ("overlap", "running", "kind", "run", "replace"),
    [
        (Overlap.FORBID, True, DecisionKind.SKIPPED, False, False),
        (Overlap.FORBID, False, DecisionKind.FIRED, True, False),
        (Overlap.ALLOW, True, DecisionKind.FIRED, True, False),
        (Overlap.REPLACE, True, DecisionKind.FIRED, True, True),
    ],
)
def test_judge_applies_the_overlap_policy(
    overlap: Overlap, running: bool, kind: DecisionKind, run: bool, replace: bool
) -> None:
    s = spec(overlap=overlap)
    step = plan(s, ScheduleCursor(), now=T0 + 61)
    assert isinstance(step, Submit)
    verdict = judge(s, step, previous_running=running, now=T0 + 61)
    assert (verdict.kind, verdict.run, verdict.replace) == (kind, run, replace)


def test_a_tick_that_became_late_while_judging_is_missed() -> None:
    s = spec()
    step = plan(s, ScheduleCursor(), now=T0 + 61)
    assert isinstance(step, Submit)
    assert judge(s, step, previous_running=False, now=T0 + 95).kind is DecisionKind.MISSED


def test_preferred_replicas_spread_schedules() -> None:
    replicas = ["a:1:x", "b:2:y", "c:3:z"]
    owners = [preferred_replica(f"s{i}", replicas) for i in range(300)]
    assert {o: owners.count(o) for o in replicas} == {
        o: pytest.approx(100, abs=30) for o in replicas
    }
    assert preferred_replica("s1", []) is None
    # a replica that goes takes only its own schedules with it
    rest = [preferred_replica(f"s{i}", replicas[1:]) for i in range(300)]
    assert all(a == b for a, b in zip(owners, rest, strict=True) if a != "a:1:x")


# --- sentences ------------------------------------------------------------------------------------


def record(kind: TickKind, **fields: Any) -> TickDecision:
    fields.setdefault("tick_text", "2026-03-01T00:01:00+00:00")
    return TickDecision(schedule="s", tick=T0 + 60, kind=kind, decided_at=T0 + 61, **fields)


@pytest.mark.parametrize(
    ("made", "expected"),
    [
        (record(TickKind.FIRED, job_id="s@x", late_seconds=0.01, replica="r1"),
         "s ran for 2026-03-01T00:01:00+00:00: job s@x, submitted on time by replica r1."),
        (record(TickKind.FIRED, job_id="s@x", late_seconds=4.2, existing=True),
         "s ran for 2026-03-01T00:01:00+00:00: job s@x, submitted 4.2s after its planned time;"
         " the orchestrator had the job already (a replica that stopped mid-way had submitted"
         " it)."),
        (record(TickKind.MOVED, job_id="s@x", reason="02:30 does not exist"),
         "s ran for 2026-03-01T00:01:00+00:00: job s@x, submitted on time; DST moved it"
         " (02:30 does not exist)."),
        (record(TickKind.SKIPPED, cause=TickCause.OVERLAP, blocking_job="s@prev",
                blocking_state="RUNNING"),
         "s did not run at 2026-03-01T00:01:00+00:00: its overlap policy forbids a second run"
         " and job s@prev (the previous one) was still RUNNING."),
        (record(TickKind.MISSED, cause=TickCause.NO_REPLICA, late_seconds=612,
                grace_seconds=300, reason="no trigger replica was working the schedule"),
         "s did not run at 2026-03-01T00:01:00+00:00: no trigger replica was working the"
         " schedule; it was decided 10m 12s after its time, past its 5m 00s misfire grace."),
        (record(TickKind.MISSED, cause=TickCause.UNREACHABLE, grace_seconds=30,
                reason="9 failed attempt(s), the last: UNAVAILABLE: x"),
         "s did not run at 2026-03-01T00:01:00+00:00: the orchestrator did not take it within"
         " its 30s misfire grace (9 failed attempt(s), the last: UNAVAILABLE: x)."),
        (record(TickKind.MISSED, cause=TickCause.PAUSED, reason="paused since X"),
         "s did not run at 2026-03-01T00:01:00+00:00: the schedule was paused since X."),
        (record(TickKind.MISSED, cause=TickCause.NO_REPLICA, count=3, first_tick=T0,
                reason="r", late_seconds=1),
         "s did not run at 3 fire times from 2026-03-01T00:00:00+00:00 to"
         " 2026-03-01T00:01:00+00:00: r; it was decided 1.0s after its time, past its"
         " misfire grace."),
        (record(TickKind.BACKFILLED, job_id="s@x", previous="s did not run at ..."),
         "s ran for 2026-03-01T00:01:00+00:00 later, by a backfill: job s@x (before, its"
         " decision was: s did not run at ...)."),
        (record(TickKind.TRIGGERED, job_id="s@manual-x", replica="r2"),
         "s was triggered by hand at 2026-03-01T00:01:00+00:00 by replica r2: job s@manual-x."),
    ],
)  # fmt: skip
def test_each_decision_reads_as_one_sentence(made: TickDecision, expected: str) -> None:
    assert sentence(made) == expected


def test_durations() -> None:
    assert [duration(s) for s in (0.4, 4.25, 12, 303, 7500, 400_000)] == [
        "0.4s", "4.2s", "12s", "5m 03s", "2h 05m", "4d 15h",
    ]  # fmt: skip


def test_explain_answers_for_an_instant() -> None:
    s = spec(created_at=T0)
    trig = trigger_for(s)
    fired = record(TickKind.FIRED, job_id="s@x")
    common: dict[str, Any] = dict(spec=s, trigger=trig, ledger_size=1000,
                                  retention_seconds=86_400)  # fmt: skip
    cursor = ScheduleCursor(tick=T0 + 60)
    assert explain("s", at=None, now=T0 + 70, cursor=cursor, before=fired, **common) == (
        sentence(fired)
    )
    at_tick = explain("s", at=T0 + 60.4, now=T0 + 70, cursor=cursor, before=fired, **common)
    assert at_tick == sentence(fired)
    between = explain("s", at=T0 + 90, now=T0 + 100, cursor=cursor, before=fired, **common)
    assert between.startswith("s had no fire time at 2026-03-01T00:01:30+00:00; the last one")
    undecided = explain("s", at=T0 + 120, now=T0 + 121, cursor=cursor, before=fired, **common)
    assert undecided == (
        "s's fire time 2026-03-01T00:02:00+00:00 has not been decided yet: the replicas have"
        " decided up to 2026-03-01T00:01:00+00:00 (is a trigger replica running?)."
    )
    future = explain("s", at=T0 + 3600, now=T0 + 70, cursor=cursor, before=fired, **common)
    assert future == (
        "2026-03-01T01:00:00+00:00 is in the future; its next fire time is"
        " 2026-03-01T00:02:00+00:00."
    )
    before = explain("s", at=T0 - 3600, now=T0 + 70, cursor=cursor, before=None, **common)
    assert before.startswith("s did not exist yet at 2026-02-28T23:00:00+00:00 (created")
    pending = ScheduleCursor(
        tick=T0 + 60,
        pending=PendingTick(
            tick=T0 + 120, replica="r2", since=T0 + 120, attempts=2, last_error="UNAVAILABLE: x"
        ),
    )
    busy = explain("s", at=T0 + 120, now=T0 + 125, cursor=pending, before=fired, **common)
    assert busy == (
        "s's fire time 2026-03-01T00:02:00+00:00 is being submitted by replica r2 (the last"
        " error: UNAVAILABLE: x)."
    )  # fmt: skip
    nothing = explain("s", at=None, now=T0 + 10, cursor=ScheduleCursor(), before=None, **common)
    assert nothing == "s has no decisions yet; its first fire time is 2026-03-01T00:01:00+00:00."
