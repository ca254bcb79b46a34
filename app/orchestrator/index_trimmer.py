"""Keeps the job index to the jobs that still have a record: off the submit path, now and then.

Every `period` seconds it drops the index entries submitted more than the record retention ago
whose record is gone, looking at `batch` entries per call (past those it kept), until it has
looked at all of them.
A job still recorded (running past the retention, or ended less than a retention ago) stays
listed. Every orchestrator runs one; the work is idempotent, so two at once only repeat reads.
A store outage (or any other failure, logged) skips the turn: the next one catches up.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.errors import StoreBusy, StoreUnavailable
from app.stores.abc import JobStore

log = logging.getLogger(__name__)

#: How often the index is trimmed.
TRIM_PERIOD_SECONDS = 60.0
#: Index entries one call looks at.
TRIM_BATCH = 1000


class TrimmerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot for metrics: turns taken, entries dropped, turns skipped for an outage."""

    state: Lifecycle
    turns: int
    trimmed: int
    skipped: int


class IndexTrimmer:
    """Drops the job index's entries whose record is gone (see the module)."""

    def __init__(
        self,
        store: JobStore,
        *,
        retention_seconds: float,
        period: float = TRIM_PERIOD_SECONDS,
        batch: int = TRIM_BATCH,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._retention = retention_seconds
        self._period = period
        self._batch = batch
        self._clock: Clock = clock or SystemClock()
        self._state = Lifecycle.CREATED
        self._turns = self._trimmed = self._skipped = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<IndexTrimmer {s.state.value} turns={s.turns} trimmed={s.trimmed}>"

    def statistics(self) -> TrimmerStatistics:
        """The counters now."""
        return TrimmerStatistics(
            state=self._state, turns=self._turns, trimmed=self._trimmed, skipped=self._skipped
        )

    async def trim(self) -> int:
        """One turn: drop what is due now; how many entries went."""
        before = self._clock.timestamp() - self._retention
        dropped = kept = 0
        while True:
            # past the entries kept so far this turn: jobs still recorded at the old end of the
            # index must not hide the expired ones behind them
            examined, removed = await self._store.trim_index(
                before=before, count=self._batch, skip=kept
            )
            dropped += removed
            kept += examined - removed
            if examined < self._batch:
                break
            await anyio.lowlevel.checkpoint()
        self._turns += 1
        self._trimmed += dropped
        return dropped

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Trim every period until cancelled (the first turn one period after the start)."""
        self._state = Lifecycle.RUNNING
        task_status.started()
        try:
            while True:
                await anyio.sleep(self._period)
                try:
                    dropped = await self.trim()
                except (StoreUnavailable, StoreBusy) as exc:  # away, or every connection busy
                    self._skipped += 1
                    log.debug("job index not trimmed this turn: %s", exc)
                    continue
                except Exception as exc:  # housekeeping: never the orchestrator's end
                    self._skipped += 1
                    log.warning("job index not trimmed this turn: %s: %s", type(exc).__name__, exc)
                    continue
                if dropped:
                    log.debug("job index: %d entries of jobs no longer recorded dropped", dropped)
        finally:
            self._state = Lifecycle.STOPPED
