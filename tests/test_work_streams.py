"""RunWorkStream: many runs over one call per worker, at both ends, against a real worker process.

The contract suite (`test_worker_client_contract.py`, `grpc-streamed`) shows a wait over the
stream answers as RunWork does. Here: what only the stream does (waits share one call and its
messages, a cancelled wait takes its item back, an older worker is asked with RunWork, a
draining worker ends the call once its runs are answered, items refused one by one).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpclib.const
import grpclib.server
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status

from app.fleet.batch_job import BatchJob
from app.fleet.job_state import JobState
from app.grpc.fastpath.coalesced_writes import CoalescedWrites
from app.orchestrator.grpc_worker_client import GrpcWorkerClient
from app.orchestrator.worker_client import Reply
from app.pb import worker as wpb
from tests.helpers import WorkerProcess, eventually, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


def job(job_id: str, job_type: str = "echo", token: int = 0, **params: str) -> BatchJob:
    return BatchJob(job_id=job_id, job_type=job_type, params=params, fencing_token=token)


@pytest.fixture
def worker(worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(worker_env)


@pytest.fixture
async def client() -> AsyncIterator[GrpcWorkerClient]:
    client = GrpcWorkerClient(keepalive_seconds=1, keepalive_timeout_seconds=1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(client.run)
            yield client
            tg.cancel_scope.cancel()
    finally:
        client.close()


async def accepted(worker: WorkerProcess) -> int:
    channel = Channel("127.0.0.1", worker.port)
    try:
        status = await wpb.WorkerServiceStub(channel).get_status(wpb.StatusReq())
    finally:
        channel.close()
    return int(status.jobs_accepted)


async def test_the_waits_of_one_turn_go_as_one_message_on_one_call(
    worker: WorkerProcess, client: GrpcWorkerClient
) -> None:
    first = await client.wait(worker.target, job("m0"))
    assert first.reply is Reply.OK
    protocol = client._channels[worker.target]._protocol
    assert protocol is not None
    transport = protocol.connection._transport
    assert isinstance(transport, CoalescedWrites)
    chunks = transport.chunks
    outcomes: dict[str, Any] = {}

    async def wait(n: int) -> None:
        completion = await client.wait(worker.target, job(f"m{n}", n=str(n)))
        assert completion.outcome is not None
        outcomes[f"m{n}"] = completion.outcome

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n in range(1, 101):
                tg.start_soon(wait, n)
    assert sorted(outcomes) == sorted(f"m{n}" for n in range(1, 101))
    assert all(o.state is JobState.SUCCEEDED for o in outcomes.values())
    assert outcomes["m42"].result_json == '{"n":"42"}'  # each answer is its own job's
    # 100 waits in one turn: one message, where 100 RunWork calls hand over 200 chunks
    assert transport.chunks - chunks <= 3
    assert "1 opened" in repr(client)  # one call carried them all
    assert await accepted(worker) == 101


async def test_a_wait_cancelled_before_its_item_went_out_starts_no_run(
    worker: WorkerProcess, client: GrpcWorkerClient
) -> None:
    assert (await client.wait(worker.target, job("k0"))).reply is Reply.OK
    with anyio.CancelScope() as scope:
        scope.cancel()
        await client.wait(worker.target, job("k1", "sleep", seconds="5"))
    assert scope.cancelled_caught
    assert (await client.wait(worker.target, job("k2"))).reply is Reply.OK
    assert await accepted(worker) == 2  # k0 and k2: k1 never reached the worker
    channel = Channel("127.0.0.1", worker.port)
    try:
        with pytest.raises(grpclib.GRPCError) as raised:
            await wpb.WorkerServiceStub(channel).get_job(wpb.JobRef(id="k1"))
    finally:
        channel.close()
    assert raised.value.status is Status.NOT_FOUND


async def test_an_abandoned_wait_leaves_its_run_going_and_the_call_open(
    worker: WorkerProcess, client: GrpcWorkerClient
) -> None:
    with anyio.move_on_after(0.3):
        await client.wait(worker.target, job("a1", "sleep", seconds="1"))
    again = await client.wait(worker.target, job("a1", "sleep", seconds="1"))  # attaches
    assert again.outcome is not None
    assert again.outcome.state is JobState.SUCCEEDED
    assert await accepted(worker) == 1
    assert "1 opened" in repr(client)


class OlderWorker(wpb.WorkerServiceBase):
    """A worker of a version before RunWorkStream: RunWork only."""

    def __init__(self) -> None:
        self.calls = 0

    async def run_work(self, message: wpb.SendWorkReq) -> wpb.JobInfo:
        self.calls += 1
        return wpb.JobInfo(id=message.id, name=message.name, state=wpb.JobState.SUCCEEDED,
                           result_json='{"older": true}')  # fmt: skip

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        del mapping["/worker.WorkerService/RunWorkStream"]
        return mapping


async def test_a_worker_without_the_stream_is_asked_with_run_work(
    client: GrpcWorkerClient,
) -> None:
    older = OlderWorker()
    server = grpclib.server.Server([older])
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        for n in range(3):
            completion = await client.wait(f"127.0.0.1:{port}", job(f"o{n}"))
            assert completion.outcome is not None
            assert completion.outcome.result_json == '{"older": true}'
        assert older.calls == 3
        assert "1 opened" in repr(client)  # tried once, then RunWork for good
    finally:
        server.close()
        await server.wait_closed()


async def raw_call(worker: WorkerProcess) -> AsyncIterator[Any]:
    channel = Channel("127.0.0.1", worker.port)
    try:
        async with channel.request(
            "/worker.WorkerService/RunWorkStream", Cardinality.STREAM_STREAM, wpb.WorkBatch,
            wpb.WorkResults,
        ) as stream:  # fmt: skip
            await stream.send_request()
            yield stream
    finally:
        channel.close()


def item(seq: int, job_id: str, name: str = "echo", **params: str) -> wpb.WorkItem:
    return wpb.WorkItem(seq=seq, work=wpb.SendWorkReq(id=job_id, name=name, params=params))


async def results_until(stream: Any, count: int) -> dict[int, wpb.WorkResult]:
    got: dict[int, wpb.WorkResult] = {}
    with anyio.fail_after(15):
        while len(got) < count:
            message = await stream.recv_message()
            assert message is not None
            got.update((r.seq, r) for r in message.results)
    return got


async def test_items_are_refused_one_by_one_with_runwork_s_status(worker: WorkerProcess) -> None:
    async for stream in raw_call(worker):
        await stream.send_message(wpb.WorkBatch(items=[
            item(1, "r1", a="1"),
            item(2, "r2", "no-such-job"),
            item(3, ""),
            wpb.WorkItem(seq=4),
            item(5, "r1", "sleep"),  # a known id under another name
        ]))  # fmt: skip
        got = await results_until(stream, 5)
        assert (got[1].status, got[1].state, got[1].result_json) == (0, wpb.JobState.SUCCEEDED,
                                                                      '{"a":"1"}')  # fmt: skip
        assert got[2].status == Status.NOT_FOUND.value
        assert "no-such-job" in got[2].error
        assert got[3].status == Status.INVALID_ARGUMENT.value
        assert got[3].error.startswith("id:")
        assert (got[4].status, got[4].error) == (Status.INVALID_ARGUMENT.value, "work: missing")
        assert got[5].status == Status.ALREADY_EXISTS.value
        # the call goes on after refusals
        await stream.send_message(wpb.WorkBatch(items=[item(6, "r6")]))
        assert (await results_until(stream, 1))[6].state == wpb.JobState.SUCCEEDED
        await stream.end()


async def test_a_client_that_ends_its_side_gets_its_results_then_ok(worker: WorkerProcess) -> None:
    async for stream in raw_call(worker):
        await stream.send_message(
            wpb.WorkBatch(items=[item(1, "h1", "sleep", seconds="0.3"), item(2, "h2")]), end=True
        )
        got = await results_until(stream, 2)
        assert (got[1].state, got[2].state) == (wpb.JobState.SUCCEEDED, wpb.JobState.SUCCEEDED)
        with anyio.fail_after(10):
            assert await stream.recv_message() is None
        await stream.recv_trailing_metadata()  # OK: raises otherwise


async def test_a_draining_worker_answers_its_runs_then_ends_the_call(worker: WorkerProcess) -> None:
    async for stream in raw_call(worker):
        await stream.send_message(wpb.WorkBatch(items=[item(1, "d1", "sleep", seconds="1")]))

        async def running() -> bool:
            return await accepted(worker) == 1

        await eventually(running, within=10)
        worker.signal(signal.SIGTERM)
        got = await results_until(stream, 1)
        assert got[1].state == wpb.JobState.SUCCEEDED
        with anyio.fail_after(10):
            assert await stream.recv_message() is None  # ended by the worker
        await stream.end()
        await stream.recv_trailing_metadata()  # OK: raises otherwise
    assert worker.wait_exit() == 0


async def test_a_message_that_does_not_read_ends_the_call_with_a_status_not_a_traceback(
    worker: WorkerProcess,
) -> None:
    async def too_many_items() -> None:
        channel = Channel("127.0.0.1", worker.port)
        try:
            async with channel.request(
                "/worker.WorkerService/RunWorkStream", Cardinality.STREAM_STREAM,
                wpb.WorkBatch, wpb.WorkResults,
            ) as stream:  # fmt: skip
                await stream.send_message(wpb.WorkBatch(items=[item(1, "j1")]))
                assert (await results_until(stream, 1))[1].state == wpb.JobState.SUCCEEDED
                too_many = wpb.WorkBatch(items=[item(n, f"j{n}") for n in range(2, 1200)])
                await stream.send_message(too_many)
                assert await stream.recv_message() is None  # the call ends (or raises): how,
                await stream.end()  # from its trailers once both sides are done
        finally:
            channel.close()

    with pytest.raises(grpclib.GRPCError) as raised, anyio.fail_after(10):
        await too_many_items()
    assert raised.value.status is Status.INVALID_ARGUMENT
    assert "1024 entries" in (raised.value.message or "")
    # a client that resets its call goes quietly as well
    async for stream in raw_call(worker):
        await stream.send_message(wpb.WorkBatch(items=[item(1, "j-reset", "sleep", seconds="0.2")]))

        async def taken() -> bool:
            return await accepted(worker) == 2

        await eventually(taken, within=10)
        await stream.cancel()  # while its run goes on
    channel = Channel("127.0.0.1", worker.port)
    try:
        status = await wpb.WorkerServiceStub(channel).get_status(wpb.StatusReq())  # still serving
        assert status.jobs_accepted == 2  # j1 and j-reset (its run goes on); no item of the 1,198
    finally:
        channel.close()
    assert "Traceback" not in worker.log()
