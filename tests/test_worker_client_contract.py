"""One contract for the orchestrator's edge to the workers, run against both implementations.

`memory`: MemoryWorkerClient with an in-process MemoryWorker (asyncio and trio). `grpc`:
GrpcWorkerClient against a real `jobworker worker` process (asyncio: grpclib needs it), a RunWork
per wait; `grpc-streamed`: the same with its work streams running (one RunWorkStream per worker
carries the waits), as in the orchestrator. The
dispatcher's in-process tests rely on the twin behaving as the real worker does; this is where
that is shown.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import anyio
import h2.connection
import msgspec
import pytest
import redis.asyncio as aioredis

from app.fleet.batch_job import BatchJob
from app.fleet.job_state import JobState
from app.grpc.fastpath.closed_streams import MAX_CLOSED_STREAMS
from app.grpc.fastpath.coalesced_writes import CoalescedWrites
from app.orchestrator.grpc_worker_client import GrpcWorkerClient
from app.orchestrator.memory_worker_client import MemoryWorker, MemoryWorkerClient
from app.orchestrator.worker_client import Admission, Completion, Reply, WorkerClient
from app.pb import worker as wpb
from app.stores.abc import JobStore
from app.stores.memory import MemoryJobStore
from app.stores.redis.job_store import RedisJobStore
from tests.helpers import WorkerProcess, eventually, free_port, twin_jobs

pytestmark = pytest.mark.anyio


class Fleet:
    """One worker behind a WorkerClient, and the knobs a test turns on it."""

    def __init__(
        self,
        client: WorkerClient,
        address: str,
        *,
        accepted: Callable[[], Any],
        drain: Callable[[], None],
        kill: Callable[[], None],
        store: JobStore,
        streamed: bool = False,
    ) -> None:
        self.client = client
        self.streamed = streamed  # waits go over a work stream
        self.store = store  # where the worker records its runs' outcomes
        self.address = address
        self.accepted = accepted  # async: jobs the worker has taken so far
        self.drain = drain
        self.kill = kill


@pytest.fixture(params=["memory", "grpc", "grpc-streamed"])
def impl(request: pytest.FixtureRequest, anyio_backend: str) -> str:
    if request.param.startswith("grpc") and anyio_backend == "trio":
        pytest.skip("grpclib runs on asyncio only")
    return str(request.param)


@pytest.fixture
def worker_process(
    impl: str, worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> WorkerProcess | None:
    return start_worker(worker_env) if impl.startswith("grpc") else None


@pytest.fixture
async def fleet(
    impl: str, worker_process: WorkerProcess | None, worker_env: dict[str, str]
) -> AsyncIterator[Fleet]:
    redis_url = worker_env["REDIS_URL"]
    if impl == "memory":
        worker = MemoryWorker(twin_jobs())
        store = MemoryJobStore()
        memory = MemoryWorkerClient({"127.0.0.1:1": worker}, store=store)

        async def accepted() -> int:
            return sum(worker.started.values())

        async with anyio.create_task_group() as tg:
            await tg.start(memory.run)
            yield Fleet(
                memory, "127.0.0.1:1", accepted=accepted,
                drain=lambda: setattr(worker, "draining", True), kill=worker.kill,
                store=store,
            )  # fmt: skip
            tg.cancel_scope.cancel()
        return
    assert worker_process is not None
    grpc = GrpcWorkerClient(keepalive_seconds=1, keepalive_timeout_seconds=1)
    redis_client = aioredis.Redis.from_url(redis_url)
    process = worker_process

    async def accepted_on_worker() -> int:
        from grpclib.client import Channel

        channel = Channel("127.0.0.1", process.port)
        try:
            status = await wpb.WorkerServiceStub(channel).get_status(wpb.StatusReq())
        finally:
            channel.close()
        return int(status.jobs_accepted)

    def kill_process() -> None:
        process.signal(signal.SIGKILL)
        process.process.wait(10)  # gone: nothing listens on its port any more

    try:
        async with anyio.create_task_group() as tg:
            if impl == "grpc-streamed":
                await tg.start(grpc.run)
            yield Fleet(
                grpc, process.target, accepted=accepted_on_worker,
                drain=lambda: process.signal(signal.SIGTERM),
                kill=kill_process,
                store=RedisJobStore(redis_client), streamed=impl == "grpc-streamed",
            )  # fmt: skip
            tg.cancel_scope.cancel()
    finally:
        grpc.close()
        await redis_client.aclose()


def job(job_id: str, job_type: str = "echo", token: int = 0, **params: str) -> BatchJob:
    return BatchJob(job_id=job_id, job_type=job_type, params=params, fencing_token=token)


async def test_a_run_with_a_fencing_token_leaves_its_outcome_in_the_job_store(
    fleet: Fleet,
) -> None:
    j = job("o1", token=7, a="1")
    await fleet.client.admit(fleet.address, j)
    completion = await fleet.client.wait(fleet.address, j)
    assert completion.outcome is not None

    async def recorded() -> bool:  # the worker writes it after the run, on its own
        return bool(await fleet.store.outcomes("o1", [7]))

    await eventually(recorded)
    assert await fleet.store.outcomes("o1", [6, 7]) == {7: completion.outcome}
    untokened = job("o2")
    await fleet.client.wait(fleet.address, untokened)
    assert await fleet.store.outcomes("o2", [0]) == {}  # other clients' runs leave nothing


async def test_admit_then_wait_gives_the_outcome(fleet: Fleet) -> None:
    j = job("c1", a="1")
    assert await fleet.client.admit(fleet.address, j) == Admission(reply=Reply.OK, running=True)
    completion = await fleet.client.wait(fleet.address, j)
    assert completion.reply is Reply.OK
    assert completion.outcome is not None
    assert completion.outcome.state is JobState.SUCCEEDED
    assert msgspec.json.decode(completion.outcome.result_json) == {"a": "1"}


async def test_a_known_id_attaches_to_its_run_instead_of_starting_another(fleet: Fleet) -> None:
    j = job("c2", "sleep", seconds="0.3")
    first = await fleet.client.admit(fleet.address, j)
    again = await fleet.client.admit(fleet.address, j)
    assert (first.reply, again.reply, again.running) == (Reply.OK, Reply.OK, True)
    done = await fleet.client.wait(fleet.address, j)
    assert done.outcome is not None
    assert done.outcome.state is JobState.SUCCEEDED
    assert await fleet.accepted() == 1


async def test_a_worker_says_whether_it_knows_a_job(fleet: Fleet) -> None:
    j = job("c11", "sleep", seconds="0.2")
    assert await fleet.client.knows(fleet.address, "c11") is False
    await fleet.client.admit(fleet.address, j)
    assert await fleet.client.knows(fleet.address, "c11") is True  # running
    await fleet.client.wait(fleet.address, j)
    assert await fleet.client.knows(fleet.address, "c11") is True  # and once it has finished
    nowhere = f"127.0.0.1:{free_port()}"
    with anyio.fail_after(10):
        assert await fleet.client.knows(nowhere, "c11") is None
    fleet.client.forget(nowhere)


async def test_waiting_on_an_id_the_worker_does_not_know_runs_it(fleet: Fleet) -> None:
    completion = await fleet.client.wait(fleet.address, job("c3", b="2"))
    assert completion.outcome is not None
    assert completion.outcome.state is JobState.SUCCEEDED
    assert await fleet.accepted() == 1


async def test_an_unknown_job_type_is_rejected(fleet: Fleet) -> None:
    admission = await fleet.client.admit(fleet.address, job("c4", "no-such-job"))
    assert admission.reply is Reply.REJECTED
    assert admission.error.startswith("NOT_FOUND")
    completion = await fleet.client.wait(fleet.address, job("c4", "no-such-job"))
    assert completion.reply is Reply.REJECTED


async def wait_while(fleet: Fleet, j: BatchJob, act: Callable[[], Awaitable[None]]) -> Completion:
    """Admit `j`, then wait for its end in a task while `act` runs; the wait's answer."""
    await fleet.client.admit(fleet.address, j)
    ended: list[Completion] = []

    async def wait() -> None:
        ended.append(await fleet.client.wait(fleet.address, j))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await act()
    return ended[0]


