"""The orchestrator's edge to the workers: what it asks of one, and how each answer is classed.

`WorkerClient` is the interface the dispatcher drives; `GrpcWorkerClient`
(`app.orchestrator.grpc_worker_client`) speaks `worker.WorkerService` over grpclib, and
`MemoryWorkerClient` (`app.orchestrator.memory_worker_client`) is its in-process twin for the
dispatcher's tests on asyncio and trio. One contract suite runs both.

Every call answers with a record instead of raising, classed by what the dispatcher can do about
it: OK (the worker answered), REFUSED (not now: draining, queue full: try another worker),
REJECTED (wrong for this job: no retry helps), UNREACHABLE (no answer at all).
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

from app.fleet.batch_job import BatchJob, RunOutcome


class Reply(enum.Enum):
    """How a call to a worker went, by what can be done about it."""

    OK = "OK"
    REFUSED = "REFUSED"
    REJECTED = "REJECTED"
    UNREACHABLE = "UNREACHABLE"


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """The worker's answer to "take this job" (SendWork).

    `running` is true when the job runs there now, this call's or an earlier one's (a known id
    attaches instead of starting a second run).
    """

    reply: Reply
    running: bool = False
    error: str = ""
    # UNREACHABLE because the connection was refused: no process listens at the address, so
    # whatever ran there is gone (as opposed to a reset or a timeout, where it may run on)
    absent: bool = False


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to "wait for this job's end" (RunWork): the outcome when `reply` is OK."""

    reply: Reply
    outcome: RunOutcome | None = None
    error: str = ""
    absent: bool = False  # as Admission.absent


class WorkerClient(Protocol):
    """Calls to the worker at `address` (`host:port`), one job at a time per call."""

    async def admit(self, address: str, job: BatchJob) -> Admission:
        """Ask the worker to run `job` (or to say it runs it already); answers at once."""
        ...

    async def wait(self, address: str, job: BatchJob) -> Completion:
        """Wait for `job`'s run on that worker to end (starting it if the worker does not know
        it). Cancelling the caller abandons the wait, not the run."""
        ...

    async def cancel(self, address: str, job_id: str) -> bool:
        """Ask the worker to cancel the run; True when it answered (whatever the run's state)."""
        ...

    async def probe(self, address: str) -> bool:
        """Whether the worker answers at all now (its status); the caller bounds the wait."""
        ...

    async def knows(self, address: str, job_id: str) -> bool | None:
        """Whether the worker has a run of `job_id` (queued, running or recently finished);
        None when it did not answer in time."""
        ...

    def forget(self, address: str) -> None:
        """Drop what is kept for that worker (its connection): it is gone or unreachable."""
        ...
