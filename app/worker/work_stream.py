"""The worker's end of RunWorkStream: many runs over one call, each answered when it ends.

An orchestrator keeps one such call open per worker and sends the jobs it dispatches there in
batches (`WorkBatch`); each item starts a run (or attaches to the run of its id, as RunWork
does) and is answered by one `WorkResult` carrying its `seq` once the run ends, or at once with
the status RunWork would have answered when the item is refused. Results that end in the same
loop turn go out as one message. Per job this costs a share of one DATA frame each way, where a
RunWork costs a stream's headers, message and trailers both ways.

A client that ends its side of the call gets the results of what it sent, then the call's end
(OK). Cancelling the call (the orchestrator going, the connection breaking) abandons the waits,
not the runs: their outcomes are recorded in the job store all the same (`OutcomeWriter`). A
draining worker refuses new items (an item of a run it has attaches, as with RunWork), and ends
the call with OK once no run of the call is left, so that the server's close is not held up by
a call that never ends on its own; the client asks with RunWork for what it had sent after that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from app.core.exception_groups import first_leaf
from app.errors import JobWorkerError
from app.fleet.job_state import to_worker_wire
from app.grpc.status import CALL_ERRORS
from app.pb import worker as pb
from app.worker.job_master import JobMaster
from app.worker.job_run import JobRun

if TYPE_CHECKING:
    import grpclib.server
    from grpclib.const import Status

#: What an item refused by the job master is answered with: its status and retry hint (seconds;
#: 0 for none), as RunWork would answer (`app.worker.service.refusal`).
Refusal = Callable[[JobWorkerError], "tuple[Status, float]"]

#: Results in one message at most: a bound on a message's size, far above one turn's ends.
MAX_RESULTS_PER_MESSAGE = 512

_UNSPECIFIED = pb.JobState.JOB_STATE_UNSPECIFIED


class WorkStreamSession:
    """One RunWorkStream call: admits its items, collects their ends, sends them in batches."""

    def __init__(
        self,
        job_master: JobMaster,
        stream: grpclib.server.Stream[pb.WorkBatch, pb.WorkResults],
        *,
        refusal: Refusal,
    ) -> None:
        self._jobs = job_master
        self._stream = stream
        self._refusal = refusal
        self._outbox: list[pb.WorkResult] = []
        self._ready = anyio.Event()
        self._pending = 0  # items admitted whose runs have not ended yet
        self._closed = False  # ends after the call are dropped
        # the client sent its last item, or a drain began: end the call once `_pending` is 0
        self._ending = False

    async def serve(self) -> None:
        """Answer the call until the client ends it, or until a drain has no more to send."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send, tg.cancel_scope)
                tg.start_soon(self._watch_drain)
                async for batch in self._stream:
                    for item in batch.items:
                        self._admit(item)
                # the client has sent all it will: answer what it sent, then end the call
                self._ending = True
                self._ready.set()
        except BaseExceptionGroup as group:
            error = first_leaf(group)
            if isinstance(error, CALL_ERRORS):
                return  # the client reset the call or went: there is nobody to answer
            raise error from None  # a status (a message that does not read) for grpclib to send
        finally:
            self._closed = True
            self._outbox.clear()

    def _admit(self, item: pb.WorkItem) -> None:
        work = item.work
        if work is None:
            self._refuse(item.seq, 3, "work: missing", 0.0)  # INVALID_ARGUMENT
            return
        self._pending += 1
        try:
            self._jobs.run_then(
                work.name,
                job_id=work.id,
                params=dict(work.params),
                timeout_seconds=work.timeout_seconds,
                fencing_token=work.fencing_token,
                then=functools.partial(self._ended, item.seq),
            )
        except JobWorkerError as exc:
            self._pending -= 1
            status, retry = self._refusal(exc)
            self._refuse(item.seq, int(status.value), str(exc), retry)

    def _refuse(self, seq: int, status: int, error: str, retry: float) -> None:
        self._post(
            pb.WorkResult(seq=seq, state=_UNSPECIFIED, error=error, status=status,
                          retry_after_seconds=retry)
        )  # fmt: skip

    def _ended(self, seq: int, record: JobRun) -> None:
        """The job master's call at a run's end (synchronous: no await, never raises)."""
        if self._closed:
            return
        self._pending -= 1
        self._post(
            pb.WorkResult(seq=seq, state=to_worker_wire(record.state),
                          result_json=record.result_json.decode(), error=record.error)
        )  # fmt: skip

    def _post(self, result: pb.WorkResult) -> None:
        self._outbox.append(result)
        self._ready.set()

    async def _send(self, scope: anyio.CancelScope) -> None:
        """Send what ended since the last message, one message a turn; end a drained call."""
        while True:
            await self._ready.wait()
            self._ready = anyio.Event()
            while self._outbox:
                batch = self._outbox[:MAX_RESULTS_PER_MESSAGE]
                del self._outbox[:MAX_RESULTS_PER_MESSAGE]
                await self._stream.send_message(pb.WorkResults(results=batch))
            if self._ending and not self._pending:
                scope.cancel()
                return

    async def _watch_drain(self) -> None:
        await self._jobs.wait_draining()
        self._ending = True
        self._ready.set()
