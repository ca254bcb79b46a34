"""Waiting on a job through the store interfaces: woken by its events, re-reading its record."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from app.fleet.batch_job import BatchJob
from app.stores.abc import JobEvents, JobStore

#: Re-read the record at least this often while waiting, in case an event was missed.
REREAD_SECONDS = 2.0


class JobWaiters:
    """Tasks waiting for a job's next change, by job id: what every `JobEvents` keeps."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[anyio.Event]] = {}

    def __len__(self) -> int:
        """Jobs waited on now."""
        return len(self._waiters)

    def tasks(self) -> int:
        """Tasks waiting now."""
        return sum(len(w) for w in self._waiters.values())

    def wake(self, job_id: str) -> None:
        """Wake every task waiting on `job_id` (a change arrived)."""
        for event in self._waiters.pop(job_id, ()):
            event.set()

    async def wait(self, job_id: str) -> None:
        """Return after the next `wake(job_id)`."""
        with self.watching(job_id) as changed:
            await changed.wait()

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[anyio.Event]:
        """An event set by the next `wake(job_id)` from now on: enter it before reading the
        record, so that a change between the read and the wait is not missed."""
        event = anyio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]


async def wait_finished(
    store: JobStore, events: JobEvents, job_id: str, *, deadline: float
) -> BatchJob | None:
    """The record once the job has ended, or the latest when `deadline` (loop time) passes."""
    while True:
        # watched before the read: an end written between the read and the wait still wakes it
        with events.watching(job_id) as changed:
            job = await store.get(job_id)
            if job is None or job.state.finished or anyio.current_time() >= deadline:
                return job
            with anyio.move_on_after(min(REREAD_SECONDS, deadline - anyio.current_time())):
                await changed.wait()
