"""`WorkerClient` over grpclib: one pooled channel per worker, HTTP/2 keepalive, statuses classed.

A silent worker (stopped, partitioned) fails the keepalive within `keepalive_seconds +
keepalive_timeout_seconds` and its call breaks at once, whatever the job's length.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import BaseTransport
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.abc
from grpclib.client import Channel, Handler
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol

from app.fleet.batch_job import BatchJob
from app.grpc.fastpath.closed_streams import limit_closed_streams
from app.grpc.fastpath.coalesced_writes import CoalescedWrites
from app.grpc.status import StatusDetailsCodec
from app.orchestrator.grpc_replies import ended, failure_text, reply_for, status_text
from app.orchestrator.work_streams import WorkStreams
from app.orchestrator.worker_client import Admission, Completion, Reply
from app.pb import worker as wpb

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Res = TypeVar("Res")

CANCEL_TIMEOUT_SECONDS = 5.0
LOOKUP_TIMEOUT_SECONDS = 2.0


def _request(job: BatchJob) -> wpb.SendWorkReq:
    return wpb.SendWorkReq(
        id=job.job_id,
        name=job.job_type,
        params=dict(job.params),
        timeout_seconds=job.timeout_seconds,
        fencing_token=job.fencing_token,
    )


class _BoundedProtocol(H2Protocol):
    """grpclib's client protocol, its connection remembering fewer closed streams (one RunWork
    per job: h2's default kept ~12 MiB per worker for good), and writing once per loop turn
    (`CoalescedWrites`: a call's headers and message, and the calls of a turn, in one send)."""

    def connection_made(self, transport: BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport = CoalescedWrites(transport, asyncio.get_running_loop())
        super().connection_made(transport)
        try:
            limit_closed_streams(self.connection._connection)
        except AttributeError:  # another grpclib or h2 inside: h2's default, as before
            log.debug("no H2Connection where expected: closed streams not limited", exc_info=True)


class _BoundedChannel(Channel):
    """A grpclib `Channel` whose connections are `_BoundedProtocol`s."""

    def _protocol_factory(self) -> H2Protocol:
        return _BoundedProtocol(Handler(), self._config, self._h2_config)


class GrpcWorkerClient:
    """Channels by `host:port`, made on first use and closed together."""

    def __init__(
        self, *, keepalive_seconds: float = 2.0, keepalive_timeout_seconds: float = 3.0
    ) -> None:
        # pings go out during a long call (no data flows while a job runs) and a peer that does
        # not answer within the timeout has its connection closed, failing the call at once
        self._config = Configuration(
            _keepalive_time=keepalive_seconds,
            _keepalive_timeout=keepalive_timeout_seconds,
            _keepalive_permit_without_calls=False,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=keepalive_seconds,
        )
        self._channels: dict[str, Channel] = {}
        self._streams = WorkStreams(self._channel)
        self.forgotten = 0

    def __repr__(self) -> str:
        return (
            f"<GrpcWorkerClient {len(self._channels)} channels forgotten={self.forgotten}"
            f" {self._streams!r}>"
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the work streams (one RunWorkStream per worker) until cancelled; without it
        running, `wait` is a RunWork per job."""
        await self._streams.run(task_status=task_status)

    def _channel(self, address: str) -> Channel:
        channel = self._channels.get(address)
        if channel is None:
            host, _, port = address.rpartition(":")
            channel = self._channels[address] = _BoundedChannel(
                host, int(port), config=self._config, status_details_codec=StatusDetailsCodec()
            )
        return channel

    def _stub(self, address: str) -> wpb.WorkerServiceStub:
        return wpb.WorkerServiceStub(self._channel(address))

    async def admit(self, address: str, job: BatchJob) -> Admission:
        """SendWork; ALREADY_EXISTS means the worker has the id: attach to that run."""
        stub = self._stub(address)
        try:
            reply = await _isolated(stub.send_work, _request(job))
        except GRPCError as exc:
            if exc.status is Status.ALREADY_EXISTS:
                return Admission(reply=Reply.OK, running=True)
            return Admission(reply=reply_for(exc.status), error=status_text(exc))
        except Exception as exc:
            return Admission(
                reply=Reply.UNREACHABLE,
                error=failure_text(exc),
                absent=isinstance(exc, ConnectionRefusedError),
            )
        return Admission(reply=Reply.OK, running=reply.state == wpb.JobState.RUNNING)

    async def wait(self, address: str, job: BatchJob) -> Completion:
        """RunWork, over the worker's work stream while the streams run: attaches to the
        worker's run of this id (or starts it) and waits."""
        streamed = await self._streams.wait(address, job)
        if streamed is not None:
            return streamed
        stub = self._stub(address)
        try:
            info = await _isolated(stub.run_work, _request(job))
        except GRPCError as exc:
            return Completion(reply=reply_for(exc.status), error=status_text(exc))
        except Exception as exc:
            return Completion(
                reply=Reply.UNREACHABLE,
                error=failure_text(exc),
                absent=isinstance(exc, ConnectionRefusedError),
            )
        return ended(info.state, info.result_json, info.error)

    async def cancel(self, address: str, job_id: str) -> bool:
        """CancelJob, bounded by CANCEL_TIMEOUT_SECONDS; True when the worker answered."""
        stub = self._stub(address)
        with anyio.move_on_after(CANCEL_TIMEOUT_SECONDS):
            try:
                await _isolated(stub.cancel_job, wpb.JobRef(id=job_id))
            except GRPCError:
                return True  # it answered (NOT_FOUND: it does not know the job)
            except Exception:
                return False
            return True
        return False

    async def probe(self, address: str) -> bool:
        """GetStatus; True when the worker answered (any status: it is there)."""
        stub = self._stub(address)
        try:
            await _isolated(stub.get_status, wpb.StatusReq())
        except GRPCError:
            return True
        except Exception:
            return False
        return True

    async def knows(self, address: str, job_id: str) -> bool | None:
        """GetJob, bounded by LOOKUP_TIMEOUT_SECONDS: True when the worker has the id, False on
        NOT_FOUND, None when it did not answer."""
        stub = self._stub(address)
        with anyio.move_on_after(LOOKUP_TIMEOUT_SECONDS):
            try:
                await _isolated(stub.get_job, wpb.JobRef(id=job_id))
            except GRPCError as exc:
                return False if exc.status is Status.NOT_FOUND else None
            except Exception:
                return None
            return True
        return None

    def forget(self, address: str) -> None:
        """Close the channel to a worker that is gone (the next call reconnects)."""
        self._streams.forget(address)
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()
            self.forgotten += 1

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


async def _isolated(call: Callable[[Req], Awaitable[Res]], request: Req) -> Res:
    """Run one grpclib call in a task of its own and return its result (or raise its error).

    On a lost connection grpclib cancels the calling task natively and never uncancels it,
    which would poison the caller's cancel scopes; a child task takes that instead.
    """
    results: list[Res] = []
    errors: list[Exception] = []

    async def run() -> None:
        try:
            results.append(await call(request))
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
    if errors:
        raise errors[0]
    if not results:  # cancelled natively by grpclib: the connection went away
        raise ConnectionError("the connection to the worker was lost during the call")
    return results[0]
