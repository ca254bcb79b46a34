"""The dispatcher's pure core: the next step for a job, from its record and the last call's result.

`decide()` does no I/O and never awaits, as `app.scheduling.decisions.decide` for schedules:
the dispatcher gathers the facts (the record, whether a cancel was asked for, the time, how the
last call to a worker went), asks `decide()`, and performs the step it gets:

- `Dispatch`: pick a worker (the one an earlier holder left the job running on first, else by
  load, avoiding workers that failed this job), after a backoff for a retry;
- `Requeue`: the attempt failed in a way another attempt may not: back to PENDING;
- `Finish`: write the final state (and stop the run on its worker where it may still go);
- `Stop`: another holder has a newer fencing token; leave the job to it.
"""

from __future__ import annotations

import enum

import msgspec

from app.fleet.batch_job import AttemptRecord, BatchJob, RunOutcome
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodInfo

#: An attempt whose orchestrator stopped while it ran. The re-dispatch that attaches to the run
#: on the same worker is not a new attempt, so it does not count against max_attempts.
ORPHANED = "ORPHANED"


class CallKind(enum.Enum):
    """How one attempt's calls to a worker went, as the dispatcher saw them."""

    DONE = "DONE"  # the worker ran the job: the outcome says how it ended
    REFUSED = "REFUSED"  # the worker would not take it now (draining, queue full)
    UNREACHABLE = "UNREACHABLE"  # the connection failed or broke
    LOST = "LOST"  # the worker went stale or vanished from the registry during the call
    REJECTED = "REJECTED"  # the request is wrong for this job: retrying cannot help
    DEADLINE = "DEADLINE"  # the job's deadline passed during the call
    SUPERSEDED = "SUPERSEDED"  # another attempt holds a newer fencing token


