"""`orchestrator.OrchestratorService` on grpclib: validate, queue, answer; the Dispatcher runs."""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.config import OrchestratorConfig
from app.core.clock import utc_iso
from app.errors import CorruptIndex, CorruptRecord, StoreBusy, StoreUnavailable, shown
from app.fleet.batch_job import BatchJob, encode_job
from app.fleet.job_index import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    JobQuery,
    decode_token,
    encode_token,
)
from app.fleet.job_state import JobState, from_orchestrator_wire, to_orchestrator_wire
from app.fleet.limits import MAX_ID_LENGTH, MAX_NAME_LENGTH, params_problem
from app.fleet.schedules import MAX_SCHEDULE_NAME, SCHEDULE_NAME
from app.grpc.status import retry_later
from app.orchestrator.admission import RefusalKind, admit, reuse_problem
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.job_listing import list_jobs
from app.pb import orchestrator as pb
from app.stores.abc import JobEvents, JobStore, SubmitResult
from app.stores.waits import REREAD_SECONDS, wait_finished

_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]+$")
MAX_PRIORITY = 9
MAX_ATTEMPTS = 20
# a year: past it, deadlines overflow what records and the wire can hold (1e308 did)
MAX_SECONDS = 366 * 86_400
#: The retry-after a refusal names when nothing better is known.
RETRY_AFTER_SECONDS = 1

#: What the role says about its store while it is away: (one-line reason, retry after seconds).
StoreDown = Callable[[], "tuple[str, int] | None"]

M = TypeVar("M")
R = TypeVar("R")


#: When a full queue tells the client to come back (RetryInfo, `retry-after-ms`).
QUEUE_FULL_RETRY_SECONDS = 5.0
#: When a call refused because every Redis connection stayed busy tells the client to come back.
BUSY_RETRY_SECONDS = 1.0
_STATUS = {
    RefusalKind.NOT_FOUND: Status.NOT_FOUND,
    RefusalKind.INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
}


def _invalid(field: str, problem: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, f"{field}: {problem}")


def _check_id(job_id: str) -> None:
    # bounded first: the regex and the store never see a megabyte id
    if len(job_id) > MAX_ID_LENGTH or not _NAME.match(job_id):
        raise _invalid("job_id", f"letters, digits and _.:@/- only, at most {MAX_ID_LENGTH}")


def _check_job_type(job_type: str, field: str = "job_type") -> None:
    if len(job_type) > MAX_NAME_LENGTH or not _NAME.match(job_type):
        raise _invalid(field, f"letters, digits and _.:@/- only, at most {MAX_NAME_LENGTH}")


def _check_schedule(schedule: str) -> None:
    if len(schedule) > MAX_SCHEDULE_NAME or not SCHEDULE_NAME.match(schedule):
        raise _invalid(
            "schedule", f"a schedule's name: letters, digits and _.- only, at most"
            f" {MAX_SCHEDULE_NAME}",
        )  # fmt: skip


def _instant(field: str, text: str) -> float:
    """An RFC 3339 instant (UTC when it has no offset) as Unix seconds, or INVALID_ARGUMENT."""
    try:
        at = datetime.fromisoformat(text) if len(text) <= 64 else None
    except ValueError:
        at = None
    if at is None:
        raise _invalid(field, f"not an RFC 3339 time: {shown(text)}")
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def job_query(req: pb.ListJobsRequest) -> JobQuery:
    """The query a ListJobs request asks, or INVALID_ARGUMENT naming the field."""
    states: set[JobState] = set()
    for value in req.states:
        state = from_orchestrator_wire(int(value))
        if state is None:
            raise _invalid("states", f"{int(value)} is not a job state")
        states.add(state)
    if req.job_type:
        _check_job_type(req.job_type)
    if req.schedule:
        _check_schedule(req.schedule)
    since = _instant("submitted_since", req.submitted_since) if req.submitted_since else -math.inf
    until = _instant("submitted_until", req.submitted_until) if req.submitted_until else math.inf
    if until <= since:
        raise _invalid("submitted_until", "must be after submitted_since")
    if req.limit > MAX_LIMIT:
        raise _invalid("limit", f"must be 0..{MAX_LIMIT} (0: {DEFAULT_LIMIT})")
    try:
        after = decode_token(req.page_token) if req.page_token else None
    except ValueError:
        raise _invalid("page_token", "not a token this service gave") from None
    return JobQuery(
        states=frozenset(states), job_type=req.job_type, schedule=req.schedule, since=since,
        until=until, limit=req.limit or DEFAULT_LIMIT, after=after,
    )  # fmt: skip


