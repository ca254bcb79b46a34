"""The dispatcher's pure core: decide() for every kind of call result, and a model of the loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.fleet.batch_job import AttemptRecord, BatchJob, RunOutcome
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodInfo, PodStatus
from app.orchestrator.decisions import (
    CLOCK_SKEW_SECONDS,
    ORPHANED,
    CallKind,
    CallResult,
    Dispatch,
    Finish,
    Requeue,
    RunSighting,
    Step,
    Stop,
    adopt,
    attempts_made,
    cancel_matters,
    decide,
    sight_run,
)

NOW = 1_000.0


def job(
    *outcomes: tuple[str, str], max_attempts: int = 3, retry_on_failure: bool = False
) -> BatchJob:
    """A job with attempts (worker, outcome) made so far, its deadline an hour away."""
    return BatchJob(
        job_id="j",
        job_type="echo",
        deadline_at=NOW + 3600,
        max_attempts=max_attempts,
        retry_on_failure=retry_on_failure,
        attempts=[
            AttemptRecord(number=i + 1, worker=w, fencing_token=i + 1, started_at=NOW, outcome=o)
            for i, (w, o) in enumerate(outcomes)
        ],
    )


def done(state: JobState, *, result: str = "", error: str = "") -> CallResult:
    return CallResult(
        kind=CallKind.DONE, outcome=RunOutcome(state=state, result_json=result, error=error)
    )


def failed(kind: CallKind, error: str = "boom") -> CallResult:
    return CallResult(kind=kind, error=error)


def test_a_fresh_job_is_dispatched_without_backoff() -> None:
    assert decide(job(), None, now=NOW, cancel_requested=False) == Dispatch(attempt=1)


def test_a_retry_backs_off_and_avoids_the_workers_that_failed() -> None:
    j = job(("w1", "UNREACHABLE"), ("w2", "REFUSED"))
    step = decide(j, None, now=NOW, cancel_requested=False)
    assert step == Dispatch(attempt=3, back_off=True, avoid=frozenset({"w1", "w2"}))


def test_a_retry_after_a_worker_vanished_is_recovery_not_paid_from_the_budget() -> None:
    for outcome in ("UNREACHABLE", "LOST"):
        step = decide(job(("w1", outcome)), None, now=NOW, cancel_requested=False)
        assert step == Dispatch(attempt=2, back_off=True, budgeted=False, avoid=frozenset({"w1"}))
    for outcome in ("REFUSED", "FAILED"):
        step = decide(job(("w1", outcome)), None, now=NOW, cancel_requested=False)
        assert isinstance(step, Dispatch)
        assert step.budgeted


def test_attempts_run_out_with_the_last_error_named() -> None:
    j = job(("w1", "UNREACHABLE"), ("w2", "REFUSED"), ("w3", "LOST"))
    j.attempts[-1].error = "worker lost: its PodInfo key is gone"
    assert decide(j, None, now=NOW, cancel_requested=False) == Finish(
        state=JobState.FAILED,
        error="gave up after 3 attempts: LOST on w3: worker lost: its PodInfo key is gone",
    )


def test_a_full_queue_is_load_and_never_uses_up_the_job_s_attempts() -> None:
    """Issue 12, point 1: load alone fails no job. A refusal for a full queue is retried (backed
    off more each time, from the budget) until the deadline; other refusals count as before."""
    j = job(*[(f"w{i}", "REFUSED") for i in range(5)])
    for attempt in j.attempts:
        attempt.error = "RESOURCE_EXHAUSTED: queue is full (100 waiting, 8 running)"
    assert attempts_made(j) == 0
    step = decide(j, None, now=NOW, cancel_requested=False)
    assert isinstance(step, Dispatch)
    assert (step.attempt, step.back_off, step.budgeted) == (6, True, True)
    assert decide(j, None, now=j.deadline_at, cancel_requested=False) == Finish(
        state=JobState.TIMED_OUT,
        error="deadline passed: REFUSED on w4: RESOURCE_EXHAUSTED: queue is full (100 waiting,"
        " 8 running)",
    )
    draining = job(*[(f"w{i}", "REFUSED") for i in range(3)])
    for attempt in draining.attempts:
        attempt.error = "UNAVAILABLE: worker is draining and takes no new work"
    assert attempts_made(draining) == 3
    assert isinstance(decide(draining, None, now=NOW, cancel_requested=False), Finish)


def test_an_orphaned_run_goes_back_to_its_worker_and_is_not_counted() -> None:
    j = job(("w1", "UNREACHABLE"), ("w2", ""), max_attempts=2)
    assert adopt(j)
    assert j.attempts[-1].outcome == ORPHANED
    assert attempts_made(j) == 1
    assert decide(j, None, now=NOW, cancel_requested=False) == Dispatch(attempt=2, prefer="w2")
    assert not adopt(j)  # once is enough
    assert not adopt(job(("w1", "FAILED")))


def test_cancel_and_deadline_between_attempts_stop_an_orphaned_run_where_it_goes() -> None:
    j = job(("w2", ORPHANED))
    assert decide(j, None, now=NOW, cancel_requested=True) == Finish(
        state=JobState.CANCELLED, error="cancelled by request", stop_on="w2"
    )
    assert decide(j, None, now=NOW + 7200, cancel_requested=False) == Finish(
        state=JobState.TIMED_OUT, error="deadline passed: no eligible worker took it", stop_on="w2"
    )
    retried = job(("w1", "REFUSED"))
    retried.attempts[0].error = "UNAVAILABLE: draining"
    assert decide(retried, None, now=NOW + 7200, cancel_requested=False) == Finish(
        state=JobState.TIMED_OUT, error="deadline passed: REFUSED on w1: UNAVAILABLE: draining"
    )


@pytest.mark.parametrize(
    ("call", "cancel", "expected"),
    [
        (done(JobState.SUCCEEDED, result='{"a":1}'), False,
         Finish(state=JobState.SUCCEEDED, result_json='{"a":1}')),
        # a cancel asked for after the run ended does not hide how it ended
        (done(JobState.SUCCEEDED, result="1"), True,
         Finish(state=JobState.SUCCEEDED, result_json="1")),
        (done(JobState.TIMED_OUT, error="timed out after 1s"), False,
         Finish(state=JobState.TIMED_OUT, error="timed out after 1s")),
        (done(JobState.FAILED, error="ValueError: x"), False,
         Finish(state=JobState.FAILED, error="ValueError: x")),
        (done(JobState.CANCELLED, error="cancelled by request"), True,
         Finish(state=JobState.CANCELLED, error="cancelled by request")),
        # not asked for: the worker shut down under the run
        (done(JobState.CANCELLED, error="worker shut down"), False,
         Requeue(reason="CANCELLED on w1: worker shut down")),
        (done(JobState.RUNNING), False,
         Finish(state=JobState.FAILED, error="worker answered RUNNING", stop_on="w1")),
        (failed(CallKind.REFUSED, "UNAVAILABLE: draining"), False,
         Requeue(reason="REFUSED on w1: UNAVAILABLE: draining")),
        (failed(CallKind.UNREACHABLE), False, Requeue(reason="UNREACHABLE on w1: boom")),
        (failed(CallKind.LOST), False, Requeue(reason="LOST on w1: boom")),
        (failed(CallKind.UNREACHABLE), True,
         Finish(state=JobState.CANCELLED, error="cancelled by request", stop_on="w1")),
        (failed(CallKind.REJECTED, "NOT_FOUND: no job"), False,
         Finish(state=JobState.FAILED, error="NOT_FOUND: no job")),
        (failed(CallKind.DEADLINE, "deadline passed while running"), False,
         Finish(state=JobState.TIMED_OUT, error="deadline passed while running", stop_on="w1")),
        (failed(CallKind.SUPERSEDED), True,
         Stop(reason="another attempt holds a newer fencing token")),
    ],
)  # fmt: skip
def test_after_a_call(call: CallResult, cancel: bool, expected: Step) -> None:
    j = job(("w1", call.attempt_outcome))
    assert decide(j, call, now=NOW, cancel_requested=cancel) == expected


def test_a_failed_run_is_retried_only_when_asked_and_within_the_attempts() -> None:
    call = done(JobState.FAILED, error="E")
    again = job(("w1", "FAILED"), retry_on_failure=True)
    assert decide(again, call, now=NOW, cancel_requested=False) == Requeue(reason="FAILED on w1: E")
    assert decide(again, call, now=NOW, cancel_requested=True) == Finish(
        state=JobState.FAILED, error="E"
    )
    spent = job(("w1", "FAILED"), ("w2", "FAILED"), ("w3", "FAILED"), retry_on_failure=True)
    assert decide(spent, call, now=NOW, cancel_requested=False) == Finish(
        state=JobState.FAILED, error="E"
    )


KINDS = [k for k in CallKind if k is not CallKind.SUPERSEDED]
RESULTS = st.one_of(
    st.sampled_from([failed(k) for k in KINDS if k is not CallKind.DONE]),
    st.sampled_from([done(s) for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)]),
)


@settings(max_examples=300, deadline=None)
@given(
    results=st.lists(RESULTS, min_size=1, max_size=30),
    max_attempts=st.integers(1, 5),
    retry_on_failure=st.booleans(),
    orphan=st.booleans(),
)
def test_the_loop_ends_within_the_attempts_whatever_the_workers_answer(
    results: list[CallResult], max_attempts: int, retry_on_failure: bool, orphan: bool
) -> None:
    """Drive decide() the way the dispatcher does, the workers answering from `results`."""
    j = job(
        *([("w0", "")] if orphan else []),
        max_attempts=max_attempts,
        retry_on_failure=retry_on_failure,
    )
    adopt(j)
    answers = iter(results)
    call: CallResult | None = None
    for _ in range(4 * max_attempts + 4):
        step = decide(j, call, now=NOW, cancel_requested=False)
        call = None
        if isinstance(step, Finish):
            break
        assert not isinstance(step, Stop)
        if isinstance(step, Requeue):
            continue
        assert attempts_made(j) < max_attempts or step.prefer is not None
        try:
            call = next(answers)
        except StopIteration:
            return  # the workers ran out of answers before the job ended: nothing to check
        worker = step.prefer or f"w{len(j.attempts) + 1}"
        j.attempts.append(
            AttemptRecord(
                number=len(j.attempts) + 1, worker=worker, fencing_token=1, started_at=NOW,
                outcome=call.attempt_outcome,
            )
        )  # fmt: skip
    else:
        pytest.fail(f"no end after {4 * max_attempts + 4} steps: {j.attempts}")
    assert attempts_made(j) <= max_attempts
    answered = [a.outcome for a in j.attempts if a.outcome != ORPHANED]
    if step.state is JobState.SUCCEEDED:
        assert answered[-1] == "SUCCEEDED"
    assert "SUCCEEDED" not in answered[:-1]  # nothing runs again after it succeeded
    if not retry_on_failure:
        assert "FAILED" not in answered[:-1]  # a failed run is final unless asked


def _report(at: float, *live: str) -> PodInfo:
    return PodInfo(
        grpc_port=9091, status=PodStatus.IDLE, update_datetime="", ip="10.0.0.1",
        update_epoch_ms=int(at * 1000), live_job_ids=list(live),
    )  # fmt: skip


def test_a_broken_call_s_run_is_judged_by_the_worker_s_report() -> None:
    since = 1000.0
    # the worker lists it: the run goes on there, whenever the report was written
    assert sight_run(_report(990, "j"), fresh=True, job_id="j", since=since) is RunSighting.GOING
    # a report written after the attempt began (by more than the clocks may differ) without it
    later = since + CLOCK_SKEW_SECONDS + 0.1
    assert sight_run(_report(later), fresh=True, job_id="j", since=since) is RunSighting.UNSEEN
    # a report from before: the next one tells
    assert sight_run(_report(since), fresh=True, job_id="j", since=since) is RunSighting.UNKNOWN
    # no fresh report: whatever it listed, the worker is taken for gone
    assert sight_run(_report(990, "j"), fresh=False, job_id="j", since=since) is RunSighting.GONE
    assert sight_run(None, fresh=True, job_id="j", since=since) is RunSighting.GONE


ALL_RESULTS = st.one_of(
    st.sampled_from([failed(k) for k in KINDS if k is not CallKind.DONE]),
    st.sampled_from([done(s) for s in JobState]),
    st.just(CallResult(kind=CallKind.DONE)),
)


@settings(max_examples=300, deadline=None)
@given(
    call=ALL_RESULTS,
    made=st.integers(1, 4),
    max_attempts=st.integers(1, 5),
    retry_on_failure=st.booleans(),
)
def test_the_cancel_flag_is_skipped_only_where_decide_ignores_it(
    call: CallResult, made: int, max_attempts: int, retry_on_failure: bool
) -> None:
    """The dispatcher reads the cancel flag after a call only when `cancel_matters`: where it
    does not, decide() must answer the same either way."""
    attempts = [(f"w{i}", "UNREACHABLE") for i in range(made - 1)] + [(f"w{made}", "")]
    j = job(*attempts, max_attempts=max_attempts, retry_on_failure=retry_on_failure)
    asked = decide(j, call, now=NOW, cancel_requested=True)
    not_asked = decide(j, call, now=NOW, cancel_requested=False)
    if not cancel_matters(call):
        assert asked == not_asked
    assert cancel_matters(None)  # between attempts it is always read


def test_the_cancel_flag_is_read_after_calls_that_it_can_change() -> None:
    assert not cancel_matters(done(JobState.SUCCEEDED))
    assert not cancel_matters(done(JobState.TIMED_OUT))
    assert not cancel_matters(failed(CallKind.SUPERSEDED))
    for matters in (done(JobState.FAILED), done(JobState.CANCELLED), failed(CallKind.LOST),
                    failed(CallKind.UNREACHABLE), failed(CallKind.DEADLINE)):  # fmt: skip
        assert cancel_matters(matters)
