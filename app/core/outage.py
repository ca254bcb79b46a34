"""The one "log once, back off" for a dependency that comes and goes (Redis, the registry).

A loop that talks to something that may be away tells its `Outage` how each attempt went:
`failed(exc)` logs a warning the first time only and returns how long to wait before the next
attempt (doubling from `min_delay` up to `max_delay`); `succeeded()` ends an outage with one
line. A caller that is woken on a schedule of its own (the 5-second report) asks `due()`
instead of sleeping. The log shows one line when a dependency goes and one when it is back,
not one per attempt.
"""

from __future__ import annotations

import enum
import logging
import math

import msgspec

from app.core.clock import Clock
from app.errors import JobWorkerError


class OutageState(enum.Enum):
    """Whether the dependency answered last time."""

    UNKNOWN = "UNKNOWN"  # no attempt yet
    UP = "UP"
    DOWN = "DOWN"


class OutageStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of one dependency's outages."""

    state: OutageState
    failures: int
    outages: int


class Outage:
    """Tracks one dependency: logs its outages once, spaces the attempts while it is away."""

    def __init__(
        self,
        what: str,
        *,
        log: logging.Logger,
        clock: Clock,
        min_delay: float = 0.1,
        max_delay: float = 5.0,
        meanwhile: str = "",
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        self.what = what
        self._log = log
        self._clock = clock
        self._min = min_delay
        self._max = max_delay
        self._meanwhile = meanwhile
        self._state = OutageState.UNKNOWN
        self._delay = 0.0
        self._next = -math.inf
        self._failures = 0
        self._outages = 0
        self._down_since = 0.0
        self._down_failures = 0

    def __repr__(self) -> str:
        return f"<Outage {self.what} {self._state.value} failures={self._failures}>"

    @property
    def state(self) -> OutageState:
        """UP, DOWN, or UNKNOWN before the first attempt."""
        return self._state

    def statistics(self) -> OutageStatistics:
        """Failed attempts and outages so far."""
        return OutageStatistics(state=self._state, failures=self._failures, outages=self._outages)

    def due(self) -> bool:
        """Whether an attempt is due (always, unless backing off after a failure)."""
        return self._clock.monotonic() >= self._next

    def failed(self, exc: BaseException) -> float:
        """Count a failed attempt, log it if it starts an outage; the seconds to wait."""
        self._failures += 1
        self._down_failures += 1
        self._delay = min(self._max, max(self._min, self._delay * 2))
        now = self._clock.monotonic()
        self._next = now + self._delay
        if self._state is not OutageState.DOWN:
            self._state = OutageState.DOWN
            self._outages += 1
            self._down_since = now
            meanwhile = f"; {self._meanwhile}" if self._meanwhile else ""
            # our own errors carry a one-line reason already (StoreUnavailable names the cause)
            why = str(exc) if isinstance(exc, JobWorkerError) else f"{type(exc).__name__}: {exc}"
            self._log.warning(
                "%s unreachable (%s)%s; retrying with backoff up to %gs",
                self.what, why, meanwhile, self._max,
            )  # fmt: skip
        return self._delay

    def succeeded(self, detail: str = "") -> bool:
        """Count an attempt that worked; True (and one log line) when it ends an outage."""
        recovered = self._state is OutageState.DOWN
        if recovered:
            self._log.info(
                "%s reachable again after %d failed attempt(s) over %.1fs%s",
                self.what, self._down_failures, self._clock.monotonic() - self._down_since,
                f": {detail}" if detail else "",
            )  # fmt: skip
        self._state = OutageState.UP
        self._delay = 0.0
        self._next = -math.inf
        self._down_failures = 0
        return recovered
