"""Cron expressions: parse them, and find the next fire instant in a time zone, DST included.

Two dialects, told apart by the number of fields and nothing else:

- 5 fields, Unix cron: `minute hour day-of-month month day-of-week`;
- 6 fields, seconds first, as Spring's `@Scheduled(cron=...)` writes them:
  `second minute hour day-of-month month day-of-week`.

(croniter and Temporal read a 6th field as seconds *last*, or as a year; Quartz has a 7th for
the year. Neither is accepted here, so an expression never means two things.)

Fields take lists, ranges, steps and names (`JAN`, `MON`); `?` means "any" in the day fields;
the day fields also take the Quartz forms `L`, `L-n`, `LW`, `nW` (day-of-month) and `nL`, `n#k`
(day-of-week). Day-of-week runs 0-6 from Sunday, and 7 is Sunday too. When both day fields are
restricted, a day matches when either does (as POSIX cron has it; Spring and Quartz AND them).
Only `*` and `?` leave a day field unrestricted: `*/2` restricts (Vixie cron's "starts with a
star" reading, the well-known cron bug, is not followed).

Everything here is synchronous and pure. The arithmetic runs on naive wall times
(`CronExpression.next_local`); `next_fire` maps those wall times to instants in a zone, where a
wall time can be missing (a DST gap) or repeated (a DST fold), per the schedule's policy.
"""

from __future__ import annotations

import enum
import functools
import re
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

__all__ = [
    "CronError",
    "CronExpression",
    "CronFire",
    "RepeatedTime",
    "SkippedTime",
    "next_fire",
    "parse_cron",
    "parse_zone",
]


class CronError(ValueError):
    """An expression that cannot be parsed; the message names the bad field and why.

    `field` is the field's name (`day-of-month`), or None when the problem is the whole
    expression (the number of fields, an unknown macro).
    """

    def __init__(self, expression: str, problem: str, *, field: str | None = None) -> None:
        super().__init__(f"{expression!r}: {problem}")
        self.expression = expression
        self.field = field
        self.problem = problem


class SkippedTime(enum.StrEnum):
    """What to do with a fire time that a DST gap skips (02:30 on a spring-forward night)."""

    RUN_AT_TRANSITION = "run_at_transition"
    """Run at the first instant after the gap (03:00 new time); several such times run once."""
    SKIP = "skip"
    """Do not run; the tick is reported as skipped."""


class RepeatedTime(enum.StrEnum):
    """What to do with a fire time that a DST fold repeats (01:30 on a fall-back night)."""

    ONCE = "once"
    """Run at the first occurrence only."""
    TWICE = "twice"
    """Run at both occurrences (what an every-N-minutes schedule wants)."""


class CronFire(msgspec.Struct, frozen=True, kw_only=True):
    """One nominal fire time of a cron expression and the instant it maps to."""

    at: datetime
    """The instant, aware, in the schedule's zone (its offset shows which side of a change)."""
    nominal: datetime
    """The wall time the expression names (naive); differs from `at`'s when `moved`."""
    moved: bool = False
    """`nominal` does not exist (DST gap) and `at` is the transition (RUN_AT_TRANSITION)."""
    skipped: bool = False
    """`nominal` does not exist and the policy is SKIP: reported, never run; `at` is the gap."""
    repeat: bool = False
    """The second occurrence of a repeated wall time (TWICE)."""

    def note(self, zone: tzinfo) -> str:
        """Why this fire is not a plain one, in a few words; empty when it is."""
        wall = self.nominal.isoformat(sep=" ")
        if self.moved:
            return f"{wall} does not exist in {zone} (DST): ran at the transition"
        if self.skipped:
            return f"{wall} does not exist in {zone} (DST): skipped"
        if self.repeat:
            return f"{wall} happens twice in {zone} (DST): second run"
        return ""


# --- parsing ---------------------------------------------------------------------------------

_MONTHS: Final = {
    m: i
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1
    )
}
_DAYS: Final = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELD_NAMES: Final = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
# (lowest, highest value written, highest value `*` covers); day-of-week 7 is Sunday again
_BOUNDS: Final = {
    "second": (0, 59, 59),
    "minute": (0, 59, 59),
    "hour": (0, 23, 23),
    "day-of-month": (1, 31, 31),
    "month": (1, 12, 12),
    "day-of-week": (0, 7, 6),
}
_ITEM = re.compile(r"^(?:(?P<star>\*)|(?P<a>[0-9A-Z]+)(?:-(?P<b>[0-9A-Z]+))?)(?:/(?P<step>\d+))?$")
_DOM_LAST = re.compile(r"^L(?:-(?P<n>\d+))?$")
_DOM_NEAREST = re.compile(r"^(?P<n>\d+)W$")
_DOW_LAST = re.compile(r"^(?P<d>[0-7]|[A-Z]{3})L$")
_DOW_NTH = re.compile(r"^(?P<d>[0-7]|[A-Z]{3})#(?P<k>\d+)$")