async def test_a_cancelled_run_ends_cancelled(fleet: Fleet) -> None:
    async def cancel() -> None:
        assert await fleet.client.cancel(fleet.address, "c5")

    ended = await wait_while(fleet, job("c5", "sleep", seconds="30"), cancel)
    assert ended.outcome is not None
    assert ended.outcome.state is JobState.CANCELLED
    assert await fleet.client.cancel(fleet.address, "never-seen")  # answered all the same


async def test_a_draining_worker_refuses_new_jobs_and_finishes_its_own(fleet: Fleet) -> None:
    running = job("c6", "sleep", seconds="1")
    assert (await fleet.client.admit(fleet.address, running)).running
    fleet.drain()

    async def refused_now() -> bool:  # a signal takes a moment to reach a real process
        return (await fleet.client.admit(fleet.address, job("c7"))).reply is Reply.REFUSED

    await eventually(refused_now, within=10)
    refused = await fleet.client.admit(fleet.address, job("c7"))
    assert refused.error.startswith("UNAVAILABLE")
    completion = await fleet.client.wait(fleet.address, running)
    assert completion.outcome is not None
    assert completion.outcome.state is JobState.SUCCEEDED


async def test_a_killed_worker_breaks_the_wait_at_once(fleet: Fleet) -> None:
    async def kill() -> None:
        await anyio.wait_all_tasks_blocked()  # the wait is under way
        fleet.kill()

    ended = await wait_while(fleet, job("c8", "sleep", seconds="60"), kill)
    assert ended.reply is Reply.UNREACHABLE
    # a broken stream may be a reset as well as a death: only a refused connection tells
    assert not ended.absent
    fleet.client.forget(fleet.address)  # as the dispatcher does: the next call reconnects
    again = await fleet.client.admit(fleet.address, job("c9"))
    assert again.reply is Reply.UNREACHABLE
    assert again.absent  # nothing listens there any more
    with anyio.fail_after(10):
        assert not await fleet.client.probe(fleet.address)


