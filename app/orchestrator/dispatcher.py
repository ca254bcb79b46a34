"""Dispatcher: takes jobs off the queue and sees each through to its end on some worker.

One dispatcher per orchestrator process, all in one consumer group, so they share the queue.
For each job it gathers the facts and asks `app.orchestrator.decisions.decide()` for the next
step (dispatch, requeue, finish, stop), then performs it: wait for an eligible worker
(backpressure, by priority), take a fresh fencing token, delegate (one RunWork call: the worker
starts the run and answers at its end; RUNNING is recorded beside it once the run goes on),
and write the outcome with that token. Refused and unreachable calls are retried on another
worker with exponential backoff, full jitter and a retry budget; a circuit breaker per worker
keeps calls away from a sick one.

Recovery never waits on a timeout tied to job length:
- a worker that dies breaks its call at once (TCP reset), or, when silent, fails the HTTP/2
  keepalive within seconds, or goes stale in the registry: a watchdog cancels the call;
- an orchestrator that dies leaves its queue entries idle (the live ones refresh theirs), and
  another claims them after `claim_idle_seconds`. A re-dispatch goes first to the worker of
  the unfinished attempt, which attaches to the run by job id.

Cancel goes through `Dispatcher.cancel`: the store ends a PENDING job at once (fenced); a job on
a worker is stopped there by whichever dispatcher holds it, woken by the job's events.

Redis faults: a job in hand waits out an outage where it is (`PatientJobStore`), instead of being
given up and run again by whoever claims it (a call refused because this process's connections
were all busy is made again quietly: load, not an outage, and never a worker's fault); claims
pause until keep-alives have had a chance after an outage. When Redis lost its data (the
consumer group is gone, NOGROUP), the group is made again, said once and counted; a job whose
record vanished ends here, logged once and noted for `jobworker lost`, instead of looping. When
Redis went back in time (lost its last writes), a holder whose fence fell below its token
restores it, and for a while a job about to run with no attempt on record first asks the
workers whether one of them has it already.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

import anyio
import anyio.abc
import msgspec

from app.config import OrchestratorConfig
from app.core.balancer import Candidate, LoadBalancer
from app.core.breaker import BreakerConfig, CircuitBreaker
from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.log_context import bind_log_fields, unbind_log_fields
from app.core.outage import Outage
from app.core.retry import RetryBudget, RetryPolicy
from app.core.waiting_line import WaitingLine
from app.errors import BadDataKind, CorruptRecord, QueueGone, StoreBusy
from app.fleet.batch_job import AttemptRecord, BatchJob, LostJob
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodStatus
from app.orchestrator.admission import willing
from app.orchestrator.decisions import (
    ORPHANED,
    QUEUE_FULL,
    CallKind,
    CallResult,
    Dispatch,
    Finish,
    Requeue,
    RunSighting,
    Stop,
    adopt,
    cancel_matters,
    decide,
    sight_run,
)
from app.orchestrator.directory import WorkerDirectory, WorkerEntry
from app.orchestrator.worker_client import Completion, Reply, WorkerClient
from app.stores.abc import Delivered, JobEvents, JobStore, Taken, WriteResult
from app.stores.patient import MAX_DELAY as PATIENCE_MAX_DELAY
from app.stores.patient import PatientJobStore
from app.stores.waits import wait_finished

log = logging.getLogger(__name__)

#: How long `cancel` waits for the job's end before it answers with the record as it is.
CANCEL_WAIT_SECONDS = 10.0
#: How often an orchestrator sweeps stopped consumers out of the group (and the least idle
#: time, with six claim periods, that one must have been silent).
CONSUMER_SWEEP_SECONDS = 60.0
#: While a call runs, a cancel request is looked for at least this often (events may be missed).
CANCEL_CHECK_SECONDS = 2.0
#: A lost consumer group noticed again within this many seconds is not said again.
_QUEUE_GONE_QUIET_SECONDS = 10.0
_CALL_KIND = {
    Reply.REFUSED: CallKind.REFUSED,
    Reply.REJECTED: CallKind.REJECTED,
    Reply.UNREACHABLE: CallKind.UNREACHABLE,
}


class DispatcherStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the dispatcher for status and metrics."""

    state: Lifecycle
    inflight: int
    waiting_for_worker: int
    dispatched: int
    retries: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    claimed: int
    recovered: int
    superseded: int
    followed: int
    consumers_removed: int
    retry_budget_refused: int
    queue_recreated: int
    lost: int
    fences_restored: int
    found_on_worker: int
    copies_out_of_date: int  # fresh entries' copies refused at the first write: taken again
    taken_on_submit: int  # jobs delivered by their submit here, not read from the queue
    dispatched_on_submit: int  # of those, jobs whose first attempt their submit made
    store_waits: int
    store_busy: int


class Intake(msgspec.Struct, frozen=True):
    """What `Dispatcher.reserve_intake` holds for a job being submitted here: a slot, and maybe
    a worker's room, with the job as its first attempt there makes it (`dispatched`: the worker
    is that attempt's)."""

    reservation: object
    dispatched: BatchJob | None = None


