"""Wall time derived from the event loop's clock, so that virtual time (MockClock) moves it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

import anyio


class WallClock(Protocol):
    """Wall time as a timestamp and as an aware datetime."""

    def timestamp(self) -> float: ...

    def now(self) -> datetime: ...


class LoopWallClock:
    """`now()` is the wall time at creation plus the loop time elapsed since.

    Create it inside the event loop. A wall-clock step (NTP) after creation does not move it,
    which is what a scheduler sleeping on the loop clock wants.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._wall0 = (start or datetime.now(UTC)).timestamp()
        self._loop0 = anyio.current_time()

    def timestamp(self) -> float:
        return self._wall0 + (anyio.current_time() - self._loop0)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp(), UTC)

    def step(self, seconds: float) -> None:
        """Set this clock `seconds` ahead (behind when negative), as an NTP step or a person
        setting the clock would: for tests of what a scheduler does when the wall clock jumps."""
        self._wall0 += seconds


class SystemWallClock:
    """The system's wall clock (`time.time()`), NTP steps included, mapped to loop time.

    For a scheduler that should follow the real wall clock: it notices a step as a change of
    `timestamp() - anyio.current_time()`. A suspended machine resuming shows as a forward step
    (the loop's monotonic clock stands still while suspended).
    """

    def timestamp(self) -> float:
        return time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time(), UTC)


def utc_iso(timestamp: float | None) -> str:
    """RFC 3339 in UTC with milliseconds; empty for None."""
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
