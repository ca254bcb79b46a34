"""JobMaster: runs jobs on an anyio CapacityLimiter with ThreadPoolTaskExecutor semantics.

Spring's executor, which the seed used, admits work like this, and so does this class:

1. while fewer than `core_size` jobs run, a new job starts at once;
2. then it waits in a queue of `queue_capacity`;
3. only when that queue is full does the limiter grow by one token (up to `max_size`), and the
   new job starts on it;
4. past that the job is rejected (QueueFull).

Tokens above `core_size` are given back after `keep_alive_seconds` without job activity.
Admission and hand-over are plain synchronous methods (no await), so cancellation can never
leave a token taken with no job behind it: a job's token is taken on its behalf
(`acquire_on_behalf_of_nowait(job_id)`) before it is handed to a runner and released in the
runner's `finally`.

Jobs run on pooled runner tasks, the threads of the seed's pool: a runner that finishes a job
takes the next queued one, or parks until it is handed a new one (at most one parked runner per
token). Admitting a job on a worker that has a parked runner is a list pop and an Event.set,
not a new task, which keeps it off the path of the gRPC reply.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.log_context import bind_log_fields, unbind_log_fields
from app.errors import (
    Draining,
    InvalidJobRequest,
    JobAlreadyExists,
    JobNotFound,
    QueueFull,
    shown,
)
from app.fleet.job_state import JobState
from app.fleet.limits import MAX_ID_LENGTH, MAX_NAME_LENGTH, params_problem
from app.fleet.pod_info import PodStatus, WorkerLoad
from app.worker.job_registry import JobRegistry, JobSpec
from app.worker.job_run import JobRun
from app.worker.run_context import RunContext, enter_run, leave_run

log = logging.getLogger(__name__)

# queued runs one job task goes on to before it hands the queue to a fresh task
TAKE_OVER_LIMIT = 64
_json = msgspec.json.Encoder()


class JobMasterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the job master for status, PodInfo and metrics."""

    state: Lifecycle
    load: WorkerLoad
    jobs: JobCounts


class JobCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Jobs since start, by how admission or the run ended."""

    accepted: int
    rejected: int
    succeeded: int
    failed: int
    cancelled: int
    timed_out: int


class _Run:
    """A live run: the public record plus what only the job master needs."""

    __slots__ = ("cancel_reason", "ended", "kwargs", "on_end", "record", "scope", "spec")

    def __init__(self, record: JobRun, spec: JobSpec, kwargs: dict[str, Any]) -> None:
        self.record = record
        self.spec = spec
        self.kwargs = kwargs
        # made by the first waiter: most runs are never waited for
        self.ended: anyio.Event | None = None
        self.scope: anyio.CancelScope | None = None
        self.cancel_reason: str | None = None
        # told of the end, synchronously: a work stream's waits (`JobMaster.run_then`)
        self.on_end: list[Callable[[JobRun], None]] | None = None

    async def wait_ended(self) -> None:
        if self.record.state.finished:
            await anyio.lowlevel.checkpoint()
            return
        if self.ended is None:
            self.ended = anyio.Event()
        await self.ended.wait()


class _Runner:
    """A parked runner task: `_start` hands it its next run and sets `wake`."""

    __slots__ = ("next_run", "wake")

    def __init__(self) -> None:
        self.next_run: _Run | None = None
        self.wake = anyio.Event()


def _size(record: JobRun) -> int:
    """About what a remembered run holds: its parameters, result and error."""
    params = sum(len(k) + len(v) for k, v in record.params.items())
    return params + len(record.result_json) + len(record.error) + len(record.id) + 200


def _one_line(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


class JobMaster:
    """Admits, runs, times out and cancels jobs; the live source of the IDLE/BUSY status."""

    def __init__(
        self,
        registry: JobRegistry,
        *,
        core_size: int = 4,
        max_size: int = 8,
        queue_capacity: int = 100,
        watermark: int = 80,
        keep_alive_seconds: float = 60.0,
        default_timeout_seconds: float = 0.0,
        history_size: int = 1000,
        history_max_bytes: int = 64 * 1024 * 1024,
        max_result_bytes: int = 1024 * 1024,
        clock: Clock | None = None,
        on_finished: Callable[[JobRun], None] | None = None,
    ) -> None:
        if not 1 <= core_size <= max_size:
            raise ValueError("need 1 <= core_size <= max_size")
        self._registry = registry
        self._core_size = core_size
        self._max_size = max_size
        self._queue_capacity = queue_capacity
        self._watermark = watermark
        self._keep_alive = keep_alive_seconds
        self._default_timeout = default_timeout_seconds
        self._history_size = history_size
        self._history_max_bytes = history_max_bytes
        self._history_bytes = 0
        self._max_result_bytes = max_result_bytes
        self._clock: Clock = clock or SystemClock()
        # told of every run's end, synchronously (the worker records outcomes with it)
        self._on_finished = on_finished
        self._limiter = anyio.CapacityLimiter(core_size)
        # admission already bounds running jobs to the limiter's tokens; this one only gives the
        # blocking jobs their own thread pool instead of anyio's shared default of 40
        self._thread_limiter = anyio.CapacityLimiter(max_size)
        self._queue: deque[_Run] = deque()
        self._live: dict[str, _Run] = {}
        self._history: OrderedDict[str, _Run] = OrderedDict()
        self._parked: list[_Runner] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._scope = anyio.CancelScope()
        self._wakeup = anyio.Event()
        self._stopped = anyio.Event()
        self._drain_begun = anyio.Event()
        self._state = Lifecycle.CREATED
        self._last_activity = 0.0
        self._counts = dict.fromkeys(("accepted", "rejected", *(s.value for s in JobState)), 0)

    def __repr__(self) -> str:
        s = self.statistics()
        load, jobs = s.load, s.jobs
        return (
            f"<JobMaster {s.state.value} active={load.active}/{load.capacity} max={load.max_size}"
            f" queued={load.queued}/{load.queue_capacity} {load.status.value}"
            f" succeeded={jobs.succeeded} failed={jobs.failed}>"
        )

    # --- state -------------------------------------------------------------------------------

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The job tokens: one per running job; `total_tokens` is between core_size and max_size.

        For reading: a token taken outside admission would count as a running job.
        """
        return self._limiter

    @property
    def state(self) -> Lifecycle:
        """Where the job master is in its lifecycle."""
        return self._state

    @property
    def draining(self) -> bool:
        """True from the drain (or the stop) on: no new work is taken."""
        return self._state in (Lifecycle.DRAINING, Lifecycle.STOPPED)

    def status(self) -> PodStatus:
        """The seed's JobMaster#isActive(): at or under the watermark is IDLE, above it BUSY."""
        if self.draining:
            return PodStatus.DRAINING
        busy = self._limiter.borrowed_tokens * 100 > self._watermark * self._max_size
        return PodStatus.BUSY if busy else PodStatus.IDLE

    def load(self) -> WorkerLoad:
        """The load now, read live from the limiter and the queue."""
        return WorkerLoad(
            status=self.status(),
            active=self._limiter.borrowed_tokens,
            capacity=int(self._limiter.total_tokens),
            core_size=self._core_size,
            max_size=self._max_size,
            queued=len(self._queue),
            queue_capacity=self._queue_capacity,
            watermark=self._watermark,
        )

    def statistics(self) -> JobMasterStatistics:
        """The lifecycle, the load and the job counters: what status, PodInfo and metrics read."""
        c = self._counts
        return JobMasterStatistics(
            state=self._state,
            load=self.load(),
            jobs=JobCounts(
                accepted=c["accepted"],
                rejected=c["rejected"],
                succeeded=c[JobState.SUCCEEDED.value],
                failed=c[JobState.FAILED.value],
                cancelled=c[JobState.CANCELLED.value],
                timed_out=c[JobState.TIMED_OUT.value],
            ),
        )

    def job_names(self) -> list[str]:
        """The names of the registered jobs, sorted (what PodInfo and status advertise)."""
        return self._registry.names()

    def job_signatures(self) -> dict[str, msgspec.Raw]:
        """The registered jobs' signatures as PodInfo advertises them (see JobRegistry)."""
        return self._registry.advertised_signatures()

    def _find(self, job_id: str) -> _Run:
        if len(job_id) > MAX_ID_LENGTH:
            raise InvalidJobRequest(f"id: at most {MAX_ID_LENGTH} characters")
        run = self._live.get(job_id) or self._history.get(job_id)
        if run is None:
            raise JobNotFound(f"no job with id {shown(job_id)}")
        return run

    def get(self, job_id: str) -> JobRun:
        """The record of a queued, running or remembered finished job; JobNotFound otherwise."""
        return self._find(job_id).record

    def live(self) -> list[JobRun]:
        """The runs not finished yet (queued and running): what PodInfo lists as this worker's."""
        return [r.record for r in self._live.values()]

    def jobs(self) -> list[JobRun]:
        """Live runs (queued first, then running), then remembered ones, newest first."""
        return [r.record for r in self._live.values()] + [
            r.record for r in reversed(self._history.values())
        ]

    # --- admission (synchronous: no await between decision and effect) ------------------------

    def submit_nowait(
        self,
        name: str,
        *,
        job_id: str,
        params: dict[str, str] | None = None,
        timeout_seconds: float = 0.0,
        fencing_token: int = 0,
    ) -> JobRun:
        """Admit a job: start it, queue it, or grow the limiter for it; else raise.

        Raises InvalidJobRequest, UnknownJob, JobAlreadyExists, QueueFull or Draining.
        """
        if self._task_group is None:
            raise RuntimeError("JobMaster is not running")
        if self.draining:
            self._counts["rejected"] += 1
            raise Draining("worker is draining and takes no new work")
        params = params or {}
        spec, kwargs = self._validate(name, job_id, params, timeout_seconds)
        known = self._live.get(job_id) or self._history.get(job_id)
        if known is not None:
            # ids are idempotent: a retried submit must not run the job twice
            self._attach(known, fencing_token)
            state = known.record.state
            verb = "already ran" if state.finished else "is already"
            raise JobAlreadyExists(f"job {job_id!r} {verb} {state.value}")
        record = JobRun(
            id=job_id,
            name=name,
            params=params,
            timeout_seconds=timeout_seconds or self._default_timeout,
            submitted_at=self._clock.timestamp(),
            fencing_token=fencing_token,
        )
        run = _Run(record, spec, kwargs)
        if self._limiter.available_tokens >= 1 and not self._queue:
            self._start(run)
        elif len(self._queue) < self._queue_capacity:
            self._queue.append(run)
        elif self._limiter.total_tokens < self._max_size:
            self._limiter.total_tokens += 1
            self._wakeup.set()  # the housekeeping loop now has a keep-alive to time
            self._start(run)
        else:
            self._counts["rejected"] += 1
            raise QueueFull(
                f"queue is full ({self._queue_capacity} waiting, {self._max_size} running)"
            )
        self._live[job_id] = run
        self._counts["accepted"] += 1
        return record

    @staticmethod
    def _attach(run: _Run, fencing_token: int) -> None:
        """An orchestrator's newer attempt attaches to a live run: the run is that attempt's now
        (its outcome is recorded under the newer token, and a check after an absence does not
        take it for a run that was superseded elsewhere)."""
        if not run.record.state.finished and fencing_token > run.record.fencing_token:
            run.record.fencing_token = fencing_token

    def _validate(
        self, name: str, job_id: str, params: dict[str, str], timeout_seconds: float
    ) -> tuple[JobSpec, dict[str, Any]]:
        if not job_id:
            raise InvalidJobRequest("id: must not be empty")
        if len(job_id) > MAX_ID_LENGTH or not job_id.isprintable():
            raise InvalidJobRequest(f"id: must be printable and at most {MAX_ID_LENGTH} characters")
        if not name:
            raise InvalidJobRequest("name: must not be empty")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidJobRequest(f"name: at most {MAX_NAME_LENGTH} characters")
        problem = params_problem(params)
        if problem is not None:
            raise InvalidJobRequest(f"{problem[0]}: {problem[1]}")
        if not math.isfinite(timeout_seconds) or timeout_seconds < 0:
            raise InvalidJobRequest("timeout_seconds: must be a finite number, 0 or more")
        spec = self._registry.get(name)
        return spec, spec.bind(params)

    def _start(self, run: _Run) -> None:
        """Begin `run` and hand it to a parked runner, or to a new one."""
        assert self._task_group is not None
        self._begin(run)
        if self._parked:
            runner = self._parked.pop()  # the most recently parked: its memory is warm
            runner.next_run = run
            runner.wake.set()
        else:
            self._task_group.start_soon(self._runner, run, name="JobMaster runner")

    def _begin(self, run: _Run) -> None:
        """Give `run` a token and mark it running (a runner runs it next)."""
        self._limiter.acquire_on_behalf_of_nowait(run.record.id)
        run.record.state = JobState.RUNNING
        run.record.started_at = self._clock.timestamp()

    def _take_over(self) -> _Run | None:
        """The oldest queued run, begun on the token a finished run gave back; None if none.

        The task that ran the finished job runs it next, so that a queue of quick jobs empties
        at the pace of the jobs, not at one job per token per turn of the event loop.
        """
        run = None
        if not self._scope.cancel_called and self._queue and self._limiter.available_tokens >= 1:
            run = self._queue.popleft()
            self._begin(run)
        self._hand_over()  # any other free tokens, or the queue's cancellation
        return run

    def _finish(
        self,
        run: _Run,
        state: JobState,
        *,
        result: bytes = b"",
        error: str = "",
        hand_over: bool = True,
    ) -> None:
        record = run.record
        if record.started_at is not None:
            self._limiter.release_on_behalf_of(record.id)
        record.state, record.result_json, record.error = state, result, error
        record.finished_at = self._clock.timestamp()
        self._counts[state.value] += 1
        if self._live.get(record.id) is run:
            del self._live[record.id]
        if self._history_size:
            self._remember(run)
        if run.ended is not None:
            run.ended.set()
        if run.on_end is not None:
            for then in run.on_end:
                then(record)
            run.on_end = None
        self._last_activity = anyio.current_time()
        if hand_over:
            self._hand_over()
        if self.draining and not self._live:
            self._wakeup.set()  # the drain is complete
        if state is JobState.FAILED:
            log.info("job %s (%s) failed: %s", record.id, record.name, error,
                     extra={"job_id": record.id})  # fmt: skip
        if self._on_finished is not None:
            self._on_finished(record)

    def _remember(self, run: _Run) -> None:
        """Keep a finished run for GetJob and attaching, within the count and the bytes."""
        self._history[run.record.id] = run
        self._history_bytes += _size(run.record)
        while len(self._history) > self._history_size or (
            self._history_bytes > self._history_max_bytes and len(self._history) > 1
        ):
            _, old = self._history.popitem(last=False)
            self._history_bytes -= _size(old.record)

    def _hand_over(self) -> None:
        """Give free tokens to queued jobs, oldest first."""
        if self._scope.cancel_called:
            while self._queue:
                self._finish(self._queue.popleft(), JobState.CANCELLED, error="worker shut down")
            return
        while self._queue and self._limiter.available_tokens >= 1:
            self._start(self._queue.popleft())

    # --- running ------------------------------------------------------------------------------

    async def _runner(self, run: _Run) -> None:
        """Run `run`, then queued runs on the same token, then park for the next one."""
        parking: _Runner | None = None
        taken_over = 0
        while True:
            # after a long streak of queued quick jobs, yield to the event loop once
            await self._execute_one(run, yield_first=taken_over == TAKE_OVER_LIMIT)
            taken_over = taken_over % TAKE_OVER_LIMIT + 1
            next_run = self._take_over()
            if next_run is None:
                taken_over = 0
                if self.draining or len(self._parked) >= self._limiter.total_tokens:
                    return
                parking = parking or _Runner()
                next_run = await self._park(parking)
                if next_run is None:
                    return
            run = next_run

    async def _park(self, runner: _Runner) -> _Run | None:
        """Wait to be handed a run; None when released (a drain, or tokens given back)."""
        runner.next_run = None
        if runner.wake.is_set():
            runner.wake = anyio.Event()
        self._parked.append(runner)
        try:
            await runner.wake.wait()
        except BaseException:
            # cancelled while parked: a run handed over meanwhile must still end (the backends
            # resume a woken task before they cancel it, so this is insurance, not a path)
            if runner in self._parked:
                self._parked.remove(runner)
            elif runner.next_run is not None:
                self._finish(
                    runner.next_run,
                    JobState.CANCELLED,
                    error="worker shut down before the job started",
                )
            raise
        return runner.next_run

    def _release_parked(self, keep: int) -> None:
        """Let all but the `keep` most recently parked runners end."""
        while len(self._parked) > keep:
            self._parked.pop(0).wake.set()

    async def _execute_one(self, run: _Run, *, yield_first: bool = False) -> None:
        record = run.record
        outcome: tuple[JobState, bytes, str] | None = None
        try:
            with anyio.CancelScope() as scope:
                run.scope = scope
                if record.timeout_seconds:
                    scope.deadline = anyio.current_time() + record.timeout_seconds
                if run.cancel_reason is not None:
                    scope.cancel()
                try:
                    if yield_first:  # here, so that a cancel meanwhile still ends the run
                        await anyio.lowlevel.checkpoint()
                    value = await self._call(run)
                    result = _json.encode(value)
                    if len(result) > self._max_result_bytes:
                        outcome = (
                            JobState.FAILED,
                            b"",
                            f"result is {len(result)} bytes of JSON, over"
                            f" worker.max_result_bytes ({self._max_result_bytes})",
                        )
                    else:
                        outcome = (JobState.SUCCEEDED, result, "")
                except Exception as exc:
                    outcome = (JobState.FAILED, b"", _one_line(exc))
            if outcome is None:  # this run's own scope stopped it
                if run.cancel_reason is not None:
                    outcome = (JobState.CANCELLED, b"", run.cancel_reason)
                else:
                    outcome = (
                        JobState.TIMED_OUT,
                        b"",
                        f"timed out after {record.timeout_seconds:g}s",
                    )
        finally:
            outside = outcome is None
            if outside:  # cancelled from outside: the drain's grace ran out
                outcome = (JobState.CANCELLED, b"", "worker shut down before the job finished")
            assert outcome is not None
            state, result, error = outcome
            # a run that ended on its own leaves the hand-over to its runner's take-over
            self._finish(run, state, result=result, error=error, hand_over=outside)

    async def _call(self, run: _Run) -> Any:
        record = run.record
        entered = enter_run(
            RunContext(job_id=record.id, name=record.name, fencing_token=record.fencing_token)
        )
        # the job's own log lines (its worker thread's too) carry its id
        logged = bind_log_fields(job_id=record.id)
        try:
            return await self._call_in_context(run)
        finally:
            unbind_log_fields(logged)
            leave_run(entered)

    async def _call_in_context(self, run: _Run) -> Any:
        spec = run.spec
        if spec.blocking:
            # abandon_on_cancel: a cancel or timeout takes effect now; a thread that ignores
            # from_thread.check_cancelled() finishes in the background, its result dropped
            return await anyio.to_thread.run_sync(
                functools.partial(spec.fn, **run.kwargs),
                limiter=self._thread_limiter,
                abandon_on_cancel=True,
            )
        value = spec.fn(**run.kwargs)
        if hasattr(value, "__await__"):
            value = await value
        return value

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the jobs' task group until drained (or cancelled); report ready once it exists."""
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._task_group = tg
                    self._state = Lifecycle.RUNNING
                    task_status.started()
                    while not (self.draining and not self._live):
                        with anyio.move_on_after(self._next_shrink_in()):
                            await self._wakeup.wait()
                        self._wakeup = anyio.Event()
                        self._shrink_idle()
                    self._release_parked(keep=0)
        finally:
            self._state = Lifecycle.STOPPED
            self._task_group = None
            while self._queue:  # never started: nothing to await
                self._finish(self._queue.popleft(), JobState.CANCELLED, error="worker shut down")
            self._stopped.set()

    def _next_shrink_in(self) -> float:
        if self._limiter.total_tokens <= self._core_size:
            return math.inf
        return max(0.0, self._last_activity + self._keep_alive - anyio.current_time())

    def _shrink_idle(self) -> None:
        if self._limiter.total_tokens > self._core_size and self._next_shrink_in() == 0:
            self._limiter.total_tokens = max(self._core_size, self._limiter.borrowed_tokens)
            self._release_parked(keep=int(self._limiter.total_tokens))
            # wake again later if busy tokens above core still have to come back
            self._last_activity = anyio.current_time()

    # --- waiting, cancelling, draining ------------------------------------------------------------

    async def wait_finished(self, job_id: str) -> JobRun:
        """Wait until the job has ended and return its record."""
        run = self._find(job_id)
        await run.wait_ended()
        return run.record

    async def run_and_wait(
        self,
        name: str,
        *,
        job_id: str,
        params: dict[str, str] | None = None,
        timeout_seconds: float = 0.0,
        fencing_token: int = 0,
    ) -> JobRun:
        """Submit and wait for the outcome; an id known under the same name attaches to it."""
        run = self._submit_or_attach(name, job_id, params, timeout_seconds, fencing_token)
        await run.wait_ended()
        return run.record

    def run_then(
        self,
        name: str,
        *,
        job_id: str,
        params: dict[str, str] | None = None,
        timeout_seconds: float = 0.0,
        fencing_token: int = 0,
        then: Callable[[JobRun], None],
    ) -> None:
        """`run_and_wait` without the wait: `then(record)` is called once the run has ended (at
        once when it has already), synchronously, from whichever task ends it. Raises as
        `submit_nowait` does, except that a known id of the same name attaches."""
        run = self._submit_or_attach(name, job_id, params, timeout_seconds, fencing_token)
        if run.record.state.finished:
            then(run.record)
        elif run.on_end is None:
            run.on_end = [then]
        else:
            run.on_end.append(then)

    def _submit_or_attach(
        self,
        name: str,
        job_id: str,
        params: dict[str, str] | None,
        timeout_seconds: float,
        fencing_token: int,
    ) -> _Run:
        """The run of `job_id`: a known one of the same name (attached to), else a new one."""
        known = self._live.get(job_id) or self._history.get(job_id)
        if known is not None and job_id:
            if known.record.name != name:
                raise JobAlreadyExists(f"job {job_id!r} exists for job {known.record.name!r}")
            self._attach(known, fencing_token)
            return known
        self.submit_nowait(
            name,
            job_id=job_id,
            params=params,
            timeout_seconds=timeout_seconds,
            fencing_token=fencing_token,
        )
        return self._live[job_id]

    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> JobRun:
        """Cancel a queued or running job and wait for its end; a finished one comes back as is."""
        run = self._stop(job_id, reason)
        await run.wait_ended()
        return run.record

    def cancel_nowait(self, job_id: str, reason: str) -> None:
        """Cancel a queued or running job without waiting for its end (JobNotFound if unknown)."""
        self._stop(job_id, reason)

    def _stop(self, job_id: str, reason: str) -> _Run:
        run = self._find(job_id)
        if run.record.state is JobState.QUEUED:
            self._queue.remove(run)
            self._finish(run, JobState.CANCELLED, error=reason)
        elif not run.record.state.finished:
            run.cancel_reason = reason
            if run.scope is not None:
                run.scope.cancel()
        return run

    def begin_drain(self, grace_seconds: float) -> None:
        """Refuse new work from now on; jobs still running after the grace are cancelled."""
        if self._state is not Lifecycle.STOPPED:
            self._state = Lifecycle.DRAINING
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + grace_seconds)
        self._wakeup.set()
        self._drain_begun.set()

    def cancel_all(self) -> None:
        """Cancel every job now (a second signal, or the grace already spent elsewhere)."""
        if self._state is not Lifecycle.STOPPED:
            self._state = Lifecycle.DRAINING
        self._scope.cancel()
        self._drain_begun.set()

    async def wait_draining(self) -> None:
        """Return once the job master refuses new work (a drain begun, or everything cancelled)."""
        await self._drain_begun.wait()

    async def wait_stopped(self) -> None:
        """Return once `run` has ended: every job finished, any still queued cancelled."""
        await self._stopped.wait()