class Dispatcher:
    """Consumes the job queue and drives each job to a final state."""

    def __init__(
        self,
        store: JobStore,
        events: JobEvents,
        directory: WorkerDirectory,
        client: WorkerClient,
        balancer: LoadBalancer,
        config: OrchestratorConfig,
        *,
        consumer: str,
        rng: Callable[[], float] = random.random,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        # calls that answer a client (cancel) fail fast; the jobs in hand wait out an outage
        self._direct = store
        self._store = PatientJobStore(
            store,
            outage=Outage(
                "the job store", log=log, clock=self._clock, max_delay=PATIENCE_MAX_DELAY,
                meanwhile="jobs in hand wait where they are, queued ones in the queue",
            ),
        )  # fmt: skip
        self._events = events
        self._directory = directory
        self._client = client
        self._balancer = balancer
        self._config = config
        self.consumer = consumer
        self._rng = rng
        self._slots = anyio.CapacityLimiter(config.max_inflight)
        # slots promised to a read or a claim of the queue under way (its entries take them as
        # they come): a submit's reservation leaves them be
        self._promised = 0
        self._slot_freed = anyio.Event()
        # the jobs waiting for a worker (by job type): a call's end wakes the first that its
        # worker runs, a directory refresh all of them; they look again at once, not at their
        # next timer
        self._line: WaitingLine[str] = WaitingLine()
        self._entries: dict[str, str] = {}  # queue entry id -> job id, ours now
        self._worker_inflight: Counter[str] = Counter()
        self._queue_share: dict[str, int] = {}  # by worker: see `room`
        self._waiting: Counter[int] = Counter()  # jobs waiting for a worker, by priority
        self._breakers: dict[str, CircuitBreaker] = {}
        # per worker: when it was last probed directly, and whether it answered
        self._probes: dict[str, tuple[float, bool]] = {}
        self._next_consumer_sweep = 0.0  # monotonic
        self._cut_off: set[str] = set()  # stale workers that answer: said once each
        # SendWork answers at once; one that does not within a keepalive's time is unreachable
        self._admit_timeout = config.keepalive_seconds + config.keepalive_timeout_seconds
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
            clock=self._clock,
        )
        self._task_group: anyio.abc.TaskGroup | None = None
        self._state = Lifecycle.CREATED
        self._counts: Counter[str] = Counter()
        self._queue_lock = anyio.Lock()
        self._queue_said_at = -_QUEUE_GONE_QUIET_SECONDS
        self._data_losses = 0  # the store lost its data this many times (jobs re-check records)
        self._losses_at_take: dict[str, int] = {}  # job id -> data losses when it was taken
        self._careful_until = -math.inf  # loop time: ask the workers before a first dispatch
        # the job queue's outages (reads, claims, keep-alives): one line when it goes, one back
        self._queue_outage = Outage(
            "the job queue", log=log, clock=self._clock, min_delay=0.5,
            meanwhile="its jobs wait there",
        )  # fmt: skip

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Dispatcher {self.consumer} {s.state.value} inflight={s.inflight}"
            f"/{self._config.max_inflight} waiting={s.waiting_for_worker}"
            f" dispatched={s.dispatched} retries={s.retries} succeeded={s.succeeded}>"
        )

    # --- views ------------------------------------------------------------------------------------

    @property
    def state(self) -> Lifecycle:
        """Where the dispatcher is in its lifecycle."""
        return self._state

    def breaker(self, address: str) -> CircuitBreaker:
        """The circuit breaker of the worker at `address` (made on first use)."""
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers[address] = CircuitBreaker(
                self._breaker_config, clock=self._clock
            )
        return breaker

    def inflight_to(self, address: str) -> int:
        """This dispatcher's calls in flight to the worker at `address`."""
        return self._worker_inflight[address]

    def room(self, entry: WorkerEntry) -> int:
        """How many calls this dispatcher may have in flight to the worker: what it admits
        (`max_size` running, `queue_capacity` queued: short jobs go faster with some queued
        there), less what other orchestrators took of its queue as this one learnt from its
        refusals (`_queue_share`: halved at a queue-full refusal, one more at each run that ends
        there, so that several orchestrators share a worker without refusals becoming the rule).
        """
        running = max(1, entry.info.max_size)
        queue = entry.info.queue_capacity
        return running + min(queue, self._queue_share.get(entry.address, queue))

    def _learn_room(self, address: str, result: CallResult) -> None:
        entry = self._directory.get(address)
        if entry is None:
            return
        queue = entry.info.queue_capacity
        share = self._queue_share.get(address, queue)
        if result.kind is CallKind.REFUSED and result.error.startswith(QUEUE_FULL):
            self._queue_share[address] = share // 2
        elif result.kind is CallKind.DONE and share < queue:
            self._queue_share[address] = share + 1

    def eligibility(self, entry: WorkerEntry, job_type: str | None = None) -> str | None:
        """Why this worker gets no new work now (None: it does)."""
        stale = self._directory.stale_reason(entry)
        if stale:
            return f"stale: {stale}"
        if entry.info.status is not PodStatus.IDLE:
            return str(entry.info.status.value)
        if job_type is not None and entry.info.job_names and job_type not in entry.info.job_names:
            return f"does not run {job_type!r}"
        if self._worker_inflight[entry.address] >= self.room(entry):
            return "full with this orchestrator's calls"
        if not self.breaker(entry.address).allows():
            return f"circuit breaker {self.breaker(entry.address).state.value}"
        return None

    def statistics(self) -> DispatcherStatistics:
        """Counters since start, and what is in hand now."""
        c = self._counts
        return DispatcherStatistics(
            state=self._state,
            inflight=len(self._entries),
            waiting_for_worker=sum(self._waiting.values()),
            dispatched=c["dispatched"],
            retries=c["retries"],
            succeeded=c[JobState.SUCCEEDED.value],
            failed=c[JobState.FAILED.value],
            timed_out=c[JobState.TIMED_OUT.value],
            cancelled=c[JobState.CANCELLED.value],
            claimed=c["claimed"],
            recovered=c["recovered_outcomes"],
            superseded=c["superseded"],
            followed=c["followed"],
            consumers_removed=c["consumers_removed"],
            retry_budget_refused=self._budget.refused,
            queue_recreated=c["queue_recreated"],
            lost=c["lost"],
            fences_restored=c["fences_restored"],
            found_on_worker=c["found_on_worker"],
            copies_out_of_date=c["copies_out_of_date"],
            taken_on_submit=c["taken_on_submit"],
            dispatched_on_submit=c["dispatched_on_submit"],
            store_waits=self._store.waits,
            store_busy=self._store.busy + c["store_busy"],
        )

    # --- cancel -----------------------------------------------------------------------------------

    async def cancel(
        self, job_id: str, *, wait_seconds: float = CANCEL_WAIT_SECONDS
    ) -> BatchJob | None:
        """Cancel a job wherever it is: the record once it has ended, or as it is after
        `wait_seconds`; None when there is no such job.

        A PENDING job ends here (the store fences out its holder); a job on a worker is stopped
        there by the dispatcher that holds it, which records the end.
        """
        after = await self._direct.request_cancel(
            job_id, error="cancelled by request", now=self._clock.timestamp()
        )
        if after is None or after.state.finished:
            return after
        deadline = anyio.current_time() + wait_seconds
        return await wait_finished(self._direct, self._events, job_id, deadline=deadline)

    async def data_lost(self) -> None:
        """The store lost its data (its epoch marker changed): make the queue's group again now,
        and have the jobs waiting for a worker look whether their records are still there."""
        await self._recreate_queue()

    async def went_back_in_time(self) -> None:
        """Redis lost its last writes: a job may have run, or still run, with no trace of it
        in Redis. Until the entries its holders let go of have been claimed, a job about to run
        with no attempt on record first asks the workers, and goes to one that has it."""
        self._careful_until = anyio.current_time() + 2 * self._config.claim_idle_seconds + 5.0

    async def _worker_with_run(self, job_id: str) -> str | None:
        """A live worker that has a run of the job (asked all at once, each bounded), or None."""
        found: list[str] = []

        async def ask(address: str) -> None:
            if await self._client.knows(address, job_id):
                found.append(address)

        async with anyio.create_task_group() as tg:
            for entry in self._directory.entries():
                if self._directory.stale_reason(entry) is None:
                    tg.start_soon(ask, entry.address)
        if not found:
            return None
        self._counts["found_on_worker"] += 1
        log.info("job %s: Redis had no trace of it, but worker %s has it: going there",
                 job_id, found[0])  # fmt: skip
        return found[0]

    async def _recreate_queue(self) -> None:
        """The consumer group is gone (NOGROUP): make it again; said once, and counted."""
        async with self._queue_lock:
            created = await self._store.ensure_group()
            self._data_losses += 1
            now = self._clock.monotonic()
            if now - self._queue_said_at < _QUEUE_GONE_QUIET_SECONDS:
                return  # another of our loops found it gone a moment ago
            self._queue_said_at = now
            self._counts["queue_recreated"] += 1
        log.warning(
            "the job queue's consumer group was gone (Redis lost its data?): %s; jobs in hand"
            " whose records are gone end here and are noted for `jobworker lost`",
            "recreated it" if created else "another orchestrator has recreated it",
        )

    # --- the loops --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until drained (or cancelled); ready once the queue's group exists.

        Jobs in hand are driven in this task group; after `begin_drain` it returns once they
        have ended (the caller bounds how long).
        """
        try:
            await self._store.ensure_group()
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                if self._state is Lifecycle.CREATED:
                    self._state = Lifecycle.RUNNING
                tg.start_soon(self._claim_loop)
                tg.start_soon(self._keep_alive_loop)
                tg.start_soon(self._forward_refreshes)
                task_status.started()
                await self._consume_loop()
                # draining: nothing new is taken; wait for the jobs in hand, then stop the loops
                while self._entries:
                    await self._wait_slot_freed()
                tg.cancel_scope.cancel()
        finally:
            self._state = Lifecycle.STOPPED
            self._task_group = None

    def begin_drain(self) -> None:
        """Take no new entries; the jobs in hand go on (the caller bounds how long)."""
        if self._state is not Lifecycle.STOPPED:
            self._state = Lifecycle.DRAINING
        self._slot_freed.set()

    @property
    def _draining(self) -> bool:
        return self._state is not Lifecycle.RUNNING

    async def _forward_refreshes(self) -> None:
        """Each directory refresh may bring a worker (or room on one): wake the waiting jobs."""
        while True:
            await self._directory.wait_refreshed()
            self._line.wake_all()

    def _room_freed(self, address: str) -> None:
        """Room on that worker: wake the first job in line that it runs."""
        entry = self._directory.get(address)
        if entry is not None:
            self._line.wake_first(lambda job_type: self._directory.runs(entry, job_type))

    async def _wait_slot_freed(self) -> None:
        with anyio.move_on_after(1.0):
            await self._slot_freed.wait()
        self._slot_freed = anyio.Event()

    def _free_slots(self) -> int:
        return int(self._slots.available_tokens) - self._promised

    @contextlib.contextmanager
    def _promising(self, slots: int) -> Iterator[None]:
        """Slots promised to the read or claim of the queue inside (see `_promised`)."""
        self._promised += slots
        try:
            yield
        finally:
            self._promised -= slots

    async def _consume_loop(self) -> None:
        while not self._draining:
            free = self._free_slots()
            if free < 1:
                await self._wait_slot_freed()
                continue
            # half the free slots at most: the blocked read mostly waits, and the submits taken
            # here meanwhile need the others
            count = min(max(1, free // 2), 64)
            try:
                with self._promising(count):
                    entries = await self._store.read_new(self.consumer, count=count, block_ms=1000)
            except QueueGone:
                await self._recreate_queue()
                continue
            except Exception as exc:  # Redis away: the jobs wait in the queue meanwhile
                await anyio.sleep(self._queue_outage.failed(exc))
                continue
            self._queue_outage.succeeded()
            for entry_id, job_id in entries:
                self._take(entry_id, job_id)

    async def _claim_loop(self) -> None:
        idle_ms = int(self._config.claim_idle_seconds * 1000)
        while True:
            await anyio.sleep(self._config.claim_idle_seconds / 2)
            self._prune()
            free = self._free_slots()
            if self._draining or free < 1:
                continue
            # after an outage every entry looks idle, live holders' too: give their keep-alives
            # a claim period (and a retry) to refresh them first
            if self._store.unavailable_within(self._config.claim_idle_seconds + 1.0):
                continue
            try:
                with self._promising(free):
                    claimed = await self._store.claim_idle(
                        self.consumer, min_idle_ms=idle_ms, count=free
                    )
            except QueueGone:
                await self._recreate_queue()
                continue
            except Exception as exc:
                self._queue_outage.failed(exc)
                continue
            for entry_id, job_id in claimed:
                if entry_id not in self._entries:
                    log.info("claimed job %s from an orchestrator that stopped", job_id,
                             extra={"job_id": job_id})  # fmt: skip
                    self._counts["claimed"] += 1
                    self._take(entry_id, job_id)
            await self._remove_stopped_consumers()

    async def _remove_stopped_consumers(self) -> None:
        """Now and then: drop the group's consumers that stopped (their entries claimed, idle
        for long), so that orchestrators coming and going do not grow the group for good."""
        now = self._clock.monotonic()
        if now < self._next_consumer_sweep:
            return
        self._next_consumer_sweep = now + CONSUMER_SWEEP_SECONDS
        idle_ms = int(max(CONSUMER_SWEEP_SECONDS, 6 * self._config.claim_idle_seconds) * 1000)
        try:
            removed = await self._store.remove_idle_consumers(
                min_idle_ms=idle_ms, keep=self.consumer
            )
        except StoreBusy:
            self._counts["store_busy"] += 1  # load, not an outage: swept next time
            return
        except Exception as exc:
            self._queue_outage.failed(exc)
            return
        if removed:
            self._counts["consumers_removed"] += len(removed)
            names = ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else "")
            log.info("removed %d stopped orchestrator(s) from the job queue's group: %s",
                     len(removed), names)  # fmt: skip

    async def _keep_alive_loop(self) -> None:
        while True:
            await anyio.sleep(self._config.claim_idle_seconds / 3)
            try:
                await self._store.keep_alive(self.consumer, list(self._entries))
            except QueueGone:
                await self._recreate_queue()
            except Exception as exc:
                self._queue_outage.failed(exc)

    def _prune(self) -> None:
        """Forget what is kept per worker (breakers, probes) for workers that left the registry
        and have no call in flight: workers come and go, each under a new address in k8s."""
        known = {e.address for e in self._directory.entries()}
        for table in (self._breakers, self._probes, self._queue_share):
            for address in [a for a in table if a not in known and not self._worker_inflight[a]]:
                del table[address]
        self._cut_off &= known
        for address in [a for a, n in self._worker_inflight.items() if not n]:
            del self._worker_inflight[address]

    def reserve_intake(self, job: BatchJob) -> Intake | None:
        """A slot for `job`, submitted through this orchestrator, whose submit may deliver its
        queue entry here (`take_delivered`): the job is then driven without a read of the queue
        (a round trip, and a wake of the blocked read, less). And when a worker has room for it
        at once (nobody waits for one), that worker's room: the submit may make the first
        attempt too (`Intake.dispatched`), saving the DISPATCHED write. None when no job is
        taken now (draining, not running, every slot in use): the queue's readers take it."""
        if self._draining or self._task_group is None or self._free_slots() < 1:
            return None
        reservation = object()
        self._slots.acquire_on_behalf_of_nowait(reservation)
        if any(self._waiting.values()) or anyio.current_time() < self._careful_until:
            return Intake(reservation)  # others wait for a worker, or they must be asked first
        address = self._choose(job, frozenset())
        if address is None:
            return Intake(reservation)
        self._worker_inflight[address] += 1  # its room, as a dispatch takes it
        first = AttemptRecord(
            number=1, worker=address, fencing_token=1, started_at=self._clock.timestamp()
        )
        dispatched = msgspec.structs.replace(
            job, state=JobState.DISPATCHED, fencing_token=1, attempts=[first]
        )
        return Intake(reservation, dispatched)

    def take_delivered(self, intake: Intake, delivered: Delivered | None) -> None:
        """The reserved slot goes to the entry the submit delivered (None: back to the pool),
        and the worker's room to its first attempt when the submit made it (else back). An
        entry this dispatcher cannot take any more stays pending for it: the claim loops (this
        one's or another orchestrator's) take it once idle, as after a stop, and find its
        attempt (the worker attaches to the run)."""
        self._slots.release_on_behalf_of(intake.reservation)
        running = self._task_group is not None
        first = intake.dispatched
        if first is not None and not (running and delivered is not None and delivered.dispatched):
            self._give_back(first.attempts[-1].worker)
            first = None
        if delivered is None or not running:
            self._slot_freed.set()
            return
        self._counts["taken_on_submit"] += 1
        if first is not None:
            self._counts["dispatched_on_submit"] += 1
        self._take(delivered.entry_id, delivered.job_id, first_attempt=first)

    def _take(self, entry_id: str, job_id: str, *, first_attempt: BatchJob | None = None) -> None:
        assert self._task_group is not None
        if entry_id in self._entries:
            return  # ours already: Redis went back in time and delivered it again
        self._slots.acquire_on_behalf_of_nowait(entry_id)
        self._entries[entry_id] = job_id
        self._task_group.start_soon(self._handle, entry_id, job_id, first_attempt,
                                    name=f"job {job_id}")  # fmt: skip

    async def _handle(
        self, entry_id: str, job_id: str, first_attempt: BatchJob | None = None
    ) -> None:
        # this task's own context: every line it logs is the job's
        bind_log_fields(job_id=job_id)
        self._losses_at_take[job_id] = self._data_losses
        dispatched = first_attempt is not None
        try:
            if first_attempt is not None:
                # made by its submit's script: DISPATCHED under token 1, that worker's room taken
                taken: Taken | None = Taken(job=first_attempt, fence=1, cancel_requested=False)
            else:
                taken = await self._store.take(job_id)
            while True:
                if taken is None and not await self._store.holds_entry(entry_id):
                    # the entry went with the record after we read it (Redis restarted, or lost
                    # its last second, in between): a job Redis forgot, not junk
                    await self._lost(job_id, None)
                    return
                if taken is None:
                    # never a job's, or kept past its record's retention: nothing to drive
                    where, why = f"queue entry {entry_id}", f"no record of job {job_id!r}"
                    no_record = CorruptRecord(BadDataKind.STREAM_ENTRY, job_id, where, why)
                    await self._set_aside(entry_id, no_record)
                    return
                held = taken.job
                job: BatchJob | None = held
                if held.state.finished:
                    break
                try:
                    first, dispatched = dispatched, False  # a job taken again starts afresh
                    if await self._drive(held, entry_id, taken.fence, taken.cancel_requested,
                                         expect=taken.unverified, dispatched=first):  # fmt: skip
                        return  # ended here, and its entry acked by the same write
                except _CopyOutOfDate:
                    # the fresh entry's copy was not the record any more (a cancel, a Redis
                    # that lost or went back): take it from the store, as any other
                    self._counts["copies_out_of_date"] += 1
                    taken = await self._store.take(job_id)
                    continue
                job = await self._store.get(job_id)
                break
            if job is None:  # the record vanished: Redis lost it (an entry outlives no record)
                await self._lost(job_id, held)
            # ended here or elsewhere (or lost): the entry is done with; a job taken over by
            # another orchestrator is acked there
            if job is None or job.state.finished:
                await self._store.ack(entry_id)
        except Exception as exc:
            if (corrupt := _corrupt(exc)) is not None:
                await self._set_aside(entry_id, corrupt)
            else:
                # the entry stays pending; once its idle time passes, some orchestrator claims it
                log.exception("dispatching job %s failed; it will be claimed again", job_id)
        finally:
            self._losses_at_take.pop(job_id, None)
            self._slots.release_on_behalf_of(entry_id)
            del self._entries[entry_id]
            self._slot_freed.set()

    async def _lost(self, job_id: str, held: BatchJob | None) -> None:
        """End a job whose record vanished in hand (`held`: as last read; None when it vanished
        before its first read): said once, noted for the operators' check."""
        now = self._clock.timestamp()
        if held is None:
            lost = LostJob(
                job_id=job_id, reason="its record and queue entry vanished as this orchestrator"
                " took it (Redis lost its data?)", noticed_by=self.consumer, noticed_at=now,
                state=JobState.PENDING.value,
            )  # fmt: skip
        else:
            last = held.attempts[-1] if held.attempts else None
            lost = LostJob(
                job_id=job_id,
                reason="its record vanished while this orchestrator held it (Redis lost its data?)",
                noticed_by=self.consumer,
                noticed_at=now,
                job_type=held.job_type,
                state=held.state.value,
                worker=last.worker if last is not None else "",
                attempts=len(held.attempts),
                result_json=held.result_json,
                error=held.error,
            )
        if not await self._store.report_lost(lost):
            return  # it is there after all (a write raced the read): nothing was lost
        self._counts["lost"] += 1
        log.warning(
            "job %s lost: %s; last known %s%s; noted for `jobworker lost`",
            job_id, lost.reason, lost.state, f" on {lost.worker}" if lost.worker else "",
        )  # fmt: skip

    async def _set_aside(self, entry_id: str, problem: CorruptRecord) -> None:
        """Quarantine the entry of a job that cannot be driven (the store says it once)."""
        try:
            if not await self._store.quarantine(entry_id, problem, now=self._clock.timestamp()):
                # mended meanwhile: the entry stays pending, and is claimed and read again
                log.info("job %s: its data reads again; it will be claimed again", problem.job_id)
        except Exception:
            log.exception("quarantining job %s failed; it will be claimed again", problem.job_id)

    # --- one job: decide, then do -----------------------------------------------------------------

    async def _drive(
        self,
        job: BatchJob,
        entry_id: str,
        token: int,
        cancel: bool,
        *,
        expect: bytes | None,
        dispatched: bool = False,
    ) -> bool:
        """Steps until the job ends, or until another holder has a newer token. True when it
        ended here and the final write acked its queue entry `entry_id`.

        `token` and `cancel`: the job's fence and cancel flag, read as it was taken. `expect`:
        the fresh entry's copy it was taken from, unverified: the first write expects it, and
        raises `_CopyOutOfDate` when refused. `dispatched`: its first attempt (the last in
        `job.attempts`) was made by its submit, written and its worker's room taken: the call
        comes first."""
        call: CallResult | None = None
        fresh = True  # `cancel` was read just now
        if dispatched:
            self._budget.record_call()
            self._counts["dispatched"] += 1
            attempt = job.attempts[-1]
            call = await self._attempt(job, attempt.worker, token, attempt)
            fresh = False
        elif adopt(job):
            # its holder stopped during the attempt: the run may have ended meanwhile, and its
            # worker may be gone with the answer; the worker recorded the outcome if it ended
            call = await self._recorded_outcome(job)
            if call is not None:
                _note(job.attempts[-1], call, self._clock.timestamp())
        else:
            self._budget.record_call()  # a first attempt (an adopted run is not a new call)
        asked = False
        while True:
            if not fresh and cancel_matters(call):
                cancel = await self._store.cancel_requested(job.job_id)
            fresh = False
            step = decide(job, call, now=self._clock.timestamp(), cancel_requested=cancel)
            call = None
            if isinstance(step, Stop):
                self._counts["superseded"] += 1
                log.info("job %s: %s", job.job_id, step.reason)
                return False
            if isinstance(step, Finish):
                return await self._finish(job, token, step, entry_id, expect=expect)
            if isinstance(step, Requeue):
                job.state = JobState.PENDING
                written = await self._write(job, token, expect=expect)
                expect = None
                if written is not WriteResult.WRITTEN:
                    log.info("job %s: not retried, the record is %s", job.job_id, written.name)
                    return False
                log.info("job %s: attempt %d %s; retrying", job.job_id, len(job.attempts),
                         step.reason, extra=_worker_of(job))  # fmt: skip
                self._counts["retries"] += 1
                continue
            if step.prefer is None and not asked and anyio.current_time() < self._careful_until:
                asked = True  # Redis went back in time: a worker may have run it unrecorded
                if (known := await self._worker_with_run(job.job_id)) is not None:
                    step = msgspec.structs.replace(step, prefer=known)
            address = await self._before_attempt(job, step)
            if address is None:
                if await self._store.get(job.job_id) is None:
                    return False  # its record is gone (Redis lost its data): the caller ends it
                continue  # deadline or cancel while waiting: decide() ends it
            # the next fencing token is taken by the DISPATCHED write itself (one round trip)
            attempt = AttemptRecord(
                number=len(job.attempts) + 1,
                worker=address,
                fencing_token=token + 1,
                started_at=self._clock.timestamp(),
            )
            job.attempts.append(attempt)
            job.state = JobState.DISPATCHED
            # the worker's room is taken now, not once the write is done: the jobs that choose
            # while it is under way must see it, or a burst all goes to one worker at once
            self._worker_inflight[address] += 1
            try:
                written = await self._write(job, token, advance=True, expect=expect)
            except BaseException:
                self._give_back(address)
                raise
            expect = None
            if written is not WriteResult.WRITTEN:
                log.info("job %s: not dispatched, the record is %s", job.job_id, written.name)
                self._give_back(address)
                return False
            token += 1
            self._counts["dispatched"] += 1
            call = await self._attempt(job, address, token, attempt)

    async def _attempt(
        self, job: BatchJob, address: str, token: int, attempt: AttemptRecord
    ) -> CallResult:
        """The call of a dispatched attempt, and how it went noted in the attempt."""
        call = await self._call(job, address, token)
        if call.kind in (CallKind.UNREACHABLE, CallKind.LOST):
            # the worker went away with the answer; if the run had ended, it said how
            call = await self._recorded_outcome(job) or call
        _note(attempt, call, self._clock.timestamp())
        return call

    async def _write(
        self,
        job: BatchJob,
        token: int,
        *,
        ack: str = "",
        advance: bool = False,
        expect: bytes | None = None,
    ) -> WriteResult:
        """The store's fenced write (`advance`: taking the next token with it); when it was
        refused because Redis went back in time (the fence below our token, which only this
        holder took), the fence is restored, said once per job, and the write made again.

        `expect`: the fresh copy the job was taken from; a refusal raises `_CopyOutOfDate`."""
        written = await self._store.write(job, token, ack=ack, advance=advance, expect=expect)
        if expect is not None and written is not WriteResult.WRITTEN:
            raise _CopyOutOfDate(job.job_id)
        # not after a data loss: the record may be a new job under the same id, its own tokens
        same_data = self._losses_at_take.get(job.job_id) == self._data_losses
        if (
            written is WriteResult.SUPERSEDED
            and same_data
            and await self._store.restore_fence(job.job_id, token)
        ):
            self._counts["fences_restored"] += 1
            log.warning(
                "job %s: Redis lost its last writes (the job's fence went back below token %d,"
                " which this orchestrator holds): restored it", job.job_id, token,
            )  # fmt: skip
            written = await self._store.write(job, token, ack=ack, advance=advance)
        return written

    async def _recorded_outcome(self, job: BatchJob) -> CallResult | None:
        """The outcome the worker recorded for the run of the last attempt (which, when it
        attached to a run an earlier holder started, is the run of the first of those)."""
        chain = [job.attempts[-1]]
        for attempt in reversed(job.attempts[:-1]):
            if attempt.outcome != ORPHANED:
                break
            chain.append(attempt)
        found = await self._store.outcomes(job.job_id, [a.fencing_token for a in chain])
        for attempt in chain:
            if attempt.fencing_token in found:
                self._counts["recovered_outcomes"] += 1
                return CallResult(kind=CallKind.DONE, outcome=found[attempt.fencing_token])
        return None

    async def _before_attempt(self, job: BatchJob, step: Dispatch) -> str | None:
        """Back off (a retry), then wait for a worker; None when the deadline or a cancel came
        first."""
        if step.back_off:
            policy = RetryPolicy(
                max_attempts=job.max_attempts,
                base_seconds=self._config.retry_base_seconds,
                max_seconds=self._config.retry_max_seconds,
            )
            if not await self._back_off(job, policy, step.attempt, budgeted=step.budgeted):
                return None
        return await self._pick(job, step)

    async def _back_off(
        self, job: BatchJob, policy: RetryPolicy, attempt: int, *, budgeted: bool
    ) -> bool:
        """Sleep before a retry, and (`budgeted`) wait for the retry budget; False if the
        deadline came first."""
        delay = policy.delay(attempt, self._rng)
        while True:
            left = self._time_left(job)
            if left <= 0:
                return False
            await anyio.sleep(min(delay, left))
            if not budgeted or self._budget.try_spend():
                return True
            # the fleet is sick: wait a full ceiling before asking again, instead of piling on
            delay = policy.ceiling(policy.max_attempts + 1)

    async def _pick(self, job: BatchJob, step: Dispatch) -> str | None:
        """A worker for the job, waiting for one (backpressure); None on deadline or cancel."""
        prefer = step.prefer
        losses = self._data_losses
        self._waiting[job.priority] += 1
        still_wanted_at = anyio.current_time() + 1.0
        woken = False
        try:
            while self._time_left(job) > 0:
                if prefer is not None:
                    # the worker its run may go on: stale in the registry but answering (cut
                    # off from Redis only) still has it, and a copy elsewhere would run twice
                    fresh = self._directory.stale_reason(self._directory.get(prefer)) is None
                    if (fresh or await self._answers(prefer)) and self.breaker(
                        prefer
                    ).try_acquire():
                        return prefer
                    prefer = None
                ahead = max((p for p, n in self._waiting.items() if n), default=job.priority)
                if ahead <= job.priority:
                    address = self._choose(job, step.avoid)
                    if address is not None:
                        return address
                if anyio.current_time() >= still_wanted_at:
                    # each second without a worker, not at each wake (a Redis read each time
                    # made a burst cost 50 commands a job)
                    still_wanted_at = anyio.current_time() + 1.0
                    if await self._store.cancel_requested(job.job_id):
                        return None
                    continue  # room may have freed during the read: look again first
                if losses != self._data_losses:  # Redis lost its data: is the record still there?
                    losses = self._data_losses
                    if await self._store.get(job.job_id) is None:
                        return None
                    continue
                # no await since the look above: room that frees from here on wakes this job
                with anyio.move_on_after(
                    min(1.0, max(0.0, job.deadline_at - self._clock.timestamp()))
                ) as waiting:
                    with self._line.place(job.priority, job.job_type, front=woken) as event:
                        await event.wait()
                woken = not waiting.cancelled_caught
            return None
        finally:
            self._waiting[job.priority] -= 1

    def _time_left(self, job: BatchJob) -> float:
        """Seconds until the job's deadline (wall time: the deadline is in its record), 0 past."""
        return max(0.0, job.deadline_at - self._clock.timestamp())

    def _choose(self, job: BatchJob, avoid: frozenset[str]) -> str | None:
        directory, job_type = self._directory, job.job_type
        entries = directory.entries()
        eligible = [e for e in entries if self.eligibility(e, job_type) is None]
        # two versions of a job in the fleet (a rolling upgrade): only to one that takes its
        # params, waiting for one if need be; when none does, its refusal ends the job
        takers = willing(job_type, job.params, {
            e.address: directory.shape(e, job_type) for e in entries
            if directory.stale_reason(e) is None and directory.runs(e, job_type)
        })  # fmt: skip
        if takers is not None:
            eligible = [e for e in eligible if e.address in takers]
        others = [e for e in eligible if e.address not in avoid]
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

    def _give_back(self, address: str) -> None:
        """A dispatch that did not go ahead: the worker's room and the breaker's slot go back."""
        self._worker_inflight[address] -= 1
        self._room_freed(address)
        self.breaker(address).release()

    async def _call(self, job: BatchJob, address: str, token: int) -> CallResult:
        """Run the job on one worker (RunWork: it starts the run, or attaches to it, and answers
        at its end), watched (registry, deadline, cancel requests; RUNNING recorded once the run
        has gone on for a while); the breaker hears how it went. The caller has counted the call
        in the worker's `_worker_inflight`; it is given back here."""
        breaker = self.breaker(address)
        lost: list[str] = []
        superseded: list[str] = []
        # the RunWork call: its watcher ends it when the worker does not answer (a connection
        # to a worker cut off may hang in its connect, where no keepalive runs yet)
        running = anyio.CancelScope()
        result: CallResult | None = None
        logged = bind_log_fields(worker=address)  # the call's lines, its watchers' too
        started = anyio.current_time()
        try:
            with anyio.move_on_after(
                max(0.0, job.deadline_at - self._clock.timestamp())
            ) as deadline:
                # most runs end before RUNNING is due: until then the call goes alone, without
                # the watchers' task group and tasks (a worker that dies breaks the call at once;
                # one that goes silent, or a cancel asked meanwhile, waits for the watchers)
                early = self._config.running_recorded_after_seconds
                if early > 0:
                    with anyio.move_on_after(early):
                        result = await self._run(job, address)
                if result is None or (result.kind is CallKind.UNREACHABLE and not result.absent):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watch_worker, address, lost, tg.cancel_scope)
                        tg.start_soon(self._watch_run, job, address, token, running, superseded,
                                      tg.cancel_scope, started)  # fmt: skip
                        if result is None:  # still running: wait on (the worker attaches)
                            with running:
                                result = await self._run(job, address)
                            if result is None or running.cancelled_caught:
                                result = self._no_answer()
                        if result.kind is CallKind.UNREACHABLE and not result.absent:
                            result = await self._follow(job, address, token) or result
                        tg.cancel_scope.cancel()
            if deadline.cancelled_caught:
                result = CallResult(kind=CallKind.DEADLINE, error="deadline passed while running")
            elif lost:
                result = CallResult(kind=CallKind.LOST, error=f"worker lost: {lost[0]}")
            elif superseded:
                result = CallResult(kind=CallKind.SUPERSEDED, error=superseded[0])
        finally:
            unbind_log_fields(logged)
            self._worker_inflight[address] -= 1
            self._room_freed(address)  # it looks once the breaker below has heard (no await)
        assert result is not None
        self._learn_room(address, result)
        if result.kind in (CallKind.UNREACHABLE, CallKind.LOST):
            self._client.forget(address)
            breaker.record_failure()
        elif result.kind in (CallKind.DONE, CallKind.REJECTED):
            breaker.record_success()
        else:
            breaker.release()
        return result

    async def _run(self, job: BatchJob, address: str) -> CallResult:
        """One RunWork: the worker starts the run (or attaches to its run of this id) and answers
        at its end. A short run is thus one call, and goes from DISPATCHED to its end."""
        return _completed(await self._client.wait(address, job))

    async def _admit_then_run(self, job: BatchJob, address: str) -> CallResult:
        """Attach again where a call broke: SendWork first, bounded (a new connection to a worker
        that is cut off may hang), then RunWork."""
        with anyio.move_on_after(self._admit_timeout) as admitting:
            admission = await self._client.admit(address, job)
        if admitting.cancelled_caught:
            return self._no_answer()
        if admission.reply is not Reply.OK:
            return CallResult(
                kind=_CALL_KIND[admission.reply], error=admission.error, absent=admission.absent
            )
        return await self._run(job, address)

    def _no_answer(self) -> CallResult:
        return CallResult(
            kind=CallKind.UNREACHABLE, error=f"no answer within {self._admit_timeout:g}s"
        )

    async def _mark_running(
        self, job: BatchJob, address: str, token: int
    ) -> Literal["marked", "superseded", "no answer"]:
        """Record RUNNING when the worker says it has the run (SendWork: a known id attaches).
        "superseded" when the write was refused (another holder drives the job now), "no
        answer" when the worker did not answer within the admission timeout."""
        with anyio.move_on_after(self._admit_timeout):
            admission = await self._client.admit(address, job)
            if admission.reply is Reply.OK and admission.running:
                job.state = JobState.RUNNING
                if await self._write(job, token) is not WriteResult.WRITTEN:
                    return "superseded"
            # a refusal, or an answer that it is queued there: the call tells how it goes
            return "marked"
        return "no answer"

    async def _follow(self, job: BatchJob, address: str, token: int) -> CallResult | None:
        """The call broke, but the worker may not be gone: while its report lists the run, the
        run goes on there. Attach to it again when the worker answers, else learn its outcome
        from the store once the worker records it. None when the run is not there (or a cancel
        was asked for): the call failed.

        Bounded by the call's deadline; the worker watch ends it when the worker goes stale and
        does not answer.
        """
        since = job.attempts[-1].started_at + self._admit_timeout
        said = False
        tries = 0
        self._client.forget(address)  # reconnect: the old connection is what broke
        while True:
            recorded = await self._recorded_outcome(job)
            if recorded is not None:
                return recorded
            if await self._store.cancel_requested(job.job_id):
                return None  # stopped where the call cannot follow: decide() ends it
            entry = self._directory.get(address)
            fresh = self._directory.stale_reason(entry) is None
            info = entry.info if entry is not None else None
            sighting = sight_run(info, fresh=fresh, job_id=job.job_id, since=since)
            if sighting in (RunSighting.GONE, RunSighting.UNSEEN):
                return None
            if not said:
                said = True
                self._counts["followed"] += 1
                how = "lists it" if sighting is RunSighting.GOING else "may have it"
                log.info("job %s: the call to %s broke, but the worker %s: following the run"
                         " there", job.job_id, address, how)  # fmt: skip
            result = await self._admit_then_run(job, address)
            if result.kind is not CallKind.UNREACHABLE:
                return result
            if result.absent:  # nothing listens there any more: the run died with its worker
                return None
            self._client.forget(address)
            # soon at first (a killed worker's port refuses a moment after its connections
            # reset), then at most once a refresh
            with anyio.move_on_after(min(1.0, 0.05 * 2**tries)):
                await self._directory.wait_refreshed()
            tries += 1

    async def _answers(self, address: str) -> bool:
        """Whether the worker answers a direct probe (cached for a refresh interval)."""
        now = self._clock.monotonic()
        probed = self._probes.get(address)
        if probed is not None and now - probed[0] < self._config.discovery_interval_seconds:
            return probed[1]
        answered = False
        with anyio.move_on_after(self._config.keepalive_timeout_seconds):
            answered = await self._client.probe(address)
        self._probes[address] = (self._clock.monotonic(), answered)
        if answered and address not in self._cut_off:
            self._cut_off.add(address)
            log.warning("worker %s: its report is stale, but it answers: its runs go on there;"
                        " it gets no new work until it reports again", address,
                        extra={"worker": address})  # fmt: skip
        elif not answered:
            self._cut_off.discard(address)
        return answered

    async def _watch_worker(self, address: str, lost: list[str], scope: anyio.CancelScope) -> None:
        """Cancel the call when the worker goes stale or disappears from the registry and does
        not answer a probe either (one that answers is only cut off from the registry)."""
        while True:
            await self._directory.wait_refreshed()
            reason = self._directory.stale_reason(self._directory.get(address))
            if reason is not None and not await self._answers(address):
                lost.append(reason)
                scope.cancel()
                return

    async def _watch_run(
        self,
        job: BatchJob,
        address: str,
        token: int,
        running: anyio.CancelScope,
        superseded: list[str],
        scope: anyio.CancelScope,
        started: float,
    ) -> None:
        """While the call runs: record RUNNING once the run has gone on for
        `running_recorded_after_seconds` (a shorter one goes from DISPATCHED to its end: a
        call and a write less), ending the call when that write is refused, and the RunWork
        (`running`) when the worker does not answer (as an admission would); and on a cancel
        request, ask the worker to stop the run (again on each check until the call ends: the
        run then ends CANCELLED). Woken by cancel requests only (not by the job's own writes),
        it reads the flag at least every CANCEL_CHECK_SECONDS, in case an event was missed."""
        job_id = job.job_id
        mark_at = started + self._config.running_recorded_after_seconds
        marked = False
        while True:
            wait = CANCEL_CHECK_SECONDS if marked else mark_at - anyio.current_time()
            with self._events.watching_cancel(job_id) as asked:
                with anyio.move_on_after(wait):
                    await asked.wait()
            if not marked and anyio.current_time() >= mark_at:
                marked = True
                mark = await self._mark_running(job, address, token)
                if mark == "superseded":
                    superseded.append("superseded")
                    scope.cancel()
                    return
                if mark == "no answer":
                    running.cancel()
            if await self._store.cancel_requested(job_id):
                await self._client.cancel(address, job_id)

    def _stop_soon(self, address: str, job_id: str) -> None:
        """Best effort: stop a run that no longer counts, so that it frees its worker."""
        if self._task_group is not None:
            self._task_group.start_soon(self._client.cancel, address, job_id)

    async def _finish(
        self, job: BatchJob, token: int, step: Finish, entry_id: str, *, expect: bytes | None
    ) -> bool:
        """Write the job's end (acking its entry in the same step); True when it was written."""
        job.state, job.result_json, job.error = step.state, step.result_json, step.error
        job.finished_at = self._clock.timestamp()
        written = await self._write(job, token, ack=entry_id, expect=expect)
        if written is WriteResult.WRITTEN:
            self._counts[step.state.value] += 1
            log.info("job %s (%s) %s after %d attempt(s)%s", job.job_id, job.job_type,
                     step.state.value, len(job.attempts),
                     f": {step.error}" if step.error else "", extra=_worker_of(job))  # fmt: skip
            if step.stop_on is not None:
                self._stop_soon(step.stop_on, job.job_id)
        elif written is WriteResult.SUPERSEDED:
            # another holder drives the job now (perhaps on the same run): leave the run be
            self._counts["superseded"] += 1
            log.warning(
                "job %s: result of superseded attempt (token %d) refused", job.job_id, token
            )
        return written is WriteResult.WRITTEN


