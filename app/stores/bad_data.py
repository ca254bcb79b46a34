"""Junk in the store: each unreadable item is said once, counted, and set aside by its reader.

A store that finds an item it cannot read (a job record that is not JSON, a fencing token that
is not an integer, a queue entry with no job id...) tells its `BadData`: the first time for a
key, one warning line says what was found and what is done about it; the counters behind
/metrics count distinct items found, and queue entries moved to quarantine.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import msgspec

from app.errors import BadDataKind
from app.fleet.batch_job import decode_job
from app.fleet.limits import MAX_ID_LENGTH

log = logging.getLogger(__name__)

#: How many keys are remembered as said already; past it the oldest may be said again.
REMEMBER = 10_000
#: How much of a junk value a log line or a reason shows.
SHOW = 60
#: What is done about a job whose record, fencing token or run outcome does not read.
RECORD_ACTION = "its RPCs answer DATA_LOSS, its queue entry goes to quarantine"
FENCE_ACTION = "the job ends FAILED, its queue entry goes to quarantine"
OUTCOME_ACTION = "ignored: the run's worker is asked again"


def show(value: bytes | str) -> str:
    """A junk value for a one-line message: its repr, cut at `SHOW` characters."""
    cut = value[:SHOW]
    return repr(cut) + ("..." if len(value) > SHOW else "")


def one_line(name: bytes | str, limit: int = 200) -> str:
    """A key's name for a log line: control and non-ASCII characters escaped, cut at `limit`."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    escaped = name[:limit].encode("unicode_escape").decode("ascii")
    return escaped + ("..." if len(name) > limit else "")


def is_int(raw: bytes | str) -> bool:
    """Whether Redis would INCR it: an integer in 64 bits, written plainly (18 digits at most,
    as the scripts check it)."""
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    digits = value[1:] if value.startswith("-") else value
    return 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()


def not_a(raw: bytes | str | None, what: str) -> str:
    """`<value> is not <what>`, for junk found where a value was expected (None: the key holds
    no string value)."""
    if raw is None:
        return f"not a string value, so not {what}"
    return f"{show(raw)} is not {what}"


def record_problem(raw: bytes | str | None) -> str:
    """What is wrong with a job record (`raw` None: the key holds no string value)."""
    if raw is None:
        return "not a string value (a list, hash, set or stream)"
    try:
        job = decode_job(raw)
    except msgspec.DecodeError as exc:
        return f"{exc} in {show(raw)}"
    return f"it is the record of job {job.job_id!r}"


def index_member_id(member: bytes | str) -> str | None:
    """The job id a job index member names; None when it names none (not UTF-8, empty, longer
    than an id may be)."""
    if isinstance(member, bytes):
        try:
            member = member.decode()
        except UnicodeDecodeError:
            return None
    return member if 0 < len(member) <= MAX_ID_LENGTH else None


def readable(job_id: str, raw: bytes | str) -> bool:
    """Whether `raw` is a record of `job_id`."""
    try:
        return decode_job(raw).job_id == job_id
    except msgspec.DecodeError:
        return False


class BadDataStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Distinct bad items found, and queue entries quarantined, by kind (the kind's value)."""

    found: dict[str, int]
    quarantined: dict[str, int]


class BadData:
    """Says each bad item once (by key, the last `remember` keys), counts them by kind."""

    def __init__(self, *, remember: int = REMEMBER) -> None:
        self._said: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._found: Counter[BadDataKind] = Counter()
        self._quarantined: Counter[BadDataKind] = Counter()

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<BadData found={s.found} quarantined={s.quarantined}>"

    def found(self, kind: BadDataKind, key: bytes | str, reason: str, action: str) -> bool:
        """Note a bad item at `key`; True (logged and counted) the first time it is seen."""
        name = one_line(key)
        if name in self._said:
            self._said.move_to_end(name)
            return False
        self._said[name] = None
        if len(self._said) > self._remember:
            self._said.popitem(last=False)
        self._found[kind] += 1
        log.warning("bad data: %s: %s; %s", name, reason, action)
        return True

    def quarantined(self, kind: BadDataKind) -> None:
        """Count a queue entry moved to the quarantine stream (said by `found` already)."""
        self._quarantined[kind] += 1

    def statistics(self) -> BadDataStatistics:
        """The counters, every kind present (0 when none was seen)."""
        return BadDataStatistics(
            found={k.value: self._found[k] for k in BadDataKind},
            quarantined={k.value: self._quarantined[k] for k in BadDataKind},
        )
