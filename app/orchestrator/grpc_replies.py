"""How the orchestrator classes what grpclib brings back from a worker: a status, or a failure.

Shared by the unary calls (`grpc_worker_client`) and the work streams (`work_streams`), so that
a refusal reads and counts the same whichever way the job went.
"""

from __future__ import annotations

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from app.grpc.status import retry_info
from app.orchestrator.worker_client import Reply

log = logging.getLogger(__name__)

#: Connection-level failures of a call (no answer from the worker).
CALL_ERRORS: tuple[type[Exception], ...] = (
    OSError, ConnectionError, StreamTerminatedError, ProtocolError,
)  # fmt: skip
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


def failure_text(exc: Exception) -> str:
    """One line for a call that got no answer."""
    if not isinstance(exc, CALL_ERRORS):
        # grpclib's own races around a connection that closes while it opens a stream (an
        # AttributeError on the dropped transport): no answer either way
        log.debug("call to a worker failed oddly", exc_info=True)
    return f"{type(exc).__name__}: {exc}"
