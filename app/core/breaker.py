"""A circuit breaker per worker: CLOSED → OPEN → HALF_OPEN → CLOSED.

Pure and clock-injected (core: no asyncio, no I/O). It opens after `failure_threshold`
consecutive failures, or when the failure rate over the last `window_seconds` reaches
`failure_rate` with at least `min_calls` calls in the window. While OPEN it allows nothing;
after `open_seconds` it is HALF_OPEN and lets exactly one probe through; the probe's success
closes it, its failure opens it again.
"""

from __future__ import annotations

import enum
from collections import deque

import msgspec

from app.core.clock import Clock


class BreakerState(enum.Enum):
    """Where a breaker is: calls go (CLOSED), none go (OPEN), or one probe may go (HALF_OPEN)."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """When a breaker opens and how long it stays open; times in seconds (see the module doc)."""

    failure_threshold: int = 5
    failure_rate: float = 0.5
    min_calls: int = 10
    window_seconds: float = 30.0
    open_seconds: float = 5.0


class BreakerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one breaker for status: its state, failure counts and times opened."""

    state: BreakerState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    opened_count: int


class CircuitBreaker:
    """Decides whether a call may go to one worker; told the outcome of each call it allowed."""

    def __init__(self, config: BreakerConfig, *, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probe_out = False
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._opened_count = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state.value} consecutive_failures={self._consecutive}>"

    @property
    def state(self) -> BreakerState:
        """The state now: a read turns OPEN into HALF_OPEN once `open_seconds` have passed."""
        if (
            self._state is BreakerState.OPEN
            and self._clock.monotonic() - self._opened_at >= self._config.open_seconds
        ):
            self._state = BreakerState.HALF_OPEN
            self._probe_out = False
        return self._state

    def allows(self) -> bool:
        """Whether a call could go now (does not reserve the half-open probe)."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probe_out
        )

    def try_acquire(self) -> bool:
        """Reserve a call: always when CLOSED, the single probe when HALF_OPEN, never when OPEN."""
        if not self.allows():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probe_out = True
        return True

    def release(self) -> None:
        """A reserved call was not made after all (give the probe back)."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_out = False

    def record_success(self) -> None:
        """A call went well: the consecutive count restarts; the HALF_OPEN probe's success closes.

        A success that lands while OPEN (a call let through before it opened) does not cut the
        open period short. Closing clears the window, so old failures no longer count.
        """
        self._record(failed=False)
        self._consecutive = 0
        if self.state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._window.clear()  # a fresh start: old failures no longer speak for the worker

    def record_failure(self) -> None:
        """A call failed: HALF_OPEN opens again; CLOSED opens at the threshold or rate."""
        self._record(failed=True)
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN or self._should_open():
            self._open()

    def _record(self, *, failed: bool) -> None:
        now = self._clock.monotonic()
        self._window.append((now, failed))
        horizon = now - self._config.window_seconds
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _should_open(self) -> bool:
        c = self._config
        if self._state is not BreakerState.CLOSED:
            return False
        if self._consecutive >= c.failure_threshold:
            return True
        failures = sum(failed for _, failed in self._window)
        return len(self._window) >= c.min_calls and failures >= c.failure_rate * len(self._window)

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock.monotonic()
        self._probe_out = False
        self._opened_count += 1

    def statistics(self) -> BreakerStatistics:
        """State, consecutive failures, calls and failures in the window, and times opened.

        The window is trimmed when a call is recorded, not here: its counts may include calls older
        than `window_seconds`.
        """
        return BreakerStatistics(
            state=self.state,
            consecutive_failures=self._consecutive,
            window_calls=len(self._window),
            window_failures=sum(failed for _, failed in self._window),
            opened_count=self._opened_count,
        )
