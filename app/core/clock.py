"""Time, injected the one way: every component takes a `Clock`.

`monotonic()` is for durations and deadlines: the event loop's clock, which never jumps (and
which trio's MockClock makes virtual). `timestamp()` and `now()` are wall time, for records and
for what other hosts compare. `SystemClock` is production; `LoopClock` derives wall time from the
loop's clock (a week of schedules in milliseconds under MockClock); `ManualClock` is moved by
hand, for the synchronous core (breaker, retry budget) in tests.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

import anyio


class Clock(Protocol):
    """Monotonic seconds for durations, and the wall time as a timestamp and as a datetime."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (only differences mean something)."""
        ...

    def timestamp(self) -> float:
        """Wall time: seconds since the Unix epoch."""
        ...

    def now(self) -> datetime:
        """Wall time as an aware datetime in UTC."""
        ...


class SystemClock:
    """The event loop's clock and the system's wall clock (`time.time()`), NTP steps included.

    For a scheduler that should follow the real wall clock: it notices a step as a change of
    `timestamp() - monotonic()`. A suspended machine resuming shows as a forward step (the loop's
    monotonic clock stands still while suspended). `monotonic()` needs a running event loop.
    """

    def __repr__(self) -> str:
        return "<SystemClock>"

    def monotonic(self) -> float:
        """The running event loop's time."""
        return anyio.current_time()

    def timestamp(self) -> float:
        """`time.time()`."""
        return time.time()

    def now(self) -> datetime:
        """`datetime.now(UTC)`."""
        return datetime.fromtimestamp(time.time(), UTC)


class LoopClock:
    """Wall time is the wall time at creation plus the loop time elapsed since.

    Create it inside the event loop. A wall-clock step (NTP) after creation does not move it,
    which is what a scheduler sleeping on the loop clock wants, and what makes it virtual under
    trio's MockClock.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._wall0 = (start or datetime.now(UTC)).timestamp()
        self._loop0 = anyio.current_time()

    def __repr__(self) -> str:
        return f"<LoopClock {self.now().isoformat()}>"

    def monotonic(self) -> float:
        """The running event loop's time."""
        return anyio.current_time()

    def timestamp(self) -> float:
        """The start's wall time plus the loop time since."""
        return self._wall0 + (anyio.current_time() - self._loop0)

    def now(self) -> datetime:
        """`timestamp()` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp(), UTC)

    def step(self, seconds: float) -> None:
        """Set this clock `seconds` ahead (behind when negative), as an NTP step or a person
        setting the clock would: for tests of what a scheduler does when the wall clock jumps."""
        self._wall0 += seconds


class ManualClock:
    """A clock that moves only when told: for the synchronous core's tests, no loop needed."""

    def __init__(self, start: datetime | None = None, *, monotonic: float = 0.0) -> None:
        self._wall = (start or datetime(2026, 1, 1, tzinfo=UTC)).timestamp()
        self._monotonic = monotonic

    def __repr__(self) -> str:
        return f"<ManualClock monotonic={self._monotonic:g} {self.now().isoformat()}>"

    def monotonic(self) -> float:
        """The time advanced so far."""
        return self._monotonic

    def timestamp(self) -> float:
        """The start's wall time plus the time advanced so far (and any steps)."""
        return self._wall

    def now(self) -> datetime:
        """`timestamp()` as an aware UTC datetime."""
        return datetime.fromtimestamp(self._wall, UTC)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass."""
        if seconds < 0:
            raise ValueError("time does not run backwards; use step() for a wall-clock step")
        self._monotonic += seconds
        self._wall += seconds

    def step(self, seconds: float) -> None:
        """Move the wall time only, as an NTP step would."""
        self._wall += seconds


def utc_iso(timestamp: float | None) -> str:
    """RFC 3339 in UTC with milliseconds; empty for None."""
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
