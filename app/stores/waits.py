"""Waiting on a job through the store interfaces: woken by its events, re-reading its record."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from app.fleet.batch_job import BatchJob
from app.fleet.job_state import FINISHED
from app.stores.abc import JobEvents, JobStore

#: Re-read the record at least this often while waiting, in case an event was missed.
REREAD_SECONDS = 2.0
#: What a change says when it ends its job: its new state's name (a write publishes it).
_ENDS = frozenset(state.value for state in FINISHED)
#: What a cancel request of a job says on its events (a write says the new state's name: the
#: listeners only need to know whom to wake, not the ~700-byte record): not an end.
CANCEL_REQUESTED = "cancel"


class JobWaiters:
    """Tasks waiting for a job's next change, by job id: what every `JobEvents` keeps."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[anyio.Event]] = {}
        self._cancel_waiters: dict[str, set[anyio.Event]] = {}  # cancel requests only
        self._end_waiters: dict[str, set[anyio.Event]] = {}  # changes that end the job only

    def __len__(self) -> int:
        """Jobs waited on now."""
        return len(self._waiters.keys() | self._cancel_waiters.keys() | self._end_waiters.keys())

    def tasks(self) -> int:
        """Tasks waiting now."""
        tables = (self._waiters, self._cancel_waiters, self._end_waiters)
        return sum(len(w) for t in tables for w in t.values())

    def wake(self, job_id: str, *, cancel: bool = False, state: str | None = None) -> None:
        """Wake every task waiting on `job_id` (a change arrived); `cancel`: it was a cancel
        request, which wakes those watching for one too; `state`: what the change says it made
        the job (None: not known), which wakes those watching for its end when it is one."""
        for event in self._waiters.pop(job_id, ()):
            event.set()
        if state is None or state in _ENDS:
            for event in self._end_waiters.pop(job_id, ()):
                event.set()
        if cancel:
            for event in self._cancel_waiters.pop(job_id, ()):
                event.set()

    async def wait(self, job_id: str) -> None:
        """Return after the next `wake(job_id)`."""
        with self.watching(job_id) as changed:
            await changed.wait()

    def watching(self, job_id: str) -> contextlib.AbstractContextManager[anyio.Event]:
        """An event set by the next `wake(job_id)` from now on: enter it before reading the
        record, so that a change between the read and the wait is not missed."""
        return _watch(self._waiters, job_id)

    def watching_cancel(self, job_id: str) -> contextlib.AbstractContextManager[anyio.Event]:
        """An event set by the next `wake(job_id, cancel=True)` from now on."""
        return _watch(self._cancel_waiters, job_id)

    def watching_end(self, job_id: str) -> contextlib.AbstractContextManager[anyio.Event]:
        """An event set by the next `wake(job_id)` whose state ends the job (or is not known)."""
        return _watch(self._end_waiters, job_id)


@contextlib.contextmanager
def _watch(table: dict[str, set[anyio.Event]], job_id: str) -> Iterator[anyio.Event]:
    event = anyio.Event()
    table.setdefault(job_id, set()).add(event)
    try:
        yield event
    finally:
        waiters = table.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del table[job_id]


async def wait_finished(
    store: JobStore, events: JobEvents, job_id: str, *, deadline: float
) -> BatchJob | None:
    """The record once the job has ended, or the latest when `deadline` (loop time) passes."""
    async with events.subscribed(job_id):  # one subscription for the whole wait
        while True:
            # watched before the read: an end written between the read and the wait wakes it
            # (changes that do not end it, DISPATCHED or RUNNING, wake nothing and read nothing)
            with events.watching_end(job_id) as changed:
                job = await store.get(job_id)
                if job is None or job.state.finished or anyio.current_time() >= deadline:
                    return job
                with anyio.move_on_after(min(REREAD_SECONDS, deadline - anyio.current_time())):
                    await changed.wait()
