"""Retry: exponential backoff with full jitter, a maximum attempt count, and a retry budget.

Pure and clock-injected (core: no asyncio, no I/O). The dispatcher asks `RetryPolicy.delay` how
long to wait before attempt n, and `RetryBudget.try_spend` whether the fleet can afford a retry
at all: retries are at most `ratio` of the calls seen over the last `window_seconds` (plus a
small floor, so that a quiet system can still retry), which stops retry storms when every worker
is sick.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import msgspec

from app.core.clock import Clock


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How many attempts, and how long between them (AWS's "full jitter")."""

    max_attempts: int = 3
    base_seconds: float = 0.2
    max_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.base_seconds <= self.max_seconds:
            raise ValueError("need 0 <= base_seconds <= max_seconds")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before attempt `attempt` (2 is the first retry)."""
        return min(self.max_seconds, self.base_seconds * 2.0 ** max(0, attempt - 2))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """A uniformly random delay in [0, ceiling(attempt)]."""
        return rng() * self.ceiling(attempt)

    def can_retry(self, attempts_made: int) -> bool:
        """Whether another attempt may follow `attempts_made` (fewer than `max_attempts`)."""
        return attempts_made < self.max_attempts


class RetryBudget:
    """Allows retries up to `ratio` × calls (plus `min_retries`) in a sliding window."""

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        window_seconds: float = 10.0,
        min_retries: int = 3,
        clock: Clock,
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError("ratio must be 0..1")
        self._ratio = ratio
        self._window = window_seconds
        self._min = min_retries
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def __repr__(self) -> str:
        self._trim()
        calls, retries = len(self._calls), len(self._retries)
        return f"<RetryBudget calls={calls} retries={retries} ratio={self._ratio}>"

    @property
    def held(self) -> int:
        """How many call and retry times the budget keeps now: at most a window's worth, plus
        those that have left it since the last call or retry was counted."""
        return len(self._calls) + len(self._retries)

    def _trim(self) -> None:
        horizon = self._clock.monotonic() - self._window
        for q in (self._calls, self._retries):
            while q and q[0] < horizon:
                q.popleft()

    def record_call(self) -> None:
        """Count a first attempt (retries are counted by try_spend), and forget the times that
        have left the window: with no retry to trim them, every job's would be kept for good."""
        self._calls.append(self._clock.monotonic())
        self._trim()

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the window's share is used up."""
        self._trim()
        allowed = self._min + self._ratio * len(self._calls)
        if len(self._retries) + 1 > allowed:
            self.refused += 1
            return False
        self._retries.append(self._clock.monotonic())
        return True
