"""Dispatcher: takes jobs off the stream and sees each through to its end on some worker.

One dispatcher per orchestrator process, all in one consumer group, so they share the stream.
For each job: wait for an eligible worker (backpressure, by priority), take a fresh fencing
token, delegate with SendWork (accept) + RunWork (attach and wait), and write the outcome with
that token. Refused and unreachable calls are retried on another worker with exponential backoff,
full jitter and a retry budget; a circuit breaker per worker keeps calls away from a sick one.

Recovery never waits on a timeout tied to job length:
- a worker that dies breaks its call at once (TCP reset), or, when silent, fails the HTTP/2
  keepalive within seconds, or goes stale in the registry: a watchdog cancels the call;
- an orchestrator that dies leaves its stream entries idle (the live ones refresh theirs with
  XCLAIM), and another claims them with XAUTOCLAIM after `claim_idle_seconds`. A re-dispatch goes
  first to the worker of the unfinished attempt, which attaches to the run by job id.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from app.config import OrchestratorConfig
from app.core.balancer import Candidate, LoadBalancer
from app.core.breaker import BreakerConfig, CircuitBreaker
from app.core.retry import RetryBudget, RetryPolicy
from app.fleet.batch_job import AttemptRecord, BatchJob
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodStatus
from app.orchestrator.directory import WorkerDirectory, WorkerEntry
from app.orchestrator.worker_channels import WorkerChannels
from app.pb import worker as wpb
from app.stores.abc import JobStore, WriteResult

log = logging.getLogger(__name__)

#: Connection-level failures of a call (no answer from the worker).
CALL_ERRORS: tuple[type[Exception], ...] = (
    OSError, ConnectionError, StreamTerminatedError, ProtocolError,
)  # fmt: skip


class CallKind(enum.Enum):
    DONE = "DONE"  # the worker ran the job: its JobInfo says how it ended
    REFUSED = "REFUSED"  # the worker would not take it now (draining, queue full)
    UNREACHABLE = "UNREACHABLE"  # the connection failed or broke
    LOST = "LOST"  # the worker went stale or vanished from the registry during the call
    REJECTED = "REJECTED"  # the request is wrong for this job: retrying cannot help
    DEADLINE = "DEADLINE"  # the job's deadline passed during the call
    SUPERSEDED = "SUPERSEDED"  # another attempt holds a newer fencing token


class CallResult(msgspec.Struct, frozen=True, kw_only=True):
    kind: CallKind
    info: wpb.JobInfo | None = None
    error: str = ""

    @property
    def outcome(self) -> str:
        """What the attempt record says: the run's end on the worker, else how the call went."""
        return self.kind.value if self.info is None else wpb.JobState(self.info.state).name


_REFUSED = {Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED}
_REJECTED = {Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS}

# an attempt whose orchestrator stopped while it ran; the re-dispatch that attaches to it is
# not a new attempt, so it does not count against max_attempts
ORPHANED = "ORPHANED"


def _attempts_made(job: BatchJob) -> int:
    return sum(a.outcome != ORPHANED for a in job.attempts)


class DispatcherStatistics(msgspec.Struct, frozen=True, kw_only=True):
    inflight: int
    waiting_for_worker: int
    dispatched: int
    retries: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    claimed: int
    superseded: int
    retry_budget_refused: int


