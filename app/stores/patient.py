"""A `JobStore` that waits out the store's outages instead of failing: for work already in hand.

The dispatcher drives jobs it has taken; when Redis goes away in the middle of one (a restart, a
fail-over), giving the job up would leave its entry for another orchestrator to claim and its
run to be made again. Through this wrapper each call is made again, with a backoff of its own
(from 0.05 s doubling up to 1 s: a store that is back is noticed within a second) until the store
answers; the job then goes on where it was. The outage is logged once, by the `Outage` given.
Calls that answer a client (Submit, GetJob) use the store directly and fail fast instead.

A call refused as busy (`StoreBusy`: every connection of this process stayed in use for the
pool's wait) is made again as well, after a short pause, but quietly: that is load, not an
outage, so it neither logs one nor counts as one for `unavailable_within`.

Only those two are waited out; everything else (`QueueGone`, a bug) goes to the caller.
A call that reached the store just before the connection broke is made again: the store's calls
are safe to repeat (reads; a fenced write of the same record; an ack), or harmless (a fencing
token taken twice leaves one that nobody holds).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from app.core.outage import Outage
from app.errors import CorruptRecord, StoreBusy, StoreUnavailable
from app.fleet.batch_job import BatchJob, LostJob, RunOutcome
from app.fleet.job_index import IndexedJob, IndexPosition
from app.stores.abc import (
    Delivered,
    JobStore,
    Quarantined,
    QueueEntry,
    RecordedRun,
    SubmitResult,
    Taken,
    WriteResult,
)

T = TypeVar("T")

MIN_DELAY = 0.05
MAX_DELAY = 1.0
#: The pause before a call refused as busy is made again (it has waited the pool's timeout).
BUSY_DELAY = 0.05


class PatientJobStore:
    """`store`, with every call that meets an outage made again until the store answers."""

    def __init__(self, store: JobStore, *, outage: Outage) -> None:
        self._store = store
        self._outage = outage
        self._last_failure = -math.inf
        self.waits = 0  # calls that had to wait for the store
        self.busy = 0  # calls refused as busy, and made again

    def __repr__(self) -> str:
        return (
            f"<PatientJobStore {self._store!r} {self._outage!r} waits={self.waits}"
            f" busy={self.busy}>"
        )

    def unavailable_within(self, seconds: float) -> bool:
        """Whether a call met an outage in the last `seconds` (loop time)."""
        return anyio.current_time() - self._last_failure < seconds

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        # a backoff per call: the many tasks waiting at once must not double one shared delay
        delay = 0.0
        while True:
            try:
                result = await fn(*args, **kwargs)
            except StoreUnavailable as exc:
                self._last_failure = anyio.current_time()
                if not delay:
                    self.waits += 1
                self._outage.failed(exc)  # logs the outage's start once
                delay = min(MAX_DELAY, max(MIN_DELAY, delay * 2))
                await anyio.sleep(delay)
                continue
            except StoreBusy:
                self.busy += 1
                await anyio.sleep(BUSY_DELAY)
                continue
            self._outage.succeeded()
            return result

    async def ensure_group(self) -> bool:
        """See `JobStore.ensure_group`."""
        return await self._call(self._store.ensure_group)

    async def submit(
        self,
        job: BatchJob,
        *,
        bound: int,
        deliver_to: str = "",
        dispatched: BatchJob | None = None,
    ) -> tuple[SubmitResult, BatchJob | None, int, Delivered | None]:
        """See `JobStore.submit`."""
        return await self._call(self._store.submit, job, bound=bound, deliver_to=deliver_to,
                                dispatched=dispatched)  # fmt: skip

    async def get(self, job_id: str) -> BatchJob | None:
        """See `JobStore.get`."""
        return await self._call(self._store.get, job_id)

    async def fence(self, job_id: str) -> int:
        """See `JobStore.fence`."""
        return await self._call(self._store.fence, job_id)

    async def next_token(self, job_id: str) -> int:
        """See `JobStore.next_token`."""
        return await self._call(self._store.next_token, job_id)

    async def take(self, job_id: str) -> Taken | None:
        """See `JobStore.take`."""
        return await self._call(self._store.take, job_id)

    async def write(
        self,
        job: BatchJob,
        token: int,
        *,
        ack: str = "",
        advance: bool = False,
        expect: bytes | None = None,
    ) -> WriteResult:
        """See `JobStore.write`."""
        return await self._call(
            self._store.write, job, token, ack=ack, advance=advance, expect=expect
        )

    async def restore_fence(self, job_id: str, token: int) -> bool:
        """See `JobStore.restore_fence`."""
        return await self._call(self._store.restore_fence, job_id, token)

    async def request_cancel(self, job_id: str, *, error: str, now: float) -> BatchJob | None:
        """See `JobStore.request_cancel`."""
        return await self._call(self._store.request_cancel, job_id, error=error, now=now)

    async def cancel_requested(self, job_id: str) -> bool:
        """See `JobStore.cancel_requested`."""
        return await self._call(self._store.cancel_requested, job_id)

    async def record_outcomes(self, outcomes: Sequence[RecordedRun]) -> list[bool]:
        """See `JobStore.record_outcomes`."""
        return await self._call(self._store.record_outcomes, outcomes)

    async def outcomes(self, job_id: str, tokens: Sequence[int]) -> dict[int, RunOutcome]:
        """See `JobStore.outcomes`."""
        return await self._call(self._store.outcomes, job_id, tokens)

    async def queued_count(self, job_type: str) -> int:
        """See `JobStore.queued_count`."""
        return await self._call(self._store.queued_count, job_type)

    async def report_lost(self, lost: LostJob) -> bool:
        """See `JobStore.report_lost`."""
        return await self._call(self._store.report_lost, lost)

    async def lost_jobs(self, *, count: int) -> list[LostJob]:
        """See `JobStore.lost_jobs`."""
        return await self._call(self._store.lost_jobs, count=count)

    async def read_new(self, consumer: str, *, count: int, block_ms: int) -> list[QueueEntry]:
        """See `JobStore.read_new`."""
        return await self._call(self._store.read_new, consumer, count=count, block_ms=block_ms)

    async def claim_idle(self, consumer: str, *, min_idle_ms: int, count: int) -> list[QueueEntry]:
        """See `JobStore.claim_idle`."""
        return await self._call(
            self._store.claim_idle, consumer, min_idle_ms=min_idle_ms, count=count
        )

    async def quarantine(self, entry_id: str, problem: CorruptRecord, *, now: float) -> bool:
        """See `JobStore.quarantine`."""
        return await self._call(self._store.quarantine, entry_id, problem, now=now)

    async def quarantined(self, *, count: int = 100) -> list[Quarantined]:
        """See `JobStore.quarantined`."""
        return await self._call(self._store.quarantined, count=count)

    async def keep_alive(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """See `JobStore.keep_alive`."""
        await self._call(self._store.keep_alive, consumer, entry_ids)

    async def ack(self, entry_id: str) -> None:
        """See `JobStore.ack`."""
        await self._call(self._store.ack, entry_id)

    async def holds_entry(self, entry_id: str) -> bool:
        """See `JobStore.holds_entry`."""
        return await self._call(self._store.holds_entry, entry_id)

    async def remove_idle_consumers(self, *, min_idle_ms: int, keep: str) -> list[str]:
        """See `JobStore.remove_idle_consumers`; not waited for: a sweep missed is done later."""
        return await self._store.remove_idle_consumers(min_idle_ms=min_idle_ms, keep=keep)

    async def index_page(
        self, *, after: IndexPosition | None, since: float, until: float, count: int
    ) -> list[IndexedJob]:
        """See `JobStore.index_page`; not waited for: it answers a client."""
        return await self._store.index_page(after=after, since=since, until=until, count=count)

    async def trim_index(self, *, before: float, count: int, skip: int = 0) -> tuple[int, int]:
        """See `JobStore.trim_index`; not waited for: a trim missed is done later."""
        return await self._store.trim_index(before=before, count=count, skip=skip)
