"""Runs a person asks for: trigger a schedule now, backfill a past window. Served by any replica.

Neither goes through the cursor (that is the schedule's owner's): each submits and adds its own
record to the ledger.

- **Trigger now** submits job `<name>@manual-<time>` (its own id: two asks are two runs) and
  records it as *triggered*; the run becomes the schedule's last one, so the next fire time's
  overlap policy sees it. The overlap policy does not stop a run asked for by hand.
- **Backfill** takes the nominal fire times in a past window, oldest first, up to a cap, and
  submits each that did not run (no record, or missed, or skipped) with that fire time's own
  job id: a fire time whose job exists (submitted, then recorded missed) is absorbed by the
  orchestrator (also when it was submitted with params the schedule has since changed: that job
  is the fire time's run, and the record says so), and one that ran is left alone (the store
  checks again as it records, so two backfills at once submit each fire time once). Fire times
  after the cursor are left to the schedule's owner. It stops at the first one the
  orchestrator does not take.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec

from app.core.clock import Clock
from app.fleet.schedules import (
    RAN,
    ScheduleCursor,
    ScheduleSpec,
    TickDecision,
    TickKind,
    manual_job_id,
    tick_job_id,
    trigger_for,
)
from app.stores.abc import ScheduleStore
from app.trigger.explain import sentence
from app.trigger.orchestrator_client import CallFailed, OrchestratorClient, Submitted, TickJob
from app.trigger.runner import CALL_RETRY, with_earlier
from app.trigger.ticks import decision, ticks_between

log = logging.getLogger("app.trigger")
T = TypeVar("T")

MAX_BACKFILL = 1000
DEFAULT_BACKFILL = 100


class BackfillResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a backfill did: records of the fire times submitted, how many ran already, the
    error it stopped at, and the start of the next call when fire times remain."""

    submitted: list[TickDecision]
    already_ran: int
    error: str = ""
    next_start: float | None = None


def job_for(spec: ScheduleSpec, job_id: str) -> TickJob:
    """The orchestrator request for one run of `spec`."""
    return TickJob(
        job_id=job_id, job_type=spec.job_type, params=dict(spec.params),
        timeout_seconds=spec.timeout_seconds, deadline_seconds=spec.deadline_seconds,
        priority=spec.priority, retry_on_failure=spec.retry_on_failure,
        max_attempts=spec.max_attempts, schedule=spec.name,
    )  # fmt: skip


async def call_within(call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`call`, again on a failure that may pass (honouring a retry-after), for `seconds`;
    the last CallFailed when it runs out."""
    deadline = anyio.current_time() + seconds
    tries = 0
    while True:
        tries += 1
        try:
            with anyio.fail_after(max(0.001, deadline - anyio.current_time())):
                return await call()
        except TimeoutError:
            raise CallFailed(f"no answer within {seconds:g}s", retryable=True) from None
        except CallFailed as failure:
            delay = failure.retry_after
            if delay is None:
                delay = CALL_RETRY.delay(tries + 1, random.random)
            if not failure.retryable or anyio.current_time() + delay >= deadline:
                raise
            await anyio.sleep(delay)


async def trigger_now(
    spec: ScheduleSpec,
    *,
    store: ScheduleStore,
    client: OrchestratorClient,
    clock: Clock,
    replica: str,
    within: float,
) -> tuple[Submitted, TickDecision]:
    """Submit a run of `spec` now and record it; CallFailed when the orchestrator does not
    take it within `within` seconds."""
    now = clock.timestamp()
    job_id = manual_job_id(spec.name, now)
    answer = await call_within(lambda: client.submit(job_for(spec, job_id)), within)
    record = decision(spec, round(now, 3), TickKind.TRIGGERED, now=clock.timestamp(),
                      replica=replica, job_id=answer.job_id, existing=answer.existing,
                      reason=with_earlier("", answer))  # fmt: skip
    await store.add_decision(record, unless_ran=False, now=clock.timestamp())
    await store.set_last_job(spec.name, answer.job_id)
    log.info("schedule %s: triggered by hand as job %s", spec.name, answer.job_id)
    return answer, record


async def backfill(
    spec: ScheduleSpec,
    *,
    start: float,
    end: float,
    limit: int,
    store: ScheduleStore,
    client: OrchestratorClient,
    clock: Clock,
    replica: str,
    within: float,
) -> BackfillResult:
    """Submit the fire times of `spec` in [`start`, `end`] that did not run (see the module
    doc); each submit is tried for `within` seconds."""
    cursor: ScheduleCursor = await store.cursor(spec.name)
    decided = -math.inf if cursor.tick is None else cursor.tick
    end = min(end, clock.timestamp(), decided)
    after = max(start - 1e-6, spec.since)  # its fire times are those after it began
    ticks = [t for t in ticks_between(trigger_for(spec), after, end, limit=limit + 1) if t.runs]
    more = ticks[limit] if len(ticks) > limit else None
    submitted: list[TickDecision] = []
    already = 0
    for tick in ticks[:limit]:
        at = tick.timestamp
        kept = await store.decisions(spec.name, start=at, end=at, limit=10)
        nominal = [d for d in kept if d.kind is not TickKind.TRIGGERED]
        if any(d.kind in RAN for d in nominal):
            already += 1
            continue
        job = job_for(spec, tick_job_id(spec.name, at))
        try:
            answer = await call_within(lambda job=job: client.submit(job), within)  # type: ignore[misc]
        except CallFailed as failure:
            return BackfillResult(
                submitted=submitted, already_ran=already,
                error=f"the orchestrator did not take {job.job_id}: {failure.reason}",
                next_start=at,
            )  # fmt: skip
        previous = sentence(nominal[0], spec.zone_name) if nominal else "none recorded"
        record = decision(
            spec, at, TickKind.BACKFILLED, now=clock.timestamp(), replica=replica,
            job_id=answer.job_id, existing=answer.existing, previous=previous,
            late_seconds=clock.timestamp() - at, reason=with_earlier("", answer),
        )  # fmt: skip
        found = await store.add_decision(record, unless_ran=True, now=clock.timestamp())
        if found is not None:
            already += 1  # another backfill recorded it first (same job id: one run)
            continue
        submitted.append(record)
        log.info("schedule %s: backfilled %s as job %s", spec.name, record.tick_text, job.job_id)
    return BackfillResult(
        submitted=submitted,
        already_ran=already,
        next_start=None if more is None else more.timestamp,
    )
