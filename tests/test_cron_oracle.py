"""Cron arithmetic against croniter as an oracle, over random expressions and start times.

croniter is a test-only dependency. It spells some forms differently (`L5` for our `5L`), and a
few of its readings differ (see docs/scheduler.md), so the strategies draw only what both read
the same way: `nW` as a single item up to 28, `#`/`L` day-of-week items not mixed with plain ones
nor with a restricted day-of-month, no equal ranges (`5-5`), no day field that allows every day
other than `*` and `?`. Zoned cases stay away from DST transitions; those
are the hand-written cases in test_cron.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from app.scheduling.cron import CronError, next_fire, parse_cron

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]

Pair = tuple[str, str]  # (ours, croniter's)
_ALL_JAN = ((1 << 31) - 1) << 1


def _same(text: str) -> Pair:
    return text, text


@st.composite
def plain_item(draw: st.DrawFn, lo: int, hi: int, star_hi: int, names: list[str] | None) -> str:
    def value(v: int) -> str:
        if names and draw(st.booleans()):
            return names[v - lo] if v - lo < len(names) else str(v)
        return str(v)

    kind = draw(st.sampled_from(["value", "range", "range-step", "star-step", "value-step"]))
    a = draw(st.integers(lo, hi))
    if kind == "value" or a == hi:
        return value(a)
    if kind == "star-step":
        return f"*/{draw(st.integers(1, star_hi - lo + 1))}"
    if kind == "value-step":
        a = draw(st.integers(lo, star_hi))
        return f"{a}/{draw(st.integers(1, star_hi - lo + 1))}"
    b = draw(st.integers(a + 1, hi))  # croniter reads an equal range `5-5` as the whole field
    if kind == "range":
        return f"{value(a)}-{value(b)}"
    return f"{value(a)}-{value(b)}/{draw(st.integers(1, hi - lo + 1))}"


def plain_field(
    lo: int, hi: int, star_hi: int, names: list[str] | None = None
) -> st.SearchStrategy[str]:
    items = st.lists(plain_item(lo, hi, star_hi, names), min_size=1, max_size=3).map(",".join)
    return st.one_of(st.just("*"), items)


@st.composite
def day_fields(draw: st.DrawFn) -> tuple[Pair, Pair]:
    """(day-of-month, day-of-week), each as (ours, croniter's)."""
    shape = draw(st.sampled_from(["plain", "plain", "plain", "L", "W", "nth"]))
    if shape == "L":
        others = draw(st.lists(st.integers(1, 31).map(str), max_size=2))
        return _same(",".join([*others, "L"])), ("*", "*")
    if shape == "W":
        return _same(f"{draw(st.integers(1, 28))}W"), ("*", "*")
    if shape == "nth":
        items: list[Pair] = []
        for _ in range(draw(st.integers(1, 2))):
            d = draw(st.integers(0, 6))
            name = draw(st.sampled_from([str(d), DAYS[d]]))
            if draw(st.booleans()):
                k = draw(st.integers(1, 5))
                items.append((f"{name}#{k}", f"{name}#{k}"))
            else:
                items.append((f"{name}L", f"L{d}"))  # croniter writes the last Friday `L5`
        return ("*", "*"), (",".join(i[0] for i in items), ",".join(i[1] for i in items))
    dom = draw(st.one_of(st.just("?"), plain_field(1, 31, 31)))
    dow = draw(st.one_of(st.just("?"), plain_field(0, 7, 6, DAYS)))
    # croniter reads a day field that allows every day (`*/1`, `0-6`) as unrestricted in
    # day-of-week but as restricted in day-of-month; only `*` and `?` are unrestricted here
    assume(dom in ("*", "?") or parse_cron(f"0 0 {dom} 1 *").days_of_month(2000, 1) != _ALL_JAN)
    assume(dow in ("*", "?") or parse_cron(f"0 0 * 1 {dow}").days_of_month(2000, 1) != _ALL_JAN)
    return _same(dom), _same(dow)


@st.composite
def expressions(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(ours, croniter's, seconds first)."""
    with_seconds = draw(st.booleans())
    minute = draw(plain_field(0, 59, 59))
    hour = draw(plain_field(0, 23, 23))
    (dom, cdom), (dow, cdow) = draw(day_fields())
    month = draw(plain_field(1, 12, 12, MONTHS))
    ours = [minute, hour, dom, month, dow]
    theirs = [minute, hour, cdom, month, cdow]
    if with_seconds:
        second = draw(plain_field(0, 59, 59))
        ours, theirs = [second, *ours], [second, *theirs]
    try:  # one that can never fire (30 2: no 30 February) is refused, as test_cron shows
        parse_cron(" ".join(ours))
    except CronError:
        reject()
    return " ".join(ours), " ".join(theirs), with_seconds


starts = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2060, 12, 31))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions(), starts)
def test_next_local_matches_croniter(expr: tuple[str, str, bool], start: datetime) -> None:
    ours_text, theirs_text, with_seconds = expr
    ours = parse_cron(ours_text)
    theirs = croniter(theirs_text, start, ret_type=datetime, second_at_beginning=with_seconds)
    t = start
    for _ in range(3):
        got = ours.next_local(t)
        expected = theirs.get_next(datetime)
        assert got == expected, f"{ours_text!r} after {t}"
        assert got is not None
        t = got


ZONES = [
    "UTC", "Asia/Kolkata", "Asia/Tokyo", "America/New_York", "Europe/Berlin",
    "Australia/Sydney", "America/Santiago", "Pacific/Chatham",
]  # fmt: skip


def _steady(zone: ZoneInfo, start: datetime, end: datetime) -> bool:
    """No offset change from 6 h before `start` to 6 h after `end` (sampled every 3 h)."""
    t = start - timedelta(hours=6)
    offset = t.astimezone(zone).utcoffset()
    while t < end + timedelta(hours=6):
        t += timedelta(hours=3)
        if t.astimezone(zone).utcoffset() != offset:
            return False
    return True


@st.composite
def frequent_expressions(draw: st.DrawFn) -> tuple[str, bool]:
    """Expressions that fire at least daily, so that a fire is near its start."""
    with_seconds = draw(st.booleans())
    fields = [draw(plain_field(0, 59, 59)), draw(plain_field(0, 23, 23)), "*", "*", "*"]
    if with_seconds:
        fields.insert(0, draw(plain_field(0, 59, 59)))
    return " ".join(fields), with_seconds


@settings(max_examples=300, deadline=None)
@given(
    frequent_expressions(),
    st.sampled_from(ZONES),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)),
)
def test_next_fire_in_a_zone_matches_croniter_away_from_dst(
    expr: tuple[str, bool], zone_name: str, start_utc: datetime
) -> None:
    text, with_seconds = expr
    zone = ZoneInfo(zone_name)
    after = start_utc.replace(tzinfo=UTC).astimezone(zone)
    fire = next_fire(parse_cron(text), zone, after)
    assert fire is not None
    assume(_steady(zone, after, fire.at))
    expected = croniter(text, after, ret_type=datetime, second_at_beginning=with_seconds).get_next(
        datetime
    )
    assert fire.at.timestamp() == expected.timestamp(), f"{text!r} after {after}"
    assert (fire.moved, fire.skipped, fire.repeat) == (False, False, False)