class _CopyOutOfDate(Exception):
    """A job taken from its fresh queue entry's copy had a first write refused: the copy was
    not the stored record (any more)."""


def _corrupt(exc: Exception) -> CorruptRecord | None:
    """The CorruptRecord that `exc` is, or that ended a task group (alone), else None."""
    if isinstance(exc, CorruptRecord):
        return exc
    if isinstance(exc, ExceptionGroup):
        found, rest = exc.split(CorruptRecord)
        if found is not None and rest is None:
            return _corrupt(found.exceptions[0])
    return None


def _completed(completion: Completion) -> CallResult:
    """The call's result from a RunWork's answer."""
    if completion.reply is not Reply.OK:
        return CallResult(
            kind=_CALL_KIND[completion.reply], error=completion.error, absent=completion.absent
        )
    return CallResult(kind=CallKind.DONE, outcome=completion.outcome)


def _worker_of(job: BatchJob) -> dict[str, str]:
    """The log field naming the worker of the job's last attempt (none before the first)."""
    return {"worker": job.attempts[-1].worker} if job.attempts else {}


def _note(attempt: AttemptRecord, call: CallResult, now: float) -> None:
    """Write how the attempt went into its record."""
    attempt.finished_at = now
    attempt.outcome = call.attempt_outcome
    attempt.error = call.attempt_error
