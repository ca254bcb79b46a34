"""One contract suite for the stores of app/stores/abc.py, run against every implementation.

- `memory-asyncio`, `memory-trio`: the in-memory twins; on trio under MockClock(autojump), so
  the waits below (expiry, idle times, block_ms) take no real time;
- `redis-asyncio`: the Redis implementations on the session's real redis-server, FLUSHDB per
  test. There is no `redis-trio`: redis-py's client runs on asyncio only.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
import redis.asyncio as aioredis
import trio.testing
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.config import OrchestratorConfig
from app.core.balancer import PowerOfTwoChoices
from app.errors import BadDataKind, CorruptIndex, CorruptRecord, QueueGone
from app.fleet.batch_job import AttemptRecord, BatchJob, LostJob, RunOutcome, encode_job
from app.fleet.job_index import IndexPosition, advance
from app.fleet.job_state import JobState
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.memory_worker_client import MemoryWorkerClient
from app.orchestrator.service import OrchestratorService
from app.pb import orchestrator as pb
from app.stores.abc import JobEvents, JobStore, PodRegistry, QueueEntry, SubmitResult, WriteResult
from app.stores.memory import MemoryJobEvents, MemoryJobStore, MemoryPodRegistry
from app.stores.redis.batcher import CommandBatcher
from app.stores.redis.job_events import RedisJobEvents
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.pod_registry import RedisPodRegistry
from app.stores.waits import wait_finished
from tests.helpers import RedisServer, eventually

pytestmark = pytest.mark.anyio

RETENTION = 60  # the stores' retention, except in the test of retention itself


@dataclass
class Stores:
    """One implementation of each protocol, on a fresh state (typed: mypy checks the twins)."""

    store: JobStore
    events: JobEvents
    registry: PodRegistry
    # another job store (and its events) with its own retention: fresh in memory, the same
    # database on Redis
    with_retention: Callable[[int], tuple[JobStore, JobEvents]]
    # junk, written behind a store's back: (store, job id, "" | "fence" | "run:<token>", value)
    plant: Callable[[JobStore, str, str, bytes], Awaitable[None]]
    # lose every key, as a Redis that restarted empty (FLUSHDB)
    forget: Callable[[], Awaitable[object]]
    # entries in the job index, behind a store's back: (store, a member (any bytes), a score);
    # and the index's key made to hold a string instead of a sorted set
    plant_index: Callable[[JobStore, bytes, float], Awaitable[None]]
    spoil_index: Callable[[], Awaitable[None]]


@pytest.fixture(
    # redis-batched: the same, with the store's command batcher running (as in an orchestrator)
    params=[
        ("memory", "asyncio"),
        ("memory", "trio"),
        ("redis", "asyncio"),
        ("redis-batched", "asyncio"),
    ],
    ids=lambda p: "-".join(p),
)
def kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param[0].startswith("redis"):
        request.getfixturevalue("redis_client")  # the session's server, flushed
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(kind: tuple[str, str]) -> Any:
    if kind[1] == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return kind[1]


@pytest.fixture
async def stores(kind: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if kind[0] == "memory":

        def memory(retention: int) -> tuple[JobStore, JobEvents]:
            store = MemoryJobStore(retention_seconds=retention)
            return store, MemoryJobEvents(store)

        async def plant_in_memory(store: JobStore, job_id: str, part: str, raw: bytes) -> None:
            assert isinstance(store, MemoryJobStore)
            if part == "fence":
                store._fences.set(job_id, raw)
            elif part.startswith("run:"):
                store._outcomes.set(f"{job_id}:{part[4:]}", raw)
            else:
                store._records.set(job_id, raw)

        store, events = memory(RETENTION)
        assert isinstance(store, MemoryJobStore)
        forget_memory = store.forget_everything

        async def forget() -> None:
            forget_memory()

        async def plant_index_in_memory(into: JobStore, member: bytes, score: float) -> None:
            assert isinstance(into, MemoryJobStore)
            into._index[member] = score

        async def spoil_memory_index() -> None:
            assert isinstance(store, MemoryJobStore)
            store._index_junk = True

        await store.ensure_group()
        yield Stores(store, events, MemoryPodRegistry(), memory, plant_in_memory, forget,
                     plant_index_in_memory, spoil_memory_index)  # fmt: skip
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url)
    batcher = CommandBatcher(client)

    def on_redis(retention: int) -> tuple[JobStore, JobEvents]:
        store = RedisJobStore(client, retention_seconds=retention, batcher=batcher)
        return store, RedisJobEvents(client)

    async def plant_in_redis(store: JobStore, job_id: str, part: str, raw: bytes) -> None:
        await client.set(":".join(p for p in ("wpm-job", job_id, part) if p), raw)

    async def plant_index_in_redis(_: JobStore, member: bytes, score: float) -> None:
        await client.zadd("wpm-jobs:index", {member: score})

    async def spoil_redis_index() -> None:
        await client.delete("wpm-jobs:index")
        await client.set("wpm-jobs:index", b"junk")

    store, events = on_redis(RETENTION)
    await store.ensure_group()
    try:
        async with anyio.create_task_group() as tg:
            if kind[0] == "redis-batched":
                await tg.start(batcher.run)
                assert batcher.running
            yield Stores(store, events, RedisPodRegistry(client), on_redis, plant_in_redis,
                         client.flushdb, plant_index_in_redis, spoil_redis_index)  # fmt: skip
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()


@asynccontextmanager
async def listening(events: JobEvents) -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group with `events` running (ready) in it; cancelled on the way out."""
    async with anyio.create_task_group() as tg:
        await tg.start(events.run)
        yield tg
        tg.cancel_scope.cancel()