class CallResult(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt's result: for DONE, the run's outcome on the worker."""

    kind: CallKind
    outcome: RunOutcome | None = None
    error: str = ""
    # UNREACHABLE with the connection refused: nothing listens there, the run is gone with it
    absent: bool = False

    @property
    def attempt_outcome(self) -> str:
        """What the attempt record says: the run's end on the worker, else how the call went."""
        return self.kind.value if self.outcome is None else self.outcome.state.value

    @property
    def attempt_error(self) -> str:
        """The attempt record's error: the call's, else the run's."""
        return self.error or (self.outcome.error if self.outcome is not None else "")


class Dispatch(msgspec.Struct, frozen=True, kw_only=True):
    """Send the job to a worker: `prefer` first (its run may still go there), avoiding `avoid`
    unless no other worker is eligible; after a backoff before attempt `attempt` when
    `back_off`, paid from the retry budget when `budgeted`.

    A retry after a worker vanished (UNREACHABLE, LOST) is recovery, not a storm: it goes to
    another worker and is not held back by the budget, so a dead worker's many jobs all move at
    once. Refusals (overload) and failed runs are what the budget is for."""

    attempt: int
    back_off: bool = False
    budgeted: bool = True
    prefer: str | None = None
    avoid: frozenset[str] = frozenset()


class Requeue(msgspec.Struct, frozen=True, kw_only=True):
    """The attempt failed; another may not: the job goes back to PENDING."""

    reason: str


class Finish(msgspec.Struct, frozen=True, kw_only=True):
    """Write the job's end. `stop_on`: a worker where its run may still go (best-effort cancel)."""

    state: JobState
    result_json: str = ""
    error: str = ""
    stop_on: str | None = None


class Stop(msgspec.Struct, frozen=True, kw_only=True):
    """Leave the job: another holder took it over."""

    reason: str


Step = Dispatch | Requeue | Finish | Stop


class RunSighting(enum.Enum):
    """Whether a worker's report shows the run of a job whose call to it broke."""

    GOING = "GOING"  # listed as the worker's own: running, queued, or its outcome on the way
    UNSEEN = "UNSEEN"  # a report written since the attempt began does not list it: not there
    UNKNOWN = "UNKNOWN"  # the report predates the attempt: the next one tells
    GONE = "GONE"  # no fresh report: the worker is taken for gone


#: Worker and orchestrator clocks may differ by this much: a report counts as written after an
#: attempt began only if its time is later by more.
CLOCK_SKEW_SECONDS = 1.0


def sight_run(info: PodInfo | None, *, fresh: bool, job_id: str, since: float) -> RunSighting:
    """What the worker's last report (`info`, `fresh` or stale) says of the run of `job_id`
    started at `since` (Unix seconds) on it. Pure.

    A call to a worker breaks for reasons other than its death (a reset, a partition between
    the two, a slow link). While the worker's report lists the run, it goes on there, and
    starting another copy elsewhere would run the job twice.
    """
    if info is None or not fresh:
        return RunSighting.GONE
    if job_id in info.live_job_ids:
        return RunSighting.GOING
    if info.update_epoch_ms / 1000 > since + CLOCK_SKEW_SECONDS:
        return RunSighting.UNSEEN
    return RunSighting.UNKNOWN


#: How an attempt ends when its worker vanished: the retry is recovery, not paid from the budget.
_RECOVERY = frozenset({"UNREACHABLE", "LOST"})


#: How a refusal for a full queue reads (the worker's RESOURCE_EXHAUSTED status).
QUEUE_FULL = "RESOURCE_EXHAUSTED"


def _counts(attempt: AttemptRecord) -> bool:
    # an orphaned attempt goes on elsewhere; a worker's full queue is load, not the job's fault:
    # load alone must not fail a job (the back-off, the retry budget and the deadline bound it)
    if attempt.outcome == ORPHANED:
        return False
    return not (attempt.outcome == CallKind.REFUSED.value and attempt.error.startswith(QUEUE_FULL))


def attempts_made(job: BatchJob) -> int:
    """Attempts that count against max_attempts (an orphaned one does not, nor a refusal for a
    full queue)."""
    return sum(_counts(a) for a in job.attempts)


def adopt(job: BatchJob) -> bool:
    """Take over a job whose last attempt has no outcome (its holder stopped during it): mark it
    ORPHANED, to be re-dispatched to the same worker, which attaches to the run. True if so."""
    if job.attempts and not job.attempts[-1].outcome:
        job.attempts[-1].outcome = ORPHANED
        return True
    return False


def _orphan(job: BatchJob) -> AttemptRecord | None:
    last = job.attempts[-1] if job.attempts else None
    return last if last is not None and last.outcome == ORPHANED else None


def _last_error(job: BatchJob) -> str:
    for attempt in reversed(job.attempts):
        if attempt.outcome and attempt.outcome != ORPHANED:
            return f"{attempt.outcome} on {attempt.worker}: {attempt.error}".rstrip(": ")
    return ""


def cancel_matters(call: CallResult | None) -> bool:
    """Whether `decide` after `call` can depend on a cancel request (so it is worth reading):
    not after a run that ended SUCCEEDED or TIMED_OUT, nor after a superseded call."""
    if call is None:
        return True
    if call.kind is CallKind.SUPERSEDED:
        return False
    outcome = call.outcome if call.kind is CallKind.DONE else None
    return outcome is None or outcome.state not in (JobState.SUCCEEDED, JobState.TIMED_OUT)


def decide(job: BatchJob, call: CallResult | None, *, now: float, cancel_requested: bool) -> Step:
    """The next step for `job`, given the result of the attempt just made (None between
    attempts), the wall time `now` and whether a cancel was asked for. Pure."""
    if call is not None:
        return _after_call(job, call, cancel_requested=cancel_requested)
    orphan = _orphan(job)
    if cancel_requested:
        return Finish(
            state=JobState.CANCELLED,
            error="cancelled by request",
            stop_on=orphan.worker if orphan is not None else None,
        )
    if now >= job.deadline_at:
        why = _last_error(job) or "no eligible worker took it"
        return Finish(
            state=JobState.TIMED_OUT,
            error=f"deadline passed: {why}",
            stop_on=orphan.worker if orphan is not None else None,
        )
    made = attempts_made(job)
    if orphan is not None:
        return Dispatch(attempt=made + 1, prefer=orphan.worker)
    if made >= job.max_attempts:
        return Finish(
            state=JobState.FAILED, error=f"gave up after {made} attempts: {_last_error(job)}"
        )
    avoid = frozenset(a.worker for a in job.attempts if a.outcome and a.outcome != ORPHANED)
    last = job.attempts[-1].outcome if job.attempts else ""
    # the back-off grows with every attempt, the ones that do not count included
    tried = len(job.attempts)
    return Dispatch(
        attempt=tried + 1, back_off=tried > 0, budgeted=last not in _RECOVERY, avoid=avoid
    )


def _after_call(job: BatchJob, call: CallResult, *, cancel_requested: bool) -> Step:
    worker = job.attempts[-1].worker if job.attempts else None
    kind, outcome = call.kind, call.outcome
    if kind is CallKind.SUPERSEDED:
        return Stop(reason="another attempt holds a newer fencing token")
    if kind is CallKind.DONE and outcome is not None:
        # the run ended on the worker: that is the job's end, a cancel asked for too late aside
        state = outcome.state
        if state is JobState.SUCCEEDED:
            return Finish(state=state, result_json=outcome.result_json)
        if state is JobState.TIMED_OUT:
            return Finish(state=state, error=outcome.error)
        if state is JobState.FAILED:
            retry = job.retry_on_failure and attempts_made(job) < job.max_attempts
            if retry and not cancel_requested:
                return Requeue(reason=f"FAILED on {worker}: {outcome.error}".rstrip(": "))
            return Finish(state=state, error=outcome.error)
        if state is JobState.CANCELLED:
            if cancel_requested:
                return Finish(state=state, error=outcome.error or "cancelled by request")
            # not asked for: the worker shut down under it; run it again elsewhere
            return Requeue(reason=f"CANCELLED on {worker}: {outcome.error}".rstrip(": "))
        return Finish(state=JobState.FAILED, error=f"worker answered {state.value}", stop_on=worker)
    if cancel_requested:  # the run may still go where the call could not follow it
        return Finish(state=JobState.CANCELLED, error="cancelled by request", stop_on=worker)
    if kind is CallKind.DEADLINE:
        return Finish(state=JobState.TIMED_OUT, error=call.error, stop_on=worker)
    if kind is CallKind.REJECTED:
        return Finish(state=JobState.FAILED, error=call.error)
    return Requeue(reason=f"{call.attempt_outcome} on {worker}: {call.error}".rstrip(": "))
