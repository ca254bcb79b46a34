"""The async shell that works one schedule while this replica holds its lease.

Each step reads the schedule and its cursor afresh from the store, asks the pure core
(`app.trigger.ticks.plan_step`) what to do, and does it:

- idle until the next tick's planned instant (woken early by a change made through this
  replica, and at least every `refresh_seconds` to see changes made through others);
- write ticks decided without the orchestrator (paused, DST-skipped, past the grace);
- or run a tick: note it as pending in the cursor (so that a replica taking over knows it was
  taken, and by whom, and what the orchestrator answered), ask the orchestrator whether this
  tick's job exists already (when the tick was taken before) and whether the previous tick's
  job is still going, let the kernel's `decide()` apply the overlap policy, submit with the
  deterministic job id, and record the decision. Calls are retried until the tick's misfire
  grace runs out, honouring a RESOURCE_EXHAUSTED's retry-after; then the tick is *missed*,
  with the reason.

Every record goes through `ScheduleStore.decide`, which refuses it when another replica holds
the lease or decided the tick first: the runner then stops (lease lost) or reads again.
A runner killed at any await leaves the cursor where it was: the next owner does the step
again, and a repeated submit is absorbed by the orchestrator's idempotent job ids.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec

from app.core.clock import Clock
from app.core.log_context import bind_log_fields, unbind_log_fields
from app.core.outage import Outage
from app.core.retry import RetryPolicy
from app.errors import StoreBusy, StoreUnavailable
from app.fleet.schedules import (
    PendingTick,
    ScheduleCursor,
    ScheduleSpec,
    TickCause,
    TickDecision,
    TickKind,
    tick_job_id,
    trigger_for,
)
from app.scheduling.decisions import DecisionKind, Overlap
from app.stores.abc import DecideResult, ScheduleStore
from app.trigger.orchestrator_client import (
    CallFailed,
    OrchestratorClient,
    Submitted,
    TickJob,
)
from app.trigger.ticks import Idle, Record, Submit, decision, judge, plan_step, ran_kind

log = logging.getLogger("app.trigger")
T = TypeVar("T")

#: Backoff between calls to an orchestrator that failed (without a retry-after of its own).
CALL_RETRY = RetryPolicy(max_attempts=1_000_000, base_seconds=0.2, max_seconds=5.0)
#: How often a failing tick's attempts are noted in its cursor (for a replica taking over).
PENDING_NOTE_SECONDS = 1.0
#: The pause before a step refused as busy (every Redis connection in use) is made again.
BUSY_RETRY_SECONDS = 0.05
#: Slack added to an idle wait so that a wake lands after the planned instant, not a hair before.
_WAKE_SLACK = 0.001


class TriggerCounters:
    """What a replica's runners did, summed over its schedules (for statistics and /metrics)."""

    def __init__(self) -> None:
        self.decided: Counter[TickKind] = Counter()
        self.missed: Counter[TickCause] = Counter()
        self.submits = self.submit_failures = self.existing = 0
        self.acquired = self.lost = self.handed_off = 0

    def count(self, records: list[TickDecision]) -> None:
        """Count records this replica wrote."""
        for record in records:
            self.decided[record.kind] += record.count
            if record.kind is TickKind.MISSED:
                self.missed[record.cause] += record.count