@contextmanager
def _data_loss() -> Iterator[None]:
    """A job whose stored data does not read answers DATA_LOSS with the one-line reason (the
    store has said it in the log, once), never UNKNOWN."""
    try:
        yield
    except (CorruptRecord, CorruptIndex) as exc:
        raise GRPCError(Status.DATA_LOSS, str(exc)) from None


def unavailable(reason: str, retry_after: int, hint: str = "") -> GRPCError:
    """UNAVAILABLE with a one-line reason that names when to try again, and the same as a
    RetryInfo detail and `retry-after-ms` trailer for clients that read those."""
    message = f"{reason}; retry after {retry_after}s{hint}"
    return retry_later(Status.UNAVAILABLE, message, retry_after)


def _store_guarded(
    method: Callable[[OrchestratorService, M], Awaitable[R]],
) -> Callable[[OrchestratorService, M], Coroutine[Any, Any, R]]:
    """Refuse at once while the store is known to be away, and answer a call that meets an
    outage with UNAVAILABLE, or this process's connections all busy with RESOURCE_EXHAUSTED,
    never a traceback."""

    @functools.wraps(method)
    async def call(self: OrchestratorService, message: M) -> R:
        self.refuse_while_store_down()
        try:
            return await method(self, message)
        except (StoreUnavailable, StoreBusy) as exc:
            raise self.store_error(exc) from None

    return call


def job_message(job: BatchJob) -> pb.Job:
    """The `orchestrator.Job` message for a record, its times as RFC 3339 in UTC."""
    return pb.Job(
        job_id=job.job_id,
        job_type=job.job_type,
        state=to_orchestrator_wire(job.state),
        params=dict(job.params),
        timeout_seconds=job.timeout_seconds,
        priority=job.priority,
        attempts=[
            pb.Attempt(
                number=a.number,
                worker=a.worker,
                fencing_token=a.fencing_token,
                started_at=utc_iso(a.started_at),
                finished_at=utc_iso(a.finished_at),
                outcome=a.outcome,
                error=a.error,
            )
            for a in job.attempts
        ],
        result_json=job.result_json,
        error=job.error,
        submitted_at=utc_iso(job.submitted_at),
        finished_at=utc_iso(job.finished_at),
        deadline_at=utc_iso(job.deadline_at),
        fencing_token=job.fencing_token,
        schedule=job.schedule,
    )