class _FieldError(Exception):
    def __init__(self, problem: str) -> None:
        self.problem = problem


def _value(field: str, token: str) -> int:
    lo, hi, _ = _BOUNDS[field]
    names = _MONTHS if field == "month" else _DAYS if field == "day-of-week" else {}
    if token.isdigit():
        value = int(token)
    elif token in names:
        return names[token]
    else:
        kind = "a number" if not names else "a number or a name"
        raise _FieldError(f"{token!r} is not {kind}")
    if not lo <= value <= hi:
        raise _FieldError(f"{value} is not in {lo}-{hi}")
    return value


def _bits(field: str, text: str) -> int:
    """The bit mask (bit v for value v) of a field made of plain items (no L, W, #)."""
    lo, _, star_hi = _BOUNDS[field]
    if text == "?":
        raise _FieldError("'?' is only for day-of-month and day-of-week")
    mask = 0
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise _FieldError(f"cannot read {item!r}" if item else "empty list item")
        step = int(m["step"]) if m["step"] is not None else 1
        if step < 1:
            raise _FieldError(f"step 0 in {item!r}")
        if m["star"]:
            first, last = lo, star_hi
        else:
            first = _value(field, m["a"])
            if m["b"] is not None:
                last = _value(field, m["b"])
                if last < first:
                    raise _FieldError(f"range {item!r} runs backwards")
            else:
                # `5/15` is `5-59/15`, as in Vixie cron and Spring
                last = star_hi if m["step"] is not None else first
                last = max(last, first)
        for v in range(first, last + 1, step):
            mask |= 1 << v
    if field == "day-of-week" and mask & (1 << 7):
        mask = (mask | 1) & ~(1 << 7)
    return mask


class _Days(msgspec.Struct, frozen=True):
    """A parsed day field: plain days (a mask) plus the Quartz forms."""

    any: bool = True
    mask: int = 0
    last_offsets: frozenset[int] = frozenset()  # day-of-month `L` (0) and `L-n`
    last_weekday: bool = False  # day-of-month `LW`
    nearest: frozenset[int] = frozenset()  # day-of-month `nW`
    nth: frozenset[tuple[int, int]] = frozenset()  # day-of-week `d#k`
    last_of: frozenset[int] = frozenset()  # day-of-week `dL`


def _parse_dom(text: str) -> _Days:
    if text in ("*", "?"):
        return _Days()
    plain: list[str] = []
    offsets: set[int] = set()
    nearest: set[int] = set()
    last_weekday = False
    for item in text.split(","):
        if item == "LW":
            last_weekday = True
        elif m := _DOM_LAST.match(item):
            n = int(m["n"] or 0)
            if n > 30:
                raise _FieldError(f"{item!r}: at most L-30")
            offsets.add(n)
        elif m := _DOM_NEAREST.match(item):
            n = int(m["n"])
            if not 1 <= n <= 31:
                raise _FieldError(f"{item!r}: {n} is not in 1-31")
            nearest.add(n)
        elif item == "?":
            raise _FieldError("'?' stands alone, not in a list")
        else:
            plain.append(item)
    mask = _bits("day-of-month", ",".join(plain)) if plain else 0
    return _Days(
        any=False,
        mask=mask,
        last_offsets=frozenset(offsets),
        last_weekday=last_weekday,
        nearest=frozenset(nearest),
    )


def _parse_dow(text: str) -> _Days:
    if text in ("*", "?"):
        return _Days()
    plain: list[str] = []
    nth: set[tuple[int, int]] = set()
    last_of: set[int] = set()
    for item in text.split(","):
        if item == "L":
            raise _FieldError("'L' alone is not a day; write SAT, or 5L for the last Friday")
        if m := _DOW_LAST.match(item):
            last_of.add(_value("day-of-week", m["d"]) % 7)
        elif m := _DOW_NTH.match(item):
            k = int(m["k"])
            if not 1 <= k <= 5:
                raise _FieldError(f"{item!r}: the week number is 1-5")
            nth.add((_value("day-of-week", m["d"]) % 7, k))
        elif item == "?":
            raise _FieldError("'?' stands alone, not in a list")
        else:
            plain.append(item)
    mask = _bits("day-of-week", ",".join(plain)) if plain else 0
    return _Days(any=False, mask=mask, nth=frozenset(nth), last_of=frozenset(last_of))


