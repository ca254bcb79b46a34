"""How the orchestrator classes what grpclib brings back from a worker: a status, or a failure.

Shared by the unary calls (`grpc_worker_client`) and the work streams (`work_streams`), so that
a refusal reads and counts the same whichever way the job went.
"""

from __future__ import annotations

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.fleet.batch_job import RunOutcome
from app.fleet.job_state import JobState, from_worker_wire
from app.grpc.status import CALL_ERRORS, retry_info
from app.orchestrator.worker_client import Completion, Reply

log = logging.getLogger(__name__)

_REFUSED = {Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED}
_REJECTED = {Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS}


def reply_for(status: Status) -> Reply:
    """REFUSED (not now: try another worker), REJECTED (wrong for this job) or UNREACHABLE."""
    if status in _REFUSED:
        return Reply.REFUSED
    if status in _REJECTED:
        return Reply.REJECTED
    return Reply.UNREACHABLE  # an answer that is no answer: UNKNOWN, INTERNAL, ...


def refusal_text(status: Status, message: str, retry_after_seconds: float) -> str:
    """`STATUS: message`, and the worker's retry hint, for the attempt's record."""
    later = f" (retry after {retry_after_seconds:g}s)" if retry_after_seconds else ""
    return f"{status.name}: {message}{later}"


def status_text(exc: GRPCError) -> str:
    """`refusal_text` of a call's error status (its RetryInfo read from the details)."""
    hint = retry_info(exc.details)
    return refusal_text(exc.status, exc.message or "", hint.retry_delay_seconds if hint else 0.0)


def ended(state: int, result_json: str, error: str) -> Completion:
    """The answer of a run that ended on the worker (`state` as the worker's wire has it)."""
    known = from_worker_wire(state)
    if known is None:
        outcome = RunOutcome(state=JobState.FAILED, error=f"worker answered {state!r}")
    else:
        outcome = RunOutcome(state=known, result_json=result_json, error=error)
    return Completion(reply=Reply.OK, outcome=outcome)


def failure_text(exc: Exception) -> str:
    """One line for a call that got no answer."""
    if not isinstance(exc, CALL_ERRORS):
        # grpclib's own races around a connection that closes while it opens a stream (an
        # AttributeError on the dropped transport): no answer either way
        log.debug("call to a worker failed oddly", exc_info=True)
    return f"{type(exc).__name__}: {exc}"
