"""Waiting on a job through the store interfaces: woken by its events, re-reading its record."""

from __future__ import annotations

import anyio

from app.fleet.batch_job import BatchJob
from app.stores.abc import JobEvents, JobStore

#: Re-read the record at least this often while waiting, in case an event was missed.
REREAD_SECONDS = 2.0


async def wait_finished(
    store: JobStore, events: JobEvents, job_id: str, *, deadline: float
) -> BatchJob | None:
    """The record once the job has ended, or the latest when `deadline` (loop time) passes."""
    while True:
        job = await store.get(job_id)
        if job is None or job.state.finished or anyio.current_time() >= deadline:
            return job
        with anyio.move_on_after(min(REREAD_SECONDS, deadline - anyio.current_time())):
            await events.wait_changed(job_id)
