"""The trigger's way to the orchestrators: Submit, GetJob and CancelJob over grpclib.

`OrchestratorClient` is what the trigger needs; `GrpcOrchestratorClient` is it over gRPC, with
one channel per configured address (made on first use) and HTTP/2 keepalive. A call that cannot
reach an orchestrator moves on to the next address for the next attempt. Every failure is a
`CallFailed` that says whether trying again may help and, for RESOURCE_EXHAUSTED, after how long
(the orchestrator's google.rpc.RetryInfo).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import anyio
import msgspec
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.grpc.status import CALL_ERRORS, StatusDetailsCodec, one_line, retry_info
from app.pb import orchestrator as opb

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Statuses after which the same call may work later (NOT_FOUND on Submit: no live worker runs
#: the job type yet, and one may come).
RETRYABLE = frozenset({
    Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED, Status.DEADLINE_EXCEEDED, Status.INTERNAL,
    Status.UNKNOWN, Status.ABORTED, Status.CANCELLED,
})  # fmt: skip
_FAILURES: tuple[type[Exception], ...] = (GRPCError, TimeoutError, *CALL_ERRORS)
#: How a Submit of a known id with another job type or other params is refused.
EXISTS = f"{Status.ALREADY_EXISTS.name}: "
UNFINISHED = frozenset({opb.JobState.PENDING, opb.JobState.DISPATCHED, opb.JobState.RUNNING})


class TickJob(msgspec.Struct, frozen=True, kw_only=True):
    """What a tick submits: the orchestrator's BatchExecutionRequest."""

    job_id: str
    job_type: str
    params: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_seconds: float = 0.0
    deadline_seconds: float = 0.0
    priority: int = 0
    retry_on_failure: bool = False
    max_attempts: int = 0
    # the schedule whose run it is: recorded with the job (what `jobworker jobs --schedule` reads)
    schedule: str = ""


class Submitted(msgspec.Struct, frozen=True, kw_only=True):
    """The orchestrator's answer to a Submit."""

    job_id: str
    state: str
    existing: bool
    """The id was known: no new job (another replica, or this one before, submitted it)."""
    differs: str = ""
    """The id was known with another job type or other params (the orchestrator's reason, and
    `state` is unknown): the schedule changed after its tick was first submitted. The job of
    that first submission is this tick's run."""


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A job as the orchestrator tells it."""

    job_id: str
    state: str
    unfinished: bool


class CallFailed(Exception):
    """A call got no usable answer. `retryable`: the same call may work later; `retry_after`:
    the seconds the orchestrator asked for (RESOURCE_EXHAUSTED), if any."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class OrchestratorClient(Protocol):
    """What the trigger asks of the orchestrators. Each call raises CallFailed when it fails."""

    async def submit(self, job: TickJob) -> Submitted:
        """Queue the job (a known id answers with the existing job, also when it was submitted
        with other params: see `Submitted.differs`)."""
        ...

    async def get_job(self, job_id: str) -> JobView | None:
        """The job, or None when the orchestrator has no job with that id."""
        ...

    async def cancel_job(self, job_id: str) -> JobView | None:
        """Cancel the job; as it is after, or None when there is none."""
        ...


def _failure(exc: BaseException) -> CallFailed:
    if isinstance(exc, GRPCError):
        hint = retry_info(exc.details)
        reason = f"{exc.status.name}: {one_line(exc.message or '', 200)}"
        return CallFailed(
            reason,
            retryable=exc.status in RETRYABLE,
            retry_after=None if hint is None else hint.retry_delay_seconds,
        )
    if isinstance(exc, TimeoutError):
        return CallFailed("no answer in time", retryable=True)
    return CallFailed(f"unreachable: {type(exc).__name__}: {exc}", retryable=True)


def _view(job: opb.Job) -> JobView:
    return JobView(
        job_id=job.job_id, state=opb.JobState(job.state).name, unfinished=job.state in UNFINISHED
    )