class OrchestratorService(pb.OrchestratorServiceBase):
    """The gateway's RPCs. Submissions go to the stream; the Dispatcher does the rest."""

    def __init__(
        self,
        store: JobStore,
        events: JobEvents,
        directory: WorkerDirectory,
        dispatcher: Dispatcher,
        config: OrchestratorConfig,
    ) -> None:
        self._store = store
        self._events = events
        self._directory = directory
        self._dispatcher = dispatcher
        self._config = config
        self.draining = False
        # set by the composition root: the store's state as its monitor sees it
        self.store_down: StoreDown = lambda: None
        self.busy_refusals = 0  # calls answered RESOURCE_EXHAUSTED: every connection was busy

    def refuse_while_store_down(self) -> None:
        """UNAVAILABLE with a retry-after while the store is known to be away."""
        down = self.store_down()
        if down is not None:
            raise unavailable(*down)

    def store_error(self, exc: StoreUnavailable | StoreBusy, hint: str = "") -> GRPCError:
        """The answer to a call that met a store outage (UNAVAILABLE), or found every Redis
        connection of this process busy for the pool's wait (RESOURCE_EXHAUSTED: load, which
        the client may retry soon; UNAVAILABLE all the same while the monitor finds Redis away).
        Both carry a retry-after."""
        down = self.store_down()
        if isinstance(exc, StoreBusy) and down is None:
            self.busy_refusals += 1
            return retry_later(
                Status.RESOURCE_EXHAUSTED,
                f"orchestrator busy: {exc}; retry after {BUSY_RETRY_SECONDS:g}s{hint}",
                BUSY_RETRY_SECONDS,
            )
        return unavailable(str(exc), down[1] if down else RETRY_AFTER_SECONDS, hint)

    # --- validation -------------------------------------------------------------------------------

    def _new_job(self, req: pb.BatchExecutionRequest) -> BatchJob:
        """The record for a request, or INVALID_ARGUMENT / NOT_FOUND naming the field."""
        c = self._config
        if not req.job_type:
            raise _invalid("job_type", "must not be empty")
        _check_job_type(req.job_type)
        if req.schedule:
            _check_schedule(req.schedule)
        job_id = req.job_id or uuid.uuid4().hex
        _check_id(job_id)
        problem = params_problem(req.params)
        if problem is not None:
            raise _invalid(*problem)
        for name, number in (
            ("timeout_seconds", req.timeout_seconds),
            ("deadline_seconds", req.deadline_seconds),
        ):
            if not math.isfinite(number) or not 0 <= number <= MAX_SECONDS:
                raise _invalid(name, f"must be 0..{MAX_SECONDS} seconds")
        if not 0 <= req.priority <= MAX_PRIORITY:
            raise _invalid("priority", f"must be 0..{MAX_PRIORITY}")
        if req.max_attempts > MAX_ATTEMPTS:
            raise _invalid("max_attempts", f"must be 0..{MAX_ATTEMPTS}")
        now = time.time()
        timeout = req.timeout_seconds or c.default_timeout_seconds
        deadline = req.deadline_seconds or max(c.default_deadline_seconds, timeout)
        return BatchJob(
            job_id=job_id,
            job_type=req.job_type,
            params=dict(req.params),
            timeout_seconds=timeout,
            priority=req.priority,
            deadline_at=now + deadline,
            retry_on_failure=req.retry_on_failure,
            max_attempts=req.max_attempts or c.max_attempts,
            submitted_at=now,
            schedule=req.schedule,
        )

    def _refusal(self, job_type: str, params: dict[str, str]) -> GRPCError | None:
        """NOT_FOUND when live workers are known and none runs this job type; INVALID_ARGUMENT
        naming the field when every live worker that runs it would refuse the params.

        With no live worker at all the job is accepted and waits (backpressure), unchecked. See
        `app.orchestrator.admission` for workers that disagree or do not advertise signatures.
        """
        directory = self._directory
        live = [e for e in directory.entries() if directory.stale_reason(e) is None]
        runners = [directory.shape(e, job_type) for e in live if directory.runs(e, job_type)]
        refusal = admit(job_type, params, live=len(live), runners=runners)
        return None if refusal is None else GRPCError(_STATUS[refusal.kind], refusal.message)

    async def _submit(
        self, req: pb.BatchExecutionRequest, new: BatchJob | None = None
    ) -> tuple[BatchJob, bool]:
        """The job (`new`, or the request's record) as queued now, or the existing one with its
        id (True); the gRPC error that refuses it otherwise."""
        if self.draining:
            raise GRPCError(Status.UNAVAILABLE, "orchestrator is draining; send to another")
        job = new or self._new_job(req)
        refusal = self._refusal(job.job_type, job.params)
        if refusal is not None:
            if req.job_id:
                # the repeat of a request accepted before (unchecked, or by workers since gone)
                # answers its job as any repeat does: one lookup, on refusals only
                existing = await self._store.get(job.job_id)
                if existing is not None and reuse_problem(job, existing) is None:
                    return existing, True
            raise refusal
        bound = self._config.queue_bound_per_type
        # with a free slot here, the submit hands its entry to this orchestrator's dispatcher
        # (and makes its first attempt, when a worker has room at once)
        intake = self._dispatcher.reserve_intake(job)
        deliver_to = "" if intake is None else self._dispatcher.consumer
        try:
            result, existing, queued, delivered = await self._store.submit(
                job, bound=bound, deliver_to=deliver_to,
                dispatched=None if intake is None else intake.dispatched,
            )  # fmt: skip
        except BaseException:
            if intake is not None:
                self._dispatcher.take_delivered(intake, None)
            raise
        if intake is not None:
            self._dispatcher.take_delivered(intake, delivered)
        if result is SubmitResult.QUEUE_FULL:
            raise retry_later(
                Status.RESOURCE_EXHAUSTED,
                f"queue for job type {job.job_type!r} is full ({queued} of {bound});"
                f" retry after {QUEUE_FULL_RETRY_SECONDS:g}s",
                QUEUE_FULL_RETRY_SECONDS,
            )
        if result is SubmitResult.EXISTS:
            assert existing is not None
            problem = reuse_problem(job, existing)
            if problem is not None:
                raise GRPCError(Status.ALREADY_EXISTS, problem)
            return existing, True
        return job, False

    # --- RPCs -------------------------------------------------------------------------------------

    @_store_guarded
    async def submit(self, message: pb.BatchExecutionRequest) -> pb.SubmitResponse:
        """Queue a job and answer at once: its id, its state, and whether the id existed already.

        UNAVAILABLE while draining or while Redis is away (with a retry-after), INVALID_ARGUMENT
        or NOT_FOUND for a bad request (params are checked against the signatures the live
        workers advertise), ALREADY_EXISTS for a known id with another job type or other params,
        RESOURCE_EXHAUSTED when the job type's queue is full or every Redis connection stayed
        busy for `redis.pool_timeout_seconds` (both with a retry-after), and DATA_LOSS when the
        id's existing record does not read.
        """
        with _data_loss():
            job, existing = await self._submit(message)
        return pb.SubmitResponse(
            job_id=job.job_id, state=to_orchestrator_wire(job.state), existing=existing
        )

    @_store_guarded
    async def execute(self, message: pb.BatchExecutionRequest) -> pb.BatchExecutionResponse:
        """Queue a job as `submit` does, then answer with its record once it has ended.

        For an id that exists already (with the same job type and params), it waits for that
        job. Past the job's deadline plus 5 s the record comes back as it is then. A Redis outage
        while waiting answers UNAVAILABLE (every connection busy for the pool's wait:
        RESOURCE_EXHAUSTED): the job goes on, and an Execute with its id waits for it again.
        """
        with _data_loss():
            new = self._new_job(message)
            # subscribed before the job is queued: its end cannot come before the wait, and the
            # writes before it (DISPATCHED, RUNNING) wake nothing and read nothing
            async with self._events.subscribed(new.job_id):
                with self._events.watching_end(new.job_id) as ended:
                    job, _ = await self._submit(message, new)
                    # the dispatcher ends the job at its deadline; wait a little past it
                    deadline = anyio.current_time() + max(0.0, job.deadline_at - time.time()) + 5
                    try:
                        if not job.state.finished:
                            left = deadline - anyio.current_time()
                            with anyio.move_on_after(min(REREAD_SECONDS, left)):
                                await ended.wait()
                        # the record as it ended (or to wait on: an event may have been missed)
                        final = await wait_finished(
                            self._store, self._events, job.job_id, deadline=deadline
                        )
                    except (StoreUnavailable, StoreBusy) as exc:
                        hint = f" (job {job.job_id} goes on: Execute it again to wait for it)"
                        raise self.store_error(exc, hint) from None
        return pb.BatchExecutionResponse(job=job_message(final or job))

    @_store_guarded
    async def get_job(self, message: pb.JobRequest) -> pb.Job:
        """The job's record; INVALID_ARGUMENT for an empty id, NOT_FOUND when there is none,
        DATA_LOSS when it does not read."""
        return job_message(await self._get(message.job_id))

    async def _get(self, job_id: str) -> BatchJob:
        if not job_id:
            raise _invalid("job_id", "must not be empty")
        _check_id(job_id)
        with _data_loss():
            job = await self._store.get(job_id)
        if job is None:
            raise GRPCError(Status.NOT_FOUND, f"no job with id {job_id!r}")
        return job

    @_store_guarded
    async def cancel_job(self, message: pb.JobRequest) -> pb.Job:
        """Cancel the job and answer with its record; a finished one comes back as is.

        The record is the one after the cancel has ended the job, or as it is when the dispatcher
        stops waiting for that (see `Dispatcher.cancel`).
        """
        job = await self._get(message.job_id)
        if job.state.finished:
            return job_message(job)
        with _data_loss():
            after = await self._dispatcher.cancel(job.job_id)
        return job_message(after or job)

    @_store_guarded
    async def list_jobs(self, message: pb.ListJobsRequest) -> pb.ListJobsResponse:
        """Recent jobs, newest first, from the job index: filtered by state, type, schedule and
        submit time; a page ends at `limit` jobs or after a bounded number of index entries.

        INVALID_ARGUMENT naming a bad field, DATA_LOSS when the index is not one (entries and
        records that do not read are skipped, said once and counted).
        """
        query = job_query(message)
        with _data_loss():
            page = await list_jobs(self._store, query)
        return pb.ListJobsResponse(
            jobs=[job_message(job) for job in page.jobs],
            next_page_token=encode_token(page.next) if page.next is not None else "",
            examined=page.examined,
        )

    async def list_workers(self, message: pb.ListWorkersRequest) -> pb.ListWorkersResponse:
        """Every worker of the directory's last refresh, stale ones included.

        Each with whether it gets new work (and why not), its circuit breaker and this
        orchestrator's calls in flight to it.
        """
        workers = []
        for entry in self._directory.entries():
            info = entry.info
            breaker = self._dispatcher.breaker(entry.address).statistics()
            reason = self._dispatcher.eligibility(entry)
            workers.append(
                pb.WorkerInfo(
                    address=entry.address,
                    ip=info.ip,
                    grpc_port=info.grpc_port,
                    pid=info.pid,
                    status=info.status.value,
                    active=info.active,
                    capacity=info.capacity,
                    max_size=info.max_size,
                    queued=info.queued,
                    update_datetime=info.update_datetime,
                    eligible=reason is None,
                    reason=reason or "",
                    breaker_state=breaker.state.value,
                    breaker_consecutive_failures=breaker.consecutive_failures,
                    inflight=self._dispatcher.inflight_to(entry.address),
                    job_names=list(info.job_names),
                )
            )
        return pb.ListWorkersResponse(workers=workers)

    async def watch_job(self, message: pb.JobRequest) -> AsyncIterator[pb.Job]:
        """Stream the job's record now and after each change, until the job has ended.

        The record is read again on each event and at least every 2 s; an unchanged one is not sent
        again. A Redis outage ends the stream with UNAVAILABLE (watch again to go on).
        """
        self.refuse_while_store_down()
        try:
            last = b""
            async with self._events.subscribed(message.job_id):
                while True:
                    # watched from before the read: a change made meanwhile is not missed
                    with self._events.watching(message.job_id) as changed:
                        job = await self._get(message.job_id)
                        if (now := encode_job(job)) != last:
                            last = now
                            yield job_message(job)
                        if job.state.finished:
                            return
                        with anyio.move_on_after(2.0):
                            await changed.wait()
        except (StoreUnavailable, StoreBusy) as exc:
            raise self.store_error(exc) from None