async def test_nobody_listening_is_unreachable(fleet: Fleet) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    with anyio.fail_after(10):
        admission = await fleet.client.admit(nowhere, job("c10"))
        assert (admission.reply, admission.absent) == (Reply.UNREACHABLE, True)
        completion = await fleet.client.wait(nowhere, job("c10"))
        assert (completion.reply, completion.absent) == (Reply.UNREACHABLE, True)
        assert not await fleet.client.cancel(nowhere, "c10")
        assert not await fleet.client.probe(nowhere)
        assert await fleet.client.probe(fleet.address)
    fleet.client.forget(nowhere)


async def test_a_channel_to_a_worker_remembers_few_closed_streams(fleet: Fleet) -> None:
    """One RunWork per job: with h2's default each worker's connection kept 65,536 closed
    stream ids (~12 MiB) for good; the orchestrator's own channels keep 4,096."""
    if not isinstance(fleet.client, GrpcWorkerClient):
        pytest.skip("HTTP/2 connections are the gRPC client's")
    completion = await fleet.client.wait(fleet.address, job("s1"))
    assert completion.reply is Reply.OK
    protocol = fleet.client._channels[fleet.address]._protocol
    assert protocol is not None
    h2c = protocol.connection._connection
    assert h2c.MAX_CLOSED_STREAMS == MAX_CLOSED_STREAMS == 4096
    assert cast(Any, h2c._closed_streams)._size_limit == 4096
    assert h2.connection.H2Connection.MAX_CLOSED_STREAMS == 2**16  # h2's own, for the others


async def test_the_calls_of_one_loop_turn_share_a_write_to_the_worker(fleet: Fleet) -> None:
    """grpclib writes a call's headers and its message apart: the orchestrator's channels join
    the writes of a loop turn into one send (a loopback send costs 50-100 µs here)."""
    if not isinstance(fleet.client, GrpcWorkerClient) or fleet.streamed:
        pytest.skip("RunWork calls on the gRPC client's HTTP/2 connections (test_work_streams)")
    client = fleet.client
    assert (await client.wait(fleet.address, job("w0"))).reply is Reply.OK  # connected
    protocol = client._channels[fleet.address]._protocol
    assert protocol is not None
    transport = protocol.connection._transport
    assert isinstance(transport, CoalescedWrites)
    writes, chunks = transport.writes, transport.chunks
    replies: list[Reply] = []

    async def call(n: int) -> None:
        replies.append((await client.wait(fleet.address, job(f"w{n}"))).reply)

    async with anyio.create_task_group() as tg:
        for n in range(1, 21):
            tg.start_soon(call, n)
    assert replies == [Reply.OK] * 20
    # 20 calls: at least 40 chunks (headers, message) handed over, far fewer sends
    assert transport.chunks - chunks >= 40
    assert transport.writes - writes <= (transport.chunks - chunks) // 2