class Dispatcher:
    """Consumes the job stream and drives each job to a final state."""

    def __init__(
        self,
        store: JobStore,
        directory: WorkerDirectory,
        channels: WorkerChannels,
        balancer: LoadBalancer,
        config: OrchestratorConfig,
        *,
        consumer: str,
        rng: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._directory = directory
        self._channels = channels
        self._balancer = balancer
        self._config = config
        self.consumer = consumer
        self._rng = rng
        self._wall = wall_clock
        self._slots = anyio.CapacityLimiter(config.max_inflight)
        self._slot_freed = anyio.Event()
        self._entries: dict[str, str] = {}  # stream entry id -> job id, ours now
        self._worker_inflight: Counter[str] = Counter()
        self._waiting: Counter[int] = Counter()  # jobs waiting for a worker, by priority
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breaker_config = BreakerConfig(
            failure_threshold=config.breaker_failure_threshold,
            failure_rate=config.breaker_failure_rate,
            min_calls=config.breaker_min_calls,
            window_seconds=config.breaker_window_seconds,
            open_seconds=config.breaker_open_seconds,
        )
        self._budget = RetryBudget(
            ratio=config.retry_budget_ratio,
            window_seconds=config.retry_budget_window_seconds,
            clock=anyio.current_time,
        )
        self._task_group: anyio.abc.TaskGroup | None = None
        self._draining = False
        self._idle = anyio.Event()
        self._counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.consumer} inflight={len(self._entries)}"
            f"/{self._config.max_inflight} waiting={sum(self._waiting.values())}>"
        )

    # --- views ------------------------------------------------------------------------------------

    def breaker(self, address: str) -> CircuitBreaker:
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers[address] = CircuitBreaker(
                self._breaker_config, clock=anyio.current_time
            )
        return breaker

    def inflight_to(self, address: str) -> int:
        return self._worker_inflight[address]

    def eligibility(self, entry: WorkerEntry, job_type: str | None = None) -> str | None:
        """Why this worker gets no new work now (None: it does)."""
        stale = self._directory.stale_reason(entry)
        if stale:
            return f"stale: {stale}"
        if entry.info.status is not PodStatus.IDLE:
            return str(entry.info.status.value)
        if job_type is not None and entry.info.job_names and job_type not in entry.info.job_names:
            return f"does not run {job_type!r}"
        if self._worker_inflight[entry.address] >= max(1, entry.info.max_size):
            return "full with this orchestrator's calls"
        if not self.breaker(entry.address).allows():
            return f"circuit breaker {self.breaker(entry.address).state.value}"
        return None

    def statistics(self) -> DispatcherStatistics:
        c = self._counts
        return DispatcherStatistics(
            inflight=len(self._entries),
            waiting_for_worker=sum(self._waiting.values()),
            dispatched=c["dispatched"],
            retries=c["retries"],
            succeeded=c[JobState.SUCCEEDED.value],
            failed=c[JobState.FAILED.value],
            timed_out=c[JobState.TIMED_OUT.value],
            cancelled=c[JobState.CANCELLED.value],
            claimed=c["claimed"],
            superseded=c["superseded"],
            retry_budget_refused=self._budget.refused,
        )

    # --- the loops --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until drained (or cancelled); jobs in hand are driven in this task group."""
        await self._store.ensure_group()
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._claim_loop)
            tg.start_soon(self._keep_alive_loop)
            task_status.started()
            await self._consume_loop()
            # draining: nothing new is taken; wait for the jobs in hand, then stop the loops
            while self._entries:
                await self._wait_slot_freed()
            tg.cancel_scope.cancel()

    def begin_drain(self) -> None:
        """Take no new entries; the jobs in hand go on (the caller bounds how long)."""
        self._draining = True
        self._slot_freed.set()

    async def _wait_slot_freed(self) -> None:
        with anyio.move_on_after(1.0):
            await self._slot_freed.wait()
        self._slot_freed = anyio.Event()

    async def _consume_loop(self) -> None:
        quiet_errors = False
        while not self._draining:
            free = int(self._slots.available_tokens)
            if free < 1:
                await self._wait_slot_freed()
                continue
            try:
                entries = await self._store.read_new(
                    self.consumer, count=min(free, 64), block_ms=1000
                )
            except Exception as exc:  # Redis away: the jobs wait in the stream meanwhile
                if not quiet_errors:
                    log.warning("cannot read the job stream: %s: %s", type(exc).__name__, exc)
                quiet_errors = True
                await anyio.sleep(1.0)
                continue
            if quiet_errors:
                log.info("job stream readable again")
            quiet_errors = False
            for entry_id, job_id in entries:
                self._take(entry_id, job_id)

    async def _claim_loop(self) -> None:
        idle_ms = int(self._config.claim_idle_seconds * 1000)
        while True:
            await anyio.sleep(self._config.claim_idle_seconds / 2)
            free = int(self._slots.available_tokens)
            if self._draining or free < 1:
                continue
            try:
                claimed = await self._store.claim_idle(
                    self.consumer, min_idle_ms=idle_ms, count=free
                )
            except Exception as exc:
                log.warning("cannot claim idle entries: %s: %s", type(exc).__name__, exc)
                continue
            for entry_id, job_id in claimed:
                if entry_id not in self._entries:
                    log.info("claimed job %s from an orchestrator that stopped", job_id)
                    self._counts["claimed"] += 1
                    self._take(entry_id, job_id)

    async def _keep_alive_loop(self) -> None:
        while True:
            await anyio.sleep(self._config.claim_idle_seconds / 3)
            try:
                await self._store.keep_alive(self.consumer, list(self._entries))
            except Exception as exc:
                log.warning("cannot refresh held entries: %s: %s", type(exc).__name__, exc)

    def _take(self, entry_id: str, job_id: str) -> None:
        assert self._task_group is not None
        self._slots.acquire_on_behalf_of_nowait(entry_id)
        self._entries[entry_id] = job_id
        self._task_group.start_soon(self._handle, entry_id, job_id, name=f"job {job_id}")

    async def _handle(self, entry_id: str, job_id: str) -> None:
        try:
            job = await self._store.get(job_id)
            if job is not None and not job.state.finished:
                await self._drive(job)
                job = await self._store.get(job_id)
            # ended here or elsewhere (or its record expired): the entry is done with; a job
            # taken over by another orchestrator is acked there
            if job is None or job.state.finished:
                await self._store.ack(entry_id)
        except Exception:
            # the entry stays pending; once its idle time passes, some orchestrator claims it
            log.exception("dispatching job %s failed; it will be claimed again", job_id)
        finally:
            self._slots.release_on_behalf_of(entry_id)
            del self._entries[entry_id]
            self._slot_freed.set()

    # --- one job ----------------------------------------------------------------------------------

    async def _drive(self, job: BatchJob) -> None:
        """Attempts until the job ends, or until another orchestrator holds a newer token."""
        policy = RetryPolicy(
            max_attempts=job.max_attempts,
            base_seconds=self._config.retry_base_seconds,
            max_seconds=self._config.retry_max_seconds,
        )
        token = await self._store.fence(job.job_id)
        excluded: set[str] = set()
        last_error = ""
        sticky: str | None = None
        if job.attempts and not job.attempts[-1].outcome:
            # its orchestrator stopped during this attempt: the worker may still run the job
            sticky = job.attempts[-1].worker
            job.attempts[-1].outcome = ORPHANED
        else:
            self._budget.record_call()
        while True:
            if await self._store.cancel_requested(job.job_id):
                await self._finish(job, token, JobState.CANCELLED, error="cancelled by request")
                return
            if self._wall() >= job.deadline_at:
                why = last_error or "no eligible worker took it"
                await self._finish(job, token, JobState.TIMED_OUT, error=f"deadline passed: {why}")
                return
            made = _attempts_made(job)
            if sticky is None and made >= job.max_attempts:
                error = f"gave up after {made} attempts: {last_error}"
                await self._finish(job, token, JobState.FAILED, error=error)
                return
            if sticky is None and made > 0 and not await self._back_off(job, policy, made + 1):
                continue  # deadline or cancel: the checks above end it
            address = await self._pick(job, excluded, sticky)
            sticky = None
            if address is None:
                continue
            token = await self._store.next_token(job.job_id)
            attempt = AttemptRecord(
                number=len(job.attempts) + 1,
                worker=address,
                fencing_token=token,
                started_at=self._wall(),
            )
            job.attempts.append(attempt)
            job.state = JobState.DISPATCHED
            if (written := await self._store.write(job, token)) is not WriteResult.WRITTEN:
                log.info("job %s: not dispatched, the record is %s", job.job_id, written.name)
                self.breaker(address).release()
                return
            self._counts["dispatched"] += 1
            result = await self._call(job, address, token)
            attempt.finished_at = self._wall()
            attempt.outcome = result.outcome
            attempt.error = result.error or (result.info.error if result.info else "")
            if result.kind is CallKind.SUPERSEDED:
                self._counts["superseded"] += 1
                log.info("job %s: attempt %d superseded by a newer one", job.job_id, attempt.number)
                return
            if result.kind is CallKind.DEADLINE:
                await self._finish(job, token, JobState.TIMED_OUT, error=result.error)
                return
            if result.kind is CallKind.REJECTED:
                await self._finish(job, token, JobState.FAILED, error=result.error)
                return
            if result.kind is CallKind.DONE and result.info is not None:
                done = await self._done(job, token, result.info)
                if done:
                    return
            # retry: elsewhere if anywhere else
            last_error = f"{attempt.outcome} on {address}: {result.error}".rstrip(": ")
            excluded.add(address)
            job.state = JobState.PENDING
            if (written := await self._store.write(job, token)) is not WriteResult.WRITTEN:
                log.info("job %s: not retried, the record is %s", job.job_id, written.name)
                return
            log.info("job %s: attempt %d %s; retrying", job.job_id, attempt.number, last_error)
            self._counts["retries"] += 1

    async def _done(self, job: BatchJob, token: int, info: wpb.JobInfo) -> bool:
        """Record a run that ended on the worker; False when it should be retried."""
        state = wpb.JobState(info.state)
        if state is wpb.JobState.SUCCEEDED:
            await self._finish(job, token, JobState.SUCCEEDED, result_json=info.result_json)
            return True
        if state is wpb.JobState.TIMED_OUT:
            await self._finish(job, token, JobState.TIMED_OUT, error=info.error)
            return True
        if state is wpb.JobState.CANCELLED:
            if await self._store.cancel_requested(job.job_id):
                await self._finish(job, token, JobState.CANCELLED, error=info.error)
                return True
            return False  # the worker shut down under it: run it elsewhere
        if state is wpb.JobState.FAILED:
            made = _attempts_made(job)
            if job.retry_on_failure and made < job.max_attempts:
                return False
            await self._finish(job, token, JobState.FAILED, error=info.error)
            return True
        await self._finish(job, token, JobState.FAILED, error=f"worker answered {state.name}")
        return True

    async def _back_off(self, job: BatchJob, policy: RetryPolicy, attempt: int) -> bool:
        """Sleep before a retry, and wait for the retry budget; False if the deadline came first."""
        delay = policy.delay(attempt, self._rng)
        while True:
            left = job.deadline_at - self._wall()
            if left <= 0:
                return False
            await anyio.sleep(min(delay, left))
            if self._budget.try_spend():
                return True
            # the fleet is sick: wait a full ceiling before asking again, instead of piling on
            delay = policy.ceiling(policy.max_attempts + 1)

    async def _pick(self, job: BatchJob, excluded: set[str], sticky: str | None) -> str | None:
        """A worker for the job, waiting for one (backpressure); None on deadline or cancel."""
        self._waiting[job.priority] += 1
        try:
            while self._wall() < job.deadline_at:
                if sticky is not None:
                    entry = self._directory.get(sticky)
                    if (
                        self._directory.stale_reason(entry) is None
                        and self.breaker(sticky).try_acquire()
                    ):
                        return sticky
                    sticky = None
                ahead = max((p for p, n in self._waiting.items() if n), default=job.priority)
                if ahead <= job.priority:
                    address = self._choose(job.job_type, excluded)
                    if address is not None:
                        return address
                if await self._store.cancel_requested(job.job_id):
                    return None
                with anyio.move_on_after(min(1.0, max(0.0, job.deadline_at - self._wall()))):
                    await self._directory.wait_refreshed()
            return None
        finally:
            self._waiting[job.priority] -= 1

    def _choose(self, job_type: str, excluded: set[str]) -> str | None:
        eligible = [e for e in self._directory.entries() if self.eligibility(e, job_type) is None]
        others = [e for e in eligible if e.address not in excluded]
        candidates = [
            Candidate(
                address=e.address,
                active=e.info.active,
                queued=e.info.queued,
                capacity=e.info.max_size,
                inflight=self._worker_inflight[e.address],
            )
            for e in (others or eligible)
        ]
        while candidates:
            choice = self._balancer.choose(candidates)
            assert choice is not None
            if self.breaker(choice.address).try_acquire():
                return choice.address
            candidates.remove(choice)
        return None

    async def _call(self, job: BatchJob, address: str, token: int) -> CallResult:
        """SendWork + RunWork on one worker, watched; the breaker hears how it went."""
        breaker = self.breaker(address)
        stub = wpb.WorkerServiceStub(self._channels.get(address))
        request = wpb.SendWorkReq(
            id=job.job_id,
            name=job.job_type,
            params=dict(job.params),
            timeout_seconds=job.timeout_seconds,
        )
        lost: list[str] = []
        results: list[CallResult] = []
        result: CallResult | None = None
        self._worker_inflight[address] += 1
        try:
            with anyio.move_on_after(max(0.0, job.deadline_at - self._wall())) as deadline:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_worker, address, lost, tg.cancel_scope)
                    # its own task: on a lost connection grpclib cancels the calling task
                    # natively and never uncancels it, which would poison this task's scopes
                    tg.start_soon(
                        self._guarded_call, job, stub, request, token, results, tg.cancel_scope
                    )
            if deadline.cancelled_caught:
                result = CallResult(kind=CallKind.DEADLINE, error="deadline passed while running")
                self._cancel_on_worker_soon(address, job.job_id)
            elif lost:
                self._channels.drop(address)
                result = CallResult(kind=CallKind.LOST, error=f"worker lost: {lost[0]}")
            else:
                result = results[0]
                if result.kind is CallKind.UNREACHABLE:
                    self._channels.drop(address)
        finally:
            self._worker_inflight[address] -= 1
        assert result is not None
        if result.kind in (CallKind.UNREACHABLE, CallKind.LOST):
            breaker.record_failure()
        elif result.kind in (CallKind.DONE, CallKind.REJECTED):
            breaker.record_success()
        else:
            breaker.release()
        return result

    async def _guarded_call(
        self,
        job: BatchJob,
        stub: wpb.WorkerServiceStub,
        request: wpb.SendWorkReq,
        token: int,
        results: list[CallResult],
        scope: anyio.CancelScope,
    ) -> None:
        """Make the call, classify how it went into `results`, then stop the watchdog."""
        try:
            results.append(await self._send_and_wait(job, stub, request, token))
        except GRPCError as exc:
            kind = (
                CallKind.REFUSED if exc.status in _REFUSED
                else CallKind.REJECTED if exc.status in _REJECTED
                else CallKind.UNREACHABLE
            )  # fmt: skip
            results.append(CallResult(kind=kind, error=f"{exc.status.name}: {exc.message}"))
        except Exception as exc:
            # CALL_ERRORS, and grpclib's own races around a connection that closes while it
            # opens a stream (an AttributeError on the dropped transport): no answer either way
            if not isinstance(exc, CALL_ERRORS):
                log.debug("call to a worker failed oddly", exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
            results.append(CallResult(kind=CallKind.UNREACHABLE, error=error))
        scope.cancel()

    async def _send_and_wait(
        self, job: BatchJob, stub: wpb.WorkerServiceStub, request: wpb.SendWorkReq, token: int
    ) -> CallResult:
        try:
            accepted = await stub.send_work(request)
            running = accepted.state == wpb.JobState.RUNNING
        except GRPCError as exc:
            if exc.status is not Status.ALREADY_EXISTS:
                raise
            running = True  # the worker runs this id already (a re-dispatch): attach to it
        if running:
            job.state = JobState.RUNNING
            if await self._store.write(job, token) is not WriteResult.WRITTEN:
                return CallResult(kind=CallKind.SUPERSEDED, error="superseded")
        info = await stub.run_work(request)
        return CallResult(kind=CallKind.DONE, info=info)

    async def _watch_worker(self, address: str, lost: list[str], scope: anyio.CancelScope) -> None:
        """Cancel the call when the worker goes stale or disappears from the registry."""
        while True:
            await self._directory.wait_refreshed()
            reason = self._directory.stale_reason(self._directory.get(address))
            if reason is not None:
                lost.append(reason)
                scope.cancel()
                return

    def _cancel_on_worker_soon(self, address: str, job_id: str) -> None:
        """Best effort: stop a run whose deadline passed, so that it frees its worker."""
        if self._task_group is not None:
            self._task_group.start_soon(cancel_on_worker, self._channels, address, job_id)

    async def _finish(
        self,
        job: BatchJob,
        token: int,
        state: JobState,
        *,
        result_json: str = "",
        error: str = "",
    ) -> None:
        job.state, job.result_json, job.error = state, result_json, error
        job.finished_at = self._wall()
        written = await self._store.write(job, token)
        if written is WriteResult.WRITTEN:
            self._counts[state.value] += 1
            log.info("job %s (%s) %s after %d attempt(s)%s", job.job_id, job.job_type, state.value,
                     len(job.attempts), f": {error}" if error else "")  # fmt: skip
        elif written is WriteResult.SUPERSEDED:
            self._counts["superseded"] += 1
            log.warning(
                "job %s: result of superseded attempt (token %d) refused", job.job_id, token
            )


async def cancel_on_worker(channels: WorkerChannels, address: str, job_id: str) -> bool:
    """Ask a worker to cancel a job; True when it answered (whatever the job's state)."""
    stub = wpb.WorkerServiceStub(channels.get(address))
    answered: list[bool] = []

    async def call() -> None:
        try:
            await stub.cancel_job(wpb.JobRef(id=job_id))
            answered.append(True)
        except (GRPCError, *CALL_ERRORS):  # type: ignore[misc]
            pass

    with anyio.move_on_after(5):
        # its own task, as in Dispatcher._call: a lost connection cancels it natively
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
    return bool(answered)