class Waiter:
    """A task blocked in `events.wait_changed(job_id)`; `woken` is set when it returns."""

    def __init__(self, events: JobEvents, job_id: str) -> None:
        self.events, self.job_id = events, job_id
        self.woken = anyio.Event()

    @classmethod
    async def start(cls, tg: anyio.abc.TaskGroup, events: JobEvents, job_id: str) -> Waiter:
        waiter = cls(events, job_id)
        await tg.start(waiter._wait)  # subscribed and registered
        return waiter

    async def _wait(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.events.subscribed(self.job_id):
            with self.events.watching(self.job_id) as changed:
                task_status.started()
                await changed.wait()
        self.woken.set()

    async def wait_woken(self) -> None:
        with anyio.fail_after(5):
            await self.woken.wait()


class SpyEvents:
    """`JobEvents` that tells when someone waits (`waiting`), then waits on the real ones."""

    def __init__(self, events: JobEvents) -> None:
        self.events = events
        self.waiting = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.events.run(task_status=task_status)

    async def wait_changed(self, job_id: str) -> None:
        self.waiting.set()  # the real wait registers before its first await: no gap
        await self.events.wait_changed(job_id)

    @asynccontextmanager
    async def subscribed(self, job_id: str) -> AsyncIterator[None]:
        async with self.events.subscribed(job_id):
            yield

    def watching(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        watched = self.events.watching(job_id)  # registered from here on: no gap either
        self.waiting.set()
        return watched

    def watching_cancel(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        return self.events.watching_cancel(job_id)

    def watching_end(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        watched = self.events.watching_end(job_id)
        self.waiting.set()
        return watched


def job(job_id: str = "j1", job_type: str = "echo", **fields: Any) -> BatchJob:
    now = time.time()
    return BatchJob(
        job_id=job_id, job_type=job_type, submitted_at=now, deadline_at=now + 60, **fields
    )


async def get(store: JobStore, job_id: str) -> BatchJob:
    record = await store.get(job_id)
    assert record is not None, f"no record for {job_id}"
    return record


async def start_attempt(store: JobStore, job_id: str, state: JobState) -> tuple[BatchJob, int]:
    """Take a token for the job and write it in `state`, as a dispatcher does."""
    token = await store.next_token(job_id)
    record = await get(store, job_id)
    record.state = state
    record.attempts.append(
        AttemptRecord(number=len(record.attempts) + 1, worker="w1:1", fencing_token=token,
                      started_at=time.time())
    )  # fmt: skip
    assert await store.write(record, token) is WriteResult.WRITTEN
    return record, token


def order(entry: QueueEntry) -> tuple[int, ...]:
    """An entry id's place in the queue (ids are Redis stream ids: `<ms>-<seq>`)."""
    return tuple(int(part) for part in entry[0].split("-"))


# --- the pod registry -----------------------------------------------------------------------------


async def test_registry_put_get_delete(stores: Stores) -> None:
    registry = stores.registry
    assert await registry.get("wpm-apps:1.2.3.4:1") is None
    await registry.put("wpm-apps:1.2.3.4:1", b'{"a":1}', 60)
    assert await registry.get("wpm-apps:1.2.3.4:1") == b'{"a":1}'
    await registry.put("wpm-apps:1.2.3.4:1", b'{"a":2}', 60)
    assert await registry.get("wpm-apps:1.2.3.4:1") == b'{"a":2}'
    await registry.delete("wpm-apps:1.2.3.4:1")
    assert await registry.get("wpm-apps:1.2.3.4:1") is None
    await registry.delete("wpm-apps:1.2.3.4:1")  # deleting twice is fine


async def test_registry_get_many(stores: Stores) -> None:
    registry = stores.registry
    await registry.put("wpm-apps:a:1", b"1", 60)
    await registry.put("wpm-apps:b:2", b"2", 60)
    assert await registry.get_many(["wpm-apps:b:2", "nope", "wpm-apps:a:1"]) == [b"2", None, b"1"]
    assert await registry.get_many([]) == []


async def test_registry_keys_by_prefix(stores: Stores) -> None:
    registry = stores.registry
    for key in ("wpm-apps:a:1", "wpm-apps:b:2", "other:c:3", "wpm-apps*x"):
        await registry.put(key, b"{}", 60)
    assert sorted(await registry.keys("wpm-apps:")) == ["wpm-apps:a:1", "wpm-apps:b:2"]


async def test_registry_entries_expire(stores: Stores) -> None:
    registry = stores.registry
    await registry.put("wpm-apps:x:1", b"{}", 1)
    await registry.put("wpm-apps:y:2", b"{}", 60)

    async def gone() -> bool:
        return await registry.get("wpm-apps:x:1") is None

    await eventually(gone)
    assert await registry.keys("wpm-apps:") == ["wpm-apps:y:2"]
    assert await registry.get_many(["wpm-apps:x:1", "wpm-apps:y:2"]) == [None, b"{}"]


# --- records: submit, the per-type bound, copies --------------------------------------------------


async def test_submit_creates_the_record_and_queues_it(stores: Stores) -> None:
    store = stores.store
    submitted = job("a", params={"n": "1"})
    assert await store.submit(submitted, bound=10) == (SubmitResult.CREATED, None, 0, None)
    assert await store.get("a") == submitted
    assert await store.get("nope") is None
    assert await store.fence("a") == 0
    assert await store.cancel_requested("a") is False
    assert await store.queued_count("echo") == 1
    assert [job_id for _, job_id in await store.read_new("c1", count=10, block_ms=10)] == ["a"]


async def test_a_submit_delivers_the_oldest_unread_entry_to_its_consumer(stores: Stores) -> None:
    """`deliver_to`: the submit hands the oldest unread entry (its own when none waits) to the
    consumer, pending for it as after `read_new`, its first take from the copy; others' reads
    do not get it."""
    store = stores.store
    result, _, _, delivered = await store.submit(job("a"), bound=10, deliver_to="o1")
    assert result is SubmitResult.CREATED
    assert delivered is not None
    assert (delivered.job_id, delivered.dispatched) == ("a", False)
    assert await store.holds_entry(delivered.entry_id)
    assert await store.read_new("o2", count=10, block_ms=10) == []  # o1's now
    copy = await store.take("a")
    assert copy is not None
    assert copy.unverified is not None  # read nothing
    # a backlog: the oldest unread entry goes first, this submit's own stays for the readers
    await store.submit(job("b"), bound=10)
    *_, delivered = await store.submit(job("c"), bound=10, deliver_to="o1")
    assert delivered is not None
    assert delivered.job_id == "b"
    assert [j for _, j in await store.read_new("o2", count=10, block_ms=10)] == ["c"]
    # refused submits deliver nothing
    assert (await store.submit(job("a"), bound=10, deliver_to="o1"))[3] is None
    assert (await store.submit(job("d"), bound=0, deliver_to="o1"))[3] is None
    # claimable as any pending entry once its holder stops
    claimed = await store.claim_idle("o3", min_idle_ms=0, count=10)
    assert sorted(j for _, j in claimed) == ["a", "b", "c"]


def first_attempt(submitted: BatchJob, worker: str = "w1:1") -> BatchJob:
    return msgspec.structs.replace(
        submitted, state=JobState.DISPATCHED, fencing_token=1,
        attempts=[AttemptRecord(number=1, worker=worker, fencing_token=1, started_at=1.0)],
    )  # fmt: skip


async def test_a_submit_that_delivers_its_own_entry_makes_its_first_attempt_too(
    stores: Stores,
) -> None:
    """`dispatched`: when the entry delivered is the job's own, the record is written as its
    first attempt makes it and the fence set to 1, in the same step; the holder writes on with
    token 1. When another entry comes first, nothing of it is written."""
    store = stores.store
    a = job("a")
    *_, delivered = await store.submit(a, bound=10, deliver_to="o1", dispatched=first_attempt(a))
    assert delivered is not None
    assert (delivered.job_id, delivered.dispatched) == ("a", True)
    record = await get(store, "a")
    assert (record.state, record.fencing_token, await store.fence("a")) == (
        JobState.DISPATCHED, 1, 1,
    )  # fmt: skip
    assert record.attempts[0].worker == "w1:1"
    taken = await store.take("a")  # the entry's copy (PENDING) is not used: the store is read
    assert taken is not None
    assert (taken.unverified, taken.fence, taken.job.state) == (None, 1, JobState.DISPATCHED)
    record.state = JobState.SUCCEEDED
    assert await store.write(record, 1, ack=delivered.entry_id) is WriteResult.WRITTEN
    assert not await store.holds_entry(delivered.entry_id)
    # a backlog: the oldest entry is delivered, plain; this job stays PENDING in the queue
    await store.submit(job("b"), bound=10)
    c = job("c")
    *_, delivered = await store.submit(c, bound=10, deliver_to="o1", dispatched=first_attempt(c))
    assert delivered is not None
    assert (delivered.job_id, delivered.dispatched) == ("b", False)
    assert ((await get(store, "c")).state, await store.fence("c")) == (JobState.PENDING, 0)
    # without a delivery, nothing of it is written
    d = job("d")
    assert (await store.submit(d, bound=10, dispatched=first_attempt(d)))[3] is None
    assert ((await get(store, "d")).state, await store.fence("d")) == (JobState.PENDING, 0)
    # a fence there already (left over, or junk): the job goes the usual way, which meets it
    await stores.plant(store, "e", "fence", b"7")
    e = job("e")
    await store.read_new("o2", count=10, block_ms=10)  # nothing unread before e's own entry
    *_, delivered = await store.submit(e, bound=10, deliver_to="o1", dispatched=first_attempt(e))
    assert delivered is not None
    assert (delivered.job_id, delivered.dispatched) == ("e", False)
    assert ((await get(store, "e")).state, await store.fence("e")) == (JobState.PENDING, 7)


async def test_a_fresh_entry_is_taken_from_its_copy_once_and_its_first_write_expects_it(
    stores: Stores,
) -> None:
    """The entry carries the record as submitted: its first take reads nothing (a record
    changed behind it still comes back as the copy), and a write that expects the copy is
    refused once the record is not that any more; the next take reads the store."""
    store = stores.store
    for job_id in ("a", "b"):
        await store.submit(job(job_id), bound=10)
    assert len(await store.read_new("c1", count=10, block_ms=10)) == 2
    await store.request_cancel("a", error="stop", now=time.time())  # behind the copy's back
    copy = await store.take("a")
    assert copy is not None
    assert copy.unverified is not None
    assert (copy.job.state, copy.fence, copy.cancel_requested) == (JobState.PENDING, 0, False)
    record = copy.job
    record.state = JobState.DISPATCHED
    assert await store.write(record, 0, advance=True, expect=copy.unverified) is (
        WriteResult.SUPERSEDED
    )
    again = await store.take("a")  # the copy is spent: the store is read
    assert again is not None
    assert (again.unverified, again.job.state, again.fence) == (None, JobState.CANCELLED, 1)
    # unchanged, the copy is the record: the dispatch is written
    fresh = await store.take("b")
    assert fresh is not None
    assert fresh.unverified is not None
    fresh.job.state = JobState.DISPATCHED
    assert await store.write(fresh.job, 0, advance=True, expect=fresh.unverified) is (
        WriteResult.WRITTEN
    )
    assert (await get(store, "b")).state is JobState.DISPATCHED
    assert await store.fence("b") == 1
    # a record that changed with its fence unchanged (Redis lost the fence but kept a record
    # a holder had written): the token matches, the record does not
    await store.submit(job("c"), bound=10)
    await store.read_new("c1", count=10, block_ms=10)
    written_elsewhere = job("c")
    written_elsewhere.attempts.append(
        AttemptRecord(number=1, worker="w1:1", fencing_token=1, started_at=time.time())
    )
    await stores.plant(store, "c", "", encode_job(written_elsewhere))
    stale = await store.take("c")
    assert stale is not None
    assert stale.unverified is not None
    assert not stale.job.attempts
    assert await store.write(stale.job, 0, expect=stale.unverified) is WriteResult.SUPERSEDED
    assert (await get(store, "c")).attempts == written_elsewhere.attempts


async def test_submit_is_idempotent(stores: Stores) -> None:
    store = stores.store
    original = job("a", params={"n": "1"})
    assert (await store.submit(original, bound=10))[0] is SubmitResult.CREATED
    result, existing, _, _ = await store.submit(job("a", params={"n": "2"}), bound=10)
    assert result is SubmitResult.EXISTS
    assert existing == original
    assert await store.get("a") == original
    assert await store.queued_count("echo") == 1  # counted once
    entries = await store.read_new("c1", count=10, block_ms=10)
    assert [job_id for _, job_id in entries] == ["a"]  # queued once


def orchestrator_on(stores: Stores) -> OrchestratorService:
    """The orchestrator's service on these stores (its dispatcher built, not running)."""
    directory = WorkerDirectory(stores.registry)
    config = OrchestratorConfig()
    dispatcher = Dispatcher(stores.store, stores.events, directory, MemoryWorkerClient({}),
                            PowerOfTwoChoices(), config, consumer="o1")  # fmt: skip
    return OrchestratorService(stores.store, stores.events, directory, dispatcher, config)


async def test_a_reused_id_is_answered_only_for_the_same_request(stores: Stores) -> None:
    """Submit and Execute: the same id with the same job type and params answers the existing
    job; with another type or other params, ALREADY_EXISTS naming what differs. The store
    returns the existing record from the submit's one round trip; nothing is queued again."""
    store, service = stores.store, orchestrator_on(stores)

    def request(**fields: Any) -> pb.BatchExecutionRequest:
        return pb.BatchExecutionRequest(**{"job_id": "r1", "job_type": "echo",
                                           "params": {"n": "1"}, **fields})  # fmt: skip

    first = await service.submit(request())
    assert (first.job_id, first.existing) == ("r1", False)
    # the other options of the first submission stand: the same job
    again = await service.submit(request(priority=5, timeout_seconds=9))
    assert (again.job_id, again.existing) == ("r1", True)
    refusals = [
        (request(job_type="sleep"), "job 'r1' exists with job type 'echo', not 'sleep'"),
        (request(params={"n": "2"}),
         "job 'r1' exists with other params: params.n was '1', now '2'"),
        (request(params={}),
         "job 'r1' exists with other params: params.n was '1', now not given"),
        (request(params={"n": "1", "b": "x", "a": "y"}),
         "job 'r1' exists with other params: params.a was not given, now 'y' (and 1 more)"),
    ]  # fmt: skip
    for call in (service.submit, service.execute):
        for changed, message in refusals:
            with pytest.raises(GRPCError) as refused:
                await call(changed)
            assert (refused.value.status, refused.value.message) == (
                Status.ALREADY_EXISTS, message
            )  # fmt: skip
    assert (await get(store, "r1")).params == {"n": "1"}
    assert (await store.queued_count("echo"), await store.queued_count("sleep")) == (1, 0)
    entries = await store.read_new("c1", count=10, block_ms=10)
    assert [job_id for _, job_id in entries] == ["r1"]  # queued once
    # Execute of the same request waits for the existing job: here it has ended already
    record, token = await start_attempt(store, "r1", JobState.RUNNING)
    record.state, record.result_json = JobState.SUCCEEDED, '{"n": "1"}'
    assert await store.write(record, token) is WriteResult.WRITTEN
    done = await service.execute(request())
    assert done.job is not None
    assert (done.job.job_id, done.job.result_json) == ("r1", '{"n": "1"}')
    assert done.job.state == pb.JobState.SUCCEEDED


async def test_submit_is_bounded_per_type_and_a_finished_job_frees_its_slot(
    stores: Stores,
) -> None:
    store = stores.store
    assert (await store.submit(job("a"), bound=2))[0] is SubmitResult.CREATED
    assert (await store.submit(job("b"), bound=2))[0] is SubmitResult.CREATED
    assert await store.submit(job("c"), bound=2) == (SubmitResult.QUEUE_FULL, None, 2, None)
    assert await store.get("c") is None  # nothing of a refused job is kept
    assert (await store.submit(job("x", "other"), bound=2))[0] is SubmitResult.CREATED
    assert (await store.queued_count("echo"), await store.queued_count("other")) == (2, 1)
    entries = await store.read_new("c1", count=10, block_ms=10)
    assert [job_id for _, job_id in entries] == ["a", "b", "x"]

    record, token = await start_attempt(store, "a", JobState.RUNNING)
    assert await store.queued_count("echo") == 2  # a running job still counts
    record.state = JobState.SUCCEEDED
    assert await store.write(record, token) is WriteResult.WRITTEN
    assert await store.queued_count("echo") == 1
    assert (await store.submit(job("c"), bound=2))[0] is SubmitResult.CREATED
    assert await store.submit(job("d"), bound=2) == (SubmitResult.QUEUE_FULL, None, 2, None)


async def test_a_known_id_answers_its_job_even_when_its_type_is_full(stores: Stores) -> None:
    store = stores.store
    first = job("a")
    assert (await store.submit(first, bound=1))[0] is SubmitResult.CREATED
    assert await store.submit(job("a"), bound=1) == (SubmitResult.EXISTS, first, 0, None)
    assert await store.submit(job("b"), bound=1) == (SubmitResult.QUEUE_FULL, None, 1, None)
    assert await store.queued_count("echo") == 1  # neither the repeat nor the refusal counted
    assert await store.submit(job("a"), bound=2) == (SubmitResult.EXISTS, first, 0, None)
    assert await store.queued_count("echo") == 1
    assert [j for _, j in await store.read_new("c1", count=10, block_ms=10)] == ["a"]


async def test_the_store_keeps_copies(stores: Stores) -> None:
    store = stores.store
    submitted = job("a", params={"n": "1"})
    await store.submit(submitted, bound=10)
    submitted.params["n"] = "changed after submit"
    read = await get(store, "a")
    assert read.params == {"n": "1"}
    read.params["n"] = "changed after get"
    read.attempts.append(AttemptRecord(number=1, worker="w", fencing_token=0, started_at=0))
    again = await get(store, "a")
    assert (again.params, again.attempts) == ({"n": "1"}, [])
    token = await store.next_token("a")
    assert await store.write(read, token) is WriteResult.WRITTEN
    read.attempts.clear()
    assert len((await get(store, "a")).attempts) == 1


# --- fencing --------------------------------------------------------------------------------------


async def test_a_dispatch_takes_the_next_token_with_its_write(stores: Stores) -> None:
    store = stores.store
    await store.submit(job(), bound=10)
    record = await get(store, "j1")
    record.state = JobState.DISPATCHED
    assert await store.write(record, 0, advance=True) is WriteResult.WRITTEN
    assert record.fencing_token == 1  # the caller's record carries the token it is stored under
    assert await store.fence("j1") == 1
    stored = await get(store, "j1")
    assert (stored.state, stored.fencing_token) == (JobState.DISPATCHED, 1)
    # made again after a lost reply: the same record under that token is there already
    assert await store.write(record, 0, advance=True) is WriteResult.WRITTEN
    assert await store.fence("j1") == 1
    # anything else under the old token is refused: another dispatch, a plain write
    other = await get(store, "j1")
    other.attempts.append(AttemptRecord(number=1, worker="w2:1", fencing_token=1, started_at=1))
    assert await store.write(other, 0, advance=True) is WriteResult.SUPERSEDED
    assert await store.write(other, 0) is WriteResult.SUPERSEDED
    assert await store.fence("j1") == 1
    # the holder of the new token goes on, and can take the next one (a retry)
    assert await store.write(other, 1, advance=True) is WriteResult.WRITTEN
    assert (await store.fence("j1"), (await get(store, "j1")).fencing_token) == (2, 2)
    # a cancel of a PENDING job takes a token of its own: a dispatch after it is refused
    pending = await get(store, "j1")
    pending.state = JobState.PENDING
    assert await store.write(pending, 2) is WriteResult.WRITTEN
    await store.request_cancel("j1", error="stop", now=time.time())
    pending.state = JobState.DISPATCHED
    assert await store.write(pending, 2, advance=True) is WriteResult.SUPERSEDED
    assert (await get(store, "j1")).state is JobState.CANCELLED
    # no record: nothing to dispatch (and no fence left behind)
    ghost = job("ghost")
    assert await store.write(ghost, 0, advance=True) is WriteResult.MISSING
    assert await store.fence("ghost") == 0


async def test_a_late_result_from_a_superseded_attempt_is_refused(stores: Stores) -> None:
    store = stores.store
    await store.submit(job(), bound=10)
    _, old = await start_attempt(store, "j1", JobState.DISPATCHED)
    assert (await get(store, "j1")).fencing_token == old  # the write stamps its token
    new = await store.next_token("j1")  # a re-dispatch takes over
    assert new == old + 1
    assert await store.fence("j1") == new
    late = await get(store, "j1")
    late.state, late.result_json = JobState.SUCCEEDED, '"from the old attempt"'
    assert await store.write(late, old) is WriteResult.SUPERSEDED
    assert await store.write(late, new + 1) is WriteResult.SUPERSEDED  # not a token yet
    current = await get(store, "j1")
    assert (current.state, current.result_json) == (JobState.DISPATCHED, "")
    current.state, current.result_json = JobState.SUCCEEDED, '"from the new attempt"'
    assert await store.write(current, new) is WriteResult.WRITTEN
    # the outcome is final: not even the token holder rewrites it
    current.state = JobState.FAILED
    assert await store.write(current, new) is WriteResult.ALREADY_FINISHED
    final = await get(store, "j1")
    assert (final.state, final.result_json) == (JobState.SUCCEEDED, '"from the new attempt"')
    assert final.fencing_token == new
    assert await store.queued_count("echo") == 0  # the bound counts unfinished jobs only


async def test_a_write_to_an_unknown_record_is_missing(stores: Stores) -> None:
    store = stores.store
    assert await store.fence("ghost") == 0
    assert await store.write(job("ghost"), 0) is WriteResult.MISSING
    token = await store.next_token("ghost")
    assert token == 1
    assert await store.write(job("ghost"), token) is WriteResult.MISSING
    # no record comes first, whatever the token: a store that lost it lost its fence too
    assert await store.write(job("ghost"), 0) is WriteResult.MISSING
    assert await store.get("ghost") is None
    assert await store.queued_count("echo") == 0


# --- retention ------------------------------------------------------------------------------------


async def test_a_finished_record_expires_after_the_retention(stores: Stores) -> None:
    store, _ = stores.with_retention(1)
    await store.ensure_group()  # on Redis a second time: that is fine
    await store.submit(job("done"), bound=10)
    await store.submit(job("open"), bound=10)
    entries = await store.read_new("c1", count=10, block_ms=10)
    record, token = await start_attempt(store, "done", JobState.RUNNING)
    await start_attempt(store, "open", JobState.RUNNING)
    await store.request_cancel("done", error="stop", now=time.time())
    # the flag's retention runs from the request; let half of it pass, so that the record's
    # (from the end) ends later: the flag must then be kept as long as the record
    await anyio.sleep(0.5)
    record.state = JobState.CANCELLED
    finished = anyio.current_time()
    assert await store.write(record, token) is WriteResult.WRITTEN
    await store.next_token("done")  # a token taken late expires with the record all the same
    assert (await get(store, "done")).state is JobState.CANCELLED  # kept for the retention

    async def expired() -> bool:
        flag = await store.cancel_requested("done")  # first: it may not go before the record
        gone = await store.get("done") is None
        assert flag or gone, "the cancel flag expired before the record"
        return gone

    await eventually(expired)
    assert anyio.current_time() - finished >= 0.9  # the retention, not sooner
    # its fence and cancel flag went with it; an unfinished record has no expiry
    assert await store.fence("done") == 0
    assert await store.cancel_requested("done") is False
    assert (await get(store, "open")).state is JobState.RUNNING
    assert await store.fence("open") == 1
    # the queue entry outlives its record: it is still handed out, for its taker to ack
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == entries
    # the id is free again, and the job is counted once more
    assert (await store.submit(job("done"), bound=2))[0] is SubmitResult.CREATED
    assert await store.queued_count("echo") == 2


async def test_a_job_cancelled_while_pending_expires_too(stores: Stores) -> None:
    store, _ = stores.with_retention(1)
    await store.submit(job("a"), bound=10)
    await store.request_cancel("a", error="stop", now=time.time())

    async def expired() -> bool:
        return await store.get("a") is None

    await eventually(expired)
    assert await store.fence("a") == 0
    assert await store.cancel_requested("a") is False


# --- the queue ------------------------------------------------------------------------------------


async def test_a_run_outcome_is_kept_per_token_and_the_first_stays(stores: Stores) -> None:
    store = stores.store
    done = RunOutcome(state=JobState.SUCCEEDED, result_json='{"a":1}')
    assert await store.outcomes("j1", []) == {}
    assert await store.record_outcomes([("j1", 3, done)]) == [True]
    failed = RunOutcome(state=JobState.FAILED, error="x")
    cancelled = RunOutcome(state=JobState.CANCELLED)
    # several at once (a worker's runs that ended together): each kept unless one is there
    assert await store.record_outcomes([("j1", 3, failed), ("j1", 5, cancelled)]) == [False, True]
    assert await store.record_outcomes([]) == []
    found = await store.outcomes("j1", [2, 3, 5])
    assert found == {3: done, 5: cancelled}
    assert await store.outcomes("j2", [3]) == {}  # per job


async def test_read_new_hands_each_entry_to_one_consumer_once(stores: Stores) -> None:
    store = stores.store
    for job_id in ("a", "b", "c"):
        await store.submit(job(job_id), bound=10)
    first = await store.read_new("c1", count=2, block_ms=10)
    assert [job_id for _, job_id in first] == ["a", "b"]
    second = await store.read_new("c2", count=10, block_ms=10)
    assert [job_id for _, job_id in second] == ["c"]
    assert await store.read_new("c1", count=10, block_ms=10) == []
    assert await store.read_new("c2", count=10, block_ms=10) == []
    entries = first + second
    assert sorted(entries, key=order) == entries  # entry ids order the queue
    assert len({entry_id for entry_id, _ in entries}) == 3


async def test_read_new_waits_up_to_block_ms_for_nothing(stores: Stores) -> None:
    store = stores.store
    started = anyio.current_time()
    with anyio.fail_after(5):
        assert await store.read_new("c1", count=10, block_ms=200) == []
    assert anyio.current_time() - started >= 0.19


async def test_a_submit_wakes_blocked_readers(stores: Stores) -> None:
    store = stores.store
    got: dict[str, list[QueueEntry]] = {}

    async def read(consumer: str, block_ms: int) -> None:
        got[consumer] = await store.read_new(consumer, count=1, block_ms=block_ms)

    started = anyio.current_time()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read, "forever", 0)  # 0: until an entry comes
            tg.start_soon(read, "a-minute", 60_000)
            await anyio.wait_all_tasks_blocked()
            await store.submit(job("a"), bound=10)
            await store.submit(job("b"), bound=10)
    # woken by the submits, not by a timeout (on MockClock, a missed wake-up jumps a minute)
    assert anyio.current_time() - started < 5
    assert sorted(job_id for entries in got.values() for _, job_id in entries) == ["a", "b"]
    assert [len(entries) for entries in got.values()] == [1, 1]


async def test_idle_entries_are_claimed_and_kept_alive_ones_are_not(stores: Stores) -> None:
    store = stores.store
    for job_id in ("held", "dropped", "also-dropped"):
        await store.submit(job(job_id), bound=10)
    entries = {j: e for e, j in await store.read_new("dead", count=10, block_ms=10)}
    assert await store.claim_idle("rescuer", min_idle_ms=60_000, count=10) == []  # not idle yet

    # its owner keeps "held" alive until the others have been idle long enough to be claimed
    with anyio.fail_after(5):
        while True:
            await store.keep_alive("dead", [entries["held"]])
            claimed = await store.claim_idle("rescuer", min_idle_ms=100, count=1)
            if claimed:
                break
            await anyio.sleep(0.01)
    assert claimed == [(entries["dropped"], "dropped")]  # the lower id first, `count` at most
    await store.keep_alive("dead", [entries["held"]])
    assert await store.claim_idle("rescuer", min_idle_ms=100, count=10) == [
        (entries["also-dropped"], "also-dropped")
    ]
    # a claim resets the idle time: the rescuer's entries are not idle now
    assert await store.claim_idle("other", min_idle_ms=100, count=10) == []
    # with no minimum, every pending entry is claimed, in id order
    everything = await store.claim_idle("other", min_idle_ms=0, count=10)
    assert [j for _, j in everything] == ["held", "dropped", "also-dropped"]
    assert await store.read_new("other", count=10, block_ms=10) == []  # claimed is not new


async def test_stopped_consumers_are_removed_once_they_hold_nothing(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("done"), bound=10)
    ((done, _),) = await store.read_new("idle", count=10, block_ms=10)
    await store.ack(done)  # "idle" holds nothing now
    await store.submit(job("x"), bound=10)
    ((entry, _),) = await store.read_new("dead", count=10, block_ms=10)

    async def removed_once_idle(name: str, keep: str) -> list[str]:
        with anyio.fail_after(5):
            while True:
                removed = await store.remove_idle_consumers(min_idle_ms=100, keep=keep)
                if name in removed:
                    return removed
                await anyio.sleep(0.02)  # idle time only passes

    # "dead" holds an entry: it stays, or its job could never be claimed
    assert await removed_once_idle("idle", keep="me") == ["idle"]
    assert await store.claim_idle("rescuer", min_idle_ms=0, count=10) == [(entry, "x")]
    assert await removed_once_idle("dead", keep="rescuer") == ["dead"]
    # the rescuer holds the entry now, and is kept besides; nobody else is left
    assert await store.remove_idle_consumers(min_idle_ms=0, keep="me") == []
    assert await store.claim_idle("other", min_idle_ms=0, count=10) == [(entry, "x")]


async def test_keep_alive_moves_only_pending_entries(stores: Stores) -> None:
    store = stores.store
    for job_id in ("a", "b"):
        await store.submit(job(job_id), bound=10)
    (entry_a, _), (entry_b, _) = await store.read_new("c1", count=10, block_ms=10)
    await store.ack(entry_b)
    await store.keep_alive("c2", [entry_a, entry_b, "0-99999"])  # b is acked, 0-99999 unknown
    assert await store.claim_idle("c3", min_idle_ms=0, count=10) == [(entry_a, "a")]
    await store.keep_alive("c2", [])  # nothing to do


async def test_ack_removes_the_entry(stores: Stores) -> None:
    store = stores.store
    for job_id in ("a", "b"):
        await store.submit(job(job_id), bound=10)
    (entry_a, _), (entry_b, _) = await store.read_new("c1", count=10, block_ms=10)
    await store.ack(entry_a)
    await store.ack(entry_a)  # twice is fine
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == [(entry_b, "b")]
    await store.ack(entry_b)
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == []
    assert await store.read_new("c2", count=10, block_ms=10) == []
    assert await store.get("a") is not None  # the record stays: an ack ends the entry only


async def test_holds_entry_says_whether_the_queue_still_has_it(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("a"), bound=10)
    ((entry, _),) = await store.read_new("c1", count=10, block_ms=10)
    assert await store.holds_entry(entry)  # read, pending
    await store.ack(entry)
    assert not await store.holds_entry(entry)
    assert not await store.holds_entry("0-99999")  # never there


async def test_take_reads_the_record_its_fence_and_its_cancel_flag(stores: Stores) -> None:
    store = stores.store
    assert await store.take("none") is None
    await store.submit(job("t"), bound=10)
    taken = await store.take("t")
    assert taken is not None
    assert (taken.job.job_id, taken.fence, taken.cancel_requested) == ("t", 0, False)
    _, token = await start_attempt(store, "t", JobState.RUNNING)
    await store.request_cancel("t", error="stop", now=time.time())
    taken = await store.take("t")
    assert taken is not None
    assert (taken.job.state, taken.fence, taken.cancel_requested) == (JobState.RUNNING, token, True)
    await stores.plant(store, "t", "fence", b"junk")
    with pytest.raises(CorruptRecord) as caught:
        await store.take("t")
    assert caught.value.kind is BadDataKind.FENCING_TOKEN
    await stores.plant(store, "t", "", b"{junk")  # the record is said first
    with pytest.raises(CorruptRecord) as caught:
        await store.take("t")
    assert caught.value.kind is BadDataKind.JOB_RECORD


async def test_a_final_write_acks_its_entry_only_when_it_is_made(stores: Stores) -> None:
    store = stores.store
    for job_id in ("a", "b", "c"):
        await store.submit(job(job_id), bound=10)
    entries = dict((j, e) for e, j in await store.read_new("c1", count=10, block_ms=10))
    record, token = await start_attempt(store, "a", JobState.DISPATCHED)
    record.state = JobState.RUNNING  # not final: the entry stays
    assert await store.write(record, token, ack=entries["a"]) is WriteResult.WRITTEN
    stale, old = await start_attempt(store, "b", JobState.DISPATCHED)
    await store.next_token("b")  # taken over: the old holder's end is refused, entry kept
    stale.state = JobState.SUCCEEDED
    assert await store.write(stale, old, ack=entries["b"]) is WriteResult.SUPERSEDED
    done, token_c = await start_attempt(store, "c", JobState.RUNNING)
    done.state = JobState.SUCCEEDED
    assert await store.write(done, token_c, ack=entries["c"]) is WriteResult.WRITTEN
    assert (await get(store, "c")).state is JobState.SUCCEEDED
    assert await store.queued_count("echo") == 2
    # only c's entry is gone: a and b are still pending, and are claimed
    claimed = await store.claim_idle("c2", min_idle_ms=0, count=10)
    assert sorted(job_id for _, job_id in claimed) == ["a", "b"]
    # made again (a broken connection's retry): refused as finished, nothing else changes
    assert await store.write(done, token_c, ack=entries["c"]) is WriteResult.ALREADY_FINISHED
    assert await store.queued_count("echo") == 2


async def test_a_fence_that_went_back_in_time_is_restored_by_its_holder(stores: Stores) -> None:
    store = stores.store
    await store.submit(job(), bound=10)
    record, token = await start_attempt(store, "j1", JobState.DISPATCHED)
    assert not await store.restore_fence("j1", token)  # not behind: nothing to do
    assert not await store.restore_fence("j1", token - 1)
    # Redis lost the writes since the submit: the fence is back before this attempt's INCR
    await stores.forget()
    await store.submit(job(), bound=10)
    assert await store.fence("j1") == token - 1
    record.state = JobState.SUCCEEDED
    assert await store.write(record, token) is WriteResult.SUPERSEDED
    assert await store.restore_fence("j1", token)
    assert await store.fence("j1") == token
    assert await store.write(record, token) is WriteResult.WRITTEN
    assert await store.next_token("j1") == token + 1


# --- the store lost its data ----------------------------------------------------------------------


async def test_after_the_store_lost_its_data_the_queue_is_gone_until_remade(
    stores: Stores,
) -> None:
    store = stores.store
    assert not await store.ensure_group()  # made by the fixture: not again
    await store.submit(job("old"), bound=10)
    ((old_entry, _),) = await store.read_new("c1", count=10, block_ms=10)
    await stores.forget()
    with pytest.raises(QueueGone):
        await store.read_new("c1", count=10, block_ms=10)
    with pytest.raises(QueueGone):
        await store.claim_idle("c1", min_idle_ms=0, count=10)
    with pytest.raises(QueueGone):
        await store.keep_alive("c1", [old_entry])
    await store.ack(old_entry)  # nothing to ack: fine
    # a submit to the empty store queues, and the group made again reads it from the start
    assert (await store.submit(job("new"), bound=10))[0] is SubmitResult.CREATED
    assert await store.ensure_group()
    assert not await store.ensure_group()
    assert [j for _, j in await store.read_new("c1", count=10, block_ms=10)] == ["new"]
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) != []
    assert await store.get("old") is None


async def test_a_job_whose_record_vanished_is_noted_lost(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("gone"), bound=10)
    await store.submit(job("kept"), bound=10)
    held, token = await start_attempt(store, "gone", JobState.RUNNING)
    await stores.forget()
    await store.ensure_group()
    await store.submit(job("kept"), bound=10)
    held.state = JobState.SUCCEEDED
    assert await store.write(held, token) is WriteResult.MISSING
    await store.next_token("gone")  # a dispatcher about to try again leaves a token behind
    lost = LostJob(job_id="gone", reason="vanished", noticed_by="c1", noticed_at=time.time(),
                   job_type="echo", state="SUCCEEDED", worker="w1:1", attempts=1)  # fmt: skip
    assert await store.report_lost(lost)
    assert await store.fence("gone") == 0  # what was left of it is dropped
    assert not await store.report_lost(LostJob(job_id="kept", reason="?", noticed_by="c1",
                                               noticed_at=time.time()))  # fmt: skip
    assert await store.lost_jobs(count=10) == [lost]
    later = msgspec.structs.replace(lost, job_id="gone-too", noticed_at=lost.noticed_at + 1)
    assert await store.report_lost(later)
    assert await store.lost_jobs(count=10) == [later, lost]  # newest first
    assert await store.lost_jobs(count=1) == [later]


# --- cancel requests ------------------------------------------------------------------------------


async def test_cancel_ends_a_pending_job_under_a_new_token(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=1)
    (entry, _), = await store.read_new("c1", count=10, block_ms=10)  # fmt: skip
    held = await store.next_token("a")  # a dispatcher holds it, not yet written (still PENDING)
    async with listening(events) as tg:
        waiter = await Waiter.start(tg, events, "a")
        after = await store.request_cancel("a", error="cancelled by user", now=1234.5)
        await waiter.wait_woken()
    assert after is not None
    assert (after.state, after.error, after.finished_at) == (
        JobState.CANCELLED, "cancelled by user", 1234.5
    )  # fmt: skip
    assert after.fencing_token == held + 1
    assert await store.get("a") == after
    assert await store.fence("a") == held + 1
    assert await store.cancel_requested("a") is True
    # the holder is refused from now on, and the bound has a free slot again
    late = await get(store, "a")
    late.state = JobState.DISPATCHED
    assert await store.write(late, held) is WriteResult.SUPERSEDED
    assert (await get(store, "a")).state is JobState.CANCELLED
    assert await store.queued_count("echo") == 0
    assert (await store.submit(job("b"), bound=1))[0] is SubmitResult.CREATED
    # asking again changes nothing
    assert await store.request_cancel("a", error="again", now=9.0) == after
    assert await store.fence("a") == held + 1
    await store.ack(entry)


@pytest.mark.parametrize("state", [JobState.DISPATCHED, JobState.RUNNING])
async def test_cancel_leaves_a_job_on_a_worker_to_its_holder(
    stores: Stores, state: JobState
) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    await start_attempt(store, "a", state)
    before = await get(store, "a")
    async with listening(events) as tg:
        waiter = await Waiter.start(tg, events, "a")
        after = await store.request_cancel("a", error="cancelled by user", now=1234.5)
        await waiter.wait_woken()
    assert after == before
    assert await store.get("a") == before
    assert await store.cancel_requested("a") is True
    assert await store.fence("a") == before.fencing_token
    assert await store.queued_count("echo") == 1
    # the holder ends it once the worker has stopped it
    before.state, before.error = JobState.CANCELLED, "cancelled by user"
    assert await store.write(before, before.fencing_token) is WriteResult.WRITTEN
    assert await store.queued_count("echo") == 0


async def test_cancel_leaves_a_finished_job_alone(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("a"), bound=10)
    record, token = await start_attempt(store, "a", JobState.RUNNING)
    record.state, record.result_json = JobState.SUCCEEDED, '"done"'
    assert await store.write(record, token) is WriteResult.WRITTEN
    final = await get(store, "a")
    assert await store.request_cancel("a", error="too late", now=1.0) == final
    assert await store.get("a") == final
    assert await store.cancel_requested("a") is False
    assert await store.fence("a") == token


async def test_cancel_of_an_unknown_job_is_none(stores: Stores) -> None:
    store = stores.store
    assert await store.request_cancel("ghost", error="x", now=1.0) is None
    assert await store.cancel_requested("ghost") is False
    assert await store.get("ghost") is None


# --- events and waits -----------------------------------------------------------------------------


async def test_a_write_wakes_the_waiters_of_its_job_only(stores: Stores) -> None:
    store, events = stores.store, stores.events
    for job_id in ("a", "b"):
        await store.submit(job(job_id), bound=10)
    async with listening(events) as tg:
        waiter_a = await Waiter.start(tg, events, "a")
        waiter_b = await Waiter.start(tg, events, "b")
        also_b = await Waiter.start(tg, events, "b")
        await start_attempt(store, "b", JobState.DISPATCHED)
        await waiter_b.wait_woken()
        await also_b.wait_woken()
        await anyio.wait_all_tasks_blocked()
        assert not waiter_a.woken.is_set()
        await start_attempt(store, "a", JobState.DISPATCHED)
        await waiter_a.wait_woken()


async def test_a_refused_write_wakes_nobody(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    record, old = await start_attempt(store, "a", JobState.DISPATCHED)
    await store.next_token("a")
    async with listening(events) as tg:
        waiter = await Waiter.start(tg, events, "a")
        record.state = JobState.SUCCEEDED
        assert await store.write(record, old) is WriteResult.SUPERSEDED
        await store.submit(job("b"), bound=10)
        witness = await Waiter.start(tg, events, "b")
        await start_attempt(store, "b", JobState.DISPATCHED)
        await witness.wait_woken()  # changes arrive in order: a change of "a" would be in
        await anyio.wait_all_tasks_blocked()
        assert not waiter.woken.is_set()


async def test_a_change_between_watching_and_waiting_wakes_the_wait(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    record, token = await start_attempt(store, "a", JobState.DISPATCHED)
    async with listening(events), events.subscribed("a"):
        with events.watching("a") as changed:
            assert (await get(store, "a")).state is JobState.DISPATCHED  # the read, then ...
            record.state = JobState.RUNNING  # ... a change before the wait begins
            assert await store.write(record, token) is WriteResult.WRITTEN
            with anyio.fail_after(1):  # not the 2 s re-read: the change itself wakes it
                await changed.wait()
        with events.watching("a") as unchanged:
            await anyio.wait_all_tasks_blocked()
            assert not unchanged.is_set()  # a watch sees changes from its start only


async def test_a_cancel_watch_is_woken_by_a_cancel_request_not_by_writes(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    record, token = await start_attempt(store, "a", JobState.DISPATCHED)
    async with listening(events), events.subscribed("a"):
        with events.watching_cancel("a") as asked, events.watching("a") as changed:
            record.state = JobState.RUNNING
            assert await store.write(record, token) is WriteResult.WRITTEN
            with anyio.fail_after(1):
                await changed.wait()  # the write arrived ...
            assert not asked.is_set()  # ... and left the cancel watch be
            await store.request_cancel("a", error="stop", now=time.time())
            with anyio.fail_after(1):
                await asked.wait()


async def test_an_end_watch_is_woken_by_the_write_that_ends_the_job_only(stores: Stores) -> None:
    """Execute waits for the end: the writes before it (RUNNING) and a cancel request wake
    nobody (no read each), the final write does."""
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    record, token = await start_attempt(store, "a", JobState.DISPATCHED)
    async with listening(events), events.subscribed("a"):
        with events.watching_end("a") as ended, events.watching("a") as changed:
            record.state = JobState.RUNNING
            assert await store.write(record, token) is WriteResult.WRITTEN
            with anyio.fail_after(1):
                await changed.wait()  # the write arrived ...
            await store.request_cancel("a", error="stop", now=time.time())
            with events.watching_cancel("a") as asked, anyio.fail_after(1):
                await store.request_cancel("a", error="stop", now=time.time())
                await asked.wait()  # ... and the cancel requests
            await anyio.wait_all_tasks_blocked()
            assert not ended.is_set()  # ... neither of which ended the job
            record.state = JobState.CANCELLED
            assert await store.write(record, token) is WriteResult.WRITTEN
            with anyio.fail_after(1):
                await ended.wait()


async def test_wait_finished_returns_the_final_record(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    record, token = await start_attempt(store, "a", JobState.RUNNING)
    spy = SpyEvents(events)

    async def finish() -> None:
        await spy.waiting.wait()
        record.state, record.result_json = JobState.SUCCEEDED, '"ok"'
        assert await store.write(record, token) is WriteResult.WRITTEN

    async with listening(spy) as tg:
        tg.start_soon(finish)
        started = anyio.current_time()
        with anyio.fail_after(5):
            final = await wait_finished(store, spy, "a", deadline=started + 60)
    assert final is not None
    assert (final.state, final.result_json) == (JobState.SUCCEEDED, '"ok"')
    assert anyio.current_time() - started < 1  # woken by the write, not by a re-read


async def test_wait_finished_returns_the_latest_record_at_the_deadline(stores: Stores) -> None:
    store, events = stores.store, stores.events
    await store.submit(job("a"), bound=10)
    await start_attempt(store, "a", JobState.DISPATCHED)
    async with listening(events):
        started = anyio.current_time()
        with anyio.fail_after(5):
            latest = await wait_finished(store, events, "a", deadline=started + 0.3)
            assert await wait_finished(store, events, "ghost", deadline=started + 60) is None
    assert anyio.current_time() - started >= 0.3
    assert latest is not None
    assert latest.state is JobState.DISPATCHED


# --- junk in the store ----------------------------------------------------------------------------


def found(store: JobStore, kind: BadDataKind) -> int:
    """Distinct bad items of `kind` the store has said (each once)."""
    bad = store.bad_data  # type: ignore[attr-defined]  # both twins have one
    return int(bad.statistics().found[kind.value])


JUNK_RECORDS = {
    "not-json": b"not json {",
    "not-an-object": b"[1, 2]",
    "no-job-type": b'{"job_id": "j1"}',
    "a-worker-state": encode_job(job("j1")).replace(b'"PENDING"', b'"QUEUED"'),
    "past-year-9999": encode_job(msgspec.structs.replace(job("j1"), deadline_at=1e308)),
    "negative-token": encode_job(job("j1", fencing_token=-1)),
    "another-job-s": encode_job(job("other")),
}


@pytest.mark.parametrize("raw", JUNK_RECORDS.values(), ids=JUNK_RECORDS.keys())
async def test_a_record_that_does_not_read_is_corrupt_and_said_once(
    stores: Stores, raw: bytes
) -> None:
    store = stores.store
    await store.submit(job("ok"), bound=10)
    await stores.plant(store, "j1", "", raw)
    with pytest.raises(CorruptRecord) as caught:
        await store.get("j1")
    assert caught.value.kind is BadDataKind.JOB_RECORD
    assert str(caught.value).startswith("job j1: record unreadable: ")
    assert "\n" not in str(caught.value)
    # every way in says the same, and the item is said (and counted) once
    with pytest.raises(CorruptRecord):
        await store.submit(job("j1"), bound=10)
    with pytest.raises(CorruptRecord):
        await store.request_cancel("j1", error="x", now=1.0)
    assert found(store, BadDataKind.JOB_RECORD) == 1
    assert await store.cancel_requested("j1") is False
    # other jobs go on
    assert (await get(store, "ok")).state is JobState.PENDING
    assert (await store.submit(job("ok2"), bound=10))[0] is SubmitResult.CREATED


async def test_a_write_over_a_record_that_is_not_json_is_refused(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("j1"), bound=10)
    record, token = await start_attempt(store, "j1", JobState.RUNNING)
    await stores.plant(store, "j1", "", b"\xff junk")
    record.state = JobState.SUCCEEDED
    with pytest.raises(CorruptRecord) as caught:
        await store.write(record, token)
    assert caught.value.kind is BadDataKind.JOB_RECORD
    assert await store.queued_count("echo") == 1  # nothing was counted down


async def test_a_fencing_token_that_is_not_an_integer_is_corrupt(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("j1"), bound=10)
    record = await get(store, "j1")
    await stores.plant(store, "j1", "fence", b"junk")
    for attempt in (store.fence("j1"), store.next_token("j1"), store.write(record, 0),
                    store.request_cancel("j1", error="x", now=1.0)):  # fmt: skip
        with pytest.raises(CorruptRecord) as caught:
            await attempt
        assert caught.value.kind is BadDataKind.FENCING_TOKEN
        assert str(caught.value) == "job j1: fencing token unreadable: b'junk' is not an integer"
    assert found(store, BadDataKind.FENCING_TOKEN) == 1
    assert await store.cancel_requested("j1") is False
    assert await get(store, "j1") == record


async def test_quarantine_ends_a_job_whose_fence_is_junk(stores: Stores) -> None:
    store = stores.store
    for job_id in ("j1", "j2"):
        await store.submit(job(job_id), bound=10)
    entries = dict((j, e) for e, j in await store.read_new("c1", count=10, block_ms=10))
    await stores.plant(store, "j1", "fence", b"1.5")
    with pytest.raises(CorruptRecord) as caught:
        await store.fence("j1")
    problem = caught.value
    assert await store.quarantine(entries["j1"], problem, now=1234.5)
    failed = await get(store, "j1")
    assert (failed.state, failed.finished_at) == (JobState.FAILED, 1234.5)
    assert failed.error == "quarantined: fencing token unreadable: b'1.5' is not an integer"
    assert await store.queued_count("echo") == 1  # no longer counted against the bound
    # the entry is gone from the queue; the other one is not
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == [(entries["j2"], "j2")]
    (quarantined,) = await store.quarantined()
    assert (quarantined.entry_id, quarantined.job_id, quarantined.kind, quarantined.reason) == (
        entries["j1"], "j1", "fencing_token", problem.problem
    )  # fmt: skip
    bad = store.bad_data.statistics()  # type: ignore[attr-defined]
    assert (bad.found["fencing_token"], bad.quarantined["fencing_token"]) == (1, 1)


async def test_quarantine_keeps_a_junk_record_for_the_retention(stores: Stores) -> None:
    store, _ = stores.with_retention(1)
    await store.ensure_group()
    await store.submit(job("j1"), bound=10)
    ((entry, _),) = await store.read_new("c1", count=10, block_ms=10)
    await stores.plant(store, "j1", "", b"{junk")
    with pytest.raises(CorruptRecord) as caught:
        await store.get("j1")
    assert await store.quarantine(entry, caught.value, now=1.0)
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == []
    assert [q.kind for q in await store.quarantined()] == ["job_record"]

    async def expired() -> bool:
        try:
            return await store.get("j1") is None
        except CorruptRecord:
            return False

    await eventually(expired)  # kept as it is for the retention, then the id is free again
    assert (await store.submit(job("j1"), bound=10))[0] is SubmitResult.CREATED


async def test_quarantine_does_nothing_to_an_item_mended_meanwhile(stores: Stores) -> None:
    store = stores.store
    await store.submit(job("j1"), bound=10)
    ((entry, _),) = await store.read_new("c1", count=10, block_ms=10)
    before = await get(store, "j1")
    await stores.plant(store, "j1", "fence", b"junk")
    with pytest.raises(CorruptRecord) as fence_problem:
        await store.fence("j1")
    await stores.plant(store, "j1", "fence", b"3")
    assert not await store.quarantine(entry, fence_problem.value, now=1.0)
    await stores.plant(store, "j1", "", b"junk")
    with pytest.raises(CorruptRecord) as record_problem:
        await store.get("j1")
    await stores.plant(store, "j1", "", encode_job(before))
    assert not await store.quarantine(entry, record_problem.value, now=1.0)
    assert await get(store, "j1") == before
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == [(entry, "j1")]
    assert await store.quarantined() == []


async def test_an_entry_whose_record_is_gone_can_be_quarantined(stores: Stores) -> None:
    store, _ = stores.with_retention(1)
    await store.ensure_group()
    await store.submit(job("j1"), bound=10)
    ((entry, _),) = await store.read_new("c1", count=10, block_ms=10)
    await store.request_cancel("j1", error="stop", now=1.0)

    async def expired() -> bool:
        return await store.get("j1") is None

    await eventually(expired)
    gone = CorruptRecord(BadDataKind.STREAM_ENTRY, "j1", f"queue entry {entry}", "no record")
    assert await store.quarantine(entry, gone, now=1.0)
    assert await store.claim_idle("c2", min_idle_ms=0, count=10) == []
    (quarantined,) = await store.quarantined()
    assert (quarantined.kind, quarantined.reason) == (
        "stream_entry",
        "queue entry unusable: no record",
    )


async def test_a_run_outcome_that_does_not_read_is_left_out_and_said_once(stores: Stores) -> None:
    store = stores.store
    done = RunOutcome(state=JobState.SUCCEEDED, result_json="1")
    assert await store.record_outcomes([("j1", 3, done)]) == [True]
    await stores.plant(store, "j1", "run:4", b"junk")
    await stores.plant(store, "j1", "run:5", b'{"state": "RUNNING"}')  # not a run's end
    for _ in range(3):
        assert await store.outcomes("j1", [3, 4, 5]) == {3: done}
    assert found(store, BadDataKind.RUN_OUTCOME) == 2


# --- the job index --------------------------------------------------------------------------------


async def walk(
    store: JobStore, *, count: int, since: float = -math.inf, until: float = math.inf
) -> list[tuple[float, str | None]]:
    """Every entry of the index, newest first, read `count` at a time as ListJobs walks it:
    (score, job id or None)."""
    seen: list[tuple[float, str | None]] = []
    position = None
    while True:
        page = await store.index_page(after=position, since=since, until=until, count=count)
        for entry in page:
            seen.append((entry.score, entry.job.job_id if entry.job else None))
            position = advance(position, entry.score)
        if len(page) < count:
            return seen


def at(job_id: str, submitted_at: float, **fields: Any) -> BatchJob:
    return BatchJob(job_id=job_id, job_type="echo", submitted_at=submitted_at,
                    deadline_at=submitted_at + 60, **fields)  # fmt: skip


async def test_each_job_created_is_indexed_once_by_its_submit_time(stores: Stores) -> None:
    store = stores.store
    for job_id, submitted_at in (("a", 1000.5), ("b", 1002.25), ("c", 1001.0)):
        assert (await store.submit(at(job_id, submitted_at), bound=3))[0] is SubmitResult.CREATED
    # a known id and a refused job add nothing
    assert (await store.submit(at("a", 2000.0), bound=3))[0] is SubmitResult.EXISTS
    assert (await store.submit(at("d", 3000.0), bound=3))[0] is SubmitResult.QUEUE_FULL
    page = await store.index_page(after=None, since=-math.inf, until=math.inf, count=10)
    assert [(e.score, e.job.job_id if e.job else None) for e in page] == [
        (1002.25, "b"), (1001.0, "c"), (1000.5, "a"),
    ]  # fmt: skip
    assert page[0].job == await get(store, "b")  # the record itself


async def test_the_index_is_walked_newest_first_in_pages_ties_included(stores: Stores) -> None:
    store = stores.store
    scores = {"t1": 5.0, "t2": 5.0, "t3": 5.0, "u": 6.0, "v": 4.0, "w": 5.5, "x": 3.0}
    for job_id, score in scores.items():
        await store.submit(at(job_id, score), bound=100)
    # ties come by id, descending, as Redis orders them; the same whatever the page size
    expected = [(6.0, "u"), (5.5, "w"), (5.0, "t3"), (5.0, "t2"), (5.0, "t1"), (4.0, "v"),
                (3.0, "x")]  # fmt: skip
    for count in (1, 2, 3, 10):
        assert await walk(store, count=count) == expected, count
    # since is included, until is not
    assert await walk(store, count=2, since=4.0, until=5.5) == expected[2:6]
    # a page that starts past a position at or above `until` starts at `until`
    past = IndexPosition(score=7.0, skip=1)
    page = await store.index_page(after=past, since=-math.inf, until=5.0, count=10)
    assert [e.score for e in page] == [4.0, 3.0]


async def test_an_expired_record_leaves_its_entry_until_the_trim(stores: Stores) -> None:
    store, _ = stores.with_retention(1)
    now = time.time()
    await store.submit(at("done", now - 10), bound=10)
    await store.submit(at("open", now - 9), bound=10)
    await store.submit(at("new", now), bound=10)
    record, token = await start_attempt(store, "done", JobState.RUNNING)
    await start_attempt(store, "open", JobState.RUNNING)
    record.state = JobState.SUCCEEDED
    assert await store.write(record, token) is WriteResult.WRITTEN
    await eventually(lambda: _gone(store, "done"))
    assert await walk(store, count=10) == [(now, "new"), (now - 9, "open"), (now - 10, None)]
    # the trim looks only before `before`, and drops only entries without a record: a job that
    # is still recorded stays listed, however old
    assert await store.trim_index(before=now - 1, count=10) == (2, 1)
    assert await walk(store, count=10) == [(now, "new"), (now - 9, "open")]
    assert await store.trim_index(before=now - 1, count=10) == (1, 0)
    # bounded: at most `count` entries looked at per call
    for i in range(5):
        await stores.plant_index(store, f"gone-{i}".encode(), now - 100 + i)
    assert await store.trim_index(before=now - 1, count=3) == (3, 3)
    assert await store.trim_index(before=now - 1, count=3) == (3, 2)
    assert await walk(store, count=10) == [(now, "new"), (now - 9, "open")]
    # past the entries kept: an old job still recorded does not hide the expired ones behind it
    await stores.plant_index(store, b"gone-behind", now - 5)
    assert await store.trim_index(before=now - 1, count=1) == (1, 0)  # "open"'s, kept
    assert await store.trim_index(before=now - 1, count=1, skip=1) == (1, 1)
    assert await walk(store, count=10) == [(now, "new"), (now - 9, "open")]


async def _gone(store: JobStore, job_id: str) -> bool:
    return await store.get(job_id) is None


async def test_junk_in_the_index_is_skipped_and_said_once(stores: Stores) -> None:
    store = stores.store
    await store.submit(at("ok", 10.0), bound=10)
    await stores.plant_index(store, b"\xff\xfe", 9.0)  # not UTF-8
    await stores.plant_index(store, b"x" * 300, 8.0)  # longer than an id may be
    await stores.plant_index(store, b"j1", 7.0)  # its record is junk
    await stores.plant(store, "j1", "", b"not json {")
    await stores.plant_index(store, b"never-submitted", 6.0)  # no record: gone, not junk
    for _ in range(2):  # said once, however often it is read
        assert await walk(store, count=2) == [
            (10.0, "ok"), (9.0, None), (8.0, None), (7.0, None), (6.0, None),
        ]  # fmt: skip
    assert found(store, BadDataKind.JOB_INDEX) == 2
    assert found(store, BadDataKind.JOB_RECORD) == 1
    # the trim drops junk members (they have no record) once they are old enough
    assert await store.trim_index(before=9.5, count=10) == (4, 3)
    assert await walk(store, count=10) == [(10.0, "ok"), (7.0, None)]


async def test_an_index_that_is_not_a_sorted_set_stops_listing_not_submits(
    stores: Stores,
) -> None:
    store = stores.store
    await store.submit(at("before", 1.0), bound=10)
    await stores.spoil_index()
    with pytest.raises(CorruptIndex) as caught:
        await store.index_page(after=None, since=-math.inf, until=math.inf, count=10)
    assert "not a sorted set" in str(caught.value)
    assert (await store.submit(at("after", 2.0), bound=10))[0] is SubmitResult.CREATED
    assert (await get(store, "after")).job_type == "echo"
    assert await store.trim_index(before=100.0, count=10) == (0, 0)
    assert found(store, BadDataKind.JOB_INDEX) == 1  # said once, met three times
