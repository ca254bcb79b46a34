"""RedisJobEvents against a real redis-server: a process hears the changes of the jobs it waits
on and every cancel request, and nothing else, however many processes share the Redis (the
per-job cost of the events stays flat as orchestrators are added; issue 12, point 5)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
import redis
import redis.asyncio as aioredis

from app.fleet.batch_job import AttemptRecord, BatchJob
from app.fleet.job_state import JobState
from app.stores.abc import WriteResult
from app.stores.redis.job_events import RedisJobEvents
from app.stores.redis.job_store import RedisJobStore
from tests.helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client runs on asyncio only


async def dispatched(store: RedisJobStore, job_id: str) -> tuple[BatchJob, int]:
    """A job submitted and written DISPATCHED under its first token."""
    now = time.time()
    job = BatchJob(job_id=job_id, job_type="echo", submitted_at=now, deadline_at=now + 60)
    await store.submit(job, bound=100)
    job.state = JobState.DISPATCHED
    job.attempts.append(AttemptRecord(number=1, worker="w:1", fencing_token=1, started_at=now))
    assert await store.write(job, 0, advance=True) is WriteResult.WRITTEN
    return job, 1


@asynccontextmanager
async def listening(client: aioredis.Redis) -> AsyncIterator[RedisJobEvents]:
    """A process's `RedisJobEvents` on `client`, listening (ready) while inside."""
    events = RedisJobEvents(client)
    async with anyio.create_task_group() as tg:
        await tg.start(events.run)
        yield events
        tg.cancel_scope.cancel()


async def a_change_arrives(
    events: RedisJobEvents, store: RedisJobStore, job: BatchJob, token: int
) -> None:
    """Write the job RUNNING; its waiter here is woken (inside `events.subscribed`)."""
    with events.watching(job.job_id) as changed:
        job.state = JobState.RUNNING
        assert await store.write(job, token) is WriteResult.WRITTEN
        with anyio.fail_after(5):
            await changed.wait()


async def test_a_process_hears_the_jobs_it_waits_on_and_every_cancel_only(
    async_redis: aioredis.Redis,
) -> None:
    store = RedisJobStore(async_redis)
    async with listening(async_redis) as waiting, listening(async_redis) as other:
        # two orchestrators
        a, token_a = await dispatched(store, "a")
        b, token_b = await dispatched(store, "b")
        async with waiting.subscribed("a"):
            assert waiting.statistics().subscribed_jobs == 1
            with waiting.watching("a") as changed:
                a.state = JobState.RUNNING
                assert await store.write(a, token_a) is WriteResult.WRITTEN
                b.state = JobState.RUNNING  # a job nobody here waits on
                assert await store.write(b, token_b) is WriteResult.WRITTEN
                with anyio.fail_after(5):
                    await changed.wait()
            # a cancel request reaches every process, subscribed to the job or not
            with other.watching_cancel("b") as asked:
                await store.request_cancel("b", error="stop", now=time.time())
                with anyio.fail_after(5):
                    await asked.wait()
        assert waiting.statistics().subscribed_jobs == 0
        # the write of "a" (and its cancel's and b's events nowhere): "a"'s change, b's cancel
        await eventually(lambda: waiting.messages == 2)
        assert other.messages == 1  # the cancel alone: no job's writes
        # left (unsubscribed in the background, Redis confirming it): a's later writes reach
        # nobody
        await eventually(lambda: waiting.statistics().channels_at_redis == 1)  # the cancels'
        a.state = JobState.SUCCEEDED
        assert await store.write(a, token_a) is WriteResult.WRITTEN
        await dispatched(store, "c")
        with other.watching_cancel("c") as asked:  # a marker that both hear, after a's write
            await store.request_cancel("c", error="stop", now=time.time())
            with anyio.fail_after(5):
                await asked.wait()
        await eventually(lambda: waiting.messages == 3)
        assert (waiting.messages, other.messages) == (3, 2)


async def test_waiters_on_one_job_share_its_subscription(async_redis: aioredis.Redis) -> None:
    client = async_redis
    store = RedisJobStore(client)
    async with listening(client) as events:
        job, token = await dispatched(store, "a")
        async with events.subscribed("a"), events.subscribed("a"):
            assert events.statistics().subscribed_jobs == 1
            channels = await client.pubsub_channels("wpm-job-events:*")
            assert channels == [b"wpm-job-events:a"]
        await eventually(lambda: events.statistics().subscribed_jobs == 0)

        async def gone() -> bool:
            return await client.pubsub_channels("wpm-job-events:*") == []

        await eventually(gone)
        # subscribed again at once after the last left: the changes arrive again
        async with events.subscribed("a"):
            await a_change_arrives(events, store, job, token)


async def test_subscriptions_come_back_after_a_reconnect(
    async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    client = async_redis
    store = RedisJobStore(client)
    async with listening(client) as events:
        job, token = await dispatched(store, "a")
        async with events.subscribed("a"):
            redis_client.client_kill_filter(_type="pubsub")  # the listener's connection breaks

            async def back() -> bool:
                channels = set(await client.pubsub_channels())
                return channels == {b"wpm-job-events:a", b"wpm-job-cancels"}

            await eventually(back, within=10)
            # redis-py may put the channels back on its own first, and the listener then makes
            # its connection again (a write meanwhile reaches nobody; waiters re-read): once it
            # settles, every change arrives
            with anyio.fail_after(15):
                while True:
                    with events.watching(job.job_id) as changed:
                        job.state = JobState.RUNNING
                        assert await store.write(job, token) is WriteResult.WRITTEN
                        with anyio.move_on_after(1):
                            await changed.wait()
                    if changed.is_set():
                        break
            await a_change_arrives(events, store, job, token)  # and the next one at once


async def test_the_waits_of_one_turn_share_one_subscribe_and_one_unsubscribe(
    async_redis: aioredis.Redis,
) -> None:
    """Under load, waits begin and end by the dozen per loop turn: each SUBSCRIBE and
    UNSUBSCRIBE is a write (and a wake-up of Redis) of its own, so they go together. A wait
    that begins again on a channel not yet left is confirmed at once."""
    async with listening(async_redis) as events:
        before = events.requests
        entered = 0
        leave = anyio.Event()

        async def wait_on(job_id: str) -> None:
            nonlocal entered
            async with events.subscribed(job_id):
                entered += 1
                await leave.wait()

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(wait_on, f"j{n}")
            await eventually(lambda: entered == 20)
            assert events.statistics().channels_at_redis == 21  # and the cancels' channel
            assert events.requests - before == 1
            leave.set()
        await eventually(lambda: events.statistics().channels_at_redis == 1)
        assert events.requests - before == 2
        with anyio.fail_after(1):  # well within the confirmation's wait (CONFIRM_SECONDS)
            async with events.subscribed("j0"), events.subscribed("j0"):
                pass
            async with events.subscribed("j0"):  # left, its UNSUBSCRIBE not sent yet
                pass
