"""The orchestrator's end of RunWorkStream: one call per worker carries every wait on it.

A RunWork per job costs both ends an HTTP/2 stream: headers packed and unpacked (HPACK), a
message, trailers, stream state made and dropped, a task to isolate the call. Over one long call
per worker the same job costs an item in a batch and a result in a batch: what the waits of one
loop turn ask goes out as one message, and the worker answers each item by its `seq` when its
run ends (`app.worker.work_stream`).

What a wait sees is what RunWork gave (`Completion`): the outcome, a refusal classed from the
status RunWork would have had, or UNREACHABLE when the call broke (every wait on it then; a
refused connection is `absent`). A wait that is cancelled abandons its run, as a cancelled
RunWork does, and takes its item back if it has not gone out yet. A worker without the method
(an older version: UNIMPLEMENTED) is asked with RunWork from then on (`wait` answers None), and
so are the waits left when a draining worker ends the call.

The messages are built and read with protobuf's C classes (upb) of the same descriptors, not
betterproto2's: the bytes are the same and the per-item cost is a fraction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from google.protobuf import message_factory  # type: ignore[import-untyped]
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from app.core.exception_groups import first_leaf
from app.fleet.batch_job import BatchJob
from app.orchestrator.grpc_replies import (
    ended,
    failure_text,
    refusal_text,
    reply_for,
    status_text,
)
from app.orchestrator.worker_client import Completion, Reply
from app.pb import worker as wpb

log = logging.getLogger(__name__)

PATH = "/worker.WorkerService/RunWorkStream"
#: Items in one message at most (the worker refuses a list over 1,024 entries).
MAX_ITEMS_PER_MESSAGE = 256

_WorkBatch: Any = message_factory.GetMessageClass(wpb.WorkBatch.DESCRIPTOR)
_WorkResults: Any = message_factory.GetMessageClass(wpb.WorkResults.DESCRIPTOR)


class _Wait:
    __slots__ = ("completion", "done")

    def __init__(self) -> None:
        self.done = anyio.Event()
        # None once done: the worker does not serve the stream (ask with RunWork)
        self.completion: Completion | None = None


class _Conversation:
    """One RunWorkStream call to one worker: what is to be sent, and who waits for what."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.outbox: dict[int, BatchJob] = {}  # by seq, until sent
        self.waits: dict[int, _Wait] = {}  # by seq, until answered or abandoned
        self.ready = anyio.Event()
        self.next_seq = 1
        # what the waits left at the end get; None: ask with RunWork instead
        self.ending: Completion | None = Completion(
            reply=Reply.UNREACHABLE, error="the connection to the worker was lost during the call"
        )

    def add(self, job: BatchJob) -> tuple[int, _Wait]:
        seq = self.next_seq
        self.next_seq += 1
        wait = self.waits[seq] = _Wait()
        self.outbox[seq] = job
        self.ready.set()
        return seq, wait

    def resolve(self, result: Any) -> None:
        wait = self.waits.pop(result.seq, None)
        if wait is None:  # abandoned
            return
        wait.completion = _completion(result)
        wait.done.set()

    def close(self) -> None:
        self.outbox.clear()
        for wait in self.waits.values():
            wait.completion = self.ending
            wait.done.set()
        self.waits.clear()


def _completion(result: Any) -> Completion:
    if result.status:
        try:
            status = Status(result.status)
        except ValueError:
            status = Status.UNKNOWN
        return Completion(
            reply=reply_for(status),
            error=refusal_text(status, result.error, result.retry_after_seconds),
        )
    return ended(result.state, result.result_json, result.error)


def _fill(item: Any, seq: int, job: BatchJob) -> None:
    item.seq = seq
    work = item.work
    work.id = job.job_id
    work.name = job.job_type
    if job.params:
        work.params.update(job.params)
    work.timeout_seconds = job.timeout_seconds
    work.fencing_token = job.fencing_token


class WorkStreams:
    """The RunWorkStream calls of one orchestrator, by worker address, while `run` runs."""

    def __init__(self, channel_for: Callable[[str], Channel]) -> None:
        self._channel_for = channel_for
        self._conversations: dict[str, _Conversation] = {}
        self._unary: set[str] = set()  # workers without the method
        self._task_group: anyio.abc.TaskGroup | None = None
        self.calls_opened = 0

    def __repr__(self) -> str:
        return f"<WorkStreams {len(self._conversations)} open, {self.calls_opened} opened>"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the calls until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._task_group = None

    async def wait(self, address: str, job: BatchJob) -> Completion | None:
        """RunWork's answer for `job` on that worker, over its stream; None when the worker does
        not serve the stream (or the streams do not run): ask with RunWork."""
        if self._task_group is None or address in self._unary:
            return None
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
        conversation = self._conversations.get(address)
        if conversation is None:
            conversation = self._conversations[address] = _Conversation(address)
            self.calls_opened += 1
            self._task_group.start_soon(self._converse, conversation,
                                        name=f"work stream to {address}")  # fmt: skip
        seq, wait = conversation.add(job)
        try:
            await wait.done.wait()
        finally:
            if not wait.done.is_set():  # abandoned: its run goes on (or never starts)
                conversation.waits.pop(seq, None)
                conversation.outbox.pop(seq, None)
        return wait.completion

    def forget(self, address: str) -> None:
        """New waits on that worker open a new call (its connection is being dropped)."""
        self._conversations.pop(address, None)

    async def _converse(self, conversation: _Conversation) -> None:
        try:
            # grpclib natively cancels the task inside a call when its connection is lost, and
            # never uncancels it: a child task takes that, not this one
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._talk, conversation)
        finally:
            if self._conversations.get(conversation.address) is conversation:
                del self._conversations[conversation.address]
            conversation.close()

    async def _talk(self, conversation: _Conversation) -> None:
        address = conversation.address
        try:
            channel = self._channel_for(address)
            async with channel.request(
                PATH, Cardinality.STREAM_STREAM, _WorkBatch, _WorkResults
            ) as stream:
                await stream.send_request()
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._send, stream, conversation)
                        async for message in stream:
                            for result in message.results:
                                conversation.resolve(result)
                        tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:  # the call's own error, for the waits
                    raise first_leaf(group) from None
                # the worker ended the call: draining, with none of its runs left; an error
                # status is raised from its trailers
                await stream.end()
                await stream.recv_trailing_metadata()
            # what was sent after its last read is asked with RunWork (which attaches to a run
            # the worker has, and answers a new job as a draining worker does)
            conversation.ending = None
        except GRPCError as exc:
            if exc.status is Status.UNIMPLEMENTED:
                log.info("worker %s has no RunWorkStream: RunWork per job from now on", address)
                self._unary.add(address)
                conversation.ending = None
            else:
                conversation.ending = Completion(reply=reply_for(exc.status),
                                                 error=status_text(exc))  # fmt: skip
        except Exception as exc:
            conversation.ending = Completion(
                reply=Reply.UNREACHABLE,
                error=failure_text(exc),
                absent=isinstance(exc, ConnectionRefusedError),
            )

    @staticmethod
    async def _send(stream: Any, conversation: _Conversation) -> None:
        """Send what the waits of a turn added, as one message (or a few, when many)."""
        outbox = conversation.outbox
        while True:
            await conversation.ready.wait()
            conversation.ready = anyio.Event()
            while outbox:
                batch = _WorkBatch()
                items = batch.items
                for _ in range(min(len(outbox), MAX_ITEMS_PER_MESSAGE)):
                    seq = next(iter(outbox))
                    _fill(items.add(), seq, outbox.pop(seq))
                await stream.send_message(batch)
