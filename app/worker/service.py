"""`worker.WorkerService` on grpclib: RPC handlers hand work to the JobMaster, never spawn tasks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpclib.server
import msgspec
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError

from app.core.clock import utc_iso
from app.errors import (
    Draining,
    InvalidJobRequest,
    JobAlreadyExists,
    JobNotFound,
    JobWorkerError,
    QueueFull,
    UnknownJob,
)
from app.fleet.job_state import to_worker_wire
from app.grpc.status import retry_later
from app.pb import worker as pb
from app.scheduling.schedule_manager import ScheduleManager
from app.worker.job_master import JobMaster
from app.worker.job_run import JobRun
from app.worker.reporter import ApplicationInfoReportJob, PodIdentity
from app.worker.work_stream import WorkStreamSession

_STATUS: dict[type[JobWorkerError], Status] = {
    InvalidJobRequest: Status.INVALID_ARGUMENT,
    UnknownJob: Status.NOT_FOUND,
    JobNotFound: Status.NOT_FOUND,
    JobAlreadyExists: Status.ALREADY_EXISTS,
    QueueFull: Status.RESOURCE_EXHAUSTED,
    Draining: Status.UNAVAILABLE,
}


#: When a full queue tells the client to come back (RetryInfo, `retry-after-ms`): about how
#: long a few short jobs take to make room.
QUEUE_FULL_RETRY_SECONDS = 1.0


def refusal(exc: JobWorkerError) -> tuple[Status, float]:
    """The status for a core error (the nearest mapped class) and when to try again (seconds;
    0: no hint): a full queue's RESOURCE_EXHAUSTED carries one."""
    status = next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), Status.INTERNAL)
    return status, QUEUE_FULL_RETRY_SECONDS if isinstance(exc, QueueFull) else 0.0


def grpc_error(exc: JobWorkerError) -> GRPCError:
    """The status for a core error (`refusal`), its message the error's line; a retry hint goes
    as google.rpc.RetryInfo."""
    status, retry = refusal(exc)
    if retry:
        return retry_later(status, str(exc), retry)
    return GRPCError(status, str(exc))


@contextmanager
def _as_status() -> Iterator[None]:
    """Turn the core's errors into gRPC statuses with their one-line reason."""
    try:
        yield
    except JobWorkerError as exc:
        raise grpc_error(exc) from None


def job_info(record: JobRun) -> pb.JobInfo:
    """The `worker.JobInfo` message for a run's record, its times as RFC 3339 in UTC."""
    return pb.JobInfo(
        id=record.id,
        name=record.name,
        state=to_worker_wire(record.state),
        params=dict(record.params),
        result_json=record.result_json.decode(),
        error=record.error,
        submitted_at=utc_iso(record.submitted_at),
        started_at=utc_iso(record.started_at),
        finished_at=utc_iso(record.finished_at),
        timeout_seconds=record.timeout_seconds,
    )


class WorkerService(pb.WorkerServiceBase):
    """The seed's SendWork plus run-and-wait, get, cancel and status."""

    def __init__(self, job_master: JobMaster, schedules: ScheduleManager) -> None:
        self._jobs = job_master
        self._schedules = schedules
        # set once the port is bound and the registry is wired
        self.identity: PodIdentity | None = None
        self.report_job: ApplicationInfoReportJob | None = None

    async def send_work(self, message: pb.SendWorkReq) -> pb.SendWorkRes:
        """Admit a job and answer at once with its state (the seed's fire-and-forget SendWork).

        A refused job gets INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED or
        UNAVAILABLE, with the reason.
        """
        with _as_status():
            record = self._jobs.submit_nowait(
                message.name,
                job_id=message.id,
                params=dict(message.params),
                timeout_seconds=message.timeout_seconds,
                fencing_token=message.fencing_token,
            )
        return pb.SendWorkRes(
            message=f"job {record.id} accepted: {record.state.value}",
            state=to_worker_wire(record.state),
        )

    async def run_work(self, message: pb.SendWorkReq) -> pb.JobInfo:
        """Run a job and answer with its record once it has ended.

        A known id of the same name attaches to that run; under another name, ALREADY_EXISTS.
        """
        with _as_status():
            record = await self._jobs.run_and_wait(
                message.name,
                job_id=message.id,
                params=dict(message.params),
                timeout_seconds=message.timeout_seconds,
                fencing_token=message.fencing_token,
            )
        return job_info(record)

    async def _run_work_stream(
        self, stream: grpclib.server.Stream[pb.WorkBatch, pb.WorkResults]
    ) -> None:
        """RunWorkStream (`WorkStreamSession`)."""
        await WorkStreamSession(self._jobs, stream, refusal=refusal).serve()

    def __mapping__(self) -> dict[str, Handler]:
        # the stream's handler takes grpclib's stream itself: betterproto2's generated one is an
        # async generator, which cannot read items while it waits for runs to end
        mapping = super().__mapping__()
        mapping["/worker.WorkerService/RunWorkStream"] = Handler(
            self._run_work_stream, Cardinality.STREAM_STREAM, pb.WorkBatch, pb.WorkResults
        )
        return mapping

    async def get_job(self, message: pb.JobRef) -> pb.JobInfo:
        """A queued, running or remembered job's record; NOT_FOUND otherwise."""
        with _as_status():
            return job_info(self._jobs.get(message.id))

    async def cancel_job(self, message: pb.JobRef) -> pb.JobInfo:
        """Cancel a queued or running job and answer once it has ended; a finished one as is."""
        with _as_status():
            return job_info(await self._jobs.cancel(message.id))

    async def get_status(self, message: pb.StatusReq) -> pb.WorkerStatus:
        """The worker's identity, load, job counters, job names, schedules and registry connection.

        The identity fields are empty until the port is bound and `identity` set.
        """
        s = self._jobs.statistics()
        ident = self.identity
        schedules = [
            pb.ScheduleInfo(
                name=i.name,
                trigger=i.trigger,
                next_fire_at=utc_iso(i.next_fire_at.timestamp() if i.next_fire_at else None),
                last_run_at=utc_iso(i.last_run_at.timestamp() if i.last_run_at else None),
                last_outcome=i.last_outcome,
                run_count=i.run_count,
                failure_count=i.failure_count,
                paused=i.paused,
                skipped_count=i.skipped_count,
                missed_count=i.missed_count,
                coalesced_count=i.coalesced_count,
                running=i.running,
                overlap=i.overlap.value,
                decisions=[
                    pb.ScheduleDecision(
                        tick=d.tick.isoformat(),
                        kind=d.kind.value,
                        reason=d.reason,
                        count=d.count,
                        decided_at=utc_iso(d.decided_at.timestamp()),
                    )
                    for d in i.decisions
                ],
            )
            for i in self._schedules.schedules()
        ]
        return pb.WorkerStatus(
            **{k: v for k, v in msgspec.structs.asdict(s.load).items() if k != "status"},
            status=s.load.status.value,
            ip=ident.ip if ident else "",
            pid=ident.pid if ident else 0,
            host=ident.host if ident else "",
            grpc_port=ident.grpc_port if ident else 0,
            version=ident.version if ident else "",
            started_at=ident.start_datetime if ident else "",
            jobs_accepted=s.jobs.accepted,
            jobs_rejected=s.jobs.rejected,
            jobs_succeeded=s.jobs.succeeded,
            jobs_failed=s.jobs.failed,
            job_names=self._jobs.job_names(),
            schedules=schedules,
            registry_connected=self.report_job.connected if self.report_job else False,
            registry_failures=self.report_job.failures if self.report_job else 0,
        )
