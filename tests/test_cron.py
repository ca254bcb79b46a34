"""Cron: parsing and its errors, the day-field forms, and hand-checked fire times across DST."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest

from app.scheduling.cron import (
    CronError,
    CronFire,
    RepeatedTime,
    SkippedTime,
    next_fire,
    parse_cron,
    parse_zone,
)

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
SANTIAGO = ZoneInfo("America/Santiago")  # DST changes at midnight
HAVANA = ZoneInfo("America/Havana")  # DST changes at midnight, and midnight itself repeats
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # a 30-minute DST shift


def local_times(expression: str, start: datetime, n: int) -> list[str]:
    cron = parse_cron(expression)
    out, t = [], start
    for _ in range(n):
        nxt = cron.next_local(t)
        assert nxt is not None
        out.append(nxt.strftime("%Y-%m-%d %a %H:%M:%S"))
        t = nxt
    return out


def fires(
    expression: str,
    zone: tzinfo,
    after: datetime,
    n: int,
    *,
    skipped: SkippedTime = SkippedTime.RUN_AT_TRANSITION,
    repeated: RepeatedTime = RepeatedTime.ONCE,
) -> list[CronFire]:
    cron = parse_cron(expression)
    out: list[CronFire] = []
    for _ in range(n):
        fire = next_fire(cron, zone, after, skipped=skipped, repeated=repeated)
        assert fire is not None
        assert fire.at.timestamp() > after.timestamp()
        out.append(fire)
        after = fire.at
    return out


def iso(fs: list[CronFire]) -> list[str]:
    return [f.at.isoformat() for f in fs]


# --- parsing ---


@pytest.mark.parametrize(
    ("expression", "field", "message"),
    [
        ("0 0 32 * *", "day-of-month", "day-of-month (field 3 of 5) '32': 32 is not in 1-31"),
        ("61 * * * * *", "second", "second (field 1 of 6) '61': 61 is not in 0-59"),
        ("* 24 * * *", "hour", "hour (field 2 of 5) '24': 24 is not in 0-23"),
        ("0 0 * JAN-FOO *", "month", "'FOO' is not a number or a name"),
        ("0 0 * * 8", "day-of-week", "day-of-week (field 5 of 5) '8': 8 is not in 0-7"),
        ("0 0 5-2 * *", "day-of-month", "range '5-2' runs backwards"),
        ("*/0 * * * *", "minute", "step 0"),
        ("0 ? * * *", "hour", "'?' is only for day-of-month and day-of-week"),
        ("0 0 1,? * *", "day-of-month", "'?' stands alone"),
        ("0 0 * * L", "day-of-week", "'L' alone is not a day"),
        ("0 0 * * MON#6", "day-of-week", "the week number is 1-5"),
        ("0 0 L-31 * *", "day-of-month", "at most L-30"),
        ("0 0 32W * *", "day-of-month", "32 is not in 1-31"),
        ("0 0 1,,2 * *", "day-of-month", "empty list item"),
        ("0 0 30 2 *", "day-of-month", "never match"),
        ("0 0 H * *", "day-of-month", "'H' is not a number"),
    ],
)
def test_a_bad_field_is_named(expression: str, field: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse_cron(expression)
    assert caught.value.field == field
    assert message in str(caught.value)
    assert str(caught.value).startswith(repr(expression))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "expected 5 fields"),
        ("0 0 0 1 1 * 2030", "a 7th year field, as in Quartz, is not supported"),
        ("", "got 0"),
        ("@reboot", "unknown macro '@reboot'"),
    ],
)
def test_a_bad_shape_is_rejected(expression: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse_cron(expression)
    assert caught.value.field is None
    assert message in str(caught.value)


def test_macros_are_their_five_field_forms() -> None:
    start = datetime(2026, 5, 17, 13, 30)
    for macro, plain in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ]:
        assert local_times(macro, start, 3) == local_times(plain, start, 3), macro
    assert local_times("@HOURLY", start, 1) == ["2026-05-17 Sun 14:00:00"]


def test_unknown_zone_is_named() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        parse_zone("Mars/Olympus")
    assert parse_zone("UTC") is UTC
    assert parse_zone("Europe/Berlin") == BERLIN


# --- the arithmetic on wall times ---

START = datetime(2026, 1, 1)  # a Thursday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # lists, ranges, steps, names
        ("*/20 9-10 * * MON-FRI", ["2026-01-01 Thu 09:00:00", "2026-01-01 Thu 09:20:00",
                                   "2026-01-01 Thu 09:40:00", "2026-01-01 Thu 10:00:00"]),
        ("5/20 0 * * *", ["2026-01-01 Thu 00:05:00", "2026-01-01 Thu 00:25:00",
                          "2026-01-01 Thu 00:45:00", "2026-01-02 Fri 00:05:00"]),
        ("0 12 1 JAN,jul *", ["2026-01-01 Thu 12:00:00", "2026-07-01 Wed 12:00:00",
                              "2027-01-01 Fri 12:00:00", "2027-07-01 Thu 12:00:00"]),
        ("0 0 * * 5-7", ["2026-01-02 Fri 00:00:00", "2026-01-03 Sat 00:00:00",
                         "2026-01-04 Sun 00:00:00", "2026-01-09 Fri 00:00:00"]),
        ("0 0 * * */2", ["2026-01-01 Thu 00:00:00", "2026-01-03 Sat 00:00:00",
                         "2026-01-04 Sun 00:00:00", "2026-01-06 Tue 00:00:00"]),
        # 6 fields: seconds first, as in Spring
        ("30 */15 * * * *", ["2026-01-01 Thu 00:00:30", "2026-01-01 Thu 00:15:30",
                             "2026-01-01 Thu 00:30:30", "2026-01-01 Thu 00:45:30"]),
        ("0 0 0 ? * SUN", ["2026-01-04 Sun 00:00:00", "2026-01-11 Sun 00:00:00",
                           "2026-01-18 Sun 00:00:00", "2026-01-25 Sun 00:00:00"]),
        # both day fields restricted: either matches (the 13th, and every Friday)
        ("0 0 13 * FRI", ["2026-01-02 Fri 00:00:00", "2026-01-09 Fri 00:00:00",
                          "2026-01-13 Tue 00:00:00", "2026-01-16 Fri 00:00:00"]),
        # Quartz day-of-month forms
        ("0 0 L * *", ["2026-01-31 Sat 00:00:00", "2026-02-28 Sat 00:00:00",
                       "2026-03-31 Tue 00:00:00", "2026-04-30 Thu 00:00:00"]),
        ("0 0 L-2 * *", ["2026-01-29 Thu 00:00:00", "2026-02-26 Thu 00:00:00",
                         "2026-03-29 Sun 00:00:00", "2026-04-28 Tue 00:00:00"]),
        ("0 0 LW * *", ["2026-01-30 Fri 00:00:00", "2026-02-27 Fri 00:00:00",
                        "2026-03-31 Tue 00:00:00", "2026-04-30 Thu 00:00:00"]),
        # 15W: Feb 15 2026 is a Sunday -> Mon 16; Mar 15 Sun -> Mon 16; Aug 15 Sat -> Fri 14
        ("0 0 15W * *", ["2026-01-15 Thu 00:00:00", "2026-02-16 Mon 00:00:00",
                         "2026-03-16 Mon 00:00:00", "2026-04-15 Wed 00:00:00"]),
        # 1W on a Saturday moves forward to Monday the 3rd, not back into the previous month
        ("0 0 1W 8 *", ["2026-08-03 Mon 00:00:00", "2027-08-02 Mon 00:00:00",
                        "2028-08-01 Tue 00:00:00", "2029-08-01 Wed 00:00:00"]),
        # 31W skips months without a 31st, as a plain 31 does; May 31 2026 is a Sunday -> Fri 29
        ("0 0 31W * *", ["2026-01-30 Fri 00:00:00", "2026-03-31 Tue 00:00:00",
                         "2026-05-29 Fri 00:00:00", "2026-07-31 Fri 00:00:00"]),
        # Quartz day-of-week forms
        ("0 0 * * 5L", ["2026-01-30 Fri 00:00:00", "2026-02-27 Fri 00:00:00",
                        "2026-03-27 Fri 00:00:00", "2026-04-24 Fri 00:00:00"]),
        ("0 0 * * MON#2,FRIL", ["2026-01-12 Mon 00:00:00", "2026-01-30 Fri 00:00:00",
                                "2026-02-09 Mon 00:00:00", "2026-02-27 Fri 00:00:00"]),
        ("0 0 * * 5#5", ["2026-01-30 Fri 00:00:00", "2026-05-29 Fri 00:00:00",
                         "2026-07-31 Fri 00:00:00", "2026-10-30 Fri 00:00:00"]),
        ("0 0 1 * 7#1", ["2026-01-01 Thu 00:00:00", "2026-01-04 Sun 00:00:00",
                         "2026-02-01 Sun 00:00:00", "2026-03-01 Sun 00:00:00"]),
        # leap days
        ("0 0 29 2 *", ["2028-02-29 Tue 00:00:00", "2032-02-29 Sun 00:00:00",
                        "2036-02-29 Fri 00:00:00", "2040-02-29 Wed 00:00:00"]),
    ],
)  # fmt: skip
def test_next_local(expression: str, expected: list[str]) -> None:
    assert local_times(expression, START - timedelta(seconds=1), len(expected)) == expected


def test_next_local_rounds_sub_seconds_up_and_inclusive_counts() -> None:
    cron = parse_cron("* * * * * *")
    assert cron.next_local(datetime(2026, 1, 1, 0, 0, 0, 1)) == datetime(2026, 1, 1, 0, 0, 1)
    assert cron.next_local(datetime(2026, 1, 1), inclusive=True) == datetime(2026, 1, 1)
    assert cron.next_local(datetime(2026, 1, 1)) == datetime(2026, 1, 1, 0, 0, 1)
    assert parse_cron("0 0 1 1 *").next_local(datetime(9999, 6, 1)) is None


def test_a_year_of_daily_fires_in_utc() -> None:
    got = fires("0 3 * * *", UTC, datetime(2026, 1, 1, tzinfo=UTC), 365)
    assert got[0].at == datetime(2026, 1, 1, 3, tzinfo=UTC)
    assert got[-1].at == datetime(2026, 12, 31, 3, tzinfo=UTC)
    assert all(b.at - a.at == timedelta(days=1) for a, b in itertools.pairwise(got))


def test_naive_after_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_fire(parse_cron("* * * * *"), UTC, datetime(2026, 1, 1))


# --- DST: spring forward (a gap) ---


def test_new_york_spring_forward_runs_a_skipped_time_at_the_transition() -> None:
    got = fires("30 2 * * *", NEW_YORK, datetime(2026, 3, 7, 12, tzinfo=NEW_YORK), 3)
    assert iso(got) == [
        "2026-03-08T03:00:00-04:00",  # 02:30 does not exist: run at 03:00, the transition
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    assert [f.moved for f in got] == [True, False, False]
    assert got[0].nominal == datetime(2026, 3, 8, 2, 30)
    assert "does not exist in America/New_York" in got[0].note(NEW_YORK)


def test_new_york_spring_forward_skip_policy_reports_and_skips() -> None:
    got = fires(
        "30 2 * * *", NEW_YORK, datetime(2026, 3, 7, 12, tzinfo=NEW_YORK), 2,
        skipped=SkippedTime.SKIP,
    )  # fmt: skip
    assert got[0].skipped
    assert not got[0].moved
    assert iso(got) == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]


def test_several_skipped_times_and_the_transition_time_run_once() -> None:
    got = fires("*/30 * * * *", NEW_YORK, datetime(2026, 3, 8, 1, 0, tzinfo=NEW_YORK), 4)
    # 02:00 and 02:30 do not exist; they and 03:00 itself are one run at the transition
    assert iso(got) == [
        "2026-03-08T01:30:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:30:00-04:00",
        "2026-03-08T04:00:00-04:00",
    ]
    assert [f.moved for f in got] == [False, True, False, False]


def test_berlin_spring_forward_every_minute_has_no_burst_in_the_gap() -> None:
    got = fires("* * * * *", BERLIN, datetime(2026, 3, 29, 1, 58, tzinfo=BERLIN), 3)
    assert iso(got) == [
        "2026-03-29T01:59:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:00-02:59 do not exist: one run at 03:00
        "2026-03-29T03:01:00+02:00",
    ]


def test_santiago_midnight_spring_forward() -> None:
    # 2026-09-06 00:00 -04 becomes 01:00 -03: midnight does not exist that day
    got = fires("0 0 * * *", SANTIAGO, datetime(2026, 9, 4, 12, tzinfo=SANTIAGO), 3)
    assert iso(got) == [
        "2026-09-05T00:00:00-04:00",
        "2026-09-06T01:00:00-03:00",
        "2026-09-07T00:00:00-03:00",
    ]
    assert got[1].moved
    skipped = fires(
        "0 0 * * *", SANTIAGO, datetime(2026, 9, 5, 12, tzinfo=SANTIAGO), 2,
        skipped=SkippedTime.SKIP,
    )  # fmt: skip
    assert [f.skipped for f in skipped] == [True, False]


def test_havana_midnight_spring_forward() -> None:
    got = fires("30 0 * * *", HAVANA, datetime(2026, 3, 7, 12, tzinfo=HAVANA), 2)
    assert iso(got) == ["2026-03-08T01:00:00-04:00", "2026-03-09T00:30:00-04:00"]


def test_lord_howe_half_hour_gap() -> None:
    # 2026-10-04 02:00 +10:30 becomes 02:30 +11:00
    got = fires("15 2 * * *", LORD_HOWE, datetime(2026, 10, 3, 12, tzinfo=LORD_HOWE), 2)
    assert iso(got) == ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"]


# --- DST: fall back (a fold) ---


def test_new_york_fall_back_once_runs_at_the_first_occurrence() -> None:
    got = fires("30 1 * * *", NEW_YORK, datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 2)
    assert iso(got) == ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]


def test_new_york_fall_back_twice_runs_both() -> None:
    got = fires(
        "30 1 * * *", NEW_YORK, datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 3,
        repeated=RepeatedTime.TWICE,
    )  # fmt: skip
    assert iso(got) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-02T01:30:00-05:00",
    ]
    assert [f.repeat for f in got] == [False, True, False]


def test_every_half_hour_through_a_fold() -> None:
    start = datetime(2026, 11, 1, 0, 30, tzinfo=NEW_YORK)
    once = fires("*/30 * * * *", NEW_YORK, start, 4)
    assert iso(once) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T02:00:00-05:00",  # 01:00 and 01:30 do not run again
        "2026-11-01T02:30:00-05:00",
    ]
    twice = fires("*/30 * * * *", NEW_YORK, start, 5, repeated=RepeatedTime.TWICE)
    assert iso(twice) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]


def test_twice_from_inside_either_pass_of_the_fold() -> None:
    cron = parse_cron("*/20 * * * *")
    # from 01:10 first pass: 01:20 EDT comes before any second-pass time
    first_pass = datetime(2026, 11, 1, 5, 10, tzinfo=UTC)  # 01:10 EDT
    fire = next_fire(cron, NEW_YORK, first_pass, repeated=RepeatedTime.TWICE)
    assert fire is not None
    assert fire.at.isoformat() == "2026-11-01T01:20:00-04:00"
    # from 01:50 first pass: the next is 01:00 EST, the second pass's first time
    late_first = datetime(2026, 11, 1, 5, 50, tzinfo=UTC)
    fire = next_fire(cron, NEW_YORK, late_first, repeated=RepeatedTime.TWICE)
    assert fire is not None
    assert fire.at.isoformat() == "2026-11-01T01:00:00-05:00"
    assert fire.repeat
    # from 01:10 second pass: 01:20 EST; ONCE skips the rest of the fold
    second_pass = datetime(2026, 11, 1, 6, 10, tzinfo=UTC)
    fire = next_fire(cron, NEW_YORK, second_pass, repeated=RepeatedTime.TWICE)
    assert fire is not None
    assert fire.at.isoformat() == "2026-11-01T01:20:00-05:00"
    fire = next_fire(cron, NEW_YORK, second_pass, repeated=RepeatedTime.ONCE)
    assert fire is not None
    assert fire.at.isoformat() == "2026-11-01T02:00:00-05:00"


def test_berlin_fall_back() -> None:
    got = fires("0 2 * * *", BERLIN, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 2)
    assert iso(got) == ["2026-10-25T02:00:00+02:00", "2026-10-26T02:00:00+01:00"]
    got = fires(
        "0 2 * * *", BERLIN, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3,
        repeated=RepeatedTime.TWICE,
    )  # fmt: skip
    assert iso(got) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-26T02:00:00+01:00",
    ]


def test_santiago_midnight_fall_back() -> None:
    # 2026-04-05 00:00 -03 becomes 2026-04-04 23:00 -04: 23:00-23:59 on the 4th repeat
    got = fires(
        "30 23 * * *", SANTIAGO, datetime(2026, 4, 3, 12, tzinfo=SANTIAGO), 4,
        repeated=RepeatedTime.TWICE,
    )  # fmt: skip
    assert iso(got) == [
        "2026-04-03T23:30:00-03:00",
        "2026-04-04T23:30:00-03:00",
        "2026-04-04T23:30:00-04:00",
        "2026-04-05T23:30:00-04:00",
    ]
    once = fires("30 23 * * *", SANTIAGO, datetime(2026, 4, 4, 12, tzinfo=SANTIAGO), 2)
    assert iso(once) == ["2026-04-04T23:30:00-03:00", "2026-04-05T23:30:00-04:00"]


def test_havana_midnight_repeats() -> None:
    # 2026-11-01 01:00 -04 becomes 00:00 -05: midnight happens twice
    once = fires("0 0 * * *", HAVANA, datetime(2026, 10, 31, 12, tzinfo=HAVANA), 2)
    assert iso(once) == ["2026-11-01T00:00:00-04:00", "2026-11-02T00:00:00-05:00"]
    twice = fires(
        "0 0 * * *", HAVANA, datetime(2026, 10, 31, 12, tzinfo=HAVANA), 3,
        repeated=RepeatedTime.TWICE,
    )  # fmt: skip
    assert iso(twice) == [
        "2026-11-01T00:00:00-04:00",
        "2026-11-01T00:00:00-05:00",
        "2026-11-02T00:00:00-05:00",
    ]


def test_lord_howe_half_hour_fold() -> None:
    # 2026-04-05 02:00 +11:00 becomes 01:30 +10:30
    twice = fires(
        "45 1 * * *", LORD_HOWE, datetime(2026, 4, 4, 12, tzinfo=LORD_HOWE), 3,
        repeated=RepeatedTime.TWICE,
    )  # fmt: skip
    assert iso(twice) == [
        "2026-04-05T01:45:00+11:00",
        "2026-04-05T01:45:00+10:30",
        "2026-04-06T01:45:00+10:30",
    ]


def test_a_year_in_new_york_has_one_fire_a_day() -> None:
    got = fires("30 2 * * *", NEW_YORK, datetime(2026, 1, 1, tzinfo=NEW_YORK), 365)
    days = [f.at.date() for f in got]
    assert len(set(days)) == 365
    assert sum(f.moved for f in got) == 1  # March 8