class GrpcOrchestratorClient:
    """`OrchestratorClient` over grpclib, on the first of `addresses` that answers."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        call_timeout_seconds: float = 5.0,
        keepalive_seconds: float = 10.0,
        keepalive_timeout_seconds: float = 5.0,
    ) -> None:
        if not addresses:
            raise ValueError("at least one orchestrator address")
        self._addresses = list(addresses)
        self._turn = itertools.cycle(range(len(self._addresses)))
        self._current = next(self._turn)
        self._timeout = call_timeout_seconds
        self._config = Configuration(
            _keepalive_time=keepalive_seconds,
            _keepalive_timeout=keepalive_timeout_seconds,
            _keepalive_permit_without_calls=False,
            _http2_max_pings_without_data=0,
        )
        self._channels: dict[str, Channel] = {}
        self.calls = self.failures = 0

    def __repr__(self) -> str:
        return (
            f"<GrpcOrchestratorClient {self.address} of {len(self._addresses)}"
            f" calls={self.calls} failures={self.failures}>"
        )

    @property
    def address(self) -> str:
        """The address the next call goes to."""
        return self._addresses[self._current]

    def _stub(self) -> opb.OrchestratorServiceStub:
        address = self.address
        channel = self._channels.get(address)
        if channel is None:
            host, _, port = address.rpartition(":")
            channel = self._channels[address] = Channel(
                host.strip("[]"),
                int(port),
                config=self._config,
                status_details_codec=StatusDetailsCodec(),
            )
        return opb.OrchestratorServiceStub(channel)

    async def _call(self, call: Callable[[opb.OrchestratorServiceStub], Awaitable[T]]) -> T:
        self.calls += 1
        try:
            with anyio.fail_after(self._timeout):
                return await call(self._stub())
        except _FAILURES as exc:
            self.failures += 1
            failed = _failure(exc)
            if not isinstance(exc, GRPCError) or exc.status is Status.UNAVAILABLE:
                self._current = next(self._turn)  # try another orchestrator next time
            raise failed from None

    async def submit(self, job: TickJob) -> Submitted:
        """Submit; NOT_FOUND (no live worker runs the job type) may work later, and
        ALREADY_EXISTS (the id exists with other params) answers the existing job."""
        request = opb.BatchExecutionRequest(
            job_id=job.job_id,
            job_type=job.job_type,
            params=dict(job.params),
            timeout_seconds=job.timeout_seconds,
            deadline_seconds=job.deadline_seconds,
            priority=job.priority,
            retry_on_failure=job.retry_on_failure,
            max_attempts=job.max_attempts,
            schedule=job.schedule,
        )
        try:
            reply = await self._call(lambda stub: stub.submit(request))
        except CallFailed as failed:
            if failed.reason.startswith("NOT_FOUND"):
                failed.retryable = True
            if failed.reason.startswith(EXISTS):
                differs = failed.reason.removeprefix(EXISTS)
                return Submitted(job_id=job.job_id, state="", existing=True, differs=differs)
            raise
        return Submitted(
            job_id=reply.job_id, state=opb.JobState(reply.state).name, existing=reply.existing
        )

    async def get_job(self, job_id: str) -> JobView | None:
        """The job, None for NOT_FOUND."""
        try:
            job = await self._call(lambda stub: stub.get_job(opb.JobRequest(job_id=job_id)))
        except CallFailed as failed:
            if failed.reason.startswith("NOT_FOUND"):
                return None
            raise
        return _view(job)

    async def cancel_job(self, job_id: str) -> JobView | None:
        """Cancel; None for NOT_FOUND."""
        try:
            job = await self._call(lambda stub: stub.cancel_job(opb.JobRequest(job_id=job_id)))
        except CallFailed as failed:
            if failed.reason.startswith("NOT_FOUND"):
                return None
            raise
        return _view(job)

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
