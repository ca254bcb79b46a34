"""The in-process twin of `GrpcWorkerClient`: workers that are objects in this process.

A `MemoryWorker` runs async job functions by name with the wire worker's semantics that the
dispatcher relies on (ids are idempotent: a known id attaches to its run; RunWork of an unknown
id starts it; a draining worker refuses; an unknown job name is rejected), and can be made to
fail the ways a real one does: killed (calls break at once), silent (calls hang), draining.
The contract suite runs the same tests against it and against a real worker process.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from app.fleet.batch_job import BatchJob, RunOutcome
from app.fleet.job_state import JobState
from app.orchestrator.worker_client import Admission, Completion, Reply
from app.stores.abc import JobStore

JobFn = Callable[..., Awaitable[Any]]


class _Run:
    __slots__ = ("cancelled", "ended", "outcome", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.cancelled = False
        self.ended = anyio.Event()
        self.outcome: RunOutcome | None = None


class MemoryWorker:
    """One worker: job functions by name, runs by job id, and switches for its failures."""

    def __init__(self, jobs: Mapping[str, JobFn]) -> None:
        self.jobs = dict(jobs)
        self.runs: dict[str, _Run] = {}
        self.started: Counter[str] = Counter()  # runs started, by job id
        self.reachable = True
        self.draining = False
        self.silent = False  # calls hang instead of answering (a stopped process)
        # calls hang, runs go on and record their outcomes (a partition between the two)
        self.cut_off = False
        self._gone = anyio.Event()  # set when killed: calls in flight break

    def __repr__(self) -> str:
        live = sum(not r.ended.is_set() for r in self.runs.values())
        return f"<MemoryWorker runs={len(self.runs)} live={live} reachable={self.reachable}>"

    def kill(self) -> None:
        """Stop like a SIGKILL: runs end unrecorded, calls in flight break, none get through."""
        self.reachable = False
        for run in self.runs.values():
            run.scope.cancel()
        self._gone.set()

    def pause(self) -> None:
        """Stop like a SIGSTOP: nothing answers any more, calls in flight hang, runs go nowhere
        (they end unrecorded)."""
        self.silent = True
        for run in self.runs.values():
            run.scope.cancel()

    def black_hole(self) -> None:
        """Cut the network between orchestrators and this worker: calls in flight break (as
        the keepalive would notice), new ones hang; its runs go on and record outcomes."""
        self.cut_off = True
        self._gone.set()

    def reconnect(self) -> None:
        """End the black hole."""
        self.cut_off = False
        self._gone = anyio.Event()

    def live_ids(self) -> list[str]:
        """The runs not ended yet (what a real worker's PodInfo lists)."""
        return [job_id for job_id, run in self.runs.items() if not run.ended.is_set()]

    def restart(self) -> None:
        """Come back empty, as a new process on the same address would."""
        self.runs.clear()
        self.reachable, self.silent, self.draining = True, False, False
        self._gone = anyio.Event()


class MemoryWorkerClient:
    """`WorkerClient` for `MemoryWorker`s by address. `run()` owns the workers' job tasks."""

    def __init__(
        self, workers: Mapping[str, MemoryWorker] | None = None, *, store: JobStore | None = None
    ) -> None:
        self.workers: dict[str, MemoryWorker] = dict(workers or {})
        # where the workers record each run's outcome under its fencing token, as real ones do
        self._store = store
        self._task_group: anyio.abc.TaskGroup | None = None
        self.calls: Counter[str] = Counter()
        self.forgotten: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<MemoryWorkerClient workers={len(self.workers)} calls={dict(self.calls)}>"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the workers' runs until cancelled."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            task_status.started()
            await anyio.sleep_forever()

    async def _reach(self, address: str) -> MemoryWorker | None:
        """The worker if it answers; hangs while it is silent; None when it is unreachable."""
        worker = self.workers.get(address)
        if worker is None or not worker.reachable:
            return None
        if worker.silent or worker.cut_off:
            await anyio.sleep(math.inf)
        return worker

    def _start(self, worker: MemoryWorker, job: BatchJob) -> _Run:
        assert self._task_group is not None, "MemoryWorkerClient.run() is not running"
        run = worker.runs[job.job_id] = _Run()
        worker.started[job.job_id] += 1
        self._task_group.start_soon(self._execute, worker, job, run)
        return run

    async def _execute(self, worker: MemoryWorker, job: BatchJob, run: _Run) -> None:
        fn = worker.jobs[job.job_type]
        with run.scope:
            if job.timeout_seconds:
                run.scope.deadline = anyio.current_time() + job.timeout_seconds
            try:
                value = await fn(**job.params)
            except Exception as exc:
                run.outcome = RunOutcome(
                    state=JobState.FAILED, error=f"{type(exc).__name__}: {exc}"
                )
            else:
                run.outcome = RunOutcome(
                    state=JobState.SUCCEEDED, result_json=msgspec.json.encode(value).decode()
                )
        if run.outcome is None and worker.reachable and not worker.silent:  # cancel or timeout
            run.outcome = (
                RunOutcome(state=JobState.CANCELLED, error="cancelled by request")
                if run.cancelled
                else RunOutcome(
                    state=JobState.TIMED_OUT, error=f"timed out after {job.timeout_seconds:g}s"
                )
            )
        if run.outcome is not None and job.fencing_token and self._store is not None:
            await self._store.record_outcomes([(job.job_id, job.fencing_token, run.outcome)])
        run.ended.set()

    async def admit(self, address: str, job: BatchJob) -> Admission:
        """SendWork's semantics."""
        self.calls["admit"] += 1
        worker = await self._reach(address)
        if worker is None:
            return Admission(reply=Reply.UNREACHABLE, error="ConnectionRefusedError", absent=True)
        if worker.draining:  # before the id: a draining worker takes nothing, known or not
            return Admission(reply=Reply.REFUSED, error="UNAVAILABLE: worker is draining")
        if job.job_id in worker.runs:
            return Admission(reply=Reply.OK, running=True)
        if job.job_type not in worker.jobs:
            return Admission(reply=Reply.REJECTED, error=f"NOT_FOUND: no job {job.job_type!r}")
        self._start(worker, job)
        return Admission(reply=Reply.OK, running=True)

    async def wait(self, address: str, job: BatchJob) -> Completion:
        """RunWork's semantics: attach to the run of this id, or start it; wait for its end."""
        self.calls["wait"] += 1
        worker = await self._reach(address)
        if worker is None:
            return Completion(reply=Reply.UNREACHABLE, error="ConnectionRefusedError", absent=True)
        run = worker.runs.get(job.job_id)
        if run is None:
            admission = await self.admit(address, job)
            if admission.reply is not Reply.OK:
                return Completion(reply=admission.reply, error=admission.error)
            run = worker.runs[job.job_id]
        gone = worker._gone
        with anyio.move_on_after(math.inf) as scope:

            async def broken() -> None:
                await gone.wait()
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(broken)
                await run.ended.wait()
                tg.cancel_scope.cancel()
        if run.outcome is None or not run.ended.is_set():  # killed, paused or cut off
            if worker.silent:
                await anyio.sleep(math.inf)
            return Completion(reply=Reply.UNREACHABLE, error="StreamTerminatedError: reset")
        return Completion(reply=Reply.OK, outcome=run.outcome)

    async def cancel(self, address: str, job_id: str) -> bool:
        """CancelJob's semantics (answered: True, whatever the run's state)."""
        self.calls["cancel"] += 1
        worker = await self._reach(address)
        if worker is None:
            return False
        run = worker.runs.get(job_id)
        if run is not None and not run.ended.is_set():
            run.cancelled = True
            run.scope.cancel()
        return True

    async def probe(self, address: str) -> bool:
        """Whether the worker answers (hangs while it is silent or cut off)."""
        self.calls["probe"] += 1
        return await self._reach(address) is not None

    async def knows(self, address: str, job_id: str) -> bool | None:
        """GetJob's semantics: whether the worker has a run of the id (None: no answer, at once
        for a silent or cut-off worker where a real call would time out)."""
        self.calls["knows"] += 1
        await anyio.lowlevel.checkpoint()
        worker = self.workers.get(address)
        if worker is None or not worker.reachable or worker.silent or worker.cut_off:
            return None
        return job_id in worker.runs

    def forget(self, address: str) -> None:
        """Counted, so that tests can see the dispatcher let go of a worker."""
        self.forgotten[address] += 1