class RunnerContext:
    """What every runner of a replica shares."""

    def __init__(
        self,
        *,
        store: ScheduleStore,
        client: OrchestratorClient,
        clock: Clock,
        replica: str,
        lease_seconds: float,
        ledger_limit: int,
        refresh_seconds: float,
        counters: TriggerCounters,
        outage: Outage,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.ledger_limit = ledger_limit
        self.refresh_seconds = refresh_seconds
        self.counters = counters
        self.outage = outage
        self.draining = False


class _GaveUp(msgspec.Struct, frozen=True, kw_only=True):
    """Calls that got no usable answer before the tick's deadline (or a final refusal)."""

    cause: TickCause
    reason: str
    attempts: int


class _Attempts:
    """Counts one tick's calls and notes failures in the cursor, at most every second."""

    def __init__(self, pending: PendingTick) -> None:
        self.pending = pending
        self.noted_at = -math.inf

    def failed(self, failure: CallFailed) -> None:
        self.pending = msgspec.structs.replace(
            self.pending, attempts=self.pending.attempts + 1, last_error=failure.reason
        )


class ScheduleRunner:
    """Works schedule `name` until the lease is lost, the schedule deleted, or the replica
    drains. `idle_until` (wall time) is set while it waits for a tick."""

    def __init__(self, name: str, ctx: RunnerContext) -> None:
        self.name = name
        self.ctx = ctx
        self.scope = anyio.CancelScope()
        self.idle_until: float | None = None
        self.lost = False
        self.stopped = anyio.Event()
        self._wake = anyio.Event()
        self._rng = random.Random()

    def __repr__(self) -> str:
        state = "lost" if self.lost else ("idle" if self.idle_until is not None else "busy")
        return f"<ScheduleRunner {self.name} {state}>"

    def wake(self) -> None:
        """Plan again now (the schedule changed, or the replica drains)."""
        self._wake.set()

    async def run(self) -> None:
        """Steps until stopped; cancelling `scope` stops it at any await."""
        try:
            with self.scope:
                delay = 0.0
                while not self.ctx.draining:
                    try:
                        if not await self._step():
                            return
                    except StoreUnavailable as exc:
                        self.ctx.outage.failed(exc)
                        delay = min(2.0, max(0.1, delay * 2))
                        await self._idle(self.ctx.clock.timestamp() + delay)
                    except StoreBusy:
                        # this process's connections were all busy: load, not an outage
                        await self._idle(self.ctx.clock.timestamp() + BUSY_RETRY_SECONDS)
                    else:
                        delay = 0.0
        finally:
            self.stopped.set()

    # --- one step ---------------------------------------------------------------------------------

    async def _step(self) -> bool:
        """One step; False when the runner should stop."""
        c = self.ctx
        spec = await c.store.get(self.name)
        if spec is None:
            log.info("schedule %s: deleted; no longer worked here", self.name)
            return False
        cursor = await c.store.cursor(self.name)
        c.outage.succeeded()
        step = plan_step(
            spec, trigger_for(spec), cursor,
            now=c.clock.timestamp(), replica=c.replica, limit=c.ledger_limit,
        )  # fmt: skip
        if isinstance(step, Idle):
            await self._idle(step.wake_at)
            return True
        if isinstance(step, Record):
            return await self._decide(cursor, step.decisions)
        # the tick's lines concern its job too
        logged = bind_log_fields(job_id=tick_job_id(spec.name, step.tick.timestamp))
        try:
            return await self._run_tick(spec, cursor, step)
        finally:
            unbind_log_fields(logged)

    async def _idle(self, until: float | None) -> None:
        c = self.ctx
        delay = math.inf if until is None else until - c.clock.timestamp() + _WAKE_SLACK
        self.idle_until = math.inf if until is None else until
        try:
            with anyio.move_on_after(max(0.0, min(delay, c.refresh_seconds))):
                await self._wake.wait()
        finally:
            self.idle_until = None
        if self._wake.is_set():
            self._wake = anyio.Event()

    async def _decide(
        self, cursor: ScheduleCursor, records: list[TickDecision], last_job_id: str = ""
    ) -> bool:
        """Write `records` and move the cursor past them; False when the lease is lost."""
        c = self.ctx
        result = await c.store.decide(
            self.name, c.replica, expected=cursor.tick, decisions=records,
            last_job_id=last_job_id, now=c.clock.timestamp(), ttl_seconds=c.lease_seconds,
        )  # fmt: skip
        if result is DecideResult.LEASE_LOST:
            log.info("schedule %s: another replica holds it now; stopping here", self.name)
            self.lost = True
            return False
        if result is DecideResult.CONFLICT:
            return True  # another replica decided these ticks: read again
        c.counters.count(records)
        for r in records:
            if r.kind is TickKind.MISSED:
                log.warning(
                    "schedule %s: missed %s%s (%s): %s", self.name, r.tick_text,
                    f" and {r.count - 1} before" if r.count > 1 else "", r.cause.value, r.reason,
                )  # fmt: skip
            elif r.kind is TickKind.SKIPPED:
                log.info("schedule %s: skipped %s: %s", self.name, r.tick_text, r.reason)
            else:
                log.debug("schedule %s: %s %s as %s", self.name, r.kind, r.tick_text, r.job_id)
        return True

    # --- a tick that should run -------------------------------------------------------------------

    async def _run_tick(self, spec: ScheduleSpec, cursor: ScheduleCursor, step: Submit) -> bool:
        c = self.ctx
        tick = step.tick.timestamp
        earlier = cursor.pending if cursor.pending and cursor.pending.tick == tick else None
        attempts = _Attempts(
            PendingTick(
                tick=tick, replica=c.replica, since=c.clock.timestamp(),
                attempts=earlier.attempts if earlier else 0,
                last_error=earlier.last_error if earlier else "",
            )
        )  # fmt: skip
        if not await c.store.set_pending(self.name, c.replica, attempts.pending):
            return True  # decided meanwhile, or another replica's now: read again
        job_id = tick_job_id(spec.name, tick)

        def record(kind: TickKind, **fields: object) -> TickDecision:
            return decision(
                spec, tick, kind, now=c.clock.timestamp(), replica=c.replica,
                jitter_seconds=step.jitter, **fields,
            )  # fmt: skip

        def gave_up(failure: _GaveUp) -> TickDecision:
            return record(
                TickKind.MISSED, cause=failure.cause, reason=failure.reason,
                attempts=failure.attempts, late_seconds=c.clock.timestamp() - step.planned,
                grace_seconds=spec.misfire_grace_seconds,
            )  # fmt: skip

        if earlier is not None:
            # taken before (by a replica since stopped, or this one): its job may exist
            found = await self._until(lambda: c.client.get_job(job_id), step, attempts)
            if isinstance(found, _GaveUp):
                return await self._decide(cursor, [gave_up(found)])
            if found is not None:
                c.counters.existing += 1
                fired = record(
                    TickKind.MOVED if step.tick.moved else TickKind.FIRED,
                    job_id=job_id, existing=True, reason=step.tick.note,
                    late_seconds=max(0.0, earlier.since - step.planned),
                )  # fmt: skip
                return await self._decide(cursor, [fired], last_job_id=job_id)
        previous = None
        if cursor.last_job_id and spec.overlap is not Overlap.ALLOW:
            last = cursor.last_job_id
            looked = await self._until(lambda: c.client.get_job(last), step, attempts)
            if isinstance(looked, _GaveUp):
                return await self._decide(cursor, [gave_up(looked)])
            previous = looked
        running = previous is not None and previous.unfinished
        verdict = judge(spec, step, previous_running=running, now=c.clock.timestamp())
        if verdict.kind is DecisionKind.MISSED:
            return await self._decide(cursor, [gave_up(_late(attempts))])
        if not verdict.run:
            assert previous is not None
            skipped = record(
                TickKind.SKIPPED, cause=TickCause.OVERLAP, reason=verdict.reason,
                blocking_job=previous.job_id, blocking_state=previous.state,
            )  # fmt: skip
            return await self._decide(cursor, [skipped])
        if verdict.replace and previous is not None:
            stop = previous.job_id
            cancelled = await self._until(lambda: c.client.cancel_job(stop), step, attempts)
            if isinstance(cancelled, _GaveUp):
                return await self._decide(cursor, [gave_up(cancelled)])
        job = TickJob(
            job_id=job_id, job_type=spec.job_type, params=dict(spec.params),
            timeout_seconds=spec.timeout_seconds, deadline_seconds=spec.deadline_seconds,
            priority=spec.priority, retry_on_failure=spec.retry_on_failure,
            max_attempts=spec.max_attempts, schedule=spec.name,
        )  # fmt: skip
        c.counters.submits += 1
        answer = await self._until(lambda: c.client.submit(job), step, attempts)
        if isinstance(answer, _GaveUp):
            return await self._decide(cursor, [gave_up(answer)])
        if answer.existing:
            c.counters.existing += 1
        # lateness is a field of its own; the reason keeps the DST note, if any
        fired = record(
            ran_kind(verdict), job_id=answer.job_id, existing=answer.existing,
            reason=with_earlier(step.tick.note, answer),
            late_seconds=max(0.0, c.clock.timestamp() - step.planned),
            attempts=attempts.pending.attempts + 1,
            blocking_job=previous.job_id if verdict.replace and previous else "",
        )  # fmt: skip
        return await self._decide(cursor, [fired], last_job_id=answer.job_id)

    async def _until(
        self, call: Callable[[], Awaitable[T]], step: Submit, attempts: _Attempts
    ) -> T | _GaveUp:
        """`call` until it answers, is refused for good, or the tick's deadline passes."""
        c = self.ctx
        tries = 0
        while True:
            remaining = step.deadline - c.clock.timestamp()
            if remaining <= 0:
                return _unreachable(attempts)
            tries += 1
            try:
                with anyio.fail_after(remaining):
                    return await call()
            except TimeoutError:
                return _unreachable(attempts)
            except CallFailed as failure:
                c.counters.submit_failures += 1
                attempts.failed(failure)
                if not failure.retryable:
                    return _GaveUp(
                        cause=TickCause.REFUSED,
                        reason=f"the orchestrator refused it: {failure.reason}",
                        attempts=attempts.pending.attempts,
                    )
                await self._note(attempts)
                delay = failure.retry_after
                if delay is None:
                    delay = CALL_RETRY.delay(tries + 1, self._rng.random)
                remaining = step.deadline - c.clock.timestamp()
                if delay >= remaining:
                    # honour the retry-after: no call before it, and the grace ends first
                    await anyio.sleep(max(0.0, remaining))
                    return _unreachable(attempts)
                await anyio.sleep(delay)

    async def _note(self, attempts: _Attempts) -> None:
        """Note the failures in the cursor now and then, for a replica that takes over."""
        now = anyio.current_time()
        if now - attempts.noted_at < PENDING_NOTE_SECONDS:
            return
        attempts.noted_at = now
        with contextlib.suppress(StoreUnavailable, StoreBusy):  # a courtesy: the tick goes on
            await self.ctx.store.set_pending(self.name, self.ctx.replica, attempts.pending)


def with_earlier(note: str, answer: Submitted) -> str:
    """A ran tick's reason: `note` (DST's), and when its job id was known with other params
    (the schedule changed after the tick was first submitted), that the earlier job is its run:
    the tick ran, and is neither retried nor missed."""
    if not answer.differs:
        return note
    log.warning("job %s: submitted before with other params; that job is the tick's run (%s)",
                answer.job_id, answer.differs)  # fmt: skip
    earlier = f"its job was submitted earlier with other params ({answer.differs})"
    return f"{note}; {earlier}" if note else earlier


def _late(attempts: _Attempts) -> _GaveUp:
    """The tick became later than its grace while its previous job was looked up."""
    if attempts.pending.last_error:
        return _unreachable(attempts)
    return _GaveUp(
        cause=TickCause.NO_REPLICA,
        reason="it was past its grace by the time the previous job was known",
        attempts=attempts.pending.attempts,
    )


def _unreachable(attempts: _Attempts) -> _GaveUp:
    pending = attempts.pending
    last = pending.last_error or "no answer"
    return _GaveUp(
        cause=TickCause.UNREACHABLE,
        reason=f"{pending.attempts} failed attempt(s), the last: {last}",
        attempts=pending.attempts,
    )