def _days_in_month(year: int, month: int) -> int:
    if month == 12:
        return 31
    return (date(year, month + 1, 1) - date(year, month, 1)).days


def _next_bit(mask: int, start: int) -> int | None:
    """The lowest set bit at or above `start`, or None."""
    rest = mask >> start
    if not rest:
        return None
    return start + (rest & -rest).bit_length() - 1


class CronExpression:
    """A parsed cron expression. Immutable; build it with `parse_cron`.

    `next_local(t)` is the whole arithmetic: the first wall time after `t` that matches,
    on naive datetimes, whole seconds.
    """

    __slots__ = ("_month_days", "dom", "dow", "hours", "minutes", "months", "seconds", "text")

    def __init__(
        self,
        text: str,
        *,
        seconds: int,
        minutes: int,
        hours: int,
        months: int,
        dom: _Days,
        dow: _Days,
    ) -> None:
        self.text = text
        self.seconds, self.minutes, self.hours, self.months = seconds, minutes, hours, months
        self.dom, self.dow = dom, dow
        self._month_days: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"CronExpression({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronExpression) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)

    def days_of_month(self, year: int, month: int) -> int:
        """The mask (bit d for day d) of the days that match in that month."""
        key = (year, month)
        cached = self._month_days.get(key)
        if cached is None:
            if len(self._month_days) > 512:
                self._month_days.clear()
            cached = self._month_days[key] = self._compute_days(year, month)
        return cached

    def _compute_days(self, year: int, month: int) -> int:
        n = _days_in_month(year, month)
        every = ((1 << n) - 1) << 1
        dom, dow = self.dom, self.dow
        if dom.any and dow.any:
            return every
        first = (date(year, month, 1).weekday() + 1) % 7  # Sunday = 0

        def weekday(d: int) -> int:
            return (first + d - 1) % 7

        by_dom = dom.mask & every
        for k in dom.last_offsets:
            if n - k >= 1:
                by_dom |= 1 << (n - k)
        if dom.last_weekday:
            d = n - {0: 2, 6: 1}.get(weekday(n), 0)
            by_dom |= 1 << d
        for d in dom.nearest:
            if d > n:
                continue  # as a plain 31 does, `31W` skips a 30-day month
            wd = weekday(d)
            if wd == 6:  # Saturday: the Friday before, or the Monday after the 1st
                d = d - 1 if d > 1 else d + 2
            elif wd == 0:  # Sunday: the Monday after, or the Friday before the last day
                d = d + 1 if d < n else d - 2
            by_dom |= 1 << d
        by_dow = 0
        for wd in range(7):
            if dow.mask & (1 << wd):
                for d in range(1 + (wd - first) % 7, n + 1, 7):
                    by_dow |= 1 << d
        for wd, k in dow.nth:
            d = 1 + (wd - first) % 7 + 7 * (k - 1)
            if d <= n:
                by_dow |= 1 << d
        for wd in dow.last_of:
            d = 1 + (wd - first) % 7
            by_dow |= 1 << (d + 7 * ((n - d) // 7))
        if dom.any:
            return by_dow
        if dow.any:
            return by_dom
        return by_dom | by_dow

    def next_local(self, after: datetime, *, inclusive: bool = False) -> datetime | None:
        """The first matching wall time after `after` (at or after it when `inclusive`).

        Naive in, naive out; sub-second parts round up. None past the year 9999.
        """
        if after.microsecond:
            after = after.replace(microsecond=0) + timedelta(seconds=1)
        elif not inclusive:
            after += timedelta(seconds=1)
        y, mo, d = after.year, after.month, after.day
        h, mi, s = after.hour, after.minute, after.second
        while True:
            if y > 9999:
                return None
            nm = _next_bit(self.months, mo)
            if nm is None:
                y, mo, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
                continue
            if nm != mo:
                mo, d, h, mi, s = nm, 1, 0, 0, 0
            nd = _next_bit(self.days_of_month(y, mo), d)
            if nd is None:
                y, mo = (y + 1, 1) if mo == 12 else (y, mo + 1)
                d, h, mi, s = 1, 0, 0, 0
                continue
            if nd != d:
                d, h, mi, s = nd, 0, 0, 0
            nh = _next_bit(self.hours, h)
            if nh is None:
                d, h, mi, s = d + 1, 0, 0, 0
                continue
            if nh != h:
                h, mi, s = nh, 0, 0
            nmi = _next_bit(self.minutes, mi)
            if nmi is None:
                h, mi, s = h + 1, 0, 0
                continue
            if nmi != mi:
                mi, s = nmi, 0
            ns = _next_bit(self.seconds, s)
            if ns is None:
                mi, s = mi + 1, 0
                continue
            return datetime(y, mo, d, h, mi, ns)


@functools.lru_cache(maxsize=1024)
def parse_cron(text: str) -> CronExpression:
    """Parse a 5- or 6-field expression or a macro; raise `CronError` naming the bad field."""
    expression = text.strip()
    if expression.startswith("@"):
        try:
            fields = _MACROS[expression.lower()].split()
        except KeyError:
            known = " ".join(_MACROS)
            raise CronError(text, f"unknown macro {expression!r} (known: {known})") from None
    else:
        fields = expression.split()
    count = len(fields)
    if count not in (5, 6):
        extra = " (a 7th year field, as in Quartz, is not supported)" if count == 7 else ""
        raise CronError(
            text,
            f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 (second "
            f"first, as in Spring), got {count}{extra}",
        )
    if count == 5:
        fields = ["0", *fields]
    parsed: dict[str, object] = {}
    for index, (name, raw) in enumerate(zip(_FIELD_NAMES, fields, strict=True)):
        value = raw.upper()
        try:
            if name == "day-of-month":
                parsed[name] = _parse_dom(value)
            elif name == "day-of-week":
                parsed[name] = _parse_dow(value)
            else:
                parsed[name] = _bits(name, value)
        except _FieldError as exc:
            if expression.startswith("@"):
                where = f"{name} {raw!r}"
            else:
                where = f"{name} (field {index + count - 5} of {count}) {raw!r}"
            raise CronError(text, f"{where}: {exc.problem}", field=name) from None
    dom, dow = parsed["day-of-month"], parsed["day-of-week"]
    assert isinstance(dom, _Days)
    assert isinstance(dow, _Days)
    cron = CronExpression(
        text.strip(),
        seconds=_int(parsed["second"]),
        minutes=_int(parsed["minute"]),
        hours=_int(parsed["hour"]),
        months=_int(parsed["month"]),
        dom=dom,
        dow=dow,
    )
    _check_can_match(cron, text)
    return cron


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _check_can_match(cron: CronExpression, text: str) -> None:
    # 28 years repeat every weekday/leap-year combination (within 1901-2099)
    for year in range(2000, 2028):
        for month in range(1, 13):
            if cron.months & (1 << month) and cron.days_of_month(year, month):
                return
    raise CronError(
        text,
        "day-of-month and month never match together (e.g. 30 2: February has no 30th)",
        field="day-of-month",
    )


def parse_zone(name: str) -> tzinfo:
    """A zoneinfo zone by IANA name (`UTC` included); ValueError naming it when unknown."""
    if name.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Berlin)") from None


# --- wall times to instants ------------------------------------------------------------------


def _utc_offset(zone: tzinfo, timestamp: int) -> timedelta:
    offset = datetime.fromtimestamp(timestamp, zone).utcoffset()
    assert offset is not None
    return offset


def _transition(zone: tzinfo, before: int, after: int) -> int:
    """The first whole second in (before, after] with the offset `after` has (bisection)."""
    old = _utc_offset(zone, before)
    while after - before > 1:
        mid = (before + after) // 2
        if _utc_offset(zone, mid) == old:
            before = mid
        else:
            after = mid
    return after


def _aware_offsets(local: datetime, zone: tzinfo) -> tuple[timedelta, timedelta]:
    o0 = local.replace(tzinfo=zone, fold=0).utcoffset()
    o1 = local.replace(tzinfo=zone, fold=1).utcoffset()
    assert o0 is not None
    assert o1 is not None
    return o0, o1


def _as_utc(local: datetime, offset: timedelta) -> datetime:
    return (local - offset).replace(tzinfo=UTC)


def _exists(local: datetime, instant: datetime, zone: tzinfo) -> bool:
    return instant.astimezone(zone).replace(tzinfo=None, fold=0) == local


def _fire_for(
    local: datetime,
    zone: tzinfo,
    after: datetime,
    skipped: SkippedTime,
    repeated: RepeatedTime,
) -> CronFire | None:
    """The fire for wall time `local` that is strictly after the instant `after`, if any."""
    o0, o1 = _aware_offsets(local, zone)
    if o0 == o1:
        instant = _as_utc(local, o0)
        return CronFire(at=instant.astimezone(zone), nominal=local) if instant > after else None
    i0, i1 = _as_utc(local, o0), _as_utc(local, o1)
    if _exists(local, i0, zone) and _exists(local, i1, zone):  # a fold: two instants
        first, second = sorted((i0, i1))
        if first > after:
            return CronFire(at=first.astimezone(zone), nominal=local)
        if repeated is RepeatedTime.TWICE and second > after:
            return CronFire(at=second.astimezone(zone), nominal=local, repeat=True)
        return None
    lo, hi = sorted((i0, i1))  # a gap: none; the transition lies between the two readings
    at = datetime.fromtimestamp(_transition(zone, int(lo.timestamp()), int(hi.timestamp())), zone)
    if at <= after:
        return None
    if skipped is SkippedTime.SKIP:
        return CronFire(at=at, nominal=local, skipped=True)
    return CronFire(at=at, nominal=local, moved=True)


# Walking wall times one match at a time ends within a fold (at most a few hours of matches);
# the bound only turns a bug into an error instead of a hang.
_MAX_WALK: Final = 1_000_000


def next_fire(
    cron: CronExpression,
    zone: tzinfo,
    after: datetime,
    *,
    skipped: SkippedTime = SkippedTime.RUN_AT_TRANSITION,
    repeated: RepeatedTime = RepeatedTime.ONCE,
) -> CronFire | None:
    """The first fire strictly after the instant `after` (aware), or None past year 9999.

    Wall times map to instants monotonically except in a fold under TWICE, where the second
    occurrences of the repeated wall times come after the first ones of later wall times.
    """
    if after.tzinfo is None:
        raise ValueError("`after` must be an aware datetime")
    after = after.astimezone(UTC)
    local = after.astimezone(zone).replace(tzinfo=None)
    cursor = local.replace(fold=0)
    best: CronFire | None = None
    for _ in range(_MAX_WALK):
        nominal = cron.next_local(cursor)
        if nominal is None:
            break
        best = _fire_for(nominal, zone, after, skipped, repeated)
        if best is not None:
            break
        cursor = nominal
    else:  # pragma: no cover - see _MAX_WALK
        raise RuntimeError(f"no fire found for {cron.text!r} after {after}")
    if repeated is RepeatedTime.TWICE:
        second = _second_occurrence_ahead(cron, zone, after, cursor)
        # by timestamp: aware datetimes of one zone compare by wall time, blind to the fold
        if second is not None and (best is None or second.at.timestamp() < best.at.timestamp()):
            best = second
    return best


def _second_occurrence_ahead(
    cron: CronExpression, zone: tzinfo, after: datetime, local: datetime
) -> CronFire | None:
    """When `after` is in the first pass of a fold, the earliest second-pass fire after it.

    The walk above starts at `after`'s wall time, so it cannot see the wall times of the fold
    that came before it and will come again.
    """
    o0, o1 = _aware_offsets(local, zone)
    if o0 == o1:
        return None
    i0, i1 = sorted((_as_utc(local, o0), _as_utc(local, o1)))
    if after != i0 or not (_exists(local, i0, zone) and _exists(local, i1, zone)):
        return None  # a gap, or `after` is not in the first pass of a fold
    transition = datetime.fromtimestamp(
        _transition(zone, int(i0.timestamp()), int(i1.timestamp())), UTC
    )
    new_offset = transition.astimezone(zone).utcoffset()
    old_offset = (transition - timedelta(seconds=1)).astimezone(zone).utcoffset()
    assert new_offset is not None
    assert old_offset is not None
    fold_start = (transition + new_offset).replace(tzinfo=None)
    fold_end = (transition + old_offset).replace(tzinfo=None)
    nominal = cron.next_local(fold_start, inclusive=True)
    if nominal is None or nominal >= fold_end:
        return None
    instant = _as_utc(nominal, new_offset)
    return CronFire(at=instant.astimezone(zone), nominal=nominal, repeat=True)
